"""Model tiles inside one window: where they go and how much each voxel weighs (no torch).

Split from :mod:`workers.tiles` (which blends with torch) so that planners and the benchmark
driver can use it without importing torch.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import numpy as np

from schemas.checks import as_int, as_int_tuple

__all__ = ["BLEND_MODES", "GAUSSIAN_FLOOR", "blend_weights", "plan_tiles"]

#: Weight maps understood by :func:`blend_weights`.
BLEND_MODES = ("gaussian", "constant")

#: Floor of Gaussian weights relative to their maximum, so no voxel weighs zero (MONAI uses 1e-3).
GAUSSIAN_FLOOR = 1e-3


def _as_shape(values: object, what: str) -> tuple[int, ...]:
    shape = as_int_tuple(values, what)
    if not shape or min(shape) <= 0:
        raise ValueError(f"{what} must have at least one axis, all > 0, got {shape}")
    return shape


def plan_tiles(
    window_shape: Sequence[int], tile: int | Sequence[int], overlap: float
) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """Offsets of overlapping model tiles that cover a window, the last one flush with its end.

    Per axis, with window size ``W`` and requested tile size ``T``: the tile is clipped to
    ``t = min(T, W)``; the largest step allowed is ``s = max(1, floor(t * (1 - overlap)))``;
    there are ``n = ceil((W - t) / s) + 1`` tiles, spread evenly from 0 to ``W - t``:
    ``offset_i = round(i * (W - t) / (n - 1))`` (halves rounded up; exact integer maths). The
    actual step never exceeds ``s``, so neighbouring tiles overlap by at least ``overlap * t``
    (rounded) and no tile reaches past the window (as nnU-Net's
    ``compute_steps_for_sliding_window``). The tiles are the Cartesian product of the per-axis
    offsets, in C order.

    Args:
        window_shape: Window size in voxels per axis, e.g. ``(H, W)`` or ``(D, H, W)``; all > 0.
        tile: Model tile size in voxels, one int or one per axis; all > 0.
        overlap: Wanted fraction of a tile shared with its neighbour, ``0 <= overlap < 1``.

    Returns:
        ``(tile_shape, offsets)``: the effective tile shape (``min(tile, window)`` per axis;
        smaller than the model's tile where the window is smaller: pad it yourself if the model
        needs a fixed size) and the first voxel of each tile in window coordinates.

    Raises:
        ValueError: On a non-positive size, mismatched axes, or an overlap outside ``[0, 1)``.
    """
    window = _as_shape(window_shape, "window_shape")
    if isinstance(tile, Sequence | np.ndarray) and not isinstance(tile, (str, bytes)):
        tiles = _as_shape(tile, "tile")
        if len(tiles) != len(window):
            raise ValueError(f"tile {tiles} has {len(tiles)} axes but window_shape {window} has {len(window)}")
    else:
        tiles = (as_int(tile, "tile"),) * len(window)
        if tiles[0] <= 0:
            raise ValueError(f"tile must be > 0, got {tile!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int | float) or not 0 <= overlap < 1:
        raise ValueError(f"overlap must be a number in [0, 1), got {overlap!r}")
    effective = tuple(min(t, w) for t, w in zip(tiles, window, strict=True))
    per_axis = []
    for w, t in zip(window, effective, strict=True):
        step = max(1, math.floor(t * (1 - overlap)))
        n = -(-(w - t) // step) + 1
        if n == 1:
            per_axis.append([0])
        else:
            span, gaps = w - t, n - 1
            # round(i * span / gaps) with halves up, in integers
            per_axis.append([(2 * i * span + gaps) // (2 * gaps) for i in range(n)])
    return effective, list(itertools.product(*per_axis))


def blend_weights(tile_shape: Sequence[int], *, mode: str = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
    """Weight map of one tile for blending overlapping tiles; cached, read-only.

    ``"gaussian"`` (MONAI's and nnU-Net's importance map): separable,
    ``w(x) = prod_a exp(-(x_a - (n_a - 1) / 2)^2 / (2 * (sigma_scale * n_a)^2))``, divided by its
    maximum (so ``max == 1``) and floored at :data:`GAUSSIAN_FLOOR` so that a voxel covered only
    by tile borders still has a weight and the division never gives NaN. Exactly symmetric
    along each axis. ``"constant"``: all ones (plain averaging).

    Args:
        tile_shape: Tile size in voxels per axis; all > 0.
        mode: One of :data:`BLEND_MODES`.
        sigma_scale: Gaussian sigma as a fraction of the tile size per axis; > 0.

    Returns:
        ``tile_shape`` float32 array in ``[GAUSSIAN_FLOOR, 1]``, read-only. The same object is
        returned for the same arguments; copy it before changing it.

    Raises:
        ValueError: On a bad shape, mode or sigma_scale.
    """
    shape = _as_shape(tile_shape, "tile_shape")
    if mode not in BLEND_MODES:
        raise ValueError(f"blend mode must be one of {BLEND_MODES}, got {mode!r}")
    if isinstance(sigma_scale, bool) or not isinstance(sigma_scale, int | float) or not 0 < sigma_scale < math.inf:
        raise ValueError(f"sigma_scale must be a finite number > 0, got {sigma_scale!r}")
    return _blend_weights_cached(shape, mode, float(sigma_scale))


@functools.lru_cache(maxsize=32)
def _blend_weights_cached(shape: tuple[int, ...], mode: str, sigma_scale: float) -> np.ndarray:
    if mode == "constant":
        weights = np.ones(shape, dtype=np.float32)
    else:
        weights = np.ones((), dtype=np.float64)
        for n in shape:
            x = np.arange(n, dtype=np.float64) - (n - 1) / 2  # exactly symmetric about the centre
            axis = np.exp(-(x**2) / (2 * (sigma_scale * n) ** 2))
            weights = np.multiply.outer(weights, axis / axis.max())
        weights = np.maximum(weights, GAUSSIAN_FLOOR).astype(np.float32)
    weights.setflags(write=False)
    return weights


def windows_per_pass(window_shape: Sequence[int], tile: int | Sequence[int], overlap: float, batch_size: int) -> int:
    """How many whole windows one forward pass takes: `batch_size` when the window is a single
    model tile (whole windows are then stacked into one batch, which a GPU needs), else 1 (the
    window's own tiles fill the batches)."""
    _, offsets = plan_tiles(window_shape, tile, overlap)
    return batch_size if len(offsets) == 1 else 1
