"""Registry: every architecture builds for any band count, keeps input size, and round-trips
through a checkpoint; plugins load; errors name the value and the fix."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from schemas.errors import ModelCardError
from workers.checkpoints import build_from_checkpoint, load_checkpoint, save_checkpoint
from workers.models.plugins import NumpyModel
from workers.models.zoo import adapt_first_conv, extend_band_stats, first_conv
from workers.registry import (
    ALLOW_PLUGINS_ENV,
    architectures,
    build_model,
    check_plugin_allowed,
    model_kind,
    model_spatial_dims,
    native_stride,
)

SLOW = pytest.mark.slow

# (architecture, arch_args): every semantic architecture at least once. The ResNet-50/101
# torchvision models take several seconds per build + forward on 2 CPU cores: slow.
SEMANTIC_CASES = [
    pytest.param("unet", {}, id="unet"),
    pytest.param("unet", {"depth": 2, "upsample": "bilinear", "base_channels": 4}, id="unet-bilinear"),
    pytest.param("oracle_threshold", {"radius": 1}, id="oracle_threshold"),
    pytest.param("oracle_ramp", {"slope": 6.0}, id="oracle_ramp"),
    pytest.param("lraspp", {}, id="lraspp"),
    pytest.param("deeplabv3", {"backbone": "mobilenet_v3_large"}, id="deeplabv3-mobilenet"),
    pytest.param("deeplabv3plus", {}, id="deeplabv3plus"),
    pytest.param("pspnet", {}, id="pspnet"),
    pytest.param("pspnet", {"encoder_depth": 4}, id="pspnet-depth4"),
    pytest.param("unet_smp", {}, id="unet_smp"),
    pytest.param("unet_smp", {"encoder_depth": 3}, id="unet_smp-depth3"),
    pytest.param("fcn_resnet50", {}, id="fcn_resnet50", marks=SLOW),
    pytest.param("deeplabv3", {}, id="deeplabv3-resnet50", marks=SLOW),
    pytest.param("deeplabv3", {"backbone": "resnet101"}, id="deeplabv3-resnet101", marks=SLOW),
]

NUM_CLASSES = 3
SIZE = 64


def card_fields(architecture: str, arch_args: dict, *, in_channels: int, num_classes: int) -> dict:
    """A valid card (all but name/weights/sha) with the architecture's native stride."""
    return {
        "architecture": architecture,
        "arch_args": arch_args,
        "in_channels": in_channels,
        "classes": [{"id": i, "name": f"class{i}"} for i in range(num_classes)],
        "bands": [{"name": f"b{i + 1}", "mean": 0.0, "std": 1.0} for i in range(in_channels)],
        "tile_size": SIZE,
        "halo": 8,
        "stride": native_stride(architecture, arch_args),
    }


def has_parameters(model: nn.Module) -> bool:
    return any(True for _ in model.parameters())


