"""Model tiles inside one window, and blending their predictions back together.

Used inside the predictor (CPU or GPU). A window (see ``schemas.window.ChunkWindow``) that
is larger than the model's tile is covered by overlapping tiles (:func:`plan_tiles`); each
tile's class probabilities are weighted by a smooth map that is highest in the tile centre
(:func:`blend_weights`) and accumulated (:class:`BlendAccumulator`):

    blended[c, x] = sum_t w_t(x) * p_t[c, x] / sum_t w_t(x)

over the tiles ``t`` containing voxel ``x``. The sums are float32 (or float64), never fp16.

The two sums are the largest allocations of a window (K x window voxels x 4 bytes: 1.4 GB for
117 classes and a 144³ window), and a predictor needs them again for the next window of the
same shape: :class:`BlendBuffers` keeps them between windows. Allocated afresh per window, they
made a predictor process grow by whole buffers over a long job (steps of one buffer, measured
on CPU with the predictor processes' malloc tunables, which keep freed memory in the heap: other
allocations land in a freed buffer's hole and the next buffer goes on top).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from schemas.checks import as_int
from workers.tileplan import BLEND_MODES, GAUSSIAN_FLOOR, _as_shape, blend_weights, plan_tiles

__all__ = ["BLEND_MODES", "GAUSSIAN_FLOOR", "BlendAccumulator", "BlendBuffers", "blend_weights", "plan_tiles"]


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
        buffers: ``(sum, weight)`` tensors of shapes ``(C, *window_shape)`` and ``window_shape``,
            of ``dtype`` on ``device``, to accumulate into instead of new ones (zeroed here; from
            :class:`BlendBuffers`). :meth:`finalize` returns the first.
        region: the part of the window to accumulate, one slice per axis within it (default:
            the whole window). Tiles are still given in window coordinates; only the part of
            each inside `region` is added, so the buffers (and :meth:`finalize`'s result) are
            region-shaped. Each voxel of the region gets the same terms in the same order as
            with the whole window: the result is the whole window's, cropped (a core needs no
            buffer for the halo around it: 0.70x the memory for a 144³ window of a 128³ core).

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
        buffers: tuple[torch.Tensor, torch.Tensor] | None = None,
        region: Sequence[slice] | None = None,
    ) -> None:
        self._window = _as_shape(window_shape, "window_shape")
        self._part = self._check_region(region)
        extent = tuple(s.stop - s.start for s in self._part)
        self._channels = as_int(n_channels, "n_channels")
        if self._channels <= 0:
            raise ValueError(f"n_channels must be > 0, got {n_channels!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accumulation dtype must be torch.float32 or torch.float64, got {dtype!r}")
        self._device = torch.device(device)
        self._dtype = dtype
        self._sum: torch.Tensor | None
        self._weight: torch.Tensor | None
        if buffers is None:
            self._sum = torch.zeros((self._channels, *extent), dtype=dtype, device=self._device)
            self._weight = torch.zeros(extent, dtype=dtype, device=self._device)
        else:
            total, weight = buffers
            for name, t, shape in (("sum", total, (self._channels, *extent)), ("weight", weight, extent)):
                if tuple(t.shape) != shape or t.dtype != dtype or t.device != self._device or not t.is_contiguous():
                    raise ValueError(f"the {name} buffer is {tuple(t.shape)} {t.dtype} on {t.device}; this "
                                     f"accumulator needs a contiguous {shape} {dtype} on {self._device}")
            self._sum, self._weight = total.zero_(), weight.zero_()
        self._numpy_weights: tuple[np.ndarray, torch.Tensor] | None = None

    def _check_region(self, region: Sequence[slice] | None) -> tuple[slice, ...]:
        if region is None:
            return tuple(slice(0, n) for n in self._window)
        if len(region) != len(self._window):
            raise ValueError(f"region {tuple(region)} has {len(region)} axes but the window {self._window} has "
                             f"{len(self._window)}")
        out = []
        for s, n in zip(region, self._window, strict=True):
            start, stop, step = s.indices(n)
            if step != 1 or stop <= start:
                raise ValueError(f"region {tuple(region)} is not a non-empty box of the window {self._window}")
            out.append(slice(start, stop))
        return tuple(out)

    @property
    def window_shape(self) -> tuple[int, ...]:
        """Window size in voxels per axis."""
        return self._window

    @property
    def region(self) -> tuple[slice, ...]:
        """The accumulated part of the window (the whole window unless one was given)."""
        return self._part

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
        # the part of the tile inside the accumulated region: src in tile, dst in the buffers
        src, dst = [], []
        for r, acc in zip(region, self._part, strict=True):
            lo, hi = max(r.start, acc.start), min(r.stop, acc.stop)
            if hi <= lo:
                return  # the tile adds nothing to the region
            src.append(slice(lo - r.start, hi - r.start))
            dst.append(slice(lo - acc.start, hi - acc.start))
        src_t, dst_t = tuple(src), tuple(dst)
        total[(slice(None), *dst_t)].addcmul_(probs[(slice(None), *src_t)].to(device=self._device, dtype=self._dtype),
                                              w[src_t])
        weight[dst_t].add_(w[src_t])

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
        """Normalise and return the blended window (its region); the accumulator is closed afterwards.

        Returns:
            ``(C, *region_shape)`` (the window's, without a region) tensor of ``dtype`` on
            ``device``: weighted sum / weight sum.

        Raises:
            RuntimeError: If already finalized, or if a voxel got no weight (the message names
                the first such voxel in C order; the accumulator stays open then).
        """
        total, weight = self._open("finalize")
        uncovered = weight <= 0
        if bool(uncovered.any()):
            first = tuple(int(i) + r.start for i, r in zip(torch.nonzero(uncovered)[0], self._part, strict=True))
            count = int(uncovered.sum())
            raise RuntimeError(
                f"{count} voxel(s) of the window {self._window} got no weight, the first at {first}; "
                "the tiles must cover the window (use plan_tiles)"
            )
        total /= weight
        self._sum = self._weight = None
        self._numpy_weights = None
        return total


class BlendBuffers:
    """Blend accumulator buffers kept from one window to the next of the same shape.

    :meth:`take` hands out a ``(sum, weight)`` pair (a kept one, or new), :meth:`give` takes it
    back once nothing refers to it any more. It keeps only pairs of the last key asked for
    (window shape, classes, dtype, device), as many as were in use at once, so it holds no
    more than the windows in flight did; a pair never given back is simply freed.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._free: list[tuple[torch.Tensor, torch.Tensor]] = []

    def take(self, window_shape: Sequence[int], n_channels: int, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """A ``(sum (n_channels, *window_shape), weight window_shape)`` pair, contents undefined."""
        window = tuple(int(n) for n in window_shape)
        device = torch.device(device)
        key = (window, int(n_channels), dtype, device)
        if key != self._key:
            self._key, self._free = key, []
        if self._free:
            return self._free.pop()
        return (torch.empty((int(n_channels), *window), dtype=dtype, device=device),
                torch.empty(window, dtype=dtype, device=device))

    def give(self, buffers: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Keep a pair from :meth:`take` for a later window (dropped if the key has changed)."""
        total, weight = buffers
        if (tuple(weight.shape), int(total.shape[0]), total.dtype, total.device) == self._key:
            self._free.append(buffers)
