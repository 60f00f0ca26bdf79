"""Seam measurement (pipelines.tools.seams) and the generic trainer (pipelines.tools.train.train_model), tiny sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipelines.tools.seams import (
    agreement_stats,
    arch_label,
    checkpoint_name,
    measure_seams,
    parse_arch,
    seam_zones,
    write_report,
)
from pipelines.tools.synthetic import CLASS_NAMES
from pipelines.tools.train import TrainSettings, train_demo_model, train_model
from schemas.errors import ModelCardError
from workers.checkpoints import build_from_checkpoint, load_checkpoint
from workers.registry import native_stride

TINY = TrainSettings(
    base_channels=4,
    depth=2,
    batch_size=2,
    patch_px=36,
    train_scene_seeds=(1, 2),
    val_scene_seed=9,
    scene_px=1024,
    pool_windows=2,
    pool_window_px=64,
    pool_refresh=1,
    val_windows=1,
    val_window_px=68,
    benchmark_batches=0,
)
TINY_SCENE = dict(scene_size=96, chunk_size=32, halo=8, steps=1, train_budget_s=None, settings=TINY)


class GlobalContextNet(torch.nn.Module):
    """A parameter-free global-pooling model: classes from the pixel's band mean minus the input's.

    Logits depend on the mean over the whole input (like PSPNet's 1x1 pyramid bin or DeepLab's
    image pooling), so a chunk's labels depend on its window.
    """

    stride = 1

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.register_buffer("thresholds", torch.linspace(-0.5, 0.5, num_classes - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.mean(dim=1, keepdim=True)
        v = v - v.mean(dim=(2, 3), keepdim=True)
        classes = (v > self.thresholds.view(1, -1, 1, 1)).sum(dim=1)
        return torch.nn.functional.one_hot(classes, self.thresholds.numel() + 1).permute(0, 3, 1, 2).float() * 50


# ----------------------------------------------------------------------------- pure parts


def test_seam_zones_mark_8_px_each_side_of_inner_borders() -> None:
    seam, edge = seam_zones((40, 50), 16, width=3)
    rows_near = [r for r in range(40) if seam[r, 8]]  # column 8 is 8 px from any column border
    assert rows_near == [13, 14, 15, 16, 17, 18, 29, 30, 31, 32, 33, 34]
    assert seam[:, 13:19].all() and seam[:, 45:48].all()  # column borders at 16, 32 and 48
    assert not seam[0:13, 0:13].any()
    assert edge[0, 5] and edge[39, 5] and edge[20, 2] and not edge[8, 8] and not edge[20, 49]  # 49: seam
    assert not (seam & edge).any()


def test_agreement_stats_split_by_zone() -> None:
    whole = np.zeros((32, 32), np.uint8)
    tiled = whole.copy()
    tiled[16, 20] = 1  # on the seam (border at 16)
    tiled[8, 8] = 1  # interior
    stats = agreement_stats(whole, tiled, chunk=16, width=2)
    assert stats["disagree_px"] == 2
    assert stats["agreement"] == pytest.approx(1 - 2 / 1024)
    assert stats["disagree_in_seam"] == pytest.approx(0.5)
    assert stats["agreement_edge"] == 1.0
    seam, _ = seam_zones((32, 32), 16, width=2)
    assert stats["agreement_seam"] == pytest.approx(1 - 1 / seam.sum())
    with pytest.raises(ValueError, match="one shape"):
        agreement_stats(whole, whole[:-1], chunk=16)


def test_parse_arch_and_labels() -> None:
    assert parse_arch("pspnet") == ("pspnet", {})
    assert parse_arch("deeplabv3,backbone=resnet50") == ("deeplabv3", {"backbone": "resnet50"})
    assert parse_arch("unet_smp, encoder_depth=3") == ("unet_smp", {"encoder_depth": 3})
    assert parse_arch("builtin:unet-demo") == ("builtin:unet-demo", {})
    with pytest.raises(ValueError, match="key=value"):
        parse_arch("pspnet,resnet18")
    assert arch_label("deeplabv3", {"backbone": "resnet50"}) == "deeplabv3(backbone=resnet50)"
    a = checkpoint_name("pspnet", {}, seed=0, steps=5, train_budget_s=None, settings=TINY)
    assert a.startswith("seams-pspnet-") and a == checkpoint_name(
        "pspnet", {}, seed=0, steps=5, train_budget_s=None, settings=TINY)
    assert a != checkpoint_name("pspnet", {}, seed=1, steps=5, train_budget_s=None, settings=TINY)


# ----------------------------------------------------------------------------- measurement


def test_pointwise_oracle_agrees_everywhere(tmp_path) -> None:
    (row,) = measure_seams([("oracle_threshold", {"radius": 0})], out_dir=tmp_path, **TINY_SCENE)
    assert row["skipped"] is None and row["source"] == "untrained"
    assert row["agreement"] == row["agreement_seam"] == row["agreement_edge"] == row["agreement_interior"] == 1.0
    assert row["disagree_px"] == 0 and row["disagree_in_seam"] is None
    assert row["miou_whole"] == row["miou_tiled"]
    labels = np.load(tmp_path / f"{row['card'].rsplit('/', 1)[1][:-5]}.labels.npz")
    assert labels["whole"].shape == labels["tiled"].shape == labels["truth"].shape == (96, 96)
    np.testing.assert_array_equal(labels["whole"], labels["tiled"])


def test_one_chunk_has_no_seam_zone(tmp_path) -> None:
    settings = {**TINY_SCENE, "chunk_size": 96, "halo": 8, "tile_size": 64}  # one window, 2 x 2 tiles
    (row,) = measure_seams([("oracle_threshold", {})], out_dir=tmp_path, **settings)
    assert row["agreement_seam"] is None and row["seam_share"] == 0.0
    assert row["agreement"] == row["agreement_edge"] == row["agreement_interior"] == 1.0
    assert row["tile_size"] == 64


def test_global_pooling_model_shows_seams(tmp_path) -> None:
    rows = measure_seams(
        [("tests.tools.test_seams:GlobalContextNet", {}), ("maskrcnn", {})], out_dir=tmp_path, **TINY_SCENE
    )
    row, skipped = rows
    assert row["params"] == 0 and row["stride"] == 1
    assert row["agreement"] < 1.0 and row["disagree_px"] > 0
    seam, edge = seam_zones((96, 96), 32)
    whole = row["agreement_seam"] * seam.sum() + row["agreement_edge"] * edge.sum()
    whole += row["agreement_interior"] * (~(seam | edge)).sum()
    assert whole / 96**2 == pytest.approx(row["agreement"])
    assert 0.0 <= row["miou_whole"] <= 1.0 and 0.0 <= row["miou_tiled"] <= 1.0
    assert skipped["skipped"].startswith("instance model") and "agreement" not in skipped
    report = json.loads(write_report(rows, tmp_path, settings={"scene_size": 96}).read_text())
    assert report["rows"][0]["agreement"] == row["agreement"] and report["settings"] == {"scene_size": 96}


def test_time_budget_skips_the_rest(tmp_path) -> None:
    rows = measure_seams([("oracle_threshold", {}), ("pspnet", {})], out_dir=tmp_path, time_budget_s=0.0,
                         **TINY_SCENE)
    assert [r["skipped"] is not None for r in rows] == [True, True]
    assert "time budget" in rows[1]["skipped"]


def test_scene_seed_must_be_held_out(tmp_path) -> None:
    with pytest.raises(ValueError, match="scene_seed 1"):
        measure_seams([("oracle_threshold", {})], out_dir=tmp_path, scene_seed=1, **TINY_SCENE)


def test_trained_entry_is_cached(tmp_path) -> None:
    args = [("unet", {"base_channels": 4, "depth": 2})]
    (first,) = measure_seams(args, out_dir=tmp_path, **TINY_SCENE)
    (again,) = measure_seams(args, out_dir=tmp_path, **TINY_SCENE)
    assert (first["source"], first["cached"], again["cached"]) == ("trained", False, True)
    assert first["train_steps"] == again["train_steps"] == 1
    assert first["agreement"] == again["agreement"]


# ----------------------------------------------------------------------------- train_model


def test_train_model_writes_a_loadable_checkpoint(tmp_path) -> None:
    card_path = train_model("pspnet", {"encoder_depth": 3}, tmp_path, name="psp-tiny", seed=1, steps=2,
                            settings=TINY)
    ckpt = load_checkpoint(card_path)
    card = ckpt.card
    assert card_path == tmp_path / "psp-tiny.json" and card.name == "psp-tiny"
    assert card.stride == native_stride("pspnet", {"encoder_depth": 3}) == 8
    assert card.tile_size % card.stride == 0 and card.class_names == CLASS_NAMES
    training = card.training
    assert training["patch_px"] == 40 and training["val_pixels"] == 72**2  # 36 and 68 rounded up to 8
    assert training["steps"] == 2 and "cpu_forward_mpx_s" not in training
    model = build_from_checkpoint(ckpt)
    assert training["parameters"] == sum(p.numel() for p in model.parameters())
    with torch.inference_mode():
        assert model(torch.zeros(1, 4, 64, 64)).shape == (1, len(CLASS_NAMES), 64, 64)


def test_bn_recalibration_replaces_the_running_averages(tmp_path) -> None:
    plain = train_model("unet", {"base_channels": 4, "depth": 2}, tmp_path, name="plain", seed=2, steps=2,
                        settings=TINY)
    recal = train_model("unet", {"base_channels": 4, "depth": 2}, tmp_path, name="recal", seed=2, steps=2,
                        settings=TrainSettings(**{**TINY.__dict__, "bn_recalibration_batches": 2}))
    a, b = load_file(plain.with_suffix(".safetensors")), load_file(recal.with_suffix(".safetensors"))
    stats = [k for k in a if k.endswith(("running_mean", "running_var"))]
    weights = [k for k in a if k.endswith("weight")]
    assert stats and all(torch.equal(a[k], b[k]) for k in weights)  # same training, other statistics
    assert not all(torch.equal(a[k], b[k]) for k in stats)
    assert json.loads(recal.read_text())["training"]["bn_recalibration_batches"] == 2
    assert "bn_recalibration_batches" not in json.loads(plain.read_text())["training"]


def test_train_model_matches_the_demo_loop(tmp_path) -> None:
    """The generic trainer on the demo's U-Net gives the demo's weights, tensor for tensor."""
    settings = TrainSettings(**{**TINY.__dict__, "patch_px": 32, "val_window_px": 64})
    demo = json.loads(train_demo_model(tmp_path / "demo", seed=3, steps=3, settings=settings).read_text())
    generic = train_model("unet", demo["arch_args"], tmp_path / "generic", name="g", seed=3, steps=3,
                          settings=settings)
    a = load_file(tmp_path / "demo" / demo["weights"])
    b = load_file(generic.with_suffix(".safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the same band statistics ("window": null, written by the generic card writer, is no window)
    set_fields = [{k: v for k, v in band.items() if v is not None} for band in json.loads(generic.read_text())["bands"]]
    assert set_fields == demo["bands"]


def test_train_model_rejects_bad_settings(tmp_path) -> None:
    with pytest.raises(ValueError, match="batch_size >= 2"):
        train_model("pspnet", {}, tmp_path, name="x", steps=1,
                    settings=TrainSettings(**{**TINY.__dict__, "batch_size": 1}))
    with pytest.raises(ValueError, match="semantic"):
        train_model("maskrcnn", {}, tmp_path, name="x", steps=1, settings=TINY)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        train_model("unet", {}, tmp_path, name="x", steps=0, settings=TINY)
    with pytest.raises(ModelCardError, match="rejected arch_args"):
        train_model("unet", {"nope": 1}, tmp_path, name="x", steps=1, settings=TINY)
