"""Peak memory of the driver and every process it started (local Ray workers included)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class MemoryPeaks:
    """Peaks in bytes over the sampled period.

    Attributes:
        driver_rss: peak RSS of this process.
        max_child_rss: peak RSS of any single descendant process (e.g. one Ray worker).
        total_rss: peak of the summed RSS of this process and all descendants. Shared pages
            (Ray's object store is shared memory) count once per process that maps them, so this
            overstates real use; it is an upper bound.
    """

    driver_rss: int
    max_child_rss: int
    total_rss: int


class MemorySampler:
    """Samples RSS of this process tree every `interval_s` in a daemon thread.

    Use as a context manager; `peaks` is valid after exit.
    """

    def __init__(self, *, interval_s: float = 0.25):
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tessera-memory", daemon=True)
        self._driver = self._child = self._total = 0
        self.peaks: MemoryPeaks | None = None

    def _sample(self) -> None:
        me = psutil.Process()
        driver = me.memory_info().rss
        total, child_max = driver, 0
        for child in me.children(recursive=True):
            try:
                rss = child.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += rss
            child_max = max(child_max, rss)
        self._driver = max(self._driver, driver)
        self._child = max(self._child, child_max)
        self._total = max(self._total, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> MemorySampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.peaks = MemoryPeaks(self._driver, self._child, self._total)
