"""Model registry: architecture name -> builder. Nothing is imported or built at import time.

A builder takes (in_channels, num_classes, **arch_args) and returns a torch.nn.Module that maps
(N, in_channels, H, W) float32 to (N, num_classes, H, W) logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from schemas.errors import ModelCardError

Builder = Callable[..., torch.nn.Module]


def _build_unet(in_channels: int, num_classes: int, **arch_args: Any) -> torch.nn.Module:
    from workers.models.unet import UNet

    return UNet(in_channels, num_classes, **arch_args)


def _build_threshold_oracle(in_channels: int, num_classes: int, **arch_args: Any) -> torch.nn.Module:
    from workers.models.oracles import ThresholdOracle

    return ThresholdOracle(in_channels, num_classes, **arch_args)


_BUILDERS: dict[str, Builder] = {
    "unet": _build_unet,
    "oracle_threshold": _build_threshold_oracle,
}


def architectures() -> tuple[str, ...]:
    """Names the registry can build, sorted."""
    return tuple(sorted(_BUILDERS))


def build_model(architecture: str, *, in_channels: int, num_classes: int, arch_args: dict[str, Any]) -> torch.nn.Module:
    """Build an architecture with random init (weights are loaded separately).

    Raises:
        ModelCardError: unknown architecture, or arguments the builder rejects.
    """
    try:
        builder = _BUILDERS[architecture]
    except KeyError:
        raise ModelCardError(
            f"unknown architecture {architecture!r}; known: {', '.join(architectures())}"
        ) from None
    try:
        return builder(in_channels, num_classes, **arch_args)
    except TypeError as exc:
        raise ModelCardError(f"architecture {architecture!r} rejected arch_args {arch_args}: {exc}") from None
