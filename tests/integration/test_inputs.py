"""Input policy through a whole job: a complex-valued scene fails alone with its reason unless
the job derives a real band, and then runs like any other scene."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.run.job import run_job
from tests.helpers import job_spec, oracle_checkpoint, read_classes, smooth_scene, write_geotiff

pytestmark = pytest.mark.usefixtures("ray_local")


def _slc(tmp_path):
    rng = np.random.default_rng(5)
    amplitude = smooth_scene((70, 90), bands=2, seed=4).astype(np.float64)
    phase = rng.uniform(-np.pi, np.pi, size=amplitude.shape)
    return write_geotiff(tmp_path / "slc.tif", (amplitude * np.exp(1j * phase)).astype(np.complex64), nodata=None)


def test_a_complex_scene_fails_alone_and_runs_when_a_real_band_is_asked_for(tmp_path):
    slc = _slc(tmp_path)
    optical = write_geotiff(tmp_path / "optical.tif", smooth_scene((70, 90), bands=2, seed=6), nodata=None)
    card = oracle_checkpoint(tmp_path / "model", bands=2)
    root = tmp_path / "out"
    result = run_job(job_spec([slc, optical], root, card), base_dir=tmp_path)
    status = {s.name: (s.status, s.error) for s in result.scenes}
    assert status["optical"] == ("complete", None)
    assert status["slc"][0] == "failed"
    assert status["slc"][1].startswith(f"{slc}: complex-valued bands (complex64")
    scenes = pq.read_table(root / "tables" / "scenes" / "slc.parquet").to_pylist()
    assert scenes[0]["status"] == "failed" and "complex_bands" in scenes[0]["error"]
    assert not (root / "slc.zarr").exists()  # nothing written for a refused scene

    spec = job_spec([slc], tmp_path / "out-db", card).model_copy(update={"complex_bands": "magnitude"})
    result = run_job(spec, base_dir=tmp_path)
    assert [s.status for s in result.scenes] == ["complete"]
    # the oracle on |z| equals the oracle on the amplitude written as a real scene
    amp = write_geotiff(tmp_path / "amp.tif", smooth_scene((70, 90), bands=2, seed=4).astype(np.float32), nodata=None)
    run_job(job_spec([amp], tmp_path / "out-amp", card), base_dir=tmp_path)
    np.testing.assert_array_equal(read_classes(tmp_path / "out-db", "slc"), read_classes(tmp_path / "out-amp", "amp"))
