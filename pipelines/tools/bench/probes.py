"""Facts about this machine and its GPUs while the benchmark runs (no torch at import).

:class:`GpuSampler` samples nvidia-smi during the job; :func:`machine_facts` and :func:`cpu_name`
describe the machine for the result JSON; :func:`probe_device` asks torch which device the
benchmark gets, in a child process (:mod:`pipelines.tools.bench.children`). The memory of the
driver and its Ray processes is sampled by :class:`pipelines.tools.monitor.MemorySampler`.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any


class GpuSampler:
    """Peak `memory.used` (MiB, summed over GPUs) and mean `utilization.gpu` from nvidia-smi,
    sampled in a daemon thread.

    GPU memory and work of the job live in Ray actors, where the driver cannot ask torch;
    nvidia-smi sees every process. `utilization.gpu` is the share of the sample period in which
    a kernel ran (NVML), so `busy` is the fraction of the job's wall time the GPUs computed.
    `peak_mib`/`baseline_mib`/`busy` are None when disabled or nvidia-smi is unavailable.
    """

    QUERY = ("nvidia-smi", "--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader,nounits")

    def __init__(self, *, enabled: bool, interval_s: float = 0.5):
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.interval_s = interval_s
        self.baseline_mib: float | None = None
        self.peak_mib: float | None = None
        self.utilization: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tessera-gpu-sampler", daemon=True)

    @classmethod
    def _query(cls) -> tuple[float, float] | None:
        """(memory used MiB summed over GPUs, mean utilization % over GPUs), or None."""
        try:
            out = subprocess.run(cls.QUERY, capture_output=True, text=True, timeout=10, check=True).stdout
            rows = [[float(v) for v in line.split(",")] for line in out.splitlines() if line.strip()]
            if not rows or any(len(r) != 2 for r in rows):
                return None
            return sum(r[0] for r in rows), sum(r[1] for r in rows) / len(rows)
        except (OSError, subprocess.SubprocessError, ValueError):
            return None

    def _sample(self, *, busy: bool = True) -> None:
        got = self._query()
        if got is None:
            return
        used, util = got
        self.peak_mib = used if self.peak_mib is None else max(self.peak_mib, used)
        if busy:
            self.utilization.append(util)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> GpuSampler:
        if self.enabled:
            got = self._query()
            self.baseline_mib = got[0] if got else None
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join()
            self._sample(busy=False)

    @property
    def increase_mib(self) -> float | None:
        """Peak minus the use before the job started (what the job added)."""
        if self.peak_mib is None or self.baseline_mib is None:
            return None
        return self.peak_mib - self.baseline_mib

    @property
    def busy(self) -> float | None:
        """Mean GPU utilization during the job, 0..1 (None without samples)."""
        if not self.utilization:
            return None
        return sum(self.utilization) / len(self.utilization) / 100.0



def probe_device(*, device: str) -> dict[str, Any]:
    """{"type": "cpu" | "cuda", "count": CUDA devices} (run in a child: the benchmark's own
    process, which is the job's driver, stays without torch, like `tessera run`)."""
    import torch

    from workers.predictor import resolve_device

    dev = resolve_device(device)
    return {"type": dev.type, "count": torch.cuda.device_count() if dev.type == "cuda" else 0}



def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (else what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()



def machine_facts(device: str) -> dict[str, Any]:
    """Versions and sizes of this machine (no CUDA context is created here)."""
    from importlib.metadata import PackageNotFoundError, version

    import psutil
    import ray

    try:
        monai_version = version("monai")
    except PackageNotFoundError:
        monai_version = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu": cpu_name(),
        "memory_gib": psutil.virtual_memory().total / 2**30,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": version("torch"),
        "ray": ray.__version__,
        "monai": monai_version,
        "device": device,
    }


