"""3D registry entries: each builds, keeps the input size at its native stride, segments odd
volumes with overlapping tiles through the n-D predictor, round-trips through a checkpoint
exactly, and is left alone by BatchNorm folding where it normalises per instance or group."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from schemas.errors import ModelCardError
from schemas.model_card import ModelCard
from workers.checkpoints import build_from_checkpoint, load_checkpoint, save_checkpoint
from workers.predictor import Predictor, PredictorOptions, fold_batchnorm
from workers.predictor import model_spatial_dims as weights_spatial_dims
from workers.registry import architectures, build_model, model_kind, model_spatial_dims, native_stride

IN_CHANNELS = 2
NUM_CLASSES = 3

# (architecture, arch_args): tiny widths, every 3D architecture at least once.
CASES_3D = [
    pytest.param("unet3d", {"base_channels": 4, "depth": 2}, id="unet3d"),
    pytest.param("unet3d", {"base_channels": 4, "depth": 2, "upsample": "trilinear"}, id="unet3d-trilinear"),
    pytest.param("monai_unet", {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}, id="monai_unet"),
    pytest.param("monai_basicunet", {"features": [4, 4, 8, 8, 16, 4]}, id="monai_basicunet"),
    pytest.param("monai_segresnet", {"init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]},
                 id="monai_segresnet"),
]
NAMES_3D = {"unet3d", "monai_unet", "monai_basicunet", "monai_segresnet"}
#: Architectures that normalise with the tile's own statistics (nothing for BatchNorm folding).
PER_TILE_NORM = {"monai_unet", "monai_basicunet", "monai_segresnet"}


def tile_side(architecture: str, arch_args: dict) -> int:
    """A tile side for the case: a multiple of the stride, and twice it, so that instance norm
    has more than one voxel at the coarsest level (16 for the tiny cases, 32 for BasicUNet)."""
    return max(16, 2 * native_stride(architecture, arch_args))


def card_fields(architecture: str, arch_args: dict, **extra) -> dict:
    """A valid 3D card (all but name/weights/sha) with the architecture's native stride."""
    return {
        "architecture": architecture,
        "arch_args": arch_args,
        "in_channels": IN_CHANNELS,
        "classes": [{"id": i, "name": f"class{i}"} for i in range(NUM_CLASSES)],
        "bands": [{"name": f"b{i}", "mean": 100.0, "std": 50.0} for i in range(IN_CHANNELS)],
        "tile_size": tile_side(architecture, arch_args),
        "halo": 4,
        "stride": native_stride(architecture, arch_args),
        "spacing_mm": [2.0, 0.8, 0.8],
    } | extra


