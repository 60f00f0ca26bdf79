"""`tessera submit/status/logs/stop` against a real loopback Ray cluster with token authentication
(`ray start --head`, RAY_AUTH_MODE=token): the job runs on the cluster from the uploaded package
and tessera's shipped code, and the token never shows."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.run.status import read_root_status
from pipelines.run.submit import AuthToken, connect, job_status
from schemas.errors import ClusterError
from tests.helpers import (
    assert_same_tables,
    chunk_markers,
    oracle_checkpoint,
    settled_chunk_markers,
    smooth_scene,
    store_digest,
    write_geotiff,
)

runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def token_cluster():
    """A one-node Ray cluster started with `ray start --head` and token authentication; yields
    (dashboard address, token). Its own temp dir, stopped at the end."""
    token = secrets.token_hex(16)
    port, dashboard, agent = _free_port(), _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="tsub", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH", "RAY_AUTH_TOKEN_PATH")}
    # the job's `python` is this interpreter; tessera's code comes only from the submission
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={agent}", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=temp_dir)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                connect(address, AuthToken(token, "test"))
                break
            except ClusterError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"head did not come up: {head.stdout.read()[-3000:] if head.poll() is not None else ''}")
                time.sleep(2)
        # the job agent starts after the dashboard: wait until a trivial job runs
        jobs = connect(address, AuthToken(token, "test"))
        submitted: list[str] = []

        def warm() -> bool:
            if not submitted:
                submitted.append(jobs.client.submit_job(entrypoint="true"))
            return jobs.client.get_job_status(submitted[0]).value == "SUCCEEDED"

        _wait_until(warm, timeout_s=120)
        yield address, token
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_until(ready, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if ready():
                return
        except (RuntimeError, OSError):  # the agent not up yet; requests' errors are OSErrors
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise TimeoutError("the cluster's job agent did not run a job")
        time.sleep(2)


def _wait(address: str, token: str, job_id: str, *, until, timeout_s: float = 300):
    jobs = connect(address, AuthToken(token, "test"))
    deadline = time.monotonic() + timeout_s
    while True:
        info = job_status(jobs, job_id)
        if until(info) or time.monotonic() > deadline:
            return info
        time.sleep(2)


def _job_folder(tmp: Path, *, size: tuple[int, int], chunk: int, root: Path) -> Path:
    write_geotiff(tmp / "scenes" / "a.tif", smooth_scene(size, seed=5))
    oracle_checkpoint(tmp / "models", name="oracle")
    (tmp / "job.yaml").write_text(
        "name: submitted\ninputs: ['scenes/*.tif']\nmodel: {card: models/oracle.json}\n"
        f"tiling: {{chunk_size: {chunk}, halo: 4, tile_size: 32}}\nresources: {{actors: 1, torch_threads: 1}}\n"
        f"output: {{root: {root}}}\n")
    return tmp / "job.yaml"


@pytest.mark.slow
def test_submit_runs_the_job_on_the_cluster_and_status_logs_stop_follow_it(token_cluster, tmp_path):
    address, token = token_cluster
    (tmp_path / "scenes").mkdir()
    root = tmp_path / "out"
    spec = _job_folder(tmp_path, size=(96, 160), chunk=64, root=root)

    sub = runner.invoke(app, ["submit", str(spec), "--address", address], env={"RAY_AUTH_TOKEN": token})
    assert sub.exit_code == 0, sub.output
    job_id = sub.stdout.strip().splitlines()[-1]
    assert job_id.startswith("raysubmit_") and token not in sub.output

    info = _wait(address, token, job_id, until=lambda i: i.finished)
    assert info.status == "SUCCEEDED", (info.message, runner.invoke(
        app, ["logs", job_id, "--address", address], env={"RAY_AUTH_TOKEN": token}).output[-4000:])
    assert info.output_root == str(root)
    assert [(s.name, s.status, s.chunks_done, s.chunks_total) for s in read_root_status(root)] == [
        ("a", "complete", 6, 6)]
    assert info.progress is not None and (info.progress["chunks_done"], info.progress["scenes_complete"]) == (6, 1)

    shown = runner.invoke(app, ["status", job_id, "--address", address], env={"RAY_AUTH_TOKEN": token})
    assert shown.exit_code == 0, shown.output
    assert f"job {job_id}: SUCCEEDED" in shown.output and "chunks 6/6, scenes 1 complete" in shown.output
    assert "chunks 6/6" in shown.output.split("outputs:")[1]  # the root's table, read here
    logs = runner.invoke(app, ["logs", job_id, "--address", address], env={"RAY_AUTH_TOKEN": token})
    assert logs.exit_code == 0 and "tessera progress: chunks 6/6" in logs.stdout and "complete" in logs.stdout
    followed = runner.invoke(app, ["logs", job_id, "--follow", "--address", address], env={"RAY_AUTH_TOKEN": token})
    assert followed.exit_code == 0 and "tessera progress: chunks 6/6" in followed.stdout

    # the token is in no output, log, output file, or the job's recorded runtime environment
    for text in (shown.output, logs.output, followed.output):
        assert token not in text
    assert not [p for p in root.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    recorded = connect(address, AuthToken(token, "test")).client.get_job_info(job_id)
    assert token not in repr(recorded.runtime_env) and token not in repr(recorded.metadata)

    # a wrong token is refused, clearly, without printing either token
    wrong = "wrong-" + secrets.token_hex(8)
    bad = runner.invoke(app, ["status", job_id, "--address", address], env={"RAY_AUTH_TOKEN": wrong})
    assert bad.exit_code == 2
    assert "refused the token from RAY_AUTH_TOKEN (HTTP 403)" in " ".join(bad.output.split()), bad.output
    assert wrong not in bad.output and token not in bad.output
    unknown = runner.invoke(app, ["status", "raysubmit_nope", "--address", address], env={"RAY_AUTH_TOKEN": token})
    assert unknown.exit_code == 2 and "no job 'raysubmit_nope'" in " ".join(unknown.output.split())

    # stop: a job of many chunks, stopped while it runs, leaves a partial scene that can resume
    big = tmp_path / "big"
    (big / "scenes").mkdir(parents=True)
    big_root = tmp_path / "big-out"
    sub = runner.invoke(app, ["submit", str(_job_folder(big, size=(512, 512), chunk=16, root=big_root)),
                              "--address", address], env={"RAY_AUTH_TOKEN": token})
    assert sub.exit_code == 0, sub.output
    big_id = sub.stdout.strip().splitlines()[-1]
    running = _wait(address, token, big_id, until=lambda i: i.finished or (i.progress or {}).get("chunks_done", 0) > 0)
    assert running.status == "RUNNING", running
    stopped = runner.invoke(app, ["stop", big_id, "--address", address], env={"RAY_AUTH_TOKEN": token})
    assert stopped.exit_code == 0 and "stop requested" in stopped.output
    final = _wait(address, token, big_id, until=lambda i: i.finished, timeout_s=120)
    assert final.status == "STOPPED"
    (scene,) = read_root_status(big_root)
    assert scene.status == "partial" and 0 < scene.chunks_done < scene.chunks_total == 1024


def _submit(spec: Path, address: str, token: str) -> str:
    sub = runner.invoke(app, ["submit", str(spec), "--address", address], env={"RAY_AUTH_TOKEN": token})
    assert sub.exit_code == 0, sub.output
    return sub.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_submitted_job_whose_driver_is_killed_resumes_when_submitted_again(token_cluster, tmp_path):
    # An overnight job's driver dies (SIGKILL: an OOM kill, a lost head process), not a clean
    # stop. Ray reports the job FAILED; submitting the same spec again resumes it: only chunks
    # without a marker are computed, and the outputs equal those of an uninterrupted job.
    address, token = token_cluster
    jobs = connect(address, AuthToken(token, "test"))
    size, chunk = 256, 16
    total = (size // chunk) ** 2
    root, clean_root = tmp_path / "out", tmp_path / "clean-out"
    (tmp_path / "scenes").mkdir()
    spec = _job_folder(tmp_path, size=(size, size), chunk=chunk, root=root)
    clean_spec = tmp_path / "clean.yaml"
    clean_spec.write_text(spec.read_text().replace(str(root), str(clean_root)))

    first = _submit(spec, address, token)
    pid = None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # kill the driver once a quarter of the chunks have a marker
        if pid is None:
            info = jobs.client.get_job_info(first)
            assert str(info.status.value) in ("PENDING", "RUNNING"), (info.status, info.message)
            pid = int(info.driver_info.pid) if info.driver_info is not None else None
        if pid is not None and len(chunk_markers(root, "a")) >= total // 4:
            break
        time.sleep(0.05 if pid is not None else 0.5)
    assert pid is not None and "pipelines.cli" in psutil.Process(pid).cmdline()  # the job's `tessera run`
    at_kill = len(chunk_markers(root, "a"))
    os.kill(pid, signal.SIGKILL)
    t_kill = time.time_ns()
    assert 0 < at_kill < total, at_kill

    killed = _wait(address, token, first, until=lambda i: i.finished, timeout_s=120)
    assert killed.status == "FAILED", killed
    t_failed = time.time_ns()
    before = settled_chunk_markers(root, "a", quiet_s=2.0)  # the dead driver's actor is gone with it
    assert at_kill <= len(before) < total
    (scene,) = read_root_status(root)
    assert (scene.status, scene.chunks_done, scene.chunks_total) == ("partial", len(before), total)

    again = _submit(spec, address, token)  # the same spec, as it was submitted the first time
    resumed = _wait(address, token, again, until=lambda i: i.finished, timeout_s=240)
    assert resumed.status == "SUCCEEDED", (resumed.message, runner.invoke(
        app, ["logs", again, "--address", address], env={"RAY_AUTH_TOKEN": token}).output[-4000:])
    recomputed = resumed.progress["chunks_total"]  # chunks the re-submitted job computed
    assert recomputed == total - len(before) <= total - at_kill  # at most the chunks in flight at the kill
    after = chunk_markers(root, "a")
    assert len(after) == total and {k: after[k] for k in before} == before  # no marked chunk was redone
    assert [(s.name, s.status, s.chunks_done) for s in read_root_status(root)] == [("a", "complete", total)]
    row = pq.read_table(root / "tables" / "scenes" / "a.parquet").to_pylist()[0]
    assert (row["n_chunks"], row["n_chunks_computed"]) == (total, recomputed)

    clean = _wait(address, token, _submit(clean_spec, address, token), until=lambda i: i.finished, timeout_s=240)
    assert clean.status == "SUCCEEDED", clean.message
    digest = store_digest(root)
    assert digest and digest == store_digest(clean_root)  # the stores' bytes, chunk file by chunk file
    assert_same_tables(root, clean_root, "a")
    print(f"resubmit: {total} chunks, {at_kill} marked at the kill, {len(before)} before re-submission "
          f"(the last {(max(before.values()) - t_kill) / 1e9:.2f} s after the kill; FAILED after "
          f"{(t_failed - t_kill) / 1e9:.1f} s), {recomputed} recomputed; {len(digest)} store files "
          f"({sum((root / rel).stat().st_size for rel in digest)} bytes) equal a clean run's")
