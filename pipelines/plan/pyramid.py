"""Overview pyramids of a class mask: which levels, and the mode downsampling that makes them.

Pure (numpy only). The store side (reading and writing levels chunk by chunk, their metadata)
is :mod:`pipelines.writers.overviews`.

Levels: level 0 is the full-resolution mask; level ``l`` is level ``l - 1`` downsampled by a
factor 1 or 2 per axis (:func:`plan_pyramid`), until a level fits in one chunk. Each level is
computed from the previous one, never from level 0, so every output chunk reads at most
``2**ndim`` input chunks.

Mode downsampling (:func:`mode_downsample`): each output pixel is the most frequent class among
the (up to) ``2 x 2`` (2D) or ``2 x 2 x 2`` (3D) input pixels it covers, nodata ignored; it is
nodata only where the whole block is nodata. Ties go to the *lowest* class id (a deterministic
rule that needs no neighbourhood, so a chunk's output never depends on its neighbours). At an
odd edge the block is cut short and the mode is taken over the pixels it has.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NODATA = 255


@dataclass(frozen=True)
class PyramidLevel:
    """One level of an overview pyramid.

    Attributes:
        level: 0 (full resolution), 1, 2, ...
        shape: size per array axis, px / voxels: ``ceil(previous / factor)``.
        factors: downsampling factor per axis from the previous level (1 or 2; all 1 at level 0).
        cumulative: factor per axis from level 0 (a power of 2): one pixel of this level covers
            ``cumulative`` pixels of level 0 per axis.
    """

    level: int
    shape: tuple[int, ...]
    factors: tuple[int, ...]
    cumulative: tuple[int, ...]


def plan_pyramid(shape: Sequence[int], chunk: Sequence[int], *,
                 spacing: Sequence[float] | None = None) -> tuple[PyramidLevel, ...]:
    """The levels of a mask of `shape`, level 0 first, down to the first level that fits in one
    chunk (every axis <= the chunk's): a scene that fits in one chunk gets level 0 alone.

    Which axes are halved: every axis longer than one pixel, unless `spacing` says the axis is
    already coarse. With `spacing` (a volume's voxel size per axis, mm) an axis is halved when
    its spacing at the current level is below twice the finest spacing among axes longer than
    one voxel, so a (3, 0.8, 0.8) mm volume is halved in y and x first ((3, 1.6, 1.6) mm), then
    in all three ((6, 3.2, 3.2) mm): levels drift towards isotropic voxels instead of squashing
    the thick axis. The finest axis is always halved, so the pyramid always ends.

    Args:
        shape: level-0 size per axis (positive ints).
        chunk: chunk shape per axis (positive ints), as the store's.
        spacing: size of a pixel per axis at level 0 (any unit), or None for isotropic.

    Returns:
        The levels, ``levels[l].level == l``.

    Raises:
        ValueError: shapes of different lengths or with values < 1.
    """
    shape, chunk = tuple(int(n) for n in shape), tuple(int(n) for n in chunk)
    ndim = len(shape)
    if len(chunk) != ndim or min(shape + chunk, default=0) < 1:
        raise ValueError(f"plan_pyramid: shape {shape} and chunk {chunk} must be positive and of one length")
    base = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * ndim
    if len(base) != ndim or not all(math.isfinite(s) and s > 0 for s in base):
        raise ValueError(f"plan_pyramid: spacing {spacing!r} must be {ndim} finite numbers > 0")
    levels = [PyramidLevel(0, shape, (1,) * ndim, (1,) * ndim)]
    while any(n > c for n, c in zip(levels[-1].shape, chunk)):
        prev = levels[-1]
        current = [s * f for s, f in zip(base, prev.cumulative)]
        finest = min(current[a] for a in range(ndim) if prev.shape[a] > 1)
        factors = tuple(2 if prev.shape[a] > 1 and current[a] < 2 * finest else 1 for a in range(ndim))
        levels.append(PyramidLevel(
            level=prev.level + 1,
            shape=tuple(-(-n // f) for n, f in zip(prev.shape, factors)),
            factors=factors,
            cumulative=tuple(c * f for c, f in zip(prev.cumulative, factors)),
        ))
    return tuple(levels)


def mode_downsample(block: np.ndarray, factors: Sequence[int], *, nodata: int = NODATA) -> np.ndarray:
    """The mode of each ``factors`` block of a uint8 class mask (see the module docstring).

    Args:
        block: (n0, n1[, n2]) uint8 class ids, `nodata` where not predicted; any size (an odd
            edge makes short blocks).
        factors: block size per axis (1 or 2 each; any positive int works).
        nodata: the value ignored in the vote, returned only for all-nodata blocks.

    Returns:
        ``ceil(n / f)`` per axis, uint8: the most frequent non-nodata class of each block, the
        lowest class id among equally frequent ones, `nodata` where the block holds nothing else.

    Memory: the block (padded at an odd edge), ``prod(factors)`` uint8 vote counts and a few int32
    arrays of the output's size: for a 2x2 block about 4x the block's bytes.
    """
    factors = tuple(int(f) for f in factors)
    if block.ndim != len(factors) or min(factors, default=0) < 1:
        raise ValueError(f"mode_downsample: factors {factors} for a block of shape {block.shape}")
    if block.dtype != np.uint8:
        raise ValueError(f"mode_downsample: class masks are uint8, got {block.dtype}")
    out_shape = tuple(-(-n // f) for n, f in zip(block.shape, factors))
    pad = [(0, o * f - n) for o, f, n in zip(out_shape, factors, block.shape)]
    padded = np.pad(block, pad, constant_values=nodata) if any(p for _, p in pad) else block
    # one strided view per position in the block: candidates[i][o] is the i-th pixel of block o
    candidates = [padded[tuple(slice(offset, None, f) for offset, f in zip(offsets, factors))]
                  for offsets in itertools.product(*(range(f) for f in factors))]
    # votes per candidate from the pairwise equalities (n(n-1)/2 comparisons of output size)
    counts = [np.ones(out_shape, dtype=np.uint8) for _ in candidates]  # <= prod(factors) votes
    for i, j in itertools.combinations(range(len(candidates)), 2):
        same = candidates[i] == candidates[j]
        counts[i] += same
        counts[j] += same
    best_key = np.full(out_shape, -1, dtype=np.int32)
    best = np.full(out_shape, nodata, dtype=np.uint8)
    for candidate, count in zip(candidates, counts):
        # key: more votes first, then the lower class id; nodata never wins
        key = np.where(candidate == nodata, -1, count.astype(np.int32) * 256 + (255 - candidate.astype(np.int32)))
        better = key > best_key
        best_key[better] = key[better]
        best[better] = candidate[better]
    return best


def mean_downsample(block: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """The mean of each ``factors`` block of an image (a volume store's input image levels).

    Args:
        block: any shape and numeric dtype (``(C, z, y, x)`` with factor 1 on the channel axis);
            an odd edge makes short blocks, whose mean is over the values they have.
        factors: block size per axis (positive ints).

    Returns:
        ``ceil(n / f)`` per axis in `block`'s dtype: the block means accumulated in float64; NaN
        values are left out of a float block's mean (NaN only where the whole block is NaN);
        integer means are rounded to the nearest integer (halves to even, ``np.rint``), which
        stays within the dtype's range.

    Memory: a float64 copy of the block and float64 sums of the output's size per reduced axis.
    """
    factors = tuple(int(f) for f in factors)
    if block.ndim != len(factors) or min(factors, default=0) < 1:
        raise ValueError(f"mean_downsample: factors {factors} for a block of shape {block.shape}")
    values = block.astype(np.float64)
    floating = np.issubdtype(block.dtype, np.floating)
    counts = None
    if floating:
        valid = ~np.isnan(values)
        values[~valid] = 0.0
        counts = valid.astype(np.float64)
    sums = values
    for axis, f in enumerate(factors):
        if f == 1:
            continue
        starts = np.arange(0, block.shape[axis], f)
        sums = np.add.reduceat(sums, starts, axis=axis)
        if counts is not None:
            counts = np.add.reduceat(counts, starts, axis=axis)
    if counts is None:  # integers: every voxel counts; a short block at an edge has fewer
        counts = np.ones((1,) * block.ndim)
        for axis, f in enumerate(factors):
            n = block.shape[axis]
            sizes = np.minimum(f, n - np.arange(0, n, f)).astype(np.float64)
            shape = [1] * block.ndim
            shape[axis] = len(sizes)
            counts = counts * sizes.reshape(shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / counts
    if floating:
        return mean.astype(block.dtype)
    return np.rint(mean).astype(block.dtype)
