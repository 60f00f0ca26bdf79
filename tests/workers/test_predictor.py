"""The plain predictor (no Ray): tiling + blending, TTA, multi-scale, ensembles, nodata."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from schemas.model_card import ModelCard
from tests.helpers import assert_batched_equals_one_by_one, smooth_scene
from workers.models.oracles import ThresholdOracle
from workers.predictor import Member, Predictor, PredictorOptions, resolve_autocast_dtype


def _card(num_classes=4, bands=4, stride=1) -> ModelCard:
    return ModelCard.model_validate({
        "name": "t", "architecture": "oracle_threshold", "in_channels": bands,
        "classes": [{"id": i, "name": f"c{i}"} for i in range(num_classes)],
        "bands": [{"name": f"b{i}", "mean": 10000.0, "std": 3000.0} for i in range(bands)],
        "tile_size": 32, "halo": 4, "stride": stride, "weights": "w.safetensors", "weights_sha256": "0" * 64,
    })


class AsymmetricConv(torch.nn.Module):
    """A fixed, not flip-equivariant model: logits from a horizontal-gradient conv."""

    def __init__(self, bands=4, classes=4):
        super().__init__()
        self.conv = torch.nn.Conv2d(bands, classes, 3, padding=1, padding_mode="replicate")
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.zero_()

    def forward(self, x):
        return self.conv(x)


OPTS = dict(device="cpu", tile_size=32, tile_overlap=0.25, batch_size=3)


@pytest.fixture(scope="module")
def window():
    return smooth_scene((70, 90), seed=3)


def test_tiled_equals_one_pass_for_a_pointwise_model(window):
    oracle = ThresholdOracle(4, 4)
    tiled = Predictor(oracle, _card(), options=PredictorOptions(**OPTS)).predict_labels(window)
    whole = Predictor(oracle, _card(), options=PredictorOptions(**OPTS | {"tile_size": 4096})).predict_labels(window)
    np.testing.assert_array_equal(tiled, whole)


def test_flip_tta_of_an_equivariant_oracle_equals_the_oracle(window):
    oracle = ThresholdOracle(4, 4)
    plain = Predictor(oracle, _card(), options=PredictorOptions(**OPTS)).predict_probabilities(window)
    tta = Predictor(oracle, _card(), options=PredictorOptions(**OPTS | {"tta": ("d4",)})).predict_probabilities(window)
    torch.testing.assert_close(tta, plain, rtol=0, atol=1e-6)


def test_tta_averages_the_inverse_mapped_views(window):
    model = AsymmetricConv().eval()
    opts = OPTS | {"tile_size": 4096}  # one tile: the expected value is easy to write down
    got = Predictor(model, _card(), options=PredictorOptions(**opts | {"tta": ("hflip",)})).predict_probabilities(window)
    plain = Predictor(model, _card(), options=PredictorOptions(**opts)).predict_probabilities(window)
    x = (torch.from_numpy(window.astype(np.float32))[None] - 10000.0) * (1.0 / torch.tensor(3000.0))
    with torch.inference_mode():
        flipped = torch.softmax(model(x.flip(-1)), dim=1).flip(-1)[0]
    torch.testing.assert_close(got, (plain + flipped) / 2, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, plain, atol=1e-3)  # the augmentation really changed something


def test_ensemble_of_one_and_of_identical_members_equal_the_single_model(window):
    model = AsymmetricConv().eval()
    single = Predictor(model, _card(), options=PredictorOptions(**OPTS)).predict_probabilities(window)
    doubled = Predictor(model, _card(), options=PredictorOptions(**OPTS), weight=2.0,
                        extra_members=(Member(model, _card(), 3.0),)).predict_probabilities(window)
    torch.testing.assert_close(doubled, single, rtol=1e-5, atol=1e-6)


def test_ensemble_is_the_weighted_probability_average(window):
    a, b = AsymmetricConv().eval(), ThresholdOracle(4, 4, sharpness=2.0)
    opts = PredictorOptions(**OPTS)
    pa = Predictor(a, _card(), options=opts).predict_probabilities(window)
    pb = Predictor(b, _card(), options=opts).predict_probabilities(window)
    pab = Predictor(a, _card(), options=opts, weight=1.0,
                    extra_members=(Member(b, _card(), 3.0),)).predict_probabilities(window)
    torch.testing.assert_close(pab, (pa + 3 * pb) / 4, rtol=1e-5, atol=1e-6)


def test_ensemble_members_must_agree():
    with pytest.raises(ValueError, match="has classes"):
        Predictor(ThresholdOracle(4, 4), _card(), options=PredictorOptions(**OPTS),
                  extra_members=(Member(ThresholdOracle(4, 3), _card(num_classes=3)),))


def test_multiscale_identity_scale_is_a_no_op_and_other_scales_resample_back(window):
    model = AsymmetricConv().eval()
    plain = Predictor(model, _card(), options=PredictorOptions(**OPTS)).predict_probabilities(window)
    same = Predictor(model, _card(), options=PredictorOptions(**OPTS | {"scales": (1.0,)})).predict_probabilities(window)
    torch.testing.assert_close(same, plain, rtol=0, atol=0)
    multi = Predictor(model, _card(), options=PredictorOptions(**OPTS | {"scales": (0.5, 1.0, 1.5)}))
    probs = multi.predict_probabilities(window)
    assert probs.shape == plain.shape
    torch.testing.assert_close(probs.sum(dim=0), torch.ones(probs.shape[1:]), rtol=0, atol=1e-5)
    # A pointwise oracle is scale-invariant away from class borders: most labels agree.
    oracle = ThresholdOracle(4, 4)
    base = Predictor(oracle, _card(), options=PredictorOptions(**OPTS)).predict_labels(window)
    scaled = Predictor(oracle, _card(), options=PredictorOptions(**OPTS | {"scales": (0.5, 1.5)})).predict_labels(window)
    assert (base == scaled).mean() > 0.9


def test_nodata_pixels_are_255_and_nan_probabilities(window):
    valid = np.ones(window.shape[1:], dtype=bool)
    valid[:10] = False
    labels, probs = Predictor(ThresholdOracle(4, 4), _card(), options=PredictorOptions(**OPTS)).predict_core(
        window, valid, with_probabilities=True)
    assert (labels[:10] == 255).all() and (labels[10:] < 4).all()
    assert probs.dtype == np.float16 and np.isnan(probs[:, :10]).all()
    np.testing.assert_array_equal(probs[:, 10:].astype(np.float32).argmax(axis=0), labels[10:])


def test_strided_models_get_padded_tiles(window):
    class NeedsStride8(torch.nn.Module):
        def forward(self, x):
            if x.shape[-1] % 8 or x.shape[-2] % 8:
                raise ValueError(f"bad size {tuple(x.shape)}")
            return ThresholdOracle(4, 4)(x)

    labels = Predictor(NeedsStride8(), _card(stride=8), options=PredictorOptions(**OPTS | {"tile_size": 30})).predict_labels(window)
    assert labels.shape == window.shape[1:]


@pytest.mark.parametrize("channels_last", [False, True])
def test_argmax_classes_matches_torch_argmax_including_ties(channels_last):
    from workers.predictor import argmax_classes

    g = torch.Generator().manual_seed(0)
    probs = torch.rand((1, 5, 40, 60), generator=g)
    probs[:, :, :5] = 0.5  # ties: the first class wins, as in torch.argmax
    probs = probs.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)[0]
    assert (probs.stride(0) == 1) == channels_last  # both code paths
    view = probs[:, 3:33, 7:50]
    torch.testing.assert_close(argmax_classes(view), torch.argmax(view, dim=0).to(torch.uint8), rtol=0, atol=0)


def test_cpu_precisions():
    cpu = torch.device("cpu")
    assert resolve_autocast_dtype("auto", cpu) is None  # fp32: the same bytes on every CPU
    assert resolve_autocast_dtype("fp32", cpu) is None
    assert resolve_autocast_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_autocast_dtype("fp16", cpu)


@pytest.mark.parametrize("channels_last", [True, False])
def test_bf16_and_channels_last_on_cpu_keep_the_fp32_labels(window, channels_last):
    # A conv model under bf16 autocast and/or NHWC memory: float32 probabilities out, and
    # labels equal to plain fp32 NCHW except where two classes are nearly tied.
    model = AsymmetricConv()
    base = Predictor(model, _card(), options=PredictorOptions(**OPTS, channels_last=False))
    probs = base.predict_probabilities(window)
    for precision in ("auto", "bf16"):
        pred = Predictor(model, _card(), options=PredictorOptions(**OPTS, precision=precision,
                                                                  channels_last=channels_last))
        got = pred.predict_probabilities(window)
        assert got.dtype == torch.float32 and got.shape == probs.shape
        top2 = probs.topk(2, dim=0).values
        clear = (top2[0] - top2[1]) > 0.05
        assert torch.equal(got.argmax(0)[clear], probs.argmax(0)[clear])
        tol = 1e-5 if precision == "auto" else 0.05
        assert torch.allclose(got, probs, atol=tol)


@pytest.mark.parametrize("with_probabilities", [False, True])
@pytest.mark.parametrize("tta", [(), ("hflip",)])
def test_predict_cores_batches_whole_windows_like_one_at_a_time(with_probabilities, tta):
    # Five 40x40 windows that are each one model tile: batch 2 runs them 2 + 2 + 1 per forward
    # pass; a 70x90 window (several tiles) and one of another shape go alone. Same results.
    model = AsymmetricConv()
    pred = Predictor(model, _card(), options=PredictorOptions(**OPTS | {"tile_size": 40, "batch_size": 2, "tta": tta}))
    rng = np.random.default_rng(5)
    windows = []
    for i in range(5):
        pixels = smooth_scene((40, 40), seed=10 + i)
        valid = rng.random((40, 40)) > 0.1 if i % 2 else None
        windows.append((pixels, valid, (slice(4, 36), slice(4, 36))))
    windows.insert(2, (smooth_scene((70, 90), seed=3), None, None))
    windows.append((smooth_scene((40, 24), seed=4), None, None))
    assert pred.windows_per_pass((40, 40)) == 2 and pred.windows_per_pass((70, 90)) == 1
    assert_batched_equals_one_by_one(pred, windows, with_probabilities=with_probabilities)


def test_an_all_valid_mask_gives_what_no_mask_gives(window, monkeypatch):
    # An all-True mask is dropped before any work (no mask on the device, no multiply); the
    # results equal no mask, and a mask with nodata still goes through the masked path.
    import workers.predictor as predictor_module

    pred = Predictor(AsymmetricConv(), _card(), options=PredictorOptions(**OPTS | {"tile_size": 128}))
    core = (slice(5, 65), slice(5, 85))
    all_valid = np.ones(window.shape[1:], dtype=bool)
    for with_probabilities in (False, True):
        want = pred.predict_core(window, None, core=core, with_probabilities=with_probabilities)
        got = pred.predict_core(window, all_valid, core=core, with_probabilities=with_probabilities)
        np.testing.assert_array_equal(got[0], want[0])
        if with_probabilities:
            np.testing.assert_array_equal(got[1], want[1])
    moved = []
    to_device = Predictor._to_device
    monkeypatch.setattr(predictor_module.Predictor, "_to_device", lambda self, a: moved.append(a.dtype) or to_device(self, a))
    pred.predict_core(window, all_valid, core=core)
    assert np.dtype(bool) not in moved
    holes = all_valid.copy()
    holes[10, 10] = False
    labels, _ = pred.predict_core(window, holes, core=core)
    assert labels[5, 5] == 255 and (np.delete(labels.ravel(), 5 * 80 + 5) != 255).all()
    assert np.dtype(bool) in moved


def test_fold_batchnorm_keeps_outputs_and_leaves_the_callers_model_alone():
    from workers.models.unet import UNet
    from workers.predictor import fold_batchnorm

    torch.manual_seed(0)
    model = UNet(4, 3, base_channels=4, depth=2)
    with torch.no_grad():  # non-trivial running statistics, as after training
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
    model.eval()
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    folded = fold_batchnorm(model)
    assert folded is not model
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules()) == 0
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == n_bn  # untouched
    x = torch.randn(2, 4, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)
    plain = torch.nn.Sequential(torch.nn.Conv2d(4, 3, 3), torch.nn.ReLU()).eval()
    assert fold_batchnorm(plain) is plain  # nothing to fold: the same module back
    training = UNet(4, 3, base_channels=4, depth=2).train()
    assert fold_batchnorm(training) is training  # BN in training mode is never folded


def test_predictor_with_and_without_folding_agree(window):
    from workers.models.unet import UNet

    torch.manual_seed(1)
    model = UNet(4, 4, base_channels=4, depth=2).eval()
    opts = OPTS | {"tile_size": 48}
    a = Predictor(model, _card(), options=PredictorOptions(**opts, fold_batchnorm=True)).predict_probabilities(window)
    b = Predictor(model, _card(), options=PredictorOptions(**opts, fold_batchnorm=False)).predict_probabilities(window)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
