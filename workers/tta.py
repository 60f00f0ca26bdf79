"""Test-time augmentation and multi-scale resampling of tile batches (torch, any device).

Each augmentation is an exact, invertible dihedral transform of the last two axes: the model
sees T(x), its probabilities are mapped back with T^-1 and averaged. Multi-scale resamples the
input by a factor, and the probabilities back to the tile size, before averaging.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from schemas.job import TTA_PRESETS, TTA_TRANSFORMS

Transform = Callable[[torch.Tensor], torch.Tensor]

# name -> (forward, inverse), on (N, C, H, W) tensors.
_TRANSFORMS: dict[str, tuple[Transform, Transform]] = {
    "identity": (lambda x: x, lambda x: x),
    "hflip": (lambda x: x.flip(-1), lambda x: x.flip(-1)),
    "vflip": (lambda x: x.flip(-2), lambda x: x.flip(-2)),
    "rot90": (lambda x: x.rot90(1, (-2, -1)), lambda x: x.rot90(-1, (-2, -1))),
    "rot180": (lambda x: x.rot90(2, (-2, -1)), lambda x: x.rot90(-2, (-2, -1))),
    "rot270": (lambda x: x.rot90(3, (-2, -1)), lambda x: x.rot90(-3, (-2, -1))),
    "transpose": (lambda x: x.transpose(-2, -1), lambda x: x.transpose(-2, -1)),
    "antitranspose": (lambda x: x.rot90(2, (-2, -1)).transpose(-2, -1),
                      lambda x: x.transpose(-2, -1).rot90(-2, (-2, -1))),
}

TTA_NAMES = TTA_TRANSFORMS
if set(_TRANSFORMS) != set(TTA_TRANSFORMS):  # one list of names, in schemas
    raise ImportError(f"workers.tta implements {sorted(_TRANSFORMS)}, schemas names {sorted(TTA_TRANSFORMS)}")


def expand_tta(names: tuple[str, ...]) -> tuple[str, ...]:
    """Resolve presets and check names; identity always first, order kept, repeats dropped.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    out: list[str] = ["identity"]
    for name in names:
        members = TTA_PRESETS.get(name, (name,))
        for member in members:
            if member not in _TRANSFORMS:
                raise ValueError(
                    f"unknown test-time augmentation {name!r}; known: {', '.join(TTA_NAMES)} "
                    f"or presets {', '.join(TTA_PRESETS)}"
                )
            if member not in out:
                out.append(member)
    return tuple(out)


def augment(name: str) -> tuple[Transform, Transform]:
    """(forward, inverse) of a named transform."""
    return _TRANSFORMS[name]


def resample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) to `size` (antialiased when shrinking); no-op if equal."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


def scaled_size(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """round(side * scale) per axis, at least 1 px."""
    return tuple(max(1, round(s * scale)) for s in shape)  # type: ignore[return-value]