@pytest.mark.parametrize("in_channels", [1, 4])
@pytest.mark.parametrize(("architecture", "arch_args"), SEMANTIC_CASES)
def test_semantic_builds_forwards_and_round_trips(architecture, arch_args, in_channels, tmp_path):
    torch.manual_seed(0)
    model = build_model(architecture, in_channels=in_channels, num_classes=NUM_CLASSES, arch_args=arch_args).eval()
    x = torch.randn(1, in_channels, SIZE, SIZE)
    with torch.inference_mode():
        expected = model(x)
    assert isinstance(expected, torch.Tensor)
    assert expected.shape == (1, NUM_CLASSES, SIZE, SIZE)
    assert expected.dtype == torch.float32
    assert torch.isfinite(expected).all()

    fields = card_fields(architecture, arch_args, in_channels=in_channels, num_classes=NUM_CLASSES)
    card_path = save_checkpoint(model, fields, tmp_path, name=f"{architecture}-{in_channels}")
    torch.manual_seed(1)  # a different random init: only loading the weights can restore the output
    loaded = build_from_checkpoint(load_checkpoint(card_path))
    assert not loaded.training
    # safetensors' views sit at the file's offsets; kernels may take another path for unaligned
    # weights (AVX-512 machines did: 1.7e-6 apart). Every loaded tensor has storage of its own.
    unaligned = {name: t.data_ptr() % 64 for name, t in (*loaded.named_parameters(), *loaded.named_buffers())
                 if t.numel() and t.data_ptr() % 64}
    assert unaligned == {}
    with torch.inference_mode():
        got = loaded(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    if has_parameters(model):
        fresh = build_model(architecture, in_channels=in_channels, num_classes=NUM_CLASSES, arch_args=arch_args).eval()
        with torch.inference_mode():
            assert not torch.equal(fresh(x), expected)


def test_semantic_cases_cover_every_semantic_architecture():
    """Every 2D one; the 3D ones are covered by tests/workers/test_models3d.py."""
    covered = {p.values[0] for p in SEMANTIC_CASES}
    semantic = {name for name in architectures() if model_kind(name) == "semantic" and model_spatial_dims(name) == 2}
    assert covered == semantic


def test_registry_names_and_kinds():
    assert architectures() == (
        "deeplabv3", "deeplabv3plus", "fcn_resnet50", "instance_oracle", "lraspp", "maskrcnn", "maskrcnn_light",
        "monai_basicunet", "monai_segresnet", "monai_unet", "oracle_ramp", "oracle_threshold", "pspnet", "unet",
        "unet3d", "unet_smp",
    )
    assert {name: model_kind(name) for name in architectures()}["maskrcnn"] == "instance"
    assert [name for name in architectures() if model_kind(name) == "instance"] == [
        "instance_oracle", "maskrcnn", "maskrcnn_light"]
    assert model_kind("some.module:factory") == "semantic"


@pytest.mark.parametrize(
    ("architecture", "arch_args", "stride"),
    [
        ("unet", {}, 16),
        ("unet", {"depth": 2}, 4),
        ("oracle_threshold", {}, 1),
        ("oracle_ramp", {"gain": 0.5}, 1),
        ("fcn_resnet50", {}, 1),
        ("deeplabv3", {"backbone": "resnet101"}, 1),
        ("lraspp", {}, 1),
        ("deeplabv3plus", {}, 16),
        ("deeplabv3plus", {"encoder_output_stride": 8}, 8),
        ("pspnet", {}, 8),
        ("pspnet", {"encoder_depth": 4}, 16),
        ("unet_smp", {}, 32),
        ("unet_smp", {"encoder_depth": 4, "decoder_channels": [64, 32, 16, 8]}, 16),
        ("maskrcnn", {"min_size": 256}, 1),
        ("maskrcnn", {"backbone": "resnet18", "min_size": None}, 1),
        ("instance_oracle", {"threshold": 0.2, "class_channel": 1}, 1),
    ],
)
def test_native_stride_table(architecture, arch_args, stride):
    assert native_stride(architecture, arch_args) == stride


@pytest.mark.parametrize(
    ("architecture", "arch_args"),
    [
        ("deeplabv3plus", {}),
        ("deeplabv3plus", {"encoder_output_stride": 8}),
        ("pspnet", {"encoder_depth": 4}),
        ("unet_smp", {"encoder_depth": 4}),
    ],
)
def test_native_stride_matches_smp_encoder(architecture, arch_args):
    model = build_model(architecture, in_channels=2, num_classes=2, arch_args=arch_args)
    assert native_stride(architecture, arch_args) == model.encoder.output_stride


@pytest.mark.parametrize(
    ("architecture", "arch_args", "size"),
    [
        ("lraspp", {}, 67),
        ("deeplabv3", {"backbone": "mobilenet_v3_large"}, 37),
        ("unet", {"depth": 3, "base_channels": 4}, 40),
        ("deeplabv3plus", {}, 48),
        ("pspnet", {}, 40),
        ("unet_smp", {}, 96),
        pytest.param("fcn_resnet50", {}, 37, marks=SLOW),
    ],
)
def test_native_stride_sizes_keep_input_size(architecture, arch_args, size):
    """A side that is a multiple of the native stride (odd sides where it is 1) keeps its size."""
    assert size % native_stride(architecture, arch_args) == 0
    model = build_model(architecture, in_channels=4, num_classes=2, arch_args=arch_args).eval()
    with torch.inference_mode():
        out = model(torch.randn(1, 4, size, size + native_stride(architecture, arch_args)))
    assert out.shape == (1, 2, size, size + native_stride(architecture, arch_args))


def test_native_stride_rejects_unknown_args_and_architectures():
    with pytest.raises(ModelCardError, match="rejected arch_args.*'depht'"):
        native_stride("unet", {"depht": 3})
    with pytest.raises(ModelCardError, match="rejected arch_args.*'backbone'"):
        native_stride("lraspp", {"backbone": "resnet50"})
    with pytest.raises(ModelCardError, match="unknown architecture 'segformer'"):
        native_stride("segformer", {})


def test_unknown_architecture_lists_known_names():
    with pytest.raises(ModelCardError, match="unknown architecture 'segformer'") as info:
        build_model("segformer", in_channels=3, num_classes=2, arch_args={})
    for name in architectures():
        assert name in str(info.value)
    assert "package.module:callable" in str(info.value)


@pytest.mark.parametrize(
    ("architecture", "arch_args", "match"),
    [
        ("lraspp", {"aux_loss": True}, "unexpected keyword argument 'aux_loss'"),
        ("fcn_resnet50", {"backbone": "resnet101"}, "unexpected keyword argument 'backbone'"),
        ("deeplabv3", {"backbone": "vgg16"}, "backbone must be one of"),
        ("deeplabv3plus", {"encoder": "resnet19"}, "'resnet19' is not an smp encoder"),
        ("deeplabv3plus", {"encoder_output_stride": 32}, "encoder_output_stride must be 8 or 16"),
        ("pspnet", {"encoder_depth": 7}, "encoder_depth must be an int in 1..5"),
        ("unet_smp", {"decoder_channels": [32, 16]}, "needs 5 widths"),
        ("unet_smp", {"encoder": "tu-not_a_model"}, "not a timm model"),
        ("unet", {"upsample": "nearest"}, "upsample must be one of"),
        ("maskrcnn", {"image_mean": [0.5, 0.5, 0.5]}, "image_mean must list 4 numbers"),
        ("maskrcnn", {"image_std": [1.0, 1.0, 0.0, 1.0]}, "image_std must hold positive numbers"),
        ("maskrcnn", {"anchor_sizes": [8]}, "unexpected keyword argument 'anchor_sizes'"),
        ("maskrcnn", {"backbone": "vgg16"}, "maskrcnn backbone must be one of"),
        ("maskrcnn", {"rpn_post_nms_top_n_test": 0}, "rpn_post_nms_top_n_test must be an int >= 1"),
        ("instance_oracle", {"class_channel": 7}, "class_channel must be a band index in 0..3"),
    ],
)
def test_builders_reject_bad_arch_args(architecture, arch_args, match):
    with pytest.raises(ModelCardError, match=match) as info:
        build_model(architecture, in_channels=4, num_classes=3, arch_args=arch_args)
    assert f"architecture {architecture!r} rejected arch_args" in str(info.value)


def test_maskrcnn_num_classes_counts_background():
    with pytest.raises(ModelCardError, match="counts background"):
        build_model("maskrcnn", in_channels=4, num_classes=1, arch_args={})


@pytest.mark.parametrize(
    "arch_args", [pytest.param({"min_size": 128, "max_size": 128}, id="min128"), pytest.param({}, id="default800", marks=SLOW)]
)
def test_maskrcnn_four_bands_returns_instances(arch_args):
    torch.manual_seed(0)
    model = build_model("maskrcnn", in_channels=4, num_classes=3, arch_args=arch_args).eval()
    assert first_conv(model.backbone)[1].in_channels == 4
    assert model.transform.image_mean == pytest.approx([0.485, 0.456, 0.406, (0.485 + 0.456 + 0.406) / 3])
    assert len(model.transform.image_std) == 4
    with torch.inference_mode():
        out = model(torch.rand(1, 4, 128, 128))
    assert isinstance(out, list) and len(out) == 1
    det = out[0]
    assert {"boxes", "labels", "scores", "masks"} <= set(det)
    n = det["boxes"].shape[0]
    assert det["boxes"].shape == (n, 4)
    assert det["labels"].shape == (n,) and det["labels"].dtype == torch.int64
    assert det["scores"].shape == (n,)
    assert det["masks"].shape == (n, 1, 128, 128)
    if n:
        assert int(det["labels"].min()) >= 1 and int(det["labels"].max()) <= 2  # 0 is background
        assert float(det["boxes"].min()) >= 0 and float(det["boxes"].max()) <= 128


def test_maskrcnn_custom_normalisation():
    model = build_model(
        "maskrcnn", in_channels=2, num_classes=2,
        arch_args={"image_mean": [0, 0], "image_std": [1, 1], "min_size": 64, "max_size": 64},
    )
    assert model.transform.image_mean == [0.0, 0.0]
    assert model.transform.image_std == [1.0, 1.0]
    assert model.transform.min_size == (64,)


# ---------------------------------------------------------------------------- adapt_first_conv


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, padding_mode="reflect"), nn.ReLU()),
        nn.Conv2d(8, 2, 1),
    )


