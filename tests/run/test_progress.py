"""Progress records, the progress line and its parser, and when lines are emitted."""

from __future__ import annotations

import pytest

from pipelines.run.progress import JobProgress, ProgressLines, format_duration, format_progress, parse_progress


def test_rates_and_eta_by_hand():
    p = JobProgress(chunks_done=50, chunks_total=200, scenes_total=3, scenes_complete=1, scenes_failed=1,
                    pixels_done=50 * 1024 * 1024, elapsed_s=10.0)
    assert p.scenes_running == 1
    assert p.mpx_per_s == pytest.approx(50 * 1024 * 1024 / 1e6 / 10.0)
    assert p.eta_s == pytest.approx(150 * 10.0 / 50)  # chunks left x seconds per chunk
    assert JobProgress(0, 10, 1, 0, 0).eta_s is None and JobProgress(0, 10, 1, 0, 0).mpx_per_s == 0.0
    assert format_duration(3725.4) == "1:02:05" and format_duration(None) == "-"


def test_the_line_parses_back_and_the_last_one_wins():
    a = JobProgress(3, 8, 2, 0, 0, pixels_done=3 * 4096, elapsed_s=2.0)
    b = JobProgress(8, 8, 2, 1, 1, pixels_done=8 * 4096, elapsed_s=4.0)
    log = f"starting\n{format_progress(a)}\nscene x failed: ...\n{format_progress(b)}\n(table)\n"
    assert format_progress(b) == ("tessera progress: chunks 8/8 (100.0 %), scenes 1 complete, 1 failed, "
                                  "0 running of 2, 0.01 Mpx/s, ETA 0:00:00")
    assert parse_progress(log) == {"chunks_done": 8, "chunks_total": 8, "scenes_complete": 1, "scenes_failed": 1,
                                   "scenes_running": 0, "scenes_total": 2, "mpx_per_s": 0.01, "eta": "0:00:00"}
    assert parse_progress("no progress here") is None


def test_lines_come_every_interval_and_when_scenes_change():
    now = [0.0]
    lines: list[str] = []
    emit = ProgressLines(lines.append, interval_s=10.0, clock=lambda: now[0])
    emit(JobProgress(0, 4, 2, 0, 0))                 # first: always
    now[0] = 1.0
    emit(JobProgress(1, 4, 2, 0, 0, 10, 1.0))        # 1 s later: quiet
    now[0] = 11.0
    emit(JobProgress(2, 4, 2, 0, 0, 20, 11.0))       # interval passed
    now[0] = 12.0
    emit(JobProgress(3, 4, 2, 0, 1, 30, 12.0))       # a scene failed
    emit(JobProgress(4, 4, 2, 0, 1, 40, 12.5))       # the last chunk
    emit(JobProgress(4, 4, 2, 0, 1, 40, 12.5))       # nothing new: quiet
    emit(JobProgress(4, 4, 2, 1, 1, 40, 13.0))       # a scene completed
    assert [parse_progress(line)["chunks_done"] for line in lines] == [0, 2, 3, 4, 4]
    assert parse_progress(lines[-1])["scenes_complete"] == 1
