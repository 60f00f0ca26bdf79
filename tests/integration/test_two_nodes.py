"""A worker node lost mid-job on a real two-node loopback Ray cluster with token authentication:
`ray start --head` plus `ray start --address` as a second node with its own CPUs, resources,
ports and temp dir, both on 127.0.0.1. Once some chunks are done and a predictor actor runs on
the second node, every process of that node (its raylet, agents and workers) is killed with
SIGKILL. The job completes on the head with the outputs of a clean single-node run, byte for
byte, and one chunk marker per planned chunk."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from tests.helpers import job_spec, oracle_checkpoint, read_classes, smooth_scene, store_digest, write_geotiff
from tests.integration.test_submit_cluster import _free_port

_DRIVER = """
import sys
from pathlib import Path
from pipelines.run.job import run_job
from pipelines.spec import load_job_spec
spec_path = Path(sys.argv[1])
address = sys.argv[2] or None
result = run_job(load_job_spec(spec_path), base_dir=spec_path.parent, ray_address=address,
                 on_chunk=lambda d, t: print("chunk", d, t, flush=True))
print("scenes", *[s.status for s in result.scenes], flush=True)
"""


def _ray_start(args: list[str], env: dict[str, str], temp_dir: str) -> subprocess.Popen:
    """`ray start --block` in its own session (so that its processes can be found and killed)."""
    return subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
         f"--temp-dir={temp_dir}", f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
         f"--metrics-export-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
         f"--dashboard-agent-grpc-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=temp_dir, start_new_session=True)


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """`proc` and every process below it (a `ray start --block`: the node's raylet, agents, workers)."""
    try:
        top = psutil.Process(proc.pid)
        return [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _kill_tree(processes: list[psutil.Process]) -> None:
    for p in processes:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def _actors_on(proc: subprocess.Popen) -> int:
    """Predictor actor processes running under this node's `ray start` (Ray names them
    `ray::FusedChunkActor...`)."""
    n = 0
    for p in _tree(proc):
        try:
            n += any("FusedChunkActor" in part for part in p.cmdline())
        except psutil.NoSuchProcess:
            pass
    return n


@dataclass
class TwoNodes:
    """A running two-node loopback cluster (`two_node_cluster`)."""

    address: str  # the GCS address, 127.0.0.1:<port>
    env: dict[str, str]  # an environment for a driver (token auth, no RAY_ADDRESS)
    head: subprocess.Popen  # the head's `ray start --block`
    node: subprocess.Popen  # the second node's
    temp_head: Path  # each node's Ray temp dir (sessions, logs, spilled objects)
    temp_node: Path


@contextlib.contextmanager
def two_node_cluster(*, head_env: dict[str, str] | None = None,
                     node_env: dict[str, str] | None = None) -> Iterator[TwoNodes]:
    """A head (2 CPUs) and a second node (2 CPUs, resource node2) on 127.0.0.1, token auth, each
    with its own temp dir and with `head_env` / `node_env` added to its own environment (its
    raylet's, which its workers inherit). Fast node-death detection (1 s health checks). Every
    process the two `ray start` started is gone afterwards, and both temp dirs."""
    token = secrets.token_hex(16)
    port = _free_port()
    temp_head = tempfile.mkdtemp(prefix="t2h", dir="/tmp")
    temp_node = tempfile.mkdtemp(prefix="t2n", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    head_environ = env | {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                          "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "1000",
                          **(head_env or {})}
    head = _ray_start(["--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                       f"--ray-client-server-port={_free_port()}"], head_environ, temp_head)
    address = f"127.0.0.1:{port}"
    node = None
    processes: list[psutil.Process] = []
    try:
        _wait_for_nodes(address, env, 1, head)
        node = _ray_start([f"--address={address}", "--num-cpus=2", '--resources={"node2": 1}'],
                          env | (node_env or {}), temp_node)
        _wait_for_nodes(address, env, 2, node)
        processes = _tree(head) + _tree(node)
        yield TwoNodes(address, env, head, node, Path(temp_head), Path(temp_node))
    finally:
        for proc in (node, head):
            if proc is not None and proc.poll() is None:
                processes += _tree(proc)
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
        _kill_tree([p for p in processes if p.is_running()])  # only what these two `ray start` started
        shutil.rmtree(temp_head, ignore_errors=True)
        shutil.rmtree(temp_node, ignore_errors=True)


@pytest.fixture
def two_nodes():
    """`two_node_cluster()`: yields (GCS address, environment for a driver, the second node's
    `ray start` process)."""
    with two_node_cluster() as cluster:
        yield cluster.address, cluster.env, cluster.node


def _wait_for_nodes(address: str, env: dict[str, str], n: int, proc: subprocess.Popen) -> None:
    """Until the cluster has `n` alive nodes (asked from a short-lived driver)."""
    ask = ("import ray; ray.init(address=%r, include_dashboard=False, log_to_driver=False); "
           "print(sum(1 for x in ray.nodes() if x['Alive']))" % address)
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited: {proc.stdout.read()[-3000:]}")
        out = subprocess.run([sys.executable, "-c", ask], env=env, capture_output=True, text=True, timeout=120)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster did not reach {n} nodes: {out.stdout[-2000:]} {out.stderr[-2000:]}")
        time.sleep(2)


@pytest.mark.slow
def test_a_worker_node_lost_mid_job_the_job_completes_on_the_head_with_identical_outputs(two_nodes, tmp_path):
    address, env, node = two_nodes
    scene = write_geotiff(tmp_path / "big.tif", smooth_scene((1024, 1024), seed=4))
    card = oracle_checkpoint(tmp_path / "m")

    def spec_file(root: Path) -> Path:
        spec = job_spec([scene], root, card).model_dump(mode="json", exclude_none=True)
        spec["resources"] |= {"actors": 2, "batch_size": 2}
        spec["output"]["shared_filesystem"] = True  # both nodes see this disk
        path = tmp_path / f"{root.name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path

    clean = tmp_path / "clean"  # a clean run on a local single-node Ray
    local_env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")} | {"RAY_ADDRESS": ""}
    subprocess.run([sys.executable, "-c", _DRIVER, str(spec_file(clean)), ""], check=True, capture_output=True,
                   env=local_env, timeout=600)

    lost = tmp_path / "lost"
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(spec_file(lost)), address], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    killed_at = None
    actors_on_node2 = 0
    for line in proc.stdout:
        lines.append(line)
        if killed_at is None and line.startswith("chunk "):
            _, done, total = line.split()
            actors_on_node2 = max(actors_on_node2, _actors_on(node))
            if int(done) >= int(total) // 5 and actors_on_node2:
                _kill_tree(_tree(node))  # the raylet, its agents and workers: the node is gone
                killed_at = (int(done), int(total))
    proc.wait(timeout=60)
    output = "".join(lines)
    assert proc.returncode == 0, output[-6000:]
    assert killed_at is not None, f"no predictor actor ran on the second node: {output[-3000:]}"
    done, total = killed_at
    assert actors_on_node2 >= 1 and done < total, killed_at
    assert "scenes complete" in output.splitlines(), output[-3000:]  # Ray's own log lines interleave
    np.testing.assert_array_equal(read_classes(lost, "big"), read_classes(clean, "big"))
    assert store_digest(lost) == store_digest(clean)  # every store chunk, byte for byte
    work = next((lost / "_work" / "big").iterdir())
    assert len(list(work.glob("c*.json"))) == total == 256
