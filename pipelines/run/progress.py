"""Progress of a job for people: a frozen snapshot, one stable text line, and its parser.

`run_job` reports a `JobProgress` as chunks come back and scenes finish (`on_progress`). The
`tessera run` command shows it as a live bar on a terminal, and as a `tessera progress: ...` line
every few seconds otherwise (a submitted job's log), which `tessera status JOB_ID` reads back from
the job's log. Pure: no Ray, no I/O.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

PROGRESS_PREFIX = "tessera progress:"


@dataclass(frozen=True)
class JobProgress:
    """Where a job stands.

    Attributes:
        chunks_done: chunks computed (written or skipped as nodata, or failed) in this run.
        chunks_total: chunks this run computes (chunks done in an earlier run are not counted).
        scenes_total: scenes of the job (inputs that matched nothing included, as failed).
        scenes_complete: scenes whose outputs are complete (merged, tables written).
        scenes_failed: scenes that failed (unreadable, refused, a chunk failed).
        pixels_done: output pixels (voxels) of the chunk cores done in this run.
        elapsed_s: seconds since the chunk stream started (0 before it starts).
    """

    chunks_done: int
    chunks_total: int
    scenes_total: int
    scenes_complete: int
    scenes_failed: int
    pixels_done: int = 0
    elapsed_s: float = 0.0

    @property
    def scenes_running(self) -> int:
        return self.scenes_total - self.scenes_complete - self.scenes_failed

    @property
    def mpx_per_s(self) -> float:
        """Output megapixels (megavoxels) per second of the chunk stream; 0 before it starts."""
        return self.pixels_done / 1e6 / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds until the last chunk at the rate so far (chunks left x seconds per chunk);
        None before the first chunk. Scene merges after the last chunk are not included."""
        if self.chunks_done <= 0 or self.elapsed_s <= 0:
            return None
        return (self.chunks_total - self.chunks_done) * self.elapsed_s / self.chunks_done


def format_duration(seconds: float | None) -> str:
    """``h:mm:ss`` (``-`` when unknown)."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_progress(p: JobProgress) -> str:
    """One line, stable for `parse_progress`:

    ``tessera progress: chunks 120/256 (46.9 %), scenes 1 complete, 0 failed, 2 running of 3,
    5.20 Mpx/s, ETA 0:01:23``
    """
    pct = 100.0 * p.chunks_done / p.chunks_total if p.chunks_total else 100.0
    return (f"{PROGRESS_PREFIX} chunks {p.chunks_done}/{p.chunks_total} ({pct:.1f} %), "
            f"scenes {p.scenes_complete} complete, {p.scenes_failed} failed, {p.scenes_running} running "
            f"of {p.scenes_total}, {p.mpx_per_s:.2f} Mpx/s, ETA {format_duration(p.eta_s)}")


_LINE = re.compile(
    re.escape(PROGRESS_PREFIX) + r" chunks (\d+)/(\d+) \([\d.]+ %\), scenes (\d+) complete, (\d+) failed, "
    r"(\d+) running of (\d+), ([\d.]+) Mpx/s, ETA (\S+)")


def parse_progress(text: str) -> dict[str, int | float | str] | None:
    """The last progress line in `text` (a job's log) as numbers, or None when it has none.

    Returns:
        ``{"chunks_done", "chunks_total", "scenes_complete", "scenes_failed", "scenes_running",
        "scenes_total", "mpx_per_s", "eta"}`` (eta as written, ``h:mm:ss`` or ``-``).
    """
    matches = list(_LINE.finditer(text))
    if not matches:
        return None
    g = matches[-1].groups()
    names = ("chunks_done", "chunks_total", "scenes_complete", "scenes_failed", "scenes_running", "scenes_total")
    return {**{n: int(v) for n, v in zip(names, g[:6])}, "mpx_per_s": float(g[6]), "eta": g[7]}


class ProgressLines:
    """An `on_progress` callback that emits a progress line at most every `interval_s` seconds
    (and whenever a scene completes or fails, and at the last chunk), for logs and pipes.

    Args:
        emit: where a line goes (e.g. a console's print).
        interval_s: least seconds between two lines about chunks alone.
        clock: monotonic seconds (time.monotonic).
    """

    def __init__(self, emit: Callable[[str], None], *, interval_s: float = 10.0,
                 clock: Callable[[], float] | None = None):
        self.emit, self.interval_s = emit, interval_s
        self.clock = clock or time.monotonic
        self._last_t: float | None = None
        self._last_state: tuple[int, int, int] | None = None
        self.last: JobProgress | None = None

    def __call__(self, p: JobProgress) -> None:
        self.last = p
        now = self.clock()
        state = (p.scenes_complete, p.scenes_failed, p.chunks_done)
        if state == self._last_state:
            return
        due = (self._last_t is None or now - self._last_t >= self.interval_s
               or self._last_state is None or state[:2] != self._last_state[:2]
               or p.chunks_done == p.chunks_total)
        if due:
            self._last_t, self._last_state = now, state
            self.emit(format_progress(p))
