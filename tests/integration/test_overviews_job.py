"""A 2D scene through the real job on a local Ray: the complete store has its overview levels
and a quicklook, and re-running the finished job leaves both untouched."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from PIL import Image

from pipelines.plan.pyramid import mode_downsample
from pipelines.run.job import run_job
from schemas import store as layout
from tests.helpers import job_spec, oracle_checkpoint, read_classes

pytestmark = pytest.mark.usefixtures("ray_local")


def test_a_finished_scene_has_levels_and_a_quicklook_and_a_rerun_keeps_them(oracle_run, tmp_path):
    _, scene, root, result = oracle_run
    assert [s.status for s in result.scenes] == ["complete"]
    path = root / "scene_one.zarr"
    group = zarr.open_group(str(path), mode="r")
    attrs = group.attrs.asdict()
    assert attrs[layout.TESSERA_ATTR][layout.KEY_STATUS] == layout.STORE_STATUS_COMPLETE
    classes = read_classes(root, "scene_one")  # 150 x 173 in 64 px chunks: two levels
    level1 = mode_downsample(classes, (2, 2))
    np.testing.assert_array_equal(group["overviews/1/classes"][:], level1)
    np.testing.assert_array_equal(group["overviews/2/classes"][:], mode_downsample(level1, (2, 2)))
    assert [e["asset"] for e in attrs[layout.MULTISCALES_ATTR]["layout"]] == [layout.classes_path(2, k) for k in range(3)]
    assert attrs[layout.TESSERA_ATTR][layout.KEY_CLASS_COLORS] == ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    quicklook = root / "quicklooks" / "scene_one.png"
    # no level reaches 1024 px: the quicklook is drawn at full resolution, legend on the right
    assert Image.open(quicklook).size == (173 + 180, 150)

    before = {p: p.stat().st_mtime_ns for p in (quicklook, path / "zarr.json", path / "overviews" / "1" / "zarr.json")}
    card = oracle_checkpoint(tmp_path / "model")  # the same card bytes: the same fingerprint
    again = run_job(job_spec([scene], root, card), base_dir=tmp_path)
    assert [s.status for s in again.scenes] == ["complete"]
    assert {p: p.stat().st_mtime_ns for p in before} == before
