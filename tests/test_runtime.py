"""Tests of workers.runtime: the environment of predictor processes."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from workers.runtime import MALLOC_TUNABLES, actor_env, process_env, with_malloc_tunables

ALL = ":".join(f"{k}={v}" for k, v in MALLOC_TUNABLES)


def test_malloc_tunables_added_to_empty_environment():
    assert with_malloc_tunables({}) == {"GLIBC_TUNABLES": ALL}
    assert "glibc.malloc.mmap_max=0" in ALL and "glibc.malloc.hugetlb=1" in ALL


def test_malloc_tunables_keep_other_tunables():
    env = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert with_malloc_tunables(env) == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{ALL}"}


def test_explicit_tunable_setting_is_respected():
    env = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    got = with_malloc_tunables(env)["GLIBC_TUNABLES"].split(":")
    assert got[0] == "glibc.malloc.hugetlb=0"
    assert "glibc.malloc.hugetlb=1" not in got and "glibc.malloc.mmap_max=0" in got


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc tunables")
def test_a_process_with_the_tunables_keeps_large_blocks_mapped():
    # With the tunables, a freed 64 MiB block stays in the heap and the next one reuses its
    # pages: (almost) no new page faults. Without them glibc mmaps and unmaps it each time:
    # 5 x 16384 faults of 4 KiB pages (THP is switched off in that child, in case the kernel
    # would otherwise back the block with huge pages: 512x fewer faults).
    code = ("import ctypes, resource, sys, numpy as np\n"
            "if sys.argv[1] == 'nothp':\n    ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE\n"
            "def faults():\n    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "a = np.ones(2**23); del a\n"
            "f0 = faults()\n"
            "for _ in range(5):\n    a = np.ones(2**23); del a\n"
            "print(faults() - f0)")
    tuned = subprocess.run([sys.executable, "-c", code, "thp"], env=with_malloc_tunables({}),
                           capture_output=True, text=True, check=True)
    plain = subprocess.run([sys.executable, "-c", code, "nothp"], env={"GLIBC_TUNABLES": ""},
                           capture_output=True, text=True, check=True)
    assert int(tuned.stdout) < 500 and int(plain.stdout) > 5 * 16384 * 0.9


def test_driver_modules_do_not_import_torch():
    # The driver (tessera run / bench / demo) plans, reads cards and collects results; only
    # the predictor actors need torch (about 0.5 GB per process with the CUDA wheel).
    code = ("import sys; import pipelines.cli, pipelines.run.job, pipelines.run.fused, pipelines.tools.demo, "
            "pipelines.tools.bench.run, pipelines.tools.bench.report, "
            "workers.actors, workers.checkpoints, workers.registry, workers.tileplan; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_local_ray_started_by_tessera_prestarts_no_idle_workers():
    # In its own process (the test session's Ray is already up): ensure_ray starts a local Ray
    # whose raylet starts no Python workers before anything asks for one.
    import subprocess
    import sys

    code = (
        "import time, psutil; from pipelines.run.cluster import ensure_ray; import ray\n"
        "ensure_ray(num_cpus=2); time.sleep(3)\n"
        "workers = [p for p in psutil.Process().children(recursive=True)\n"
        "           if ' '.join(p.cmdline()).startswith('ray::IDLE')]\n"
        "print('workers', len(workers)); ray.get(ray.remote(lambda: 1).remote()); ray.shutdown()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "workers 0" in out.stdout, out.stdout + out.stderr[-2000:]


def test_actor_env_is_empty_only_when_the_workers_inherit_what_is_wanted():
    wanted = {"GLIBC_TUNABLES": ALL}
    assert actor_env(wanted, {"GLIBC_TUNABLES": ALL}) == {}
    assert actor_env(wanted, {"GLIBC_TUNABLES": ""}) == wanted
    assert actor_env(wanted, {}) == wanted
    assert actor_env(wanted, None) == wanted  # unknown Ray: always give it
    assert actor_env({"GLIBC_TUNABLES": ""}, {}) == {}  # unset and empty are the same to glibc


def test_process_env_sets_and_restores(monkeypatch):
    monkeypatch.setenv("TESSERA_TEST_KEEP", "before")
    monkeypatch.delenv("TESSERA_TEST_NEW", raising=False)
    with process_env({"TESSERA_TEST_KEEP": "inside", "TESSERA_TEST_NEW": "x"}):
        assert os.environ["TESSERA_TEST_KEEP"] == "inside" and os.environ["TESSERA_TEST_NEW"] == "x"
    assert os.environ["TESSERA_TEST_KEEP"] == "before" and "TESSERA_TEST_NEW" not in os.environ


def test_a_local_ray_started_with_the_tunables_gives_them_to_actors_without_a_runtime_env():
    # In its own process (the test session's Ray is already up): ensure_ray starts a local Ray
    # whose workers inherit the malloc tunables; an actor that wants them needs no runtime env,
    # one that must not have them gets the driver's own (empty) GLIBC_TUNABLES; the driver
    # process itself keeps its environment.
    code = (
        "import os, ray; from pipelines.run.cluster import ensure_ray; from pipelines.run.job import _actor_remote_args\n"
        "from workers.runtime import with_malloc_tunables\n"
        "class Res:\n"
        "    def __init__(self, m): self.malloc_tuning = m\n"
        "ensure_ray(num_cpus=2, worker_env=with_malloc_tunables())\n"
        "print('driver', os.environ.get('GLIBC_TUNABLES'))\n"
        "@ray.remote(num_cpus=0)\n"
        "class Env:\n"
        "    def get(self): return os.environ.get('GLIBC_TUNABLES')\n"
        "for m in (True, False):\n"
        "    args = _actor_remote_args(Res(m))\n"
        "    print('args', m, args)\n"
        "    print('actor', m, repr(ray.get(Env.options(**args).remote().get.remote())))\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                         check=True, env=env)
    lines = out.stdout.splitlines()
    tunables = with_malloc_tunables({})["GLIBC_TUNABLES"]
    assert "driver None" in lines, out.stdout
    assert "args True {}" in lines, out.stdout
    assert f"actor True {tunables!r}" in lines, out.stdout
    assert "args False {'runtime_env': {'env_vars': {'GLIBC_TUNABLES': ''}}}" in lines, out.stdout
    assert "actor False ''" in lines, out.stdout


def test_with_ray_address_set_ensure_ray_connects_to_that_cluster(tmp_path):
    # RAY_ADDRESS names a running cluster (here a one-node `ray start --head --block`): ensure_ray
    # connects to it instead of starting a local Ray (it used to pass local-only options and
    # fail), and does not assume the cluster's workers have the tunables it would give a local
    # Ray of its own. Then a whole job runs on that cluster by address (inputs hashed in Ray
    # tasks there, actors with their own runtime environment) and completes.
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    # its own (short: unix socket paths) temp dir, so that its address file does not become the
    # machine's "current cluster" for other Ray clients after it stops
    temp_dir = tempfile.mkdtemp(prefix="tray", dir="/tmp")
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
         "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        code = (
            "import sys, ray; from pathlib import Path; from pipelines.run.cluster import ensure_ray, inherited_worker_env\n"
            "from workers.runtime import with_malloc_tunables\n"
            "ensure_ray(sys.argv[1] or None, worker_env=with_malloc_tunables())\n"
            "print('cpus', ray.cluster_resources().get('CPU'), 'inherited', inherited_worker_env())\n"
            "if sys.argv[1]:\n"
            "    from pipelines.run.job import run_job\n"
            "    from tests.helpers import job_spec, oracle_checkpoint, smooth_scene, write_geotiff\n"
            "    d = Path(sys.argv[2])\n"
            "    scene = write_geotiff(d / 'c.tif', smooth_scene((96, 160), seed=3))\n"
            "    result = run_job(job_spec([scene], d / 'out', oracle_checkpoint(d / 'm')), base_dir=d,\n"
            "                     ray_address=sys.argv[1])\n"
            "    print('job', [(s.status, s.n_todo) for s in result.scenes])\n"
        )
        address = f"127.0.0.1:{port}"
        # RAY_ADDRESS in the environment (as `tessera run` sees it), then --address (the argument)
        for argument, extra in (("", {"RAY_ADDRESS": address}), (address, {})):
            out = None
            for _ in range(60):  # the head takes a few seconds to come up
                out = subprocess.run([sys.executable, "-c", code, argument, str(tmp_path)], capture_output=True,
                                     text=True, timeout=180, env={**env, **extra})
                if out.returncode == 0 or head.poll() is not None:
                    break
                time.sleep(1)
            assert out is not None and out.returncode == 0, (out.stdout + out.stderr)[-3000:] if out else head.stdout
            assert "cpus 2.0 inherited None" in out.stdout, out.stdout
        assert "job [('complete', 6)]" in out.stdout, out.stdout
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ensure_ray_starts_a_local_ray_despite_a_stale_cluster_address_file(tmp_path):
    # `ray start` writes the machine's "current cluster" address to <temp dir>/ray_current_cluster
    # and a bare ray.init() joins it, rejecting the local-only options ensure_ray passes. With a
    # stale file (its cluster gone) in the temp dir, ensure_ray still starts its own local Ray.
    temp_dir = tempfile.mkdtemp(prefix="tray", dir="/tmp")
    try:
        Path(temp_dir, "ray").mkdir()
        Path(temp_dir, "ray", "ray_current_cluster").write_text("127.0.0.1:9\n")  # Ray reads $RAY_TMPDIR/ray/
        code = (
            "import ray; from pipelines.run.cluster import ensure_ray\n"
            "ensure_ray(num_cpus=1); print('cpus', ray.cluster_resources().get('CPU')); ray.shutdown()\n"
        )
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env={**env, "RAY_TMPDIR": temp_dir})
        assert out.returncode == 0 and "cpus 1.0" in out.stdout, (out.stdout + out.stderr)[-3000:]
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
