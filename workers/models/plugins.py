"""User model plugins: an architecture named ``"package.module:callable"``.

The module is imported (from ``sys.path``; on a Ray cluster it must be importable on every
worker, e.g. installed or on ``PYTHONPATH``) only when a model is built, never when tessera is
imported. The callable is called as ``callable(in_channels=C, num_classes=K, **arch_args)`` and
returns either

* a ``torch.nn.Module`` mapping ``(N, C, H, W)`` float32 to ``(N, K, H, W)`` logits, used as is;
* or a plain callable mapping a numpy ``(N, C, H, W)`` float32 array to ``(N, K, H, W)`` float
  logits or probabilities, wrapped in :class:`NumpyModel`.

A factory may declare the side multiple its inputs need with an int attribute ``stride`` (px,
default 1); :func:`plugin_stride` reads it. A factory of a 3D model (``(N, C, D, H, W)`` inputs)
says so with an int attribute ``spatial_dims = 3`` (default 2); :func:`plugin_spatial_dims`
reads it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from schemas.errors import ModelCardError

PLUGIN_SEPARATOR = ":"


def is_plugin_reference(architecture: str) -> bool:
    """Whether an architecture name is a plugin reference ``"module.path:callable"``."""
    return PLUGIN_SEPARATOR in architecture


def load_plugin_factory(reference: str) -> Callable[..., Any]:
    """Import ``"module.path:callable"`` and return the callable (a dotted attribute path works).

    Raises:
        ModelCardError: malformed reference, module not importable, attribute missing or not
            callable.
    """
    module_name, sep, attr_path = reference.partition(PLUGIN_SEPARATOR)
    if not sep or not module_name or not attr_path or PLUGIN_SEPARATOR in attr_path:
        raise ModelCardError(
            f"plugin architecture {reference!r} must look like 'package.module:callable' "
            "(one ':', a module path before it, a callable name after it)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelCardError(
            f"plugin architecture {reference!r}: cannot import module {module_name!r} ({exc}); "
            "install it or put its folder on PYTHONPATH (on every Ray worker)"
        ) from None
    target: Any = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ModelCardError(
                f"plugin architecture {reference!r}: module {module_name!r} "
                f"({getattr(module, '__file__', None) or 'no file'}) has no attribute {attr_path!r}"
            ) from None
    if not callable(target):
        raise ModelCardError(
            f"plugin architecture {reference!r}: {attr_path!r} is a {type(target).__name__}, not a callable"
        )
    return target


def build_plugin(reference: str, *, in_channels: int, num_classes: int, arch_args: Mapping[str, Any]) -> torch.nn.Module:
    """Build a plugin model: ``factory(in_channels=..., num_classes=..., **arch_args)``.

    Returns:
        The factory's ``torch.nn.Module``, or its numpy callable wrapped in :class:`NumpyModel`.

    Raises:
        ModelCardError: see :func:`load_plugin_factory`; or the factory returned neither a module
            nor a callable. ``TypeError``/``ValueError`` raised by the factory propagate (the
            registry reports them as rejected arch_args).
    """
    factory = load_plugin_factory(reference)
    built = factory(in_channels=in_channels, num_classes=num_classes, **arch_args)
    if isinstance(built, torch.nn.Module):
        return built
    if callable(built):
        return NumpyModel(built, num_classes=num_classes, name=reference)
    raise ModelCardError(
        f"plugin architecture {reference!r} returned a {type(built).__name__}; it must return a "
        "torch.nn.Module or a callable mapping a numpy (N, C, H, W) array to (N, K, H, W) logits"
    )


def plugin_stride(reference: str) -> int:
    """The factory's int ``stride`` attribute (px), 1 when it has none.

    Raises:
        ModelCardError: see :func:`load_plugin_factory`; or ``stride`` is not an int >= 1 (e.g. a
            property of a class factory: give the class an int attribute instead).
    """
    factory = load_plugin_factory(reference)
    stride = getattr(factory, "stride", 1)
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise ModelCardError(
            f"plugin architecture {reference!r}: attribute 'stride' must be an int >= 1 (px), got "
            f"{stride!r}; set an int 'stride' on the factory or drop it (default 1)"
        )
    return stride


def plugin_spatial_dims(reference: str) -> int:
    """The factory's ``spatial_dims`` attribute (2: images, 3: volumes), 2 when it has none.

    Raises:
        ModelCardError: see :func:`load_plugin_factory`; or ``spatial_dims`` is not 2 or 3.
    """
    factory = load_plugin_factory(reference)
    spatial_dims = getattr(factory, "spatial_dims", 2)
    if type(spatial_dims) is not int or spatial_dims not in (2, 3):
        raise ModelCardError(
            f"plugin architecture {reference!r}: attribute 'spatial_dims' must be 2 (images) or 3 "
            f"(volumes), got {spatial_dims!r}; set it on the factory or drop it (default 2)"
        )
    return spatial_dims


class NumpyModel(torch.nn.Module):
    """A numpy function as a parameter-free torch module (its state dict is empty).

    Args:
        fn: maps a numpy ``(N, C, H, W)`` float32 array to ``(N, K, H, W)`` float logits or
            probabilities (any float dtype; returned as float32).
        num_classes: K, checked on every call.
        name: what the function is (the plugin reference), quoted in errors.

    The forward runs ``fn`` on the CPU whatever the input's device and returns the result on the
    input's device. It is not differentiable.
    """

    def __init__(self, fn: Callable[[np.ndarray], Any], *, num_classes: int, name: str) -> None:
        super().__init__()
        self.fn = fn
        self.num_classes = num_classes
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` input -> ``(N, K, H, W)`` float32 output of ``fn``.

        Raises:
            ValueError: the input is not 4-D, or ``fn`` returned something other than a float
                ``(N, K, H, W)`` array matching the input's N, H, W.
        """
        if x.ndim != 4:
            raise ValueError(f"{self.name}: expects input (N, C, H, W), got shape {tuple(x.shape)}")
        array = x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        out = np.asarray(self.fn(array))
        n, _, h, w = array.shape
        if out.shape != (n, self.num_classes, h, w) or not np.issubdtype(out.dtype, np.floating):
            raise ValueError(
                f"{self.name}: returned {out.dtype} array of shape {out.shape} for input {array.shape}; "
                f"expected float (N, K, H, W) = {(n, self.num_classes, h, w)}"
            )
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(x.device)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_classes={self.num_classes}"


class InstanceCallable(torch.nn.Module):
    """A registered instance model's plain callable as a parameter-free torch module (empty
    state dict), so it loads through the checkpoint path like any model.

    Args:
        fn: maps a ``(N, C, *tile)`` float32 tensor (normalised per the card) to N outputs,
            one per tile (see :func:`workers.registry.register_instance_model`).
        name: the architecture name, quoted in errors.
    """

    def __init__(self, fn: Callable[[torch.Tensor], Any], *, name: str) -> None:
        super().__init__()
        self.fn = fn
        self.name = name

    def forward(self, x: torch.Tensor) -> list[Any]:
        """N per-tile outputs of ``fn``.

        Raises:
            ValueError: ``fn`` returned something other than a list or tuple of N outputs.
        """
        out = self.fn(x)
        if not isinstance(out, (list, tuple)) or len(out) != x.shape[0]:
            raise ValueError(f"instance model {self.name!r}: returned {type(out).__name__} for {x.shape[0]} "
                             "tiles; expected a list with one output per tile")
        return list(out)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"