def build(architecture: str, arch_args: dict, *, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(architecture, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES, arch_args=arch_args).eval()


def volume(shape: tuple[int, ...], *, seed: int = 0) -> np.ndarray:
    """(IN_CHANNELS, *shape) int16 values around the cards' mean (100 +- 150)."""
    return np.random.default_rng(seed).integers(-50, 250, size=(IN_CHANNELS, *shape)).astype(np.int16)


def predictor(model: nn.Module, card: ModelCard, **options) -> Predictor:
    opts = {"device": "cpu", "tile_size": card.tile_size, "tile_overlap": 0.25, "batch_size": 4} | options
    return Predictor(model, card, options=PredictorOptions(**opts))


@pytest.mark.parametrize(("architecture", "arch_args"), CASES_3D)
def test_3d_builds_forwards_and_round_trips(architecture, arch_args, tmp_path):
    model = build(architecture, arch_args)
    stride, tile = native_stride(architecture, arch_args), tile_side(architecture, arch_args)
    shape = (tile, tile + stride, tile)  # anisotropic sides, each a multiple of the stride
    x = torch.randn(1, IN_CHANNELS, *shape)
    with torch.inference_mode():
        expected = model(x)
    assert expected.shape == (1, NUM_CLASSES, *shape) and expected.dtype == torch.float32
    assert torch.isfinite(expected).all()
    assert weights_spatial_dims(model) == 3

    card_path = save_checkpoint(model, card_fields(architecture, arch_args), tmp_path, name=architecture)
    assert load_checkpoint(card_path).card.spacing_mm == (2.0, 0.8, 0.8)
    torch.manual_seed(1)  # a different random init: only loading the weights can restore the output
    loaded = build_from_checkpoint(load_checkpoint(card_path))
    assert not loaded.training
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
        assert not torch.equal(build(architecture, arch_args, seed=2)(x), expected)


@pytest.mark.parametrize(("architecture", "arch_args"), CASES_3D)
def test_3d_predictor_odd_volume_overlapping_tiles(architecture, arch_args, tmp_path):
    """An odd volume, tile + (3, 7, 5) voxels (19 x 23 x 21 for 16^3 tiles), through tiles at
    25 % overlap: labels of the volume's shape; the loaded checkpoint gives the same bytes;
    folding BatchNorm changes nothing for per-tile norms."""
    model = build(architecture, arch_args)
    card_path = save_checkpoint(model, card_fields(architecture, arch_args), tmp_path, name=architecture)
    ckpt = load_checkpoint(card_path)
    shape = tuple(ckpt.card.tile_size + extra for extra in (3, 7, 5))
    pixels = volume(shape)
    valid = np.ones(shape, dtype=bool)
    valid[:2, :, :3] = False

    labels, probs = predictor(model, ckpt.card).predict_core(pixels, valid, with_probabilities=True)
    assert labels.shape == shape and labels.dtype == np.uint8
    assert set(np.unique(labels[valid])) <= set(range(NUM_CLASSES)) and (labels[~valid] == 255).all()
    assert probs.shape == (NUM_CLASSES, *shape) and probs.dtype == np.float16
    np.testing.assert_allclose(probs[:, valid].astype(np.float32).sum(axis=0), 1.0, atol=2e-3)
    blended = predictor(model, ckpt.card).predict_probabilities(pixels, valid).numpy()  # float32
    np.testing.assert_array_equal(labels[valid], blended[:, valid].argmax(axis=0))
    np.testing.assert_allclose(probs[:, valid].astype(np.float32), blended[:, valid], atol=1e-3)

    loaded_labels, loaded_probs = predictor(build_from_checkpoint(ckpt), ckpt.card).predict_core(
        pixels, valid, with_probabilities=True)
    np.testing.assert_array_equal(loaded_labels, labels)
    np.testing.assert_array_equal(loaded_probs, probs)

    unfolded_labels, unfolded_probs = predictor(model, ckpt.card, fold_batchnorm=False).predict_core(
        pixels, valid, with_probabilities=True)
    if architecture in PER_TILE_NORM:
        np.testing.assert_array_equal(unfolded_labels, labels)
        np.testing.assert_array_equal(unfolded_probs, probs)
    else:  # BatchNorm3d folded into Conv3d: float rounding only
        np.testing.assert_allclose(unfolded_probs.astype(np.float32), probs.astype(np.float32), atol=2e-3)


@pytest.mark.parametrize(("architecture", "arch_args"), CASES_3D)
def test_3d_predictor_single_tile_is_the_model_on_the_normalised_window(architecture, arch_args, tmp_path):
    """A window that is one tile: the predictor's probabilities are softmax(model((x - mean) / std))."""
    model = build(architecture, arch_args)
    card = ModelCard.model_validate(card_fields(architecture, arch_args, name="m", weights="w.safetensors",
                                                weights_sha256="0" * 64))
    pixels = volume((card.tile_size,) * 3, seed=3)
    got = predictor(model, card, channels_last=False, fold_batchnorm=False).predict_probabilities(pixels)
    x = (torch.from_numpy(pixels.astype(np.float32))[None] - 100.0) * torch.tensor(1 / 50.0)
    with torch.inference_mode():
        expected = torch.softmax(model(x), dim=1)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_fold_batchnorm_folds_unet3d_and_leaves_instance_and_group_norm_alone():
    x = torch.randn(1, IN_CHANNELS, 16, 16, 16)
    for param in CASES_3D:
        architecture, arch_args = param.values
        model = build(architecture, arch_args)
        folded = fold_batchnorm(model)
        norms = {type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__}
        if architecture in PER_TILE_NORM:
            assert folded is model, architecture
            assert norms and norms <= {"InstanceNorm3d", "GroupNorm"}, (architecture, norms)
        else:
            assert norms == {"BatchNorm3d"}
            assert not any(isinstance(m, nn.BatchNorm3d) for m in folded.modules())
            with torch.inference_mode():
                torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


def test_3d_cases_cover_every_3d_architecture():
    assert {p.values[0] for p in CASES_3D} == NAMES_3D
    assert {name for name in architectures() if model_spatial_dims(name) == 3} == NAMES_3D
    assert all(model_kind(name) == "semantic" for name in NAMES_3D)


def test_model_spatial_dims_of_every_registered_name():
    for name in architectures():
        assert model_spatial_dims(name) == (3 if name in NAMES_3D else 2), name
    assert model_spatial_dims("unet3d", {"depth": 2}) == 3
    assert model_spatial_dims("unet", {"depth": 2}) == 2
    with pytest.raises(ModelCardError, match="unknown architecture 'vnet'"):
        model_spatial_dims("vnet")
    with pytest.raises(ModelCardError, match="rejected arch_args.*'spatial_dims'"):
        model_spatial_dims("unet3d", {"spatial_dims": 2})


@pytest.mark.parametrize(
    ("architecture", "arch_args", "stride"),
    [
        ("unet3d", {}, 16),
        ("unet3d", {"depth": 2}, 4),
        ("monai_unet", {}, 8),
        ("monai_unet", {"channels": [8, 16, 32, 64], "strides": [2, 2, 1]}, 4),
        ("monai_basicunet", {}, 16),
        ("monai_basicunet", {"features": [4, 4, 8, 8, 16, 4]}, 16),
        ("monai_segresnet", {}, 8),
        ("monai_segresnet", {"blocks_down": [1, 2], "blocks_up": [1]}, 2),
    ],
)
def test_native_stride_3d_table(architecture, arch_args, stride):
    assert native_stride(architecture, arch_args) == stride


@pytest.mark.parametrize(("architecture", "arch_args"), CASES_3D)
def test_native_stride_is_the_side_multiple_the_model_needs(architecture, arch_args):
    """Multiples of the native stride keep their size; one voxel more does not fit the
    encoder/decoder (an error or another size), except BasicUNet, which pads its upsampled
    maps by one replicated plane (so it runs, but its pooling grid is aligned only at 16).
    Instance norm needs more than one voxel at the coarsest level: BasicUNet fails at 16^3."""
    model = build(architecture, arch_args)
    stride = native_stride(architecture, arch_args)
    with torch.inference_mode():
        sides = (2 * stride, 3 * stride, 2 * stride)
        assert model(torch.randn(1, IN_CHANNELS, *sides)).shape == (1, NUM_CLASSES, *sides)
        odd = (2 * stride + 1, 2 * stride, 2 * stride)
        if architecture == "monai_basicunet":
            assert model(torch.randn(1, IN_CHANNELS, *odd)).shape == (1, NUM_CLASSES, *odd)
            with pytest.raises(ValueError, match="more than 1 spatial element"):
                model(torch.randn(1, IN_CHANNELS, 16, 16, 16))
            return
        try:
            out_shape = tuple(model(torch.randn(1, IN_CHANNELS, *odd)).shape)
        except (RuntimeError, ValueError):
            return
        assert out_shape != (1, NUM_CLASSES, *odd)


@pytest.mark.parametrize(
    ("architecture", "arch_args", "match", "stride_rejects"),
    [
        # the stride depends on depth only: native_stride checks names, build_model values
        ("unet3d", {"upsample": "bilinear"}, r"upsample must be one of \('transpose', 'trilinear'\) in 3D", False),
        ("unet3d", {"spatial_dims": 2}, "unexpected keyword argument 'spatial_dims'", True),
        ("monai_unet", {"channels": [4, 8, 16], "strides": [2]}, "one stride fewer than channels", True),
        ("monai_unet", {"strides": [2, 2, 0]}, "strides must be a list of ints >= 1", True),
        ("monai_unet", {"num_res_units": -1}, "num_res_units must be an int >= 0", False),
        ("monai_basicunet", {"features": [4, 4, 8]}, "features must list 6 widths", False),
        ("monai_segresnet", {"init_filters": 12}, "multiple of 8", False),
        ("monai_segresnet", {"blocks_down": [1, 2, 2], "blocks_up": [1]}, "one blocks_up fewer", True),
        ("monai_segresnet", {"norm": "batch"}, "unexpected keyword argument 'norm'", True),
    ],
)
def test_3d_builders_and_strides_reject_bad_arch_args(architecture, arch_args, match, stride_rejects):
    with pytest.raises(ModelCardError, match=match) as info:
        build_model(architecture, in_channels=1, num_classes=2, arch_args=arch_args)
    assert f"architecture {architecture!r} rejected arch_args" in str(info.value)
    if stride_rejects:
        with pytest.raises(ModelCardError, match=f"architecture {architecture!r} rejected arch_args.*{match}"):
            native_stride(architecture, arch_args)


def test_predictor_refuses_a_2d_window_for_a_3d_model():
    model = build("unet3d", {"base_channels": 4, "depth": 2})
    card = ModelCard.model_validate(card_fields("unet3d", {"base_channels": 4, "depth": 2}, name="m",
                                                weights="w.safetensors", weights_sha256="0" * 64))
    with pytest.raises(ValueError, match="takes 3D tiles, got a 2D window"):
        predictor(model, card).predict_core(volume((16, 16)))
