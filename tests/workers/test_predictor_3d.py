"""The predictor on 3D volumes: (C, D, H, W) windows, tiles, halos, stride padding, TTA,
multi-scale, channels-last-3d, BatchNorm3d folding, against whole-volume oracles."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from schemas.model_card import ModelCard
from tests.helpers import assert_batched_equals_one_by_one
from workers.models.oracles import ThresholdOracle, threshold_oracle_numpy
from workers.predictor import Predictor, PredictorOptions, argmax_classes, fold_batchnorm, memory_format
from workers.tiles import plan_tiles
from workers.tta import augment, expand_tta, resample

MEAN, STD = 10000.0, 3000.0


def _card(num_classes=4, bands=2, stride=1) -> ModelCard:
    return ModelCard.model_validate({
        "name": "vol", "architecture": "oracle_threshold", "in_channels": bands,
        "classes": [{"id": i, "name": f"c{i}"} for i in range(num_classes)],
        "bands": [{"name": f"b{i}", "mean": MEAN, "std": STD} for i in range(bands)],
        "tile_size": 16, "halo": 2, "stride": stride, "weights": "w.safetensors", "weights_sha256": "0" * 64,
    })


def _volume(shape, *, bands=2, seed=0) -> np.ndarray:
    """(bands, D, H, W) uint16 smooth random volume in 1..20000."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    field = np.stack([gaussian_filter(rng.normal(size=shape), sigma=1.5) for _ in range(bands)])
    field = (field - field.min()) / (field.max() - field.min())
    return (1 + field * 19999).astype(np.uint16)


def _normalised(pixels: np.ndarray) -> torch.Tensor:
    """(C, *spatial) raw -> (1, C, *spatial) float32, normalised as the predictor does."""
    x = torch.from_numpy(pixels.astype(np.float32))[None]
    return (x - MEAN) * (1.0 / torch.tensor(STD))


class Conv3dModel(torch.nn.Module):
    """A fixed, translation-equivariant 3D conv (kernel 2r+1, replicate padding): receptive
    radius r, not flip-equivariant (random weights)."""

    def __init__(self, bands=2, classes=4, radius=1, seed=0):
        super().__init__()
        k = 2 * radius + 1
        self.conv = torch.nn.Conv3d(bands, classes, k, padding=radius, padding_mode="replicate")
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) / k)
            self.conv.bias.zero_()

    def forward(self, x):
        return self.conv(x)


def _chunk_windows(shape, chunk, halo):
    """(read slices, core slices in the window, core slices in the volume) of a chunk grid;
    windows are clipped at the volume's faces (no padding beyond them)."""
    for starts in itertools.product(*(range(0, s, chunk) for s in shape)):
        read = tuple(slice(max(0, a - halo), min(s, a + chunk + halo)) for a, s in zip(starts, shape))
        core_global = tuple(slice(a, min(s, a + chunk)) for a, s in zip(starts, shape))
        core = tuple(slice(c.start - r.start, c.stop - r.start) for c, r in zip(core_global, read))
        yield read, core, core_global


def _stitched(pred: Predictor, volume: np.ndarray, chunk: int, halo: int):
    """Labels and float32 probabilities of the whole volume, assembled from chunk cores."""
    labels = np.full(volume.shape[1:], 254, dtype=np.uint8)
    probs = np.full((pred.num_classes, *volume.shape[1:]), np.nan, dtype=np.float32)
    for read, core, core_global in _chunk_windows(volume.shape[1:], chunk, halo):
        window = np.ascontiguousarray(volume[(slice(None), *read)])
        labels[core_global] = pred.predict_labels(window, core=core)
        probs[(slice(None), *core_global)] = pred.predict_probabilities(window)[(slice(None), *core)].numpy()
    return labels, probs


VOLUME = (19, 22, 17)  # odd sizes, not multiples of the chunk


