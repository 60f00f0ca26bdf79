"""Fixtures shared by the end-to-end job tests."""

from __future__ import annotations

import pytest

from pipelines.run.job import run_job
from tests.helpers import job_spec, oracle_checkpoint, smooth_scene, write_geotiff


@pytest.fixture(scope="module")
def oracle_run(tmp_path_factory):
    """One scene (odd size, nodata border, several chunks) through the pointwise oracle."""
    tmp = tmp_path_factory.mktemp("oracle")
    data = smooth_scene((150, 173), seed=1, nodata_border=20)
    scene = write_geotiff(tmp / "scene one.tif", data)
    card = oracle_checkpoint(tmp / "model")
    root = tmp / "out"
    result = run_job(job_spec([scene], root, card), base_dir=tmp)
    return data, scene, root, result
