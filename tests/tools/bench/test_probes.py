"""pipelines.tools.bench.probes: the GPU sampler against a stand-in nvidia-smi."""

from __future__ import annotations

import os
import time

import pytest

from pipelines.tools.bench.probes import GpuSampler


def test_gpu_sampler_reads_memory_and_utilization_from_nvidia_smi(tmp_path, monkeypatch):
    # A stand-in nvidia-smi (two GPUs) on PATH: the sampler must sum memory over GPUs, keep the
    # peak above the baseline, and average utilization over GPUs and samples.
    calls = tmp_path / "calls"
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n"
        f"n=$(cat {calls} 2>/dev/null || echo 0); echo $((n + 1)) > {calls}\n"
        'if [ "$n" -eq 0 ]; then printf "100, 0\\n50, 0\\n"; else printf "1100, 90\\n550, 70\\n"; fi\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with GpuSampler(enabled=True, interval_s=0.01) as gpu:
        time.sleep(0.2)
    assert gpu.baseline_mib == 150.0
    assert gpu.peak_mib == 1650.0 and gpu.increase_mib == 1500.0
    assert gpu.busy == pytest.approx(0.80)


def test_gpu_sampler_without_nvidia_smi_reports_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with GpuSampler(enabled=True, interval_s=0.01) as gpu:
        pass
    assert gpu.enabled is False and gpu.busy is None and gpu.increase_mib is None