@pytest.mark.parametrize("in_channels", [4, 6])
def test_adapt_first_conv_keeps_rgb_filters_and_means_extra_bands(in_channels):
    net = small_net()
    old = net[0][0]
    new = adapt_first_conv(net, in_channels)
    assert net[0][0] is new and new is not old
    assert new.weight.shape == (8, in_channels, 3, 3)
    for attr in ("out_channels", "kernel_size", "stride", "padding", "dilation", "padding_mode"):
        assert getattr(new, attr) == getattr(old, attr)
    torch.testing.assert_close(new.weight[:, :3], old.weight, rtol=0, atol=0)
    mean = old.weight.mean(dim=1)
    for band in range(3, in_channels):
        torch.testing.assert_close(new.weight[:, band], mean, rtol=0, atol=0)
    torch.testing.assert_close(new.bias, old.bias, rtol=0, atol=0)
    assert net(torch.randn(1, in_channels, 16, 16)).shape == (1, 2, 8, 8)


def test_adapt_first_conv_one_band_answers_like_rgb_on_grey():
    net = small_net()
    old = net[0][0]
    new = adapt_first_conv(net, 1)
    grey = torch.randn(1, 1, 16, 16)
    torch.testing.assert_close(new(grey), old(grey.expand(1, 3, 16, 16)), rtol=1e-5, atol=1e-5)


