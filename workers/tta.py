"""Test-time augmentation and multi-scale resampling of tile batches (torch, any device).

Tiles are ``(N, C, *spatial)`` with 2 spatial axes ``(H, W)`` or 3 ``(D, H, W)``. Each
augmentation T is an exact, invertible transform of the spatial axes (a flip or a dihedral
transform of the last two axes): the model sees T(x), its probabilities are mapped back with
T^-1 and averaged, ``p = mean_T T^-1(model(T(x)))``. Multi-scale resamples the input by a
factor, and the probabilities back to the tile size, before averaging.

Names (the 2D ones act on the last two axes: the image plane in 2D, the axial plane of a
``(D, H, W)`` volume in 3D):

* ``identity``; ``hflip`` (flip W, axis -1); ``vflip`` (flip H, axis -2); ``dflip`` (flip D,
  axis -3: 3D only);
* ``rot90``, ``rot180``, ``rot270`` (counter-clockwise from H to W), ``transpose`` (swap H and
  W), ``antitranspose``: the dihedral group of the (H, W) square.

Presets expand per number of spatial axes (:func:`expand_tta`): ``flips`` is the identity and
the flip of each spatial axis (2D: hflip, vflip; 3D: dflip, vflip, hflip); ``none``, ``rot90``
and ``d4`` are as in :data:`schemas.job.TTA_PRESETS` (in 3D: in the axial plane).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from schemas.job import TTA_PRESETS, TTA_TRANSFORMS

Transform = Callable[[torch.Tensor], torch.Tensor]

# name -> (forward, inverse), on (N, C, *spatial) tensors; the axes count from the end so the
# same transform serves (N, C, H, W) and (N, C, D, H, W).
_TRANSFORMS: dict[str, tuple[Transform, Transform]] = {
    "identity": (lambda x: x, lambda x: x),
    "hflip": (lambda x: x.flip(-1), lambda x: x.flip(-1)),
    "vflip": (lambda x: x.flip(-2), lambda x: x.flip(-2)),
    "dflip": (lambda x: x.flip(-3), lambda x: x.flip(-3)),
    "rot90": (lambda x: x.rot90(1, (-2, -1)), lambda x: x.rot90(-1, (-2, -1))),
    "rot180": (lambda x: x.rot90(2, (-2, -1)), lambda x: x.rot90(-2, (-2, -1))),
    "rot270": (lambda x: x.rot90(3, (-2, -1)), lambda x: x.rot90(-3, (-2, -1))),
    "transpose": (lambda x: x.transpose(-2, -1), lambda x: x.transpose(-2, -1)),
    "antitranspose": (lambda x: x.rot90(2, (-2, -1)).transpose(-2, -1),
                      lambda x: x.transpose(-2, -1).rot90(-2, (-2, -1))),
}

#: Fewest spatial axes each transform needs (the rest need 2).
_MIN_SPATIAL_DIMS = {"dflip": 3}

#: Spatial axes the predictor takes.
SPATIAL_DIMS = (2, 3)

#: Flip names per number of spatial axes, slowest axis first.
FLIPS = {2: ("vflip", "hflip"), 3: ("dflip", "vflip", "hflip")}

TTA_NAMES = tuple(_TRANSFORMS)
# One list of names, in schemas; the job spec's names must all be implemented here (`dflip`
# included: a 2D window refuses it in `expand_tta`).
if not set(TTA_TRANSFORMS) <= set(_TRANSFORMS):
    raise ImportError(f"workers.tta implements {sorted(_TRANSFORMS)}, schemas names {sorted(TTA_TRANSFORMS)}")


def _presets(spatial_dims: int) -> dict[str, tuple[str, ...]]:
    """The presets for `spatial_dims` spatial axes: those of the job spec, with `flips` = the
    identity and each axis's flip (in 2D exactly the job spec's ("identity", "hflip", "vflip"))."""
    presets = dict(TTA_PRESETS)
    if spatial_dims != 2:
        presets["flips"] = ("identity", *FLIPS[spatial_dims])
    return presets


def expand_tta(names: tuple[str, ...], *, spatial_dims: int = 2) -> tuple[str, ...]:
    """Resolve presets and check names; identity always first, order kept, repeats dropped.

    Args:
        names: transform names and presets (see the module docstring).
        spatial_dims: 2 for (H, W) tiles, 3 for (D, H, W) tiles.

    Raises:
        ValueError: an unknown name, one that needs more spatial axes (``dflip`` in 2D), or
            an unsupported `spatial_dims` (the message lists the known names).
    """
    if spatial_dims not in SPATIAL_DIMS:
        raise ValueError(f"test-time augmentation works on {SPATIAL_DIMS} spatial axes, got {spatial_dims}")
    presets = _presets(spatial_dims)
    out: list[str] = ["identity"]
    for name in names:
        members = presets.get(name, (name,))
        for member in members:
            if member not in _TRANSFORMS:
                raise ValueError(
                    f"unknown test-time augmentation {name!r}; known: {', '.join(TTA_NAMES)} "
                    f"or presets {', '.join(presets)}"
                )
            if _MIN_SPATIAL_DIMS.get(member, 2) > spatial_dims:
                raise ValueError(
                    f"test-time augmentation {member!r} needs {_MIN_SPATIAL_DIMS[member]} spatial axes; "
                    f"these tiles have {spatial_dims} (2D flips: {', '.join(FLIPS[2])})"
                )
            if member not in out:
                out.append(member)
    return tuple(out)


def augment(name: str) -> tuple[Transform, Transform]:
    """(forward, inverse) of a named transform, on (N, C, *spatial) tensors."""
    return _TRANSFORMS[name]


def resample(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Resize (N, C, *spatial) to `size` (one entry per spatial axis); no-op if equal.

    Bilinear for 2 spatial axes, antialiased when shrinking; trilinear for 3 (torch has no
    antialiased trilinear mode: a 3D shrink samples without low-pass filtering).
    """
    if tuple(x.shape[2:]) == tuple(size):
        return x
    if len(size) != x.ndim - 2 or len(size) not in SPATIAL_DIMS:
        raise ValueError(f"cannot resample a {tuple(x.shape)} tensor to {tuple(size)}: 2 or 3 spatial axes")
    if len(size) == 3:
        return F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


def scaled_size(shape: tuple[int, ...], scale: float) -> tuple[int, ...]:
    """round(side * scale) per axis, at least 1 px (voxel)."""
    return tuple(max(1, round(s * scale)) for s in shape)
