"""Tests of workers.runtime: the environment of predictor processes."""

from __future__ import annotations

from workers.runtime import with_hugepage_tunable


def test_hugepage_tunable_added_to_empty_environment():
    assert with_hugepage_tunable({}) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def test_hugepage_tunable_keeps_other_tunables():
    env = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert with_hugepage_tunable(env) == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}


def test_explicit_hugetlb_setting_is_respected():
    env = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert with_hugepage_tunable(env) == env


def test_driver_modules_do_not_import_torch():
    # The driver (tessera run / bench / demo) plans, reads cards and collects results; only
    # the predictor actors need torch (about 0.5 GB per process with the CUDA wheel).
    import subprocess
    import sys

    code = ("import sys; import pipelines.cli, pipelines.job, pipelines.fused, pipelines.bench, pipelines.demo, "
            "workers.actors, workers.checkpoints, workers.registry, workers.tileplan; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