def test_adapt_first_conv_random_init_and_no_op():
    net = small_net()
    old = net[0][0]
    assert adapt_first_conv(net, 3) is old
    new = adapt_first_conv(net, 5, reuse_weights=False)
    assert new.weight.shape == (8, 5, 3, 3)
    assert not torch.equal(new.weight[:, :3], old.weight)


def test_adapt_first_conv_errors():
    with pytest.raises(ValueError, match="no Conv2d"):
        adapt_first_conv(nn.Sequential(nn.ReLU()), 4)
    with pytest.raises(ValueError, match="groups=3"):
        adapt_first_conv(nn.Sequential(nn.Conv2d(3, 6, 3, groups=3)), 4)
    with pytest.raises(ValueError, match="in_channels must be an int >= 1, got 0"):
        adapt_first_conv(small_net(), 0)


def test_extend_band_stats():
    assert extend_band_stats([1.0, 2.0, 3.0], 5) == [1.0, 2.0, 3.0, 2.0, 2.0]
    assert extend_band_stats([1.0, 2.0, 3.0], 1) == [2.0]


# ---------------------------------------------------------------------------- plugins

PLUGIN_SOURCE = '''
import numpy as np
import torch


class TinyNet(torch.nn.Module):
    def __init__(self, in_channels, num_classes, width):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(in_channels, width, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(width, num_classes, 1),
        )

    def forward(self, x):
        return self.body(x)


def torch_factory(*, in_channels, num_classes, width=4):
    return TinyNet(in_channels, num_classes, width)


torch_factory.stride = 4


def volume_factory(*, in_channels, num_classes):
    return torch.nn.Conv3d(in_channels, num_classes, 1)


volume_factory.spatial_dims = 3
bad_dims_factory = lambda *, in_channels, num_classes: torch.nn.Identity()  # noqa: E731
bad_dims_factory.spatial_dims = 4


def numpy_factory(*, in_channels, num_classes, scale=1.0):
    def predict(x):
        mean = x.mean(axis=1, keepdims=True)
        return np.concatenate([mean * scale * (k + 1) for k in range(num_classes)], axis=1).astype(np.float64)

    return predict


def wrong_shape_factory(*, in_channels, num_classes):
    return lambda x: x[:, :1]


def bad_factory(*, in_channels, num_classes):
    return 42


def bad_stride_factory(*, in_channels, num_classes):
    return torch.nn.Identity()


bad_stride_factory.stride = 0
not_callable = 3


class Scaled(torch.nn.Module):
    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, num_classes, 1)
        self.register_buffer("scale", torch.tensor(2.0), persistent=False)  # not in the state dict

    def forward(self, x):
        return self.conv(x) * self.scale


def buffer_factory(*, in_channels, num_classes):
    return Scaled(in_channels, num_classes)
'''


