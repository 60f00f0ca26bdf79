"""An instance model end to end through a real local Ray: the `instance_oracle` architecture (the
connected components of channel 0 > threshold) on a georeferenced scene cut into chunks, merged
across chunk halos by the driver. The stitched `instances` array must equal the connected
components of the whole scene up to renumbering, and the `instances` table must describe them.

Runs once the predictor side of instances (the `instance_oracle` architecture) is registered;
skipped before that."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from skimage.measure import label

from workers.registry import architectures, build_model, model_kind

if "instance_oracle" not in architectures() or model_kind("instance_oracle") != "instance":
    pytest.skip("the instance_oracle architecture is not registered yet (predictor side of instances)",
                allow_module_level=True)

from pipelines.query import run_query  # noqa: E402
from pipelines.run.job import run_job  # noqa: E402
from schemas.instances import INSTANCES  # noqa: E402
from tests.helpers import _save_oracle, job_spec, write_geotiff  # noqa: E402
from tests.stats.instance_cases import splits_and_duplicates  # noqa: E402

pytestmark = pytest.mark.usefixtures("ray_local")

CHUNK, HALO = 64, 8


def instance_scene(shape=(120, 101), seed=4) -> np.ndarray:
    """(2, H, W) uint16: channel 0 is 1 on objects (blobs, a band wider than a chunk, a square on
    the corner of four chunks, touching pairs), 0 elsewhere; channel 1 keeps every pixel valid."""
    rng = np.random.default_rng(seed)
    fg = np.zeros(shape, dtype=bool)
    for _ in range(30):
        r, c = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        h, w = rng.integers(1, 12, size=2)
        fg[r:r + h, c:c + w] = True
    fg[90:93, :] = True  # as wide as the scene: two chunks
    fg[63:65, 63:65] = True  # the corner of four chunks
    data = np.zeros((2, *shape), dtype=np.uint16)
    data[0] = fg
    data[1] = 1000
    return data


def instance_oracle_card(out_dir):
    model = build_model("instance_oracle", in_channels=2, num_classes=3, arch_args={"threshold": 0.5})
    return _save_oracle(model, "instance_oracle", {"threshold": 0.5}, bands=2, num_classes=3, mean=0.0, std=1.0,
                        tile_size=CHUNK + 2 * HALO, halo=HALO, out_dir=out_dir, name="instance-oracle")


def test_an_instance_job_gives_one_instance_per_object_of_the_whole_scene(tmp_path):
    import geopandas

    data = instance_scene()
    scene = write_geotiff(tmp_path / "objects.tif", data, nodata=None)
    card = instance_oracle_card(tmp_path / "model")
    root = tmp_path / "out"
    spec = job_spec([scene], root, card, chunk_size=CHUNK, halo=HALO, tile_size=CHUNK + 2 * HALO)
    result = run_job(spec, base_dir=tmp_path)
    assert [s.status for s in result.scenes] == ["complete"], [s.error for s in result.scenes]

    truth = label(data[0] > 0, connectivity=2)
    stitched = zarr.open_array(str(root / "objects.zarr"), path=INSTANCES, mode="r")[:]
    assert splits_and_duplicates(stitched, truth) == (0, 0)
    n = int(truth.max())
    frame = geopandas.read_parquet(root / "tables" / "instances" / "objects.parquet")
    assert len(frame) == n and frame.crs.to_epsg() == 32633
    assert sorted(frame["instance_id"]) == sorted(np.unique(stitched[stitched > 0]).tolist())
    np.testing.assert_allclose(frame.geometry.area, frame["pixel_count"] * 100.0)
    assert int(frame["pixel_count"].sum()) == int((truth > 0).sum())
    scenes = pq.read_table(root / "tables" / "scenes" / "objects.parquet").to_pylist()
    assert scenes[0]["n_instances"] == n
    assert run_query(root, "SELECT count(*) AS n FROM instances").column("n")[0].as_py() == n


def test_an_instance_model_on_a_volume_fails_that_scene_with_the_reason(tmp_path):
    import nibabel as nib

    from schemas.job import JobSpec

    data = np.zeros((12, 10, 9), dtype=np.int16)
    data[2:5, 3:6, 3:6] = 1
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), tmp_path / "ct.nii.gz")
    model = build_model("instance_oracle", in_channels=1, num_classes=2, arch_args={"threshold": 0.5})
    card = _save_oracle(model, "instance_oracle", {"threshold": 0.5}, bands=1, num_classes=2, mean=0.0, std=1.0,
                        tile_size=8, halo=2, out_dir=tmp_path / "model", name="instance-oracle-1band")
    spec = JobSpec.model_validate({
        "inputs": [str(tmp_path / "ct.nii.gz")], "model": {"card": str(card)},
        "tiling": {"volume_chunk_size": 8, "halo": 2, "tile_size": 8},
        "resources": {"actors": 1, "torch_threads": 1}, "output": {"root": str(tmp_path / "out")},
    })
    result = run_job(spec, base_dir=tmp_path)
    (scene,) = result.scenes
    assert scene.status == "failed"
    assert "ct.nii.gz" in scene.error and "instance outputs are written for 2D scenes only" in scene.error
