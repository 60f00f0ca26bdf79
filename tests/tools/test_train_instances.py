"""Training the light Mask R-CNN on building scenes, its targets, and the tile-by-tile baseline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipelines.tools.buildings import BuildingSceneSpec
from pipelines.tools.train_instances import (
    MODEL_NAME,
    InstanceTrainSettings,
    ensure_building_model,
    evaluate_job_on_scene,
    evaluate_model_on_scene,
    instance_targets,
)
from workers.checkpoints import build_from_checkpoint, load_checkpoint


def test_targets_of_a_crop():
    ids = np.zeros((20, 30), np.uint32)
    ids[2:5, 3:9] = 7  # 18 px
    ids[10:20, 25:30] = 9  # 50 px, cut by the crop's edge
    ids[0, 0] = 4  # 1 px: below min_pixels
    t = instance_targets(ids, min_pixels=12)
    torch.testing.assert_close(t["boxes"], torch.tensor([[3.0, 2.0, 9.0, 5.0], [25.0, 10.0, 30.0, 20.0]]))
    assert t["labels"].tolist() == [1, 1]
    assert t["masks"].shape == (2, 20, 30) and t["masks"].dtype == torch.uint8
    assert int(t["masks"][0].sum()) == 18 and int(t["masks"][1].sum()) == 50
    empty = instance_targets(np.zeros((8, 8), np.uint32), min_pixels=1)
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 8, 8)


@pytest.mark.slow
def test_a_short_training_lowers_the_loss_and_is_cached(tmp_path, ray_local):
    settings = InstanceTrainSettings(steps=30, warmup_steps=5, batch_size=2, patch_px=96, pool_windows=3,
                                     pool_window_px=256, scene_px=1024)
    card_path, trained, seconds = ensure_building_model(tmp_path, settings)
    assert trained and seconds > 0 and card_path.name == f"{MODEL_NAME}.json"
    card = json.loads(card_path.read_text())
    assert card["architecture"] == "maskrcnn_light" and card["in_channels"] == 4
    assert [c["name"] for c in card["classes"]] == ["background", "building"]
    assert card["training"]["loss_last20_mean"] < card["training"]["loss_first10_mean"]
    # the weights load back (safetensors, checksum) into the same architecture
    model = build_from_checkpoint(load_checkpoint(card_path))
    assert not model.training
    # a second call reuses the cache; another recipe trains again
    again, trained_again, _ = ensure_building_model(tmp_path, settings)
    assert again == card_path and not trained_again
    scene = BuildingSceneSpec(384, 384, seed=7)
    ev = evaluate_model_on_scene(card_path, scene)
    m = ev.metrics
    assert m.n_true > 0 and m.tp + m.fn == m.n_true and m.tp + m.fp == m.n_pred
    assert 0.0 <= m.ap <= 1.0
    # the same card through the job (chunks, halos, merge), scored from the store and the table
    job, wall_s = evaluate_job_on_scene(card_path, tmp_path / "job", scene, chunk_size=128, halo=32,
                                        score_threshold=0.05)
    assert wall_s > 0 and job.n_true == m.n_true and job.tp + job.fn == job.n_true