@pytest.fixture
def plugin_module(tmp_path, monkeypatch) -> str:
    """A plugin module written to tmp_path and put on sys.path; its name."""
    name = "tessera_test_plugin"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(PLUGIN_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


def test_plugin_returning_torch_module(plugin_module, tmp_path):
    arch = f"{plugin_module}:torch_factory"
    torch.manual_seed(0)
    model = build_model(arch, in_channels=4, num_classes=3, arch_args={"width": 6}).eval()
    assert type(model).__name__ == "TinyNet"
    assert model.body[0].out_channels == 6
    assert native_stride(arch, {"width": 6}) == 4
    assert model_kind(arch) == "semantic"
    x = torch.randn(2, 4, 16, 16)
    with torch.inference_mode():
        expected = model(x)
    assert expected.shape == (2, 3, 16, 16)
    card_path = save_checkpoint(model, card_fields(arch, {"width": 6}, in_channels=4, num_classes=3), tmp_path / "ckpt", name="tiny")
    loaded = build_from_checkpoint(load_checkpoint(card_path))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_checkpoints_build_without_random_init_and_fall_back_where_that_cannot_work(plugin_module, tmp_path):
    from workers.checkpoints import _build_on_meta, load_state_dict

    x = torch.randn(1, 4, 16, 16)
    for arch, arch_args, meta_ok in ((f"{plugin_module}:torch_factory", {"width": 3}, True),
                                     ("unet", {"base_channels": 4, "depth": 2}, True),
                                     # a non-persistent buffer is in no state dict: plain build
                                     (f"{plugin_module}:buffer_factory", {}, False)):
        model = build_model(arch, in_channels=4, num_classes=3, arch_args=arch_args).eval()
        card_path = save_checkpoint(model, card_fields(arch, arch_args, in_channels=4, num_classes=3),
                                    tmp_path / "ckpt", name=arch.replace(":", "-"))
        ckpt = load_checkpoint(card_path)
        assert (_build_on_meta(ckpt.card, load_state_dict(ckpt.weights_path)) is not None) == meta_ok, arch
        loaded = build_from_checkpoint(ckpt)
        assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
        assert all(isinstance(p, torch.nn.Parameter) for p in loaded.parameters())
        with torch.inference_mode():
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_plugin_returning_numpy_function(plugin_module, tmp_path):
    arch = f"{plugin_module}:numpy_factory"
    model = build_model(arch, in_channels=2, num_classes=3, arch_args={"scale": 2.0})
    assert isinstance(model, NumpyModel)
    assert model.state_dict() == {}
    assert native_stride(arch) == 1
    x = torch.arange(2 * 2 * 4 * 5, dtype=torch.float32).reshape(2, 2, 4, 5)
    out = model(x)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4, 5)
    mean = x.mean(dim=1)
    for k in range(3):
        torch.testing.assert_close(out[:, k], mean * 2.0 * (k + 1))
    card_path = save_checkpoint(model, card_fields(arch, {"scale": 2.0}, in_channels=2, num_classes=3), tmp_path / "ckpt", name="np")
    loaded = build_from_checkpoint(load_checkpoint(card_path))
    torch.testing.assert_close(loaded(x), out, rtol=0, atol=0)


def test_numpy_model_checks_what_the_function_returns(plugin_module):
    model = build_model(f"{plugin_module}:wrong_shape_factory", in_channels=2, num_classes=3, arch_args={})
    with pytest.raises(ValueError, match=r"expected float \(N, K, H, W\) = \(1, 3, 8, 8\)"):
        model(torch.zeros(1, 2, 8, 8))
    labels = NumpyModel(lambda x: np.zeros((1, 2, 8, 8), dtype=np.int64), num_classes=2, name="labels")
    with pytest.raises(ValueError, match="returned int64 array"):
        labels(torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="expects input"):
        labels(torch.zeros(2, 8, 8))