def test_pointwise_oracle_tiled_and_blended_inside_halo_windows_equals_the_whole_volume():
    # Windows (chunk 8 + halo 2) cut into overlapping 5^3 tiles (Gaussian blending): a pointwise
    # oracle must come back exactly as on the whole volume.
    volume = _volume(VOLUME, seed=1)
    oracle = ThresholdOracle(2, 4, sharpness=2.0)
    pred = Predictor(oracle, _card(), options=PredictorOptions(device="cpu", tile_size=5, tile_overlap=0.5,
                                                               batch_size=4))
    assert len(plan_tiles((12, 12, 12), 5, 0.5)[1]) > 8  # really tiled
    labels, probs = _stitched(pred, volume, chunk=8, halo=2)
    x = _normalised(volume)
    with torch.inference_mode():
        want = torch.softmax(oracle(x), dim=1)[0].numpy()
    np.testing.assert_allclose(probs, want, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(labels, threshold_oracle_numpy(x[0].numpy(), 4))


@pytest.mark.parametrize("model", [ThresholdOracle(2, 4, radius=2), Conv3dModel(radius=1)],
                         ids=["box-oracle-r2", "conv3-r1"])
def test_local_models_with_a_halo_covering_the_receptive_field_equal_the_whole_volume(model):
    # Each window in one tile, cropped to its core: exact wherever halo >= receptive radius.
    model = model.eval()
    volume = _volume(VOLUME, seed=2)
    pred = Predictor(model, _card(), options=PredictorOptions(device="cpu", tile_size=64))
    labels, probs = _stitched(pred, volume, chunk=8, halo=2)
    with torch.inference_mode():
        want = torch.softmax(model(_normalised(volume)), dim=1)[0]
    np.testing.assert_allclose(probs, want.numpy(), rtol=0, atol=1e-5)
    top2 = want.topk(2, dim=0).values
    clear = ((top2[0] - top2[1]) > 1e-4).numpy()
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(labels[clear], want.argmax(0).numpy().astype(np.uint8)[clear])


def test_a_too_small_halo_is_not_exact():
    # The check above has teeth: with halo 0 a radius-2 box oracle differs at chunk faces.
    model = ThresholdOracle(2, 4, radius=2)
    volume = _volume((16, 16, 16), seed=2)  # whole chunks: reflect padding needs windows > 2 px
    pred = Predictor(model, _card(), options=PredictorOptions(device="cpu", tile_size=64))
    labels, _ = _stitched(pred, volume, chunk=8, halo=0)
    with torch.inference_mode():
        want = model(_normalised(volume))[0].argmax(0).numpy()
    assert (labels != want).any()


def test_a_constant_model_blends_to_the_constant():
    class Constant(torch.nn.Module):
        def forward(self, x):
            logits = torch.tensor([0.5, -1.0, 2.0], dtype=x.dtype).view(1, 3, 1, 1, 1)
            return logits.expand(x.shape[0], 3, *x.shape[2:])

    pred = Predictor(Constant(), _card(num_classes=3), options=PredictorOptions(device="cpu", tile_size=6,
                                                                               tile_overlap=0.3, batch_size=5))
    probs = pred.predict_probabilities(_volume((13, 10, 11)))
    want = torch.softmax(torch.tensor([0.5, -1.0, 2.0]), dim=0).view(3, 1, 1, 1).expand(3, 13, 10, 11)
    torch.testing.assert_close(probs, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("tile_size", [7, 64])
def test_stride_padding_of_all_three_axes_gives_outputs_of_the_window_shape(tile_size):
    seen = []

    class NeedsStride4(torch.nn.Module):
        def forward(self, x):
            if any(s % 4 for s in x.shape[2:]):
                raise ValueError(f"bad size {tuple(x.shape)}")
            seen.append(tuple(x.shape[2:]))
            return ThresholdOracle(2, 4)(x)

    volume = _volume((13, 11, 9), seed=3)
    pred = Predictor(NeedsStride4(), _card(stride=4), options=PredictorOptions(device="cpu", tile_size=tile_size))
    probs = pred.predict_probabilities(volume)
    assert probs.shape == (4, 13, 11, 9)
    assert set(seen) == ({(8, 8, 8)} if tile_size == 7 else {(16, 12, 12)})
    # replicate padding then the crop: the pointwise oracle's answer, unchanged
    want = threshold_oracle_numpy(_normalised(volume)[0].numpy(), 4)
    np.testing.assert_array_equal(pred.predict_labels(volume), want)


def test_3d_flip_names_and_presets():
    assert expand_tta(("flips",), spatial_dims=3) == ("identity", "dflip", "vflip", "hflip")
    assert expand_tta(("flips",), spatial_dims=2) == ("identity", "hflip", "vflip")  # as before
    assert expand_tta(("dflip", "rot90"), spatial_dims=3) == ("identity", "dflip", "rot90", "rot180", "rot270")
    assert expand_tta(("hflip", "dflip", "hflip"), spatial_dims=3) == ("identity", "hflip", "dflip")
    with pytest.raises(ValueError, match="dflip.*3 spatial axes"):
        expand_tta(("dflip",), spatial_dims=2)
    with pytest.raises(ValueError, match="unknown test-time augmentation"):
        expand_tta(("zflip",), spatial_dims=3)


@pytest.mark.parametrize("name", ["dflip", "vflip", "hflip", "rot90", "rot180", "rot270", "transpose", "antitranspose"])
def test_each_3d_transform_is_undone_by_its_inverse(name):
    x = torch.randn(2, 3, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    forward, inverse = augment(name)
    y = forward(x)
    assert not torch.equal(y, x)  # it really transforms
    assert torch.equal(inverse(y), x)
    axis = {"dflip": 2, "vflip": 3, "hflip": 4}.get(name)
    if axis is not None:
        assert torch.equal(y, x.flip(axis))


def test_tta_of_an_equivariant_oracle_keeps_the_labels():
    volume = _volume((12, 14, 10), seed=4)
    oracle = ThresholdOracle(2, 4)
    opts = dict(device="cpu", tile_size=8, tile_overlap=0.25)
    plain = Predictor(oracle, _card(), options=PredictorOptions(**opts))
    for tta in (("flips",), ("dflip",), ("flips", "d4")):
        pred = Predictor(oracle, _card(), options=PredictorOptions(**opts, tta=tta))
        np.testing.assert_array_equal(pred.predict_labels(volume), plain.predict_labels(volume))
        torch.testing.assert_close(pred.predict_probabilities(volume), plain.predict_probabilities(volume),
                                   rtol=0, atol=1e-6)


def test_3d_tta_averages_the_inverse_mapped_views():
    model = Conv3dModel().eval()
    volume = _volume((9, 10, 11), seed=5)
    opts = dict(device="cpu", tile_size=64)  # one tile: the expected value is easy to write down
    got = Predictor(model, _card(), options=PredictorOptions(**opts, tta=("dflip",))).predict_probabilities(volume)
    plain = Predictor(model, _card(), options=PredictorOptions(**opts)).predict_probabilities(volume)
    with torch.inference_mode():
        flipped = torch.softmax(model(_normalised(volume).flip(2)), dim=1).flip(2)[0]
    torch.testing.assert_close(got, (plain + flipped) / 2, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, plain, atol=1e-3)


def test_multiscale_resamples_3d_trilinearly_and_back():
    x = torch.randn(1, 2, 6, 8, 10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(resample(x, (3, 4, 5)), F.interpolate(x, size=(3, 4, 5), mode="trilinear"))
    assert resample(x, (6, 8, 10)) is x
    volume = _volume((12, 14, 10), seed=6)
    oracle = ThresholdOracle(2, 4)
    base = Predictor(oracle, _card(), options=PredictorOptions(device="cpu", tile_size=8))
    multi = Predictor(oracle, _card(), options=PredictorOptions(device="cpu", tile_size=8, scales=(0.5, 1.0, 1.5)))
    probs = multi.predict_probabilities(volume)
    assert probs.shape == (4, 12, 14, 10)
    torch.testing.assert_close(probs.sum(dim=0), torch.ones(probs.shape[1:]), rtol=0, atol=1e-5)
    assert (multi.predict_labels(volume) == base.predict_labels(volume)).mean() > 0.9


def test_nodata_voxels_are_255_and_nan_probabilities_in_3d():
    volume = _volume((10, 9, 8), seed=7)
    valid = np.ones(volume.shape[1:], dtype=bool)
    valid[:3] = False
    pred = Predictor(ThresholdOracle(2, 4), _card(), options=PredictorOptions(device="cpu", tile_size=6))
    core = (slice(1, 9), slice(2, 8), slice(0, 8))
    labels, probs = pred.predict_core(volume, valid, core=core, with_probabilities=True)
    assert labels.shape == (8, 6, 8) and probs.shape == (4, 8, 6, 8) and probs.dtype == np.float16
    assert (labels[:2] == 255).all() and (labels[2:] < 4).all()
    assert np.isnan(probs[:, :2]).all() and not np.isnan(probs[:, 2:]).any()


@pytest.mark.parametrize("with_probabilities", [False, True])
def test_predict_cores_batches_whole_3d_windows_like_one_at_a_time(with_probabilities):
    pred = Predictor(Conv3dModel(), _card(), options=PredictorOptions(device="cpu", tile_size=10, batch_size=2))
    rng = np.random.default_rng(0)
    windows = [(_volume((10, 10, 10), seed=20 + i), rng.random((10, 10, 10)) > 0.1 if i % 2 else None,
                (slice(2, 8),) * 3) for i in range(3)]
    windows.append((_volume((12, 10, 9), seed=30), None, None))  # several tiles: alone
    assert pred.windows_per_pass((10, 10, 10)) == 2 and pred.windows_per_pass((12, 10, 9)) == 1
    assert_batched_equals_one_by_one(pred, windows, with_probabilities=with_probabilities)


def test_channels_last_3d_keeps_the_contiguous_results():
    assert memory_format(channels_last=True, spatial_dims=3) is torch.channels_last_3d
    assert memory_format(channels_last=True) is torch.channels_last
    model = Conv3dModel()
    volume = _volume((12, 10, 9), seed=8)
    a = Predictor(model, _card(), options=PredictorOptions(device="cpu", tile_size=8, channels_last=True))
    assert a._members[0].model.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    pa = a.predict_probabilities(volume)
    b = Predictor(Conv3dModel(), _card(), options=PredictorOptions(device="cpu", tile_size=8, channels_last=False))
    assert b._members[0].model.conv.weight.is_contiguous()
    torch.testing.assert_close(pa, b.predict_probabilities(volume), rtol=0, atol=1e-5)


def test_a_3d_model_refuses_a_2d_window_naming_the_model():
    pred = Predictor(Conv3dModel(), _card(), options=PredictorOptions(device="cpu"))
    with pytest.raises(ValueError, match="model 'vol' takes 3D tiles, got a 2D window"):
        pred.predict_labels(_volume((10, 10, 10))[:, 0])
    with pytest.raises(ValueError, match=r"\(C=2, H, W\) or \(C=2, D, H, W\)"):
        pred.predict_labels(np.zeros((2, 4, 4, 4, 4), dtype=np.uint16))


@pytest.mark.parametrize("memory", ["contiguous", "channels_last_3d"])
def test_argmax_classes_over_a_volume_matches_torch_argmax_including_ties(memory):
    probs = torch.rand((1, 5, 6, 20, 30), generator=torch.Generator().manual_seed(0))
    probs[:, :, :, :4] = 0.5  # ties: the first class wins
    fmt = torch.channels_last_3d if memory == "channels_last_3d" else torch.contiguous_format
    probs = probs.contiguous(memory_format=fmt)[0]
    view = probs[:, 1:5, 3:17, 2:25]
    assert (view.stride(0) == 1) == (memory == "channels_last_3d")  # both code paths
    torch.testing.assert_close(argmax_classes(view), torch.argmax(view, dim=0).to(torch.uint8), rtol=0, atol=0)


def _bn_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(2, 6, 3, padding=1), torch.nn.BatchNorm3d(6), torch.nn.ReLU(),
        torch.nn.Conv3d(6, 4, 3, padding=1, bias=False), torch.nn.BatchNorm3d(4),
    )
    with torch.no_grad():  # non-trivial running statistics, as after training
        for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm3d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return net.eval()


def test_fold_batchnorm_folds_conv3d_and_batchnorm3d():
    net = _bn_net()
    folded = fold_batchnorm(net)
    assert folded is not net
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules()) == 2  # the caller's, untouched
    x = torch.randn(2, 2, 9, 10, 11, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = folded(x), net(x)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert torch.equal(a.argmax(1), b.argmax(1))
    volume = _volume((12, 10, 9), seed=9)
    opts = dict(device="cpu", tile_size=8)
    p_fold = Predictor(net, _card(), options=PredictorOptions(**opts, fold_batchnorm=True))
    p_plain = Predictor(net, _card(), options=PredictorOptions(**opts, fold_batchnorm=False))
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in p_fold._members[0].model.modules())
    torch.testing.assert_close(p_fold.predict_probabilities(volume), p_plain.predict_probabilities(volume),
                               rtol=0, atol=1e-5)
    np.testing.assert_array_equal(p_fold.predict_labels(volume), p_plain.predict_labels(volume))
