"""Faults of an overnight run, each on a real local Ray: a hung chunk times out and is retried
or failed alone (fused and split stages); a predictor actor that Ray gives up on has its calls
handed to a fresh actor (split stages); a driver killed with SIGKILL mid-job is re-run and
resumes with byte-identical outputs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.run.job import run_job
from tests.helpers import (
    assert_same_tables,
    crash_count,
    crash_once_checkpoint,
    hang_checkpoint,
    job_spec,
    oracle_checkpoint,
    read_classes,
    settled_chunk_markers,
    smooth_scene,
    store_digest,
    write_geotiff,
)

pytestmark = pytest.mark.usefixtures("ray_local")


def _with(spec, **resources):
    return spec.model_copy(update={"resources": spec.resources.model_copy(update=resources)})


# per-chunk timeouts: a split block holds 8 chunks (a fused call 4), so the split jobs get less per chunk
_TIMEOUT_S = {"fused": 6.0, "split": 3.0}


@pytest.mark.parametrize("stages", ["fused", pytest.param("split", marks=pytest.mark.slow)])
def test_a_hung_chunk_times_out_its_actor_is_replaced_and_the_retry_changes_no_output(oracle_run, tmp_path,
                                                                                     monkeypatch, stages):
    # The model's first forward pass hangs for an hour. Past chunk_timeout_s the actor is killed
    # and replaced, the call's chunks are tried again one per call, and the job completes with
    # exactly the outputs of an undisturbed run, long before the hang would have ended.
    monkeypatch.setenv("TESSERA_ALLOW_PLUGINS", "tests.helpers")
    _, scene, root0, _ = oracle_run
    marker = tmp_path / "hung"
    root = tmp_path / "out"
    spec = _with(job_spec([scene], root, hang_checkpoint(tmp_path / "m", marker)),
                 chunk_timeout_s=_TIMEOUT_S[stages], stages=stages)
    t0 = time.perf_counter()
    result = run_job(spec, base_dir=tmp_path)
    assert marker.exists() and time.perf_counter() - t0 < 300
    assert [s.status for s in result.scenes] == ["complete"]
    np.testing.assert_array_equal(read_classes(root, "scene_one"), read_classes(root0, "scene_one"))


@pytest.mark.slow
@pytest.mark.parametrize("stages", ["fused", "split"])
def test_a_chunk_that_always_hangs_fails_its_scene_alone_with_the_reason(tmp_path, monkeypatch, stages):
    monkeypatch.setenv("TESSERA_ALLOW_PLUGINS", "tests.helpers")
    good = write_geotiff(tmp_path / "good.tif", smooth_scene((96, 96), seed=1))
    data = smooth_scene((96, 96), seed=2)
    data[0, 90, 90] = 65535  # normalised 18.5: the oracle hangs on the one window holding it (chunk 1, 1; halo 8)
    bad = write_geotiff(tmp_path / "bad.tif", data)
    marker = tmp_path / "first"
    marker.touch()  # no first-pass hang: only the sentinel chunk hangs
    root = tmp_path / "out"
    spec = _with(job_spec([good, bad], root, hang_checkpoint(tmp_path / "m", marker, hang_above=15.0)),
                 chunk_timeout_s=_TIMEOUT_S[stages], actors=2, stages=stages,
                 **({"cpus_per_actor": 0.5} if stages == "split" else {}))  # room for the split tasks on 2 CPUs
    result = run_job(spec, base_dir=tmp_path)
    status = {s.name: (s.status, s.error) for s in result.scenes}
    assert status["good"] == ("complete", None)
    assert status["bad"][0] == "failed"
    assert "bad.tif" in status["bad"][1] and "timed out twice" in status["bad"][1]
    assert "chunk [1, 1]" in status["bad"][1]  # the one chunk holding the sentinel pixel, found alone


def test_split_an_actor_ray_gave_up_on_is_replaced_and_its_calls_change_no_output(tmp_path, monkeypatch):
    # The model kills its process on every pass over the second block's sentinel pixel, twice:
    # Ray restarts the actor and retries its calls once, then gives up on it. The split stages
    # start a fresh actor and hand it the dead one's calls; the job completes with exactly the
    # outputs of an undisturbed run.
    monkeypatch.setenv("TESSERA_ALLOW_PLUGINS", "tests.helpers")
    data = smooth_scene((200, 200), seed=7)
    data[0, 195, 195] = 65535  # normalised 18.5, in the windows of chunk rows 2-3 only: the second block of 8
    scene = write_geotiff(tmp_path / "s.tif", data)
    clean = _with(job_spec([scene], tmp_path / "clean", oracle_checkpoint(tmp_path / "m0")), stages="split")
    assert [s.status for s in run_job(clean, base_dir=tmp_path).scenes] == ["complete"]
    marker = tmp_path / "crashed"
    root = tmp_path / "out"
    card = crash_once_checkpoint(tmp_path / "m", marker, times=2, crash_above=15.0)
    result = run_job(_with(job_spec([scene], root, card), stages="split"), base_dir=tmp_path)
    assert crash_count(marker) == 2  # died, restarted by Ray, died again: Ray gave up on it
    assert [(s.status, s.error) for s in result.scenes] == [("complete", None)]
    np.testing.assert_array_equal(read_classes(root, "s"), read_classes(tmp_path / "clean", "s"))


_DRIVER = """
import sys
from pathlib import Path
from pipelines.run.job import run_job
from pipelines.spec import load_job_spec
spec_path = Path(sys.argv[1])
run_job(load_job_spec(spec_path), base_dir=spec_path.parent, on_chunk=lambda d, t: print("chunk", d, t, flush=True))
"""


@pytest.mark.slow
def test_a_driver_killed_mid_job_resumes_recomputing_at_most_the_chunks_in_flight(tmp_path):
    import yaml

    scene = write_geotiff(tmp_path / "big.tif", smooth_scene((512, 512), seed=3))
    card = oracle_checkpoint(tmp_path / "m")

    def spec_file(root: Path) -> Path:
        spec = job_spec([scene], root, card).model_dump(mode="json", exclude_none=True)
        path = tmp_path / f"{root.name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path

    clean = tmp_path / "clean"
    subprocess.run([sys.executable, "-c", _DRIVER, str(spec_file(clean))], check=True, capture_output=True,
                   env=os.environ | {"RAY_ADDRESS": ""}, timeout=600)
    killed = tmp_path / "killed"
    path = spec_file(killed)
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(path)], stdout=subprocess.PIPE, text=True,
                            env=os.environ | {"RAY_ADDRESS": ""})
    for line in proc.stdout:  # kill the driver once a third of the chunks are done
        _, done, total = line.split()
        if int(done) >= int(total) // 3:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    # the killed driver's actor may still finish the chunks it holds before it notices and exits
    markers_before = settled_chunk_markers(killed, "big")
    total = 64
    assert 0 < len(markers_before) < total
    out = subprocess.run([sys.executable, "-c", _DRIVER, str(path)], check=True, capture_output=True, text=True,
                         env=os.environ | {"RAY_ADDRESS": ""}, timeout=600)
    recomputed = int(out.stdout.split()[-1])  # "chunk d t": t = chunks this run computed
    assert recomputed == total - len(markers_before)  # nothing with a marker is computed again
    assert store_digest(killed) == store_digest(clean)  # store bytes identical to a clean run
    assert_same_tables(killed, clean, "big")
