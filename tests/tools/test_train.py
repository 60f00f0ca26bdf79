"""Tests of the demo training pipeline (pipelines.tools.train) on a tiny, fast configuration."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from pipelines.tools.synthetic import BAND_NAMES, CLASS_NAMES, NODATA_CLASS
from pipelines.tools.train import TrainSettings, class_boundaries, segmentation_loss, train_demo_model
from workers.models.unet import UNet

TINY = TrainSettings(
    base_channels=4,
    depth=2,
    batch_size=2,
    patch_px=32,
    train_scene_seeds=(1, 2),
    val_scene_seed=9,
    scene_px=1024,
    pool_windows=3,
    pool_window_px=64,
    pool_refresh=1,
    val_windows=2,
    val_window_px=64,
    benchmark_batches=1,
)


@pytest.fixture(scope="module")
def tiny_card(tmp_path_factory) -> tuple:
    out_dir = tmp_path_factory.mktemp("weights")
    card_path = train_demo_model(out_dir, seed=3, steps=4, settings=TINY)
    return out_dir, card_path, json.loads(card_path.read_text())


def test_writes_card_and_weights(tiny_card: tuple) -> None:
    out_dir, card_path, card = tiny_card
    assert card_path == out_dir / "unet-demo.json"
    weights = out_dir / "unet-demo.safetensors"
    assert card["weights"] == weights.name
    assert card["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_card_fields(tiny_card: tuple) -> None:
    _, _, card = tiny_card
    assert set(card) == {
        "version", "name", "architecture", "arch_args", "in_channels", "classes", "bands",
        "tile_size", "halo", "stride", "weights", "weights_sha256", "training",
    }  # fmt: skip
    assert (card["version"], card["name"], card["architecture"]) == (1, "unet-demo", "unet")
    assert card["arch_args"] == {"base_channels": 4, "depth": 2, "upsample": "transpose"}
    assert card["in_channels"] == len(BAND_NAMES) == 4
    assert [c["id"] for c in card["classes"]] == list(range(5))
    assert [c["name"] for c in card["classes"]] == list(CLASS_NAMES)
    assert all(c["color"].startswith("#") and len(c["color"]) == 7 for c in card["classes"])
    assert [b["name"] for b in card["bands"]] == list(BAND_NAMES)
    assert all(0 < b["mean"] < 10000 and b["std"] > 0 for b in card["bands"])
    assert (card["tile_size"], card["halo"], card["stride"]) == (1088, 32, 4)
    training = card["training"]
    assert (training["seed"], training["steps"], training["generator"]) == (3, 4, "pipelines.tools.synthetic")
    assert training["dtype"] == "float32"
    assert 0.0 <= training["val_miou"] <= 1.0
    assert set(training["val_iou_per_class"]) <= set(CLASS_NAMES)
    assert training["seconds"] > 0 and training["cpu_forward_mpx_s"] > 0
    assert "ignore_index=255" in training["loss"]


def test_card_validates_against_the_schema(tiny_card: tuple) -> None:
    model_card = pytest.importorskip("schemas.model_card")
    _, card_path, _ = tiny_card
    card = model_card.parse_model_card(card_path.read_text(), source=str(card_path))
    assert card.num_classes == 5


def test_weights_load_into_the_described_model(tiny_card: tuple) -> None:
    out_dir, _, card = tiny_card
    state = load_file(out_dir / card["weights"])
    model = UNet(card["in_channels"], len(card["classes"]), **card["arch_args"])
    model.load_state_dict(state)
    assert all(t.is_contiguous() for t in state.values())
    assert model.stride == card["stride"]


def test_boundaries_ignore_nodata() -> None:
    labels = torch.tensor([[[0, 0, 0, 0], [0, 0, NODATA_CLASS, 1], [0, 0, 0, 1], [0, 0, 0, 1]]])
    boundary = class_boundaries(labels)
    # Column 1 sees classes 0 and nodata only: not a boundary.
    expected = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]], dtype=torch.bool)
    torch.testing.assert_close(boundary, expected)


def test_loss_ignores_nodata_pixels() -> None:
    labels = torch.tensor([[[0, NODATA_CLASS], [1, 1]]])
    logits = torch.zeros(1, 5, 2, 2)
    logits[0, 3, 0, 1] = 50.0  # a confident wrong answer on the nodata pixel changes nothing
    loss = segmentation_loss(logits, labels, boundary_weight=1.0)
    torch.testing.assert_close(loss, torch.log(torch.tensor(5.0)))


def test_settings_validation(tmp_path) -> None:
    with pytest.raises(ValueError, match="stride"):
        TrainSettings(depth=4, patch_px=40)
    with pytest.raises(ValueError, match="val_scene_seed 11"):
        TrainSettings(train_scene_seeds=(11, 12), val_scene_seed=11)
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        train_demo_model(tmp_path, steps=0, settings=TINY)


def test_same_seed_gives_identical_files(tmp_path, tiny_card: tuple) -> None:
    out_dir, _, card = tiny_card
    again = json.loads(train_demo_model(tmp_path, seed=3, steps=4, settings=TINY).read_text())
    assert again["weights_sha256"] == card["weights_sha256"]
    assert again["bands"] == card["bands"]