@pytest.mark.parametrize(
    ("target", "arch_args", "match"),
    [
        ("tessera_no_such_module:factory", {}, "cannot import module 'tessera_no_such_module'.*PYTHONPATH"),
        ("{mod}:missing", {}, "has no attribute 'missing'"),
        ("{mod}:not_callable", {}, "'not_callable' is a int, not a callable"),
        ("{mod}:bad_factory", {}, "returned a int; it must return a torch.nn.Module or a callable"),
        ("{mod}:torch_factory", {"depth": 3}, "rejected arch_args.*unexpected keyword argument 'depth'"),
        ("{mod}:", {}, "must look like 'package.module:callable'"),
        (":torch_factory", {}, "must look like 'package.module:callable'"),
        ("{mod}:torch_factory:x", {}, "must look like 'package.module:callable'"),
    ],
)
def test_plugin_errors(plugin_module, target, arch_args, match):
    with pytest.raises(ModelCardError, match=match):
        build_model(target.format(mod=plugin_module), in_channels=2, num_classes=2, arch_args=arch_args)


def test_plugin_spatial_dims_attribute(plugin_module):
    assert model_spatial_dims(f"{plugin_module}:torch_factory") == 2  # no attribute: images
    assert model_spatial_dims(f"{plugin_module}:volume_factory") == 3
    with pytest.raises(ModelCardError, match="'spatial_dims' must be 2 .* or 3 .*got 4"):
        model_spatial_dims(f"{plugin_module}:bad_dims_factory")


def test_plugin_bad_stride_attribute(plugin_module):
    with pytest.raises(ModelCardError, match="'stride' must be an int >= 1"):
        native_stride(f"{plugin_module}:bad_stride_factory")


def test_registry_import_loads_no_model_library():
    """Importing the registry imports neither torchvision, smp nor MONAI (checked in a fresh process)."""
    import subprocess

    code = (
        "import sys, workers.registry; "
        "bad = [m for m in ('torchvision', 'segmentation_models_pytorch', 'timm', 'monai') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0


# ---------------------------------------------------------------------------- timing (reported)


@SLOW
@pytest.mark.parametrize(("architecture", "arch_args"), [pytest.param(*p.values, id=p.id) for p in SEMANTIC_CASES])
def test_cpu_forward_time_512(architecture, arch_args, request):
    """Records (does not assert) the warm CPU forward time of 1x4x512x512 with 2 threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = build_model(architecture, in_channels=4, num_classes=NUM_CLASSES, arch_args=arch_args).eval()
        x = torch.randn(1, 4, 512, 512)
        with torch.inference_mode():
            model(x)  # warm-up
            start = time.perf_counter()
            out = model(x)
            seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    assert out.shape == (1, NUM_CLASSES, 512, 512)
    # Shown in a junit report (--junitxml, junit_family=legacy) and in request.node.user_properties.
    request.node.user_properties.append(("forward_s_1x4x512x512_2threads", round(seconds, 3)))
    request.node.user_properties.append(("parameters", sum(p.numel() for p in model.parameters())))


@pytest.mark.parametrize(("allowed", "ok"), [
    (None, False), ("", False), ("*", True), ("mypkg", True), ("mypkg.models", True), ("other, mypkg", True),
    ("mypk", False), ("mypkg.models.deep", False), ("mypkg.model", False),
])
def test_check_plugin_allowed_takes_module_prefixes_from_the_environment(allowed, ok):
    environ = {} if allowed is None else {ALLOW_PLUGINS_ENV: allowed}
    arch = "mypkg.models:factory"
    if ok:
        check_plugin_allowed(arch, where="card.json", environ=environ)
    else:
        with pytest.raises(ModelCardError, match=rf"card.json: .*{ALLOW_PLUGINS_ENV}=mypkg.models"):
            check_plugin_allowed(arch, where="card.json", environ=environ)
    check_plugin_allowed("unet", where="card.json", environ=environ)  # registered names always pass
