"""Model registry: architecture name -> builder. Nothing is imported or built at import time.

A builder takes (in_channels, num_classes, **arch_args) and returns a torch.nn.Module. A
"semantic" model maps (N, in_channels, H, W) float32 to (N, num_classes, H, W) logits at the
input resolution (a 3D model, :func:`model_spatial_dims`: (N, in_channels, D, H, W) to
(N, num_classes, D, H, W)); an "instance" model (``maskrcnn``) returns torchvision's list of
dicts (boxes, labels, scores, masks), see :func:`model_kind`.

Registered names (arch_args, defaults; native stride in px or voxels):

* ``unet``: our U-Net (``base_channels=16, depth=4, upsample="transpose"|"bilinear"``); ``2**depth``.
* ``oracle_threshold``: test oracle (``radius=0, sharpness=50.0``); 1.
* ``oracle_ramp``: test oracle whose scores depend on the position inside the tile, for checking
  the blend (``slope=8.0, gain=1.0``; 2 classes); 1.
* ``fcn_resnet50``: torchvision FCN ResNet-50 (no arch_args); 1.
* ``deeplabv3``: torchvision DeepLabV3 (``backbone="resnet50"|"resnet101"|"mobilenet_v3_large"``); 1.
* ``lraspp``: torchvision LR-ASPP MobileNetV3-Large (no arch_args); 1.
* ``deeplabv3plus``: smp DeepLabV3+ (``encoder="resnet18", encoder_output_stride=16,
  decoder_channels=256``); ``encoder_output_stride``.
* ``pspnet``: smp PSPNet (``encoder="resnet18", encoder_depth=3, psp_out_channels=512``);
  ``2**encoder_depth``.
* ``unet_smp``: smp U-Net (``encoder="resnet18", encoder_depth=5, decoder_channels=None``);
  ``2**encoder_depth``.
* ``maskrcnn``: torchvision Mask R-CNN, instance (``backbone="resnet50"|"resnet18"|"mobilenet_v3_large",
  min_size=800 (None: native resolution), max_size=1333, image_mean=None, image_std=None,
  box_score_thresh=0.05, box_detections_per_img=100``); 1.
* ``instance_oracle``: test oracle, instance: connected components of ``channel 0 > threshold``
  (``threshold=0.5, class_channel=None, given_labels=False``: with it, channel 0 holds the ids); 1. Images
  and volumes.
* ``maskrcnn_light``: a light Mask R-CNN that trains on CPU, instance: ResNet-18 (or ``resnet34``) FPN,
  narrow heads, no resizing (``backbone="resnet18", fpn_channels=128, norm="group",
  anchor_sizes=(16, 32, 64, 128, 256), image_mean=None, image_std=None, box_score_thresh=0.05,
  box_detections_per_img=100, rpn_batch_size_per_image=128, box_batch_size_per_image=128,
  rpn_proposals=300, mask_head_channels=64, mask_head_layers=2``); 1.

3D (volumes ``(N, C, D, H, W)``):

* ``unet3d``: our U-Net in 3D (``base_channels=16, depth=4, upsample="transpose"|"trilinear"``);
  ``2**depth``.
* ``monai_unet``: MONAI UNet (``channels=(16, 32, 64, 128), strides=(2, 2, 2),
  num_res_units=2``); the product of ``strides``.
* ``monai_basicunet``: MONAI BasicUNet (``features=(16, 16, 32, 64, 128, 16)``); 16.
* ``monai_segresnet``: MONAI SegResNet (``init_filters=8, blocks_down=(1, 2, 2, 4),
  blocks_up=(1, 1, 1)``); ``2**(len(blocks_down) - 1)``.

Any name containing ':' is a plugin, ``"package.module:callable"`` (see
:mod:`workers.models.plugins`); plugins are semantic.

Instance models other than these are registered from Python with
:func:`register_instance_model` (a card can only name them, never make a process import code).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from schemas.errors import ModelCardError

if TYPE_CHECKING:
    import torch

PLUGIN_SEPARATOR = ":"

Builder = Callable[..., Any]  # -> torch.nn.Module; torch is imported only when a model is built


ALLOW_PLUGINS_ENV = "TESSERA_ALLOW_PLUGINS"
"""Environment variable naming the plugin modules a job may import: comma-separated module
prefixes (``mypkg`` allows ``mypkg`` and ``mypkg.models``), or ``*`` for any."""


def is_plugin_reference(architecture: str) -> bool:
    """Whether an architecture name is a plugin reference ``"module.path:callable"``."""
    return PLUGIN_SEPARATOR in architecture


def check_plugin_allowed(architecture: str, *, where: str, environ: Mapping[str, str] | None = None) -> None:
    """Refuse a plugin architecture whose module the operator has not allowed (ALLOW_PLUGINS_ENV).

    A job names its model card, and a card naming ``"package.module:callable"`` makes every
    actor import that module and call it: running code. Job specs and the cards they point to
    may come from elsewhere, so a job imports a plugin only where the environment of the
    process running the job (not the spec) allows its module. Registered architectures always
    pass; so does direct use of :func:`build_model` from Python (the caller chose the code).

    Args:
        architecture: the card's architecture.
        where: what names it (the card's path), for the message.
        environ: default os.environ.

    Raises:
        ModelCardError: a plugin whose module is not allowed, naming the variable to set.
    """
    if not is_plugin_reference(architecture):
        return
    import os

    module = architecture.partition(PLUGIN_SEPARATOR)[0]
    allowed = [a.strip() for a in (os.environ if environ is None else environ).get(ALLOW_PLUGINS_ENV, "").split(",")]
    if "*" in allowed or any(a and (module == a or module.startswith(a + ".")) for a in allowed):
        return
    raise ModelCardError(
        f"{where}: architecture {architecture!r} is a plugin: a job would import {module!r} and run "
        f"its code on every worker. Allow it where you start the job, not in the spec: "
        f"{ALLOW_PLUGINS_ENV}={module} (comma-separated module prefixes, or '*')"
    )


def _zoo(name: str) -> Builder:
    """The builder `workers.models.zoo.<name>`, imported on first use (zoo imports torch)."""
    from workers.models import zoo

    return getattr(zoo, name)


def _lazy_zoo(name: str) -> Builder:
    def build(*args: Any, **kwargs: Any) -> Any:
        return _zoo(name)(*args, **kwargs)

    build.__name__ = name
    return build
ModelKind = Literal["semantic", "instance"]


def _build_unet(in_channels: int, num_classes: int, **arch_args: Any) -> torch.nn.Module:
    from workers.models.unet import UNet

    return UNet(in_channels, num_classes, **arch_args)


def _unet3d_signature(in_channels: int, num_classes: int, *, base_channels: int = 16, depth: int = 4,
                      upsample: str = "transpose") -> None:
    """The arch_args ``unet3d`` takes (UNet's, less ``spatial_dims``, which the name fixes)."""


def _build_unet3d(in_channels: int, num_classes: int, **arch_args: Any) -> torch.nn.Module:
    from workers.models.unet import UNet

    _bind_arch_args(_unet3d_signature, arch_args)
    return UNet(in_channels, num_classes, spatial_dims=3, **arch_args)


def _build_threshold_oracle(in_channels: int, num_classes: int, **arch_args: Any) -> torch.nn.Module:
    from workers.models.oracles import ThresholdOracle

    return ThresholdOracle(in_channels, num_classes, **arch_args)


def _build_ramp_oracle(in_channels: int, num_classes: int, **arch_args: Any) -> torch.nn.Module:
    from workers.models.oracles import RampOracle

    return RampOracle(in_channels, num_classes, **arch_args)


def _bind_arch_args(factory: Callable[..., Any], arch_args: Mapping[str, Any]) -> dict[str, Any]:
    """arch_args completed with the factory's defaults (TypeError for an unknown name)."""
    bound = inspect.signature(factory).bind(1, 1, **arch_args)
    bound.apply_defaults()
    return dict(bound.arguments)


def _unet_stride(arch_args: Mapping[str, Any]) -> int:
    from workers.models.unet import UNet

    return 2 ** _bind_arch_args(UNet, arch_args)["depth"]


def _unet3d_stride(arch_args: Mapping[str, Any]) -> int:
    return 2 ** _bind_arch_args(_unet3d_signature, arch_args)["depth"]


def _monai_stride(name: str) -> Callable[[Mapping[str, Any]], int]:
    """`workers.models.monai_zoo.<name>`, imported on first use."""

    def stride(arch_args: Mapping[str, Any]) -> int:
        from workers.models import monai_zoo

        return getattr(monai_zoo, name)(arch_args)

    return stride


def _lazy_monai(name: str) -> Builder:
    def build(*args: Any, **kwargs: Any) -> Any:
        from workers.models import monai_zoo

        return getattr(monai_zoo, name)(*args, **kwargs)

    build.__name__ = name
    return build


def _build_instance_oracle(in_channels: int, num_classes: int, **arch_args: Any) -> torch.nn.Module:
    from workers.models.oracles import InstanceOracle

    return InstanceOracle(in_channels, num_classes, **arch_args)


def _oracle_stride(arch_args: Mapping[str, Any]) -> int:
    from workers.models.oracles import ThresholdOracle

    _bind_arch_args(ThresholdOracle, arch_args)
    return 1


def _ramp_oracle_stride(arch_args: Mapping[str, Any]) -> int:
    from workers.models.oracles import RampOracle

    _bind_arch_args(RampOracle, arch_args)
    return 1


def _interpolating_stride(name: str) -> Callable[[Mapping[str, Any]], int]:
    """Models that resize their logits (or their input) themselves take any size: stride 1."""

    def stride(arch_args: Mapping[str, Any]) -> int:
        _bind_arch_args(_zoo(name), arch_args)
        return 1

    return stride


def _any_size(builder: Builder) -> Callable[[Mapping[str, Any]], int]:
    """Stride 1 for a builder that takes any size; checks the arch_args' names against it."""

    def stride(arch_args: Mapping[str, Any]) -> int:
        _bind_arch_args(builder, arch_args)
        return 1

    return stride


def _deeplabv3plus_stride(arch_args: Mapping[str, Any]) -> int:
    return _bind_arch_args(_zoo("build_smp_deeplabv3plus"), arch_args)["encoder_output_stride"]


def _pspnet_stride(arch_args: Mapping[str, Any]) -> int:
    return 2 ** _bind_arch_args(_zoo("build_smp_pspnet"), arch_args)["encoder_depth"]


def _unet_smp_stride(arch_args: Mapping[str, Any]) -> int:
    return 2 ** _bind_arch_args(_zoo("build_smp_unet"), arch_args)["encoder_depth"]


SpatialDims = Literal[2, 3]


@dataclass(frozen=True)
class _Entry:
    """A registered architecture: its builder, kind, native stride (of its arch_args) and
    number of spatial axes of its inputs."""

    build: Builder
    kind: ModelKind
    stride: Callable[[Mapping[str, Any]], int]
    spatial_dims: SpatialDims = 2
    any_dims: bool = False  # takes images and volumes alike (the threshold oracle)


_REGISTRY: dict[str, _Entry] = {
    "unet": _Entry(_build_unet, "semantic", _unet_stride),
    "oracle_threshold": _Entry(_build_threshold_oracle, "semantic", _oracle_stride, any_dims=True),
    "oracle_ramp": _Entry(_build_ramp_oracle, "semantic", _ramp_oracle_stride),
    "fcn_resnet50": _Entry(_lazy_zoo("build_fcn_resnet50"), "semantic", _interpolating_stride("build_fcn_resnet50")),
    "deeplabv3": _Entry(_lazy_zoo("build_deeplabv3"), "semantic", _interpolating_stride("build_deeplabv3")),
    "lraspp": _Entry(_lazy_zoo("build_lraspp"), "semantic", _interpolating_stride("build_lraspp")),
    "deeplabv3plus": _Entry(_lazy_zoo("build_smp_deeplabv3plus"), "semantic", _deeplabv3plus_stride),
    "pspnet": _Entry(_lazy_zoo("build_smp_pspnet"), "semantic", _pspnet_stride),
    "unet_smp": _Entry(_lazy_zoo("build_smp_unet"), "semantic", _unet_smp_stride),
    "maskrcnn": _Entry(_lazy_zoo("build_maskrcnn"), "instance", _interpolating_stride("build_maskrcnn")),
    "instance_oracle": _Entry(_build_instance_oracle, "instance", _any_size(_build_instance_oracle), any_dims=True),
    "maskrcnn_light": _Entry(_lazy_zoo("build_maskrcnn_light"), "instance",
                             _interpolating_stride("build_maskrcnn_light")),
    "unet3d": _Entry(_build_unet3d, "semantic", _unet3d_stride, spatial_dims=3),
    "monai_unet": _Entry(_lazy_monai("build_monai_unet"), "semantic", _monai_stride("monai_unet_stride"),
                         spatial_dims=3),
    "monai_basicunet": _Entry(_lazy_monai("build_monai_basicunet"), "semantic",
                              _monai_stride("monai_basicunet_stride"), spatial_dims=3),
    "monai_segresnet": _Entry(_lazy_monai("build_monai_segresnet"), "semantic",
                              _monai_stride("monai_segresnet_stride"), spatial_dims=3),
}


def register_instance_model(name: str, builder: Builder, *, spatial_dims: SpatialDims = 2,
                            any_dims: bool = False) -> None:
    """Register an instance model under `name`, so that model cards may name it as their
    ``architecture``.

    Job specs and model cards are untrusted: a card can only name code that Python registered,
    never make a process import a module. Register in a module that every process running the
    predictor imports before it builds the model (on a Ray cluster: the predictor actors, e.g.
    through Ray's ``runtime_env`` ``worker_process_setup_hook``); the registry is per process.

    Args:
        name: the architecture name (no ':', not taken yet).
        builder: ``builder(in_channels, num_classes, **arch_args)`` returning a
            ``torch.nn.Module`` or a plain callable; either maps a ``(N, C, *tile)`` float32
            tensor, normalised per the card, to N outputs, one per tile, each a torchvision
            detection dict (``masks``, ``scores``, ``labels``) or a
            :class:`workers.stitch.LabelImage` (see :class:`workers.stitch.InstanceStitcher`).
            A plain callable is wrapped in a parameter-free module, so it loads through the
            checkpoint path (its weights file holds no tensors).
        spatial_dims: 2 (images) or 3 (volumes), what the model takes.
        any_dims: the model takes images and volumes alike.

    Raises:
        ValueError: a bad or taken name, or a bad ``spatial_dims``.
    """
    if not isinstance(name, str) or not name or PLUGIN_SEPARATOR in name:
        raise ValueError(f"instance model name must be a non-empty string without {PLUGIN_SEPARATOR!r}, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"architecture {name!r} is already registered; choose another name")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if not callable(builder):
        raise ValueError(f"builder of {name!r} must be callable, got {type(builder).__name__}")

    def build(in_channels: int, num_classes: int, **arch_args: Any) -> Any:
        import torch

        built = builder(in_channels, num_classes, **arch_args)
        if isinstance(built, torch.nn.Module):
            return built
        if not callable(built):
            raise ValueError(f"instance model {name!r}: builder returned a {type(built).__name__}, "
                             "not a torch.nn.Module or a callable")
        from workers.models.plugins import InstanceCallable

        return InstanceCallable(built, name=name)

    build.__signature__ = inspect.signature(builder)  # type: ignore[attr-defined]
    _REGISTRY[name] = _Entry(build, "instance", _any_size(builder), spatial_dims=spatial_dims, any_dims=any_dims)


def unregister_instance_model(name: str) -> None:
    """Remove a model :func:`register_instance_model` registered (tests clean up with it).

    Raises:
        ValueError: `name` is not a registered instance model (the built-in ones stay).
    """
    if name in _BUILTIN or name not in _REGISTRY:
        raise ValueError(f"{name!r} is not an instance model registered by register_instance_model")
    del _REGISTRY[name]


_BUILTIN = frozenset(_REGISTRY)


def architectures() -> tuple[str, ...]:
    """Registered names, sorted (plugin references ``"module:callable"`` are accepted besides)."""
    return tuple(sorted(_REGISTRY))


def _entry(architecture: str) -> _Entry:
    try:
        return _REGISTRY[architecture]
    except KeyError:
        raise ModelCardError(
            f"unknown architecture {architecture!r}; known: {', '.join(architectures())} "
            "(or a plugin 'package.module:callable')"
        ) from None


def model_kind(architecture: str) -> ModelKind:
    """``"semantic"`` (logits ``(N, K, H, W)``) or ``"instance"`` (torchvision detection dicts).

    Plugins are semantic. Raises ModelCardError for an unknown name.
    """
    if is_plugin_reference(architecture):
        return "semantic"
    return _entry(architecture).kind


def model_spatial_dims(architecture: str, arch_args: Mapping[str, Any] | None = None) -> SpatialDims:
    """2 when the architecture takes images ``(N, C, H, W)``, 3 when it takes volumes
    ``(N, C, D, H, W)``, without building it (the arch_args, when given, are checked as
    :func:`native_stride` checks them).

    A registered name answers its entry (``unet3d`` and the ``monai_*`` models: 3); a plugin
    answers its factory's ``spatial_dims`` attribute (2 or 3), or 2. (`workers.predictor` has a
    namesake that reads the number from a built model's weights.)

    Raises:
        ModelCardError: unknown architecture, arch_args it does not take, or a plugin's
            ``spatial_dims`` that is not 2 or 3.
    """
    if is_plugin_reference(architecture):
        from workers.models.plugins import plugin_spatial_dims

        return plugin_spatial_dims(architecture)
    entry = _entry(architecture)
    if arch_args is not None:
        native_stride(architecture, arch_args)  # checks the arch_args' names
    return entry.spatial_dims


def takes_spatial_dims(architecture: str, ndim: int, arch_args: Mapping[str, Any] | None = None) -> bool:
    """Whether the architecture takes inputs with `ndim` spatial axes: its
    :func:`model_spatial_dims`, or any of 2 and 3 for a dimension-agnostic entry (the threshold
    oracle)."""
    if not is_plugin_reference(architecture) and _entry(architecture).any_dims:
        return ndim in (2, 3)
    return model_spatial_dims(architecture, arch_args) == ndim


def native_stride(architecture: str, arch_args: Mapping[str, Any] | None = None) -> int:
    """Input H and W (D, H and W) must be multiples of this (px, voxels) for the architecture
    with these arch_args.

    Write it as the model card's ``stride``. Models that resize their logits back to the input
    size (torchvision FCN, DeepLabV3, LR-ASPP, Mask R-CNN) take any size and answer 1; our UNet
    and smp models answer their encoder's downsampling (e.g. 16 for ``unet`` depth 4, 32 for
    ``unet_smp`` with 5 levels), the MONAI models theirs (the product of ``monai_unet``'s
    strides, 16 for ``monai_basicunet``, ``2**(len(blocks_down) - 1)`` for ``monai_segresnet``).
    A plugin answers its factory's int ``stride`` attribute, or 1.

    Raises:
        ModelCardError: unknown architecture, or arch_args it does not take.
    """
    arch_args = dict(arch_args or {})
    if is_plugin_reference(architecture):
        from workers.models.plugins import plugin_stride

        return plugin_stride(architecture)
    entry = _entry(architecture)
    try:
        stride = entry.stride(arch_args)
    except (TypeError, ValueError) as exc:
        raise ModelCardError(f"architecture {architecture!r} rejected arch_args {arch_args}: {exc}") from None
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise ModelCardError(
            f"architecture {architecture!r}: arch_args {arch_args} give stride {stride!r}, not an int >= 1"
        )
    return stride


def build_model(
    architecture: str, *, in_channels: int, num_classes: int, arch_args: Mapping[str, Any]
) -> torch.nn.Module:
    """Build an architecture with random init (weights are loaded separately).

    Args:
        architecture: a registered name (:func:`architectures`) or a plugin
            ``"package.module:callable"``.
        in_channels: input bands C.
        num_classes: output classes K (for ``maskrcnn``: including background).
        arch_args: the builder's keyword options (the card's ``arch_args``).

    Returns:
        The module, in training mode, on CPU, float32.

    Raises:
        ModelCardError: unknown architecture, a plugin that cannot be loaded, or arguments the
            builder rejects (unknown names, bad values).
    """
    arch_args = dict(arch_args)
    try:
        if is_plugin_reference(architecture):
            from workers.models.plugins import build_plugin

            return build_plugin(architecture, in_channels=in_channels, num_classes=num_classes, arch_args=arch_args)
        builder = _entry(architecture).build
        return builder(in_channels, num_classes, **arch_args)
    except (TypeError, ValueError) as exc:
        raise ModelCardError(
            f"architecture {architecture!r} rejected arch_args {arch_args} "
            f"(in_channels={in_channels}, num_classes={num_classes}): {exc}"
        ) from None
