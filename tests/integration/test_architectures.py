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


def test_instance_model_is_refused_by_the_semantic_pipeline(tmp_path):
    fields = card_fields("maskrcnn", {"min_size": 64, "max_size": 64}, in_channels=4, num_classes=2)
    model = build_model("maskrcnn", in_channels=4, num_classes=2, arch_args={"min_size": 64, "max_size": 64})
    card = save_checkpoint(model, fields, tmp_path / "model", name="mrcnn")
    scene = write_geotiff(tmp_path / "s.tif", smooth_scene((32, 32), seed=0))
    with pytest.raises(ModelCardError, match="instance model"):
        run_job(_job(tmp_path, card, scene), base_dir=tmp_path)
