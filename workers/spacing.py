"""Volumes resampled to the voxel spacing a model card declares (``spacing_mm``), one window at a time.

A 3D card's ``spacing_mm`` is ``(z, y, x)`` mm; a slice-wise card's (``slices``) is its 2D model's
in-plane ``(y, x)`` mm, applied to the two in-plane axes of each slice (the slice axis keeps the
scene's spacing). When a volume's spacing differs from the card's by more than
:data:`SPACING_RTOL` (relative) on some axis, its windows are predicted at the card's spacing:

1. the raw window ``(C, *w)`` at the scene's spacing ``s`` is resampled trilinearly
   (``torch.nn.functional.interpolate``, ``align_corners=False``) to ``round(w * s / t)`` voxels
   per axis (``t`` the card's spacing); its valid mask by nearest neighbour;
2. the predictor segments that window as usual (normalisation, tiles at the model's spacing,
   blending, TTA, ensembles) and returns blended class probabilities;
3. the probabilities are resampled trilinearly back to ``w``, and the core's labels are their
   argmax (nodata where the scene's own mask says so).

Memory stays bounded by the window: one window at the model's spacing and its ``K`` probability
planes at most, ``prod(w * s / t)`` voxels. The job's halo is in scene voxels; at the model's
spacing it is ``halo * s / t`` model voxels, so it must be at least the card's halo times
``t / s`` on every axis for chunk borders to be seamless (trilinear resampling itself reaches one
voxel beyond). Images (2 spatial axes) are never resampled: their pixel size is in CRS units.

torch is imported only where a window is resampled, so the driver can check cards with
:func:`model_spacing`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from schemas.model_card import ModelCard

if TYPE_CHECKING:
    from workers.predictor import Predictor

#: Relative spacing difference below which a volume is run at its own spacing.
SPACING_RTOL = 0.01


def model_spacing(card: ModelCard, scene_spacing: tuple[float, ...] | None, *,
                  slice_axis: int | None = None) -> tuple[float, ...] | None:
    """The spacing (mm per spatial axis, in the window's axis order) a volume's windows are
    predicted at, or None when they run at the scene's own spacing (no ``spacing_mm`` on the
    card, no scene spacing, an image, or every axis within :data:`SPACING_RTOL`).

    Args:
        card: the model card.
        scene_spacing: the window's spacing per spatial axis (mm), in the order the predictor
            sees the window (slice axis first for a slice-wise card).
        slice_axis: for a slice-wise card, the window axis slices are cut across (its spacing is
            kept; the card's ``(y, x)`` apply to the other two axes in order).

    Raises:
        ValueError: a card spacing with another number of axes than the window's.
    """
    if card.spacing_mm is None or scene_spacing is None or len(scene_spacing) != 3:
        return None
    if card.slices is not None:
        if len(card.spacing_mm) != 2:
            raise ValueError(f"model {card.name!r} is slice-wise: its spacing_mm must be the in-plane (y, x) mm "
                             f"of its 2D model, got {list(card.spacing_mm)}")
        in_plane = iter(card.spacing_mm)
        axis = 0 if slice_axis is None else slice_axis
        target = tuple(s if a == axis else next(in_plane) for a, s in enumerate(scene_spacing))
    else:
        if len(card.spacing_mm) != 3:
            raise ValueError(f"model {card.name!r}: spacing_mm {list(card.spacing_mm)} does not give the 3 axes "
                             f"of a volume of spacing {list(scene_spacing)}")
        target = tuple(card.spacing_mm)
    if all(abs(s - t) <= SPACING_RTOL * t for s, t in zip(scene_spacing, target)):
        return None
    return target


def resampled_shape(shape: tuple[int, ...], scene_spacing: tuple[float, ...],
                    target_spacing: tuple[float, ...]) -> tuple[int, ...]:
    """Voxels per axis of a window of `shape` at `target_spacing`: ``round(n * s / t)``, at least 1."""
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, scene_spacing, target_spacing))


def predict_core_resampled(predictor: Predictor, pixels: np.ndarray, valid: np.ndarray | None, core: tuple[slice, ...], *,
                           scene_spacing: tuple[float, ...], target_spacing: tuple[float, ...],
                           with_probabilities: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels (and probabilities) of a window's core, predicted at the model's spacing (module docstring).

    Args:
        predictor: a `workers.predictor.Predictor`.
        pixels: ``(C, D, H, W)`` raw values at `scene_spacing`.
        valid: ``(D, H, W)`` bool, False at nodata, or None.
        core: the core's slices in the window.
        scene_spacing: mm per axis of `pixels`.
        target_spacing: mm per axis the model takes (:func:`model_spacing`).
        with_probabilities: also return ``(K, *core)`` float16 probabilities.

    Returns:
        As `Predictor.predict_core`: core-shaped uint8 labels, NODATA_CLASS where `valid` is
        False, and the probabilities or None.
    """
    import torch

    with torch.inference_mode():
        return _predict_core_resampled(predictor, pixels, valid, core, scene_spacing=scene_spacing,
                                       target_spacing=target_spacing, with_probabilities=with_probabilities)


def _predict_core_resampled(predictor: Predictor, pixels: np.ndarray, valid: np.ndarray | None,
                            core: tuple[slice, ...], *, scene_spacing: tuple[float, ...],
                            target_spacing: tuple[float, ...],
                            with_probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
    import torch
    import torch.nn.functional as F

    from workers.stitch import StitchWindow, finish_semantic

    shape = tuple(pixels.shape[1:])
    size = resampled_shape(shape, scene_spacing, target_spacing)
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None]
    x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)[0].numpy()
    v = None
    if valid is not None and not bool(valid.all()):
        mask = torch.from_numpy(np.ascontiguousarray(valid, dtype=np.float32))[None, None]
        v = F.interpolate(mask, size=size, mode="nearest")[0, 0].numpy() > 0.5
    probs = predictor.predict_probabilities(x, v)  # (K, *size) on the predictor's device
    probs = F.interpolate(probs[None], size=shape, mode="trilinear", align_corners=False)[0]
    valid = None if valid is None or bool(valid.all()) else valid
    result = finish_semantic(probs, StitchWindow(shape, core=core, valid=valid,
                                                                 with_probabilities=with_probabilities))
    return result.labels, result.probabilities
