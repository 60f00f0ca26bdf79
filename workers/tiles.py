"""Model tiles inside one window, and blending their predictions back together.

Used inside the predictor (CPU or GPU). A window (see ``pipelines.tiling.ChunkWindow``) that
is larger than the model's tile is covered by overlapping tiles (:func:`plan_tiles`); each
tile's class probabilities are weighted by a smooth map that is highest in the tile centre
(:func:`blend_weights`) and accumulated (:class:`BlendAccumulator`):

    blended[c, x] = sum_t w_t(x) * p_t[c, x] / sum_t w_t(x)

over the tiles ``t`` containing voxel ``x``. The sums are float32 (or float64), never fp16.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch

from schemas.checks import as_int, as_int_tuple

__all__ = ["BLEND_MODES", "GAUSSIAN_FLOOR", "BlendAccumulator", "blend_weights", "plan_tiles"]

#: Weight maps understood by :func:`blend_weights`.
BLEND_MODES = ("gaussian", "constant")

#: Floor of Gaussian weights relative to their maximum, so no voxel weighs zero (MONAI uses 1e-3).
GAUSSIAN_FLOOR = 1e-3


def _as_shape(values: object, what: str) -> tuple[int, ...]:
    shape = as_int_tuple(values, what, sequence_types=(torch.Size,))
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
    if isinstance(tile, Sequence | np.ndarray | torch.Size) and not isinstance(tile, (str, bytes)):
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


class BlendAccumulator:
    """Accumulate weighted tile predictions over one window, then normalise once.

    Two verbs, as MONAI's mergers: :meth:`add` (or :meth:`add_batch`) any number of times, then
    :meth:`finalize` exactly once. Holds two buffers on ``device``: the weighted sum
    ``(C, *window_shape)`` and the weight sum ``window_shape``, in ``dtype``.

    Args:
        window_shape: Window size in voxels per axis; all > 0.
        n_channels: Number of channels (classes) of the predictions; > 0.
        device: Torch device of the buffers (``"cpu"``, ``"cuda:0"``, ...).
        dtype: Accumulation dtype, ``torch.float32`` or ``torch.float64`` (never half precision).

    Example:
        >>> acc = BlendAccumulator((4, 6), 2)
        >>> shape, offsets = plan_tiles((4, 6), 4, 0.5)
        >>> w = blend_weights(shape)
        >>> for o in offsets:
        ...     acc.add(o, torch.full((2, *shape), 0.5), w)
        >>> acc.finalize().shape
        torch.Size([2, 4, 6])
    """

    def __init__(
        self,
        window_shape: Sequence[int],
        n_channels: int,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self._window = _as_shape(window_shape, "window_shape")
        self._channels = as_int(n_channels, "n_channels")
        if self._channels <= 0:
            raise ValueError(f"n_channels must be > 0, got {n_channels!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accumulation dtype must be torch.float32 or torch.float64, got {dtype!r}")
        self._device = torch.device(device)
        self._dtype = dtype
        self._sum: torch.Tensor | None = torch.zeros(
            (self._channels, *self._window), dtype=dtype, device=self._device
        )
        self._weight: torch.Tensor | None = torch.zeros(self._window, dtype=dtype, device=self._device)
        self._numpy_weights: tuple[np.ndarray, torch.Tensor] | None = None

    @property
    def window_shape(self) -> tuple[int, ...]:
        """Window size in voxels per axis."""
        return self._window

    @property
    def n_channels(self) -> int:
        """Number of channels of the predictions."""
        return self._channels

    @property
    def device(self) -> torch.device:
        """Device of the buffers and of the result."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """Accumulation and result dtype."""
        return self._dtype

    @property
    def finalized(self) -> bool:
        """Whether :meth:`finalize` has returned."""
        return self._sum is None

    def _open(self, verb: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self._sum is None or self._weight is None:
            raise RuntimeError(f"cannot {verb}: this BlendAccumulator was already finalized; make a new one per window")
        return self._sum, self._weight

    def _weights_tensor(self, weights: torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(weights, torch.Tensor):
            return weights.to(device=self._device, dtype=self._dtype)
        if isinstance(weights, np.ndarray):
            # blend_weights returns a cached read-only array: convert it once per accumulator.
            cached = self._numpy_weights
            if cached is not None and cached[0] is weights and not weights.flags.writeable:
                return cached[1]
            tensor = torch.tensor(weights, dtype=self._dtype, device=self._device)
            self._numpy_weights = (weights, tensor)
            return tensor
        raise ValueError(f"weights must be a torch.Tensor or numpy array, got {type(weights).__name__}")

    def _region(self, offset: Sequence[int], tile: tuple[int, ...]) -> tuple[slice, ...]:
        if isinstance(offset, (str, bytes)) or not isinstance(offset, Sequence | np.ndarray):
            raise ValueError(f"offset must be a sequence of {len(self._window)} integers, got {offset!r}")
        start = tuple(as_int(o, "offset entry") for o in offset)
        if len(start) != len(self._window):
            raise ValueError(
                f"offset {start} has {len(start)} axes but the window {self._window} has {len(self._window)}"
            )
        if any(o < 0 or o + t > w for o, t, w in zip(start, tile, self._window, strict=True)):
            raise ValueError(f"tile of shape {tile} at offset {start} does not fit in the window {self._window}")
        return tuple(slice(o, o + t) for o, t in zip(start, tile, strict=True))

    def add(self, offset: Sequence[int], probs: torch.Tensor, weights: torch.Tensor | np.ndarray) -> None:
        """Add one tile's prediction: ``sum += probs * weights``, ``weight_sum += weights``.

        Args:
            offset: First voxel of the tile in window coordinates (from :func:`plan_tiles`).
            probs: ``(C, *tile)`` floating-point predictions (probabilities, or any quantity to
                blend), on any device; moved to the accumulator's device and dtype.
            weights: ``tile`` non-negative weights (from :func:`blend_weights`), tensor or array.

        Raises:
            RuntimeError: After :meth:`finalize`.
            ValueError: If shapes, offset or dtype do not fit the window.
        """
        total, weight = self._open("add")
        if not isinstance(probs, torch.Tensor):
            raise ValueError(f"probs must be a torch.Tensor, got {type(probs).__name__}")
        if not probs.is_floating_point():
            raise ValueError(f"probs must be floating point, got {probs.dtype}")
        if probs.ndim != len(self._window) + 1 or probs.shape[0] != self._channels:
            raise ValueError(
                f"probs must be (C={self._channels}, *tile) with {len(self._window)} tile axes, "
                f"got {tuple(probs.shape)}"
            )
        tile = tuple(probs.shape[1:])
        region = self._region(offset, tile)
        w = self._weights_tensor(weights)
        if tuple(w.shape) != tile:
            raise ValueError(f"weights of shape {tuple(w.shape)} do not match the tile shape {tile} of probs")
        total[(slice(None), *region)].addcmul_(probs.to(device=self._device, dtype=self._dtype), w)
        weight[region].add_(w)

    def add_batch(
        self, offsets: Sequence[Sequence[int]], probs: torch.Tensor, weights: torch.Tensor | np.ndarray
    ) -> None:
        """Add a batch of tiles that share one weight map.

        Args:
            offsets: ``N`` tile offsets in window coordinates.
            probs: ``(N, C, *tile)`` floating-point predictions.
            weights: ``tile`` weights shared by all tiles.

        Raises:
            RuntimeError: After :meth:`finalize`.
            ValueError: If ``len(offsets) != N`` or a tile does not fit (see :meth:`add`).
        """
        self._open("add")
        if not isinstance(probs, torch.Tensor) or probs.ndim < 1:
            raise ValueError(f"probs must be an (N, C, *tile) torch.Tensor, got {probs!r:.80}")
        if len(offsets) != probs.shape[0]:
            raise ValueError(
                f"{len(offsets)} offsets for a batch of {probs.shape[0]} tiles of shape {tuple(probs.shape)}"
            )
        for offset, tile_probs in zip(offsets, probs, strict=True):
            self.add(offset, tile_probs, weights)

    def finalize(self) -> torch.Tensor:
        """Normalise and return the blended window; the accumulator is closed afterwards.

        Returns:
            ``(C, *window_shape)`` tensor of ``dtype`` on ``device``: weighted sum / weight sum.

        Raises:
            RuntimeError: If already finalized, or if a voxel got no weight (the message names
                the first such voxel in C order; the accumulator stays open then).
        """
        total, weight = self._open("finalize")
        uncovered = weight <= 0
        if bool(uncovered.any()):
            first = tuple(int(i) for i in torch.nonzero(uncovered)[0])
            count = int(uncovered.sum())
            raise RuntimeError(
                f"{count} voxel(s) of the window {self._window} got no weight, the first at {first}; "
                "the tiles must cover the window (use plan_tiles)"
            )
        total /= weight
        self._sum = self._weight = None
        self._numpy_weights = None
        return total
