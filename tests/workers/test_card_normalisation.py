"""Model card normalisation (clip window, fixed mean/std), voxel spacing, and the predictor's
`_normalise` against numpy, 2D and 3D; old cards load unchanged; 3D TTA names in the job spec."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from schemas.errors import ModelCardError
from schemas.job import D4_TRANSFORMS, TTA_PRESETS, TTA_TRANSFORMS, InferenceSpec
from schemas.model_card import ModelCard, parse_model_card
from workers.predictor import Predictor, PredictorOptions
from workers.tta import TTA_NAMES, expand_tta

BUNDLED_CARD = Path(__file__).resolve().parents[2] / "workers" / "weights" / "unet-demo.json"

# (window or None, mean, std) per band: CT windowing to [0, 1], a plain z-score, a fixed
# z-score after clipping.
BANDS = [([-160.0, 240.0], -160.0, 400.0), (None, 100.0, 50.0), ([0.0, 1000.0], 300.5, 211.25)]


def card(bands=BANDS, *, architecture="oracle_threshold", arch_args=None, num_classes=None, **extra) -> ModelCard:
    num_classes = len(bands) if num_classes is None else num_classes
    return ModelCard.model_validate({
        "name": "m", "architecture": architecture, "arch_args": arch_args or {}, "in_channels": len(bands),
        "classes": [{"id": i, "name": f"c{i}"} for i in range(num_classes)],
        "bands": [{"name": f"b{i}", "mean": m, "std": s, **({} if w is None else {"window": w})}
                  for i, (w, m, s) in enumerate(bands)],
        "tile_size": 32, "halo": 0, "weights": "w.safetensors", "weights_sha256": "0" * 64,
    } | extra)


def normalised_numpy(pixels: np.ndarray, bands) -> np.ndarray:
    """(C, *spatial) raw -> float32 (clip(x, lo, hi) - mean) * (1 / std) per band."""
    out = pixels.astype(np.float32)
    for b, (window, mean, std) in enumerate(bands):
        if window is not None:
            out[b] = np.clip(out[b], np.float32(window[0]), np.float32(window[1]))
        out[b] = (out[b] - np.float32(mean)) * (np.float32(1.0) / np.float32(std))
    return out


def raw_window(shape, *, seed=0) -> np.ndarray:
    """(3, *shape) int16 CT-like values in [-1200, 1500): every window clips some."""
    return np.random.default_rng(seed).integers(-1200, 1500, size=(len(BANDS), *shape)).astype(np.int16)


def identity_predictor(model_card: ModelCard, **options) -> Predictor:
    """The model returns its (normalised) input: C == K, one tile per window, logits out."""
    opts = {"device": "cpu", "tile_size": 64} | options
    return Predictor(nn.Identity(), model_card, options=PredictorOptions(**opts))


@pytest.mark.parametrize("shape", [(21, 17), (7, 9, 11)], ids=["2d", "3d"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_normalise_clips_then_standardises_like_numpy(shape, channels_last):
    pixels = raw_window(shape)
    valid = np.ones(shape, dtype=bool)
    valid[(slice(0, 2),) * len(shape)] = False
    got = identity_predictor(card(), channels_last=channels_last).predict_probabilities(
        pixels, valid, logits_ok=True).numpy()
    expected = normalised_numpy(pixels, BANDS) * valid  # nodata -> 0 (the band mean)
    np.testing.assert_array_equal(got, expected)
    assert got[0][valid].min() == 0.0 and got[0][valid].max() == 1.0  # CT window -> [0, 1]
    assert np.abs(got[1]).max() > 20  # no window: not clipped


@pytest.mark.parametrize("shape", [(21, 17), (7, 9, 11)], ids=["2d", "3d"])
def test_normalise_without_windows_is_mean_std_exactly(shape):
    bands = [(None, m, s) for _, m, s in BANDS]
    pixels = raw_window(shape, seed=1)
    got = identity_predictor(card(bands)).predict_probabilities(pixels, logits_ok=True).numpy()
    np.testing.assert_array_equal(got, normalised_numpy(pixels, bands))


def test_a_window_wider_than_the_data_changes_no_byte_of_a_unet():
    """2D U-Net, tiled window: a card whose windows clip nothing gives the bytes of the card
    without windows (the clip is a no-op; cards without windows skip it)."""
    from workers.registry import build_model

    torch.manual_seed(0)
    model = build_model("unet", in_channels=3, num_classes=4, arch_args={"base_channels": 4, "depth": 2})
    plain = [(None, m, s) for _, m, s in BANDS]
    wide = [([-5000.0, 5000.0], m, s) for _, m, s in BANDS]
    pixels = raw_window((45, 39), seed=2)
    kwargs = {"architecture": "unet", "arch_args": {"base_channels": 4, "depth": 2}, "num_classes": 4, "stride": 4}
    results = []
    for bands in (plain, wide):
        pred = Predictor(model, card(bands, **kwargs), options=PredictorOptions(device="cpu", tile_size=32))
        results.append(pred.predict_core(pixels, with_probabilities=True))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    clipped = [([-100.0, 100.0], m, s) for _, m, s in BANDS]
    pred = Predictor(model, card(clipped, **kwargs), options=PredictorOptions(device="cpu", tile_size=32))
    assert not np.array_equal(pred.predict_core(pixels, with_probabilities=True)[1], results[0][1])


def test_bundled_card_loads_unchanged():
    raw = json.loads(BUNDLED_CARD.read_text())
    parsed = parse_model_card(BUNDLED_CARD.read_text(), source=str(BUNDLED_CARD))
    assert "spacing_mm" not in raw and not any("window" in b for b in raw["bands"])
    # every field as written, plus the new ones at their defaults (no clipping, spacing unknown,
    # not slice-wise, quicklook bands chosen by the renderer)
    assert parsed.model_dump(mode="json") == raw | {
        "spacing_mm": None, "slices": None, "quicklook_bands": None,
        "bands": [b | {"window": None} for b in raw["bands"]]}


@pytest.mark.parametrize(
    ("band", "match"),
    [
        ({"window": [100.0, 100.0]}, r"window must be \[lo, hi\] with finite lo < hi.*\[100.0, 100.0\]"),
        ({"window": [240.0, -160.0]}, "finite lo < hi"),
        ({"window": [0.0]}, "window"),
        ({"zscore": True}, "per-window z-score is not supported.*chunk grid"),
        ({"std": 0.0}, "std"),
    ],
)
def test_band_normalisation_errors_name_the_field(band, match):
    text = json.dumps({
        "name": "m", "architecture": "unet3d", "in_channels": 1, "classes": [{"id": 0, "name": "bg"}],
        "bands": [{"name": "ct", "mean": 0.0, "std": 1.0} | band], "tile_size": 32, "halo": 0,
        "weights": "w.safetensors", "weights_sha256": "0" * 64,
    })
    with pytest.raises(ModelCardError, match=match) as info:
        parse_model_card(text, source="ct.json")
    assert "ct.json" in str(info.value) and "bands.0" in str(info.value)


@pytest.mark.parametrize(
    ("spacing", "ok"),
    [([1.5, 0.8, 0.8], True), ([0.5, 0.5], True), ([1.0, 0.0, 1.0], False), ([1.0, -1.0, 1.0], False),
     ([1.0], False), ([1.0, 1.0, 1.0, 1.0], False)],
)
def test_spacing_mm_is_positive_per_axis(spacing, ok):
    if ok:
        assert card(spacing_mm=spacing).spacing_mm == tuple(spacing)
    else:
        with pytest.raises(ValueError, match="spacing_mm"):
            card(spacing_mm=spacing)


def test_dflip_is_a_job_spec_name_and_the_two_name_lists_agree():
    assert set(TTA_TRANSFORMS) == set(TTA_NAMES)
    assert InferenceSpec(tta=("dflip", "flips")).tta == ("dflip", "flips")
    with pytest.raises(ValueError, match="unknown augmentations"):
        InferenceSpec(tta=("zflip",))
    # d4 is still the dihedral group of the square, valid for 2D models
    assert TTA_PRESETS["d4"] == D4_TRANSFORMS and "dflip" not in D4_TRANSFORMS
    assert expand_tta(("d4",), spatial_dims=2) == D4_TRANSFORMS
    assert expand_tta(("dflip",), spatial_dims=3) == ("identity", "dflip")
