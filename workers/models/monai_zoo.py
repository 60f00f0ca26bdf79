"""Builders of MONAI 3D segmentation networks for the registry, and their native strides.

Every builder has the registry's signature ``builder(in_channels, num_classes, **arch_args)``,
takes its options keyword-only (an unknown option is a ``TypeError``, a bad value a
``ValueError``; the registry turns both into ``ModelCardError``), builds with random init
(MONAI ships no weights with these classes; nothing is downloaded) and imports MONAI only when
called. List options (``channels``, ``strides``, ...) take any sequence of ints (JSON lists).

Each returns a module mapping ``(N, in_channels, D, H, W)`` float32 to
``(N, num_classes, D, H, W)`` float32 logits, for D, H and W multiples of its native stride
(``*_stride`` below, what :func:`workers.registry.native_stride` answers).

Normalisation layers: MONAI's ``UNet`` and ``BasicUNet`` use instance norm, ``SegResNet`` group
norm. Both normalise with statistics of the tile being segmented (not running statistics), so a
voxel's logits depend on the whole tile's content: keep the tile size of training, and let the
tile overlap and blending smooth the seams. The predictor's BatchNorm folding leaves them alone.
Instance norm also needs more than one voxel at the coarsest level: give ``monai_unet`` and
``monai_basicunet`` tiles of at least twice their stride (``BasicUNet`` fails on 16^3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from workers.models.zoo import _check_int, _check_sizes

#: MONAI ``UNet`` defaults here: 3 stride-2 levels of 16..128 channels, 2 residual units each.
MONAI_UNET_CHANNELS: tuple[int, ...] = (16, 32, 64, 128)
MONAI_UNET_STRIDES: tuple[int, ...] = (2, 2, 2)
#: MONAI ``BasicUNet`` widths (4 poolings: 5 encoder levels, then the last decoder's width),
#: half of MONAI's (32, 32, 64, 128, 256, 32).
MONAI_BASICUNET_FEATURES: tuple[int, ...] = (16, 16, 32, 64, 128, 16)
#: ``BasicUNet`` max-pools 2x four times, whatever its features.
MONAI_BASICUNET_STRIDE = 16
#: SegResNet's group norm has this many groups (MONAI's default): widths must be multiples of it.
SEGRESNET_NUM_GROUPS = 8


def build_monai_unet(
    in_channels: int,
    num_classes: int,
    *,
    channels: Sequence[int] = MONAI_UNET_CHANNELS,
    strides: Sequence[int] = MONAI_UNET_STRIDES,
    num_res_units: int = 2,
) -> nn.Module:
    """MONAI ``UNet`` (Kerfoot et al.: strided-conv encoder, transposed-conv decoder, residual
    units, instance norm, PReLU), 3D.

    Args:
        in_channels: input bands C.
        num_classes: output classes K.
        channels: width of each level, ``len(strides) + 1`` ints >= 1.
        strides: downsampling stride between levels (ints >= 1); the input sides must be
            multiples of their product.
        num_res_units: residual units per level (0: plain convolutions).
    """
    from monai.networks.nets import UNet

    arch = "monai_unet"
    channels, strides = _check_unet_levels(channels, strides)
    _check_sizes(arch, in_channels, num_classes)
    _check_int(arch, "num_res_units", num_res_units, minimum=0)
    return UNet(spatial_dims=3, in_channels=in_channels, out_channels=num_classes, channels=channels,
                strides=strides, num_res_units=num_res_units)


def build_monai_basicunet(
    in_channels: int, num_classes: int, *, features: Sequence[int] = MONAI_BASICUNET_FEATURES
) -> nn.Module:
    """MONAI ``BasicUNet`` (two 3x3x3 convs per level, instance norm, LeakyReLU, 4 max-poolings,
    transposed-conv decoder), 3D.

    It runs on any side >= 16 (an odd side is padded by one replicated plane after each
    upsampling), but only sides that are multiples of 16 keep its pooling grid aligned, so its
    native stride is 16 and the predictor pads tiles to it.

    Args:
        in_channels: input bands C.
        num_classes: output classes K.
        features: 6 widths: the 5 encoder levels, then the last decoder level.
    """
    from monai.networks.nets import BasicUNet

    arch = "monai_basicunet"
    features = _int_sequence(arch, "features", features, minimum=1)
    if len(features) != 6:
        raise ValueError(f"{arch} features must list 6 widths (5 encoder levels, last decoder), got {list(features)}")
    _check_sizes(arch, in_channels, num_classes)
    return BasicUNet(spatial_dims=3, in_channels=in_channels, out_channels=num_classes, features=features)


def build_monai_segresnet(
    in_channels: int,
    num_classes: int,
    *,
    init_filters: int = 8,
    blocks_down: Sequence[int] = (1, 2, 2, 4),
    blocks_up: Sequence[int] = (1, 1, 1),
) -> nn.Module:
    """MONAI ``SegResNet`` (Myronenko 2018: residual blocks with group norm, stride-2 conv
    downsampling, trilinear upsampling with additive skips), 3D, without its VAE branch.

    Args:
        in_channels: input bands C.
        num_classes: output classes K.
        init_filters: width of the first level (a multiple of 8, the group norm's groups);
            doubled at each level.
        blocks_down: residual blocks per encoder level; ``len(blocks_down) - 1`` stride-2
            downsamplings, so the input sides must be multiples of ``2**(len(blocks_down) - 1)``.
        blocks_up: residual blocks per decoder level, ``len(blocks_down) - 1`` ints.
    """
    from monai.networks.nets import SegResNet

    arch = "monai_segresnet"
    blocks_down, blocks_up = _check_segresnet_blocks(blocks_down, blocks_up)
    _check_sizes(arch, in_channels, num_classes)
    _check_int(arch, "init_filters", init_filters, minimum=SEGRESNET_NUM_GROUPS)
    if init_filters % SEGRESNET_NUM_GROUPS:
        raise ValueError(f"{arch} init_filters must be a multiple of {SEGRESNET_NUM_GROUPS} (its group norm's "
                         f"groups), got {init_filters}")
    return SegResNet(spatial_dims=3, init_filters=init_filters, in_channels=in_channels, out_channels=num_classes,
                     blocks_down=blocks_down, blocks_up=blocks_up)


# ---------------------------------------------------------------------------- native strides


def monai_unet_stride(arch_args: Mapping[str, Any]) -> int:
    """The product of ``strides`` (each strided conv maps a side n to ceil(n / s) and its
    transposed conv back to s * ceil(n / s): only multiples keep the size)."""
    args = _bind(build_monai_unet, arch_args)
    _, strides = _check_unet_levels(args["channels"], args["strides"])
    return math.prod(strides)


def monai_basicunet_stride(arch_args: Mapping[str, Any]) -> int:
    """16, whatever the features (four 2x max-poolings)."""
    _bind(build_monai_basicunet, arch_args)
    return MONAI_BASICUNET_STRIDE


def monai_segresnet_stride(arch_args: Mapping[str, Any]) -> int:
    """``2**(len(blocks_down) - 1)`` (one stride-2 conv per level after the first)."""
    args = _bind(build_monai_segresnet, arch_args)
    blocks_down, _ = _check_segresnet_blocks(args["blocks_down"], args["blocks_up"])
    return 2 ** (len(blocks_down) - 1)


# ---------------------------------------------------------------------------- checks


def _bind(builder: Any, arch_args: Mapping[str, Any]) -> dict[str, Any]:
    """arch_args completed with the builder's defaults (TypeError for an unknown name)."""
    import inspect

    bound = inspect.signature(builder).bind(1, 1, **arch_args)
    bound.apply_defaults()
    return dict(bound.arguments)


def _check_unet_levels(channels: object, strides: object) -> tuple[tuple[int, ...], tuple[int, ...]]:
    arch = "monai_unet"
    channels = _int_sequence(arch, "channels", channels, minimum=1)
    strides = _int_sequence(arch, "strides", strides, minimum=1)
    if len(channels) < 2 or len(strides) != len(channels) - 1:
        raise ValueError(f"{arch} needs at least 2 channels and one stride fewer than channels, got "
                         f"channels {list(channels)}, strides {list(strides)}")
    return channels, strides


def _check_segresnet_blocks(blocks_down: object, blocks_up: object) -> tuple[tuple[int, ...], tuple[int, ...]]:
    arch = "monai_segresnet"
    blocks_down = _int_sequence(arch, "blocks_down", blocks_down, minimum=1)
    blocks_up = _int_sequence(arch, "blocks_up", blocks_up, minimum=1)
    if len(blocks_down) < 2 or len(blocks_up) != len(blocks_down) - 1:
        raise ValueError(f"{arch} needs at least 2 blocks_down and one blocks_up fewer, got blocks_down "
                         f"{list(blocks_down)}, blocks_up {list(blocks_up)}")
    return blocks_down, blocks_up


def _int_sequence(arch: str, name: str, value: object, *, minimum: int) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{arch} {name} must be a list of ints >= {minimum}, got {value!r}")
    for v in value:
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ValueError(f"{arch} {name} must be a list of ints >= {minimum}, got {list(value)}")
    return tuple(value)
