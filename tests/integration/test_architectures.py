"""Every semantic architecture of the registry runs through the real pipeline (random init)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from pipelines.run.job import run_job
from schemas import store as layout
from schemas.errors import ModelCardError
from schemas.job import JobSpec
from tests.helpers import smooth_scene, write_geotiff
from tests.workers.test_registry import NUM_CLASSES, SEMANTIC_CASES, card_fields
from workers.checkpoints import save_checkpoint
from workers.registry import build_model

pytestmark = pytest.mark.usefixtures("ray_local")


def _job(tmp_path, card_path, scene):
    return JobSpec.model_validate({
        "inputs": [str(scene)],
        "model": {"card": str(card_path)},
        "tiling": {"chunk_size": 32, "halo": 8, "tile_size": 32, "tile_overlap": 0.25},
        "resources": {"torch_threads": 1},
        "output": {"root": str(tmp_path / "out")},
    })


@pytest.mark.parametrize(("architecture", "arch_args"), SEMANTIC_CASES)
def test_architecture_runs_through_the_pipeline(tmp_path, architecture, arch_args):
    torch.manual_seed(0)
    model = build_model(architecture, in_channels=4, num_classes=NUM_CLASSES, arch_args=arch_args)
    fields = card_fields(architecture, arch_args, in_channels=4, num_classes=NUM_CLASSES)
    fields["bands"] = [{"name": f"b{i}", "mean": 10000.0, "std": 3000.0} for i in range(4)]
    card = save_checkpoint(model, fields, tmp_path / "model", name=architecture)
    scene = write_geotiff(tmp_path / "s.tif", smooth_scene((48, 40), seed=0, nodata_border=4))
    result = run_job(_job(tmp_path, card, scene), base_dir=tmp_path)
    assert result.scenes[0].status == "complete", result.scenes[0].error
    classes = zarr.open_array(str(tmp_path / "out" / "s.zarr"), path=layout.CLASSES, mode="r")[:]
    assert classes.shape == (48, 40)
    assert set(np.unique(classes)) <= set(range(NUM_CLASSES)) | {255}
    assert (classes[:4] == 255).all() and (classes[4:, :-4] < NUM_CLASSES).all()


@pytest.mark.slow  # a whole job: 43 s on the shared 2-core machine
def test_an_instance_model_runs_through_the_pipeline(tmp_path):
    # The instance oracle (connected components of band 1 > 0.5, class from band 2) through a
    # whole job: each chunk's core gets the class of the object each pixel belongs to, 0
    # elsewhere, 255 at nodata. (Writing the instance ids is the writer's part.)
    from skimage.measure import label

    rng = np.random.default_rng(0)
    data = np.zeros((2, 48, 40), np.uint16)
    data[0] = rng.random((48, 40)) < 0.3
    data[0, :4] = 0
    objects = label(data[0] > 0, connectivity=2)
    want = np.where(objects > 0, 1 + objects % 2, 0).astype(np.uint8)  # one class per object
    data[1] = np.maximum(want, 1)  # band 2 carries it (and is never the nodata value 0 in the data)
    data[1, :4] = 0  # nodata rows: every band 0
    want[:4] = 255
    fields = card_fields("instance_oracle", {"class_channel": 1}, in_channels=2, num_classes=3)
    fields["bands"] = [{"name": f"b{i}", "mean": 0.0, "std": 1.0} for i in range(2)]
    model = build_model("instance_oracle", in_channels=2, num_classes=3, arch_args={"class_channel": 1})
    card = save_checkpoint(model, fields, tmp_path / "model", name="oracle")
    scene = write_geotiff(tmp_path / "s.tif", data)
    spec = _job(tmp_path, card, scene)
    with pytest.raises(ModelCardError, match="output.write_probabilities"):
        run_job(spec.model_copy(update={"output": spec.output.model_copy(update={"write_probabilities": True})}),
                base_dir=tmp_path)
    result = run_job(spec, base_dir=tmp_path)
    assert result.scenes[0].status == "complete", result.scenes[0].error
    classes = zarr.open_array(str(tmp_path / "out" / "s.zarr"), path=layout.CLASSES, mode="r")[:]
    np.testing.assert_array_equal(classes, want)
