"""Chunk planning: cut an n-dimensional scene into output chunks with a halo of context.

Pure maths on shapes (numpy only), shared by 2D scenes ``(H, W)`` and 3D volumes ``(D, H, W)``.

A scene of shape ``S`` is cut into a regular grid of *cores* of size ``c`` aligned at 0, so the
cores coincide with the Zarr chunks of an output array chunked by ``c``; along each axis there
are ``ceil(S / c)`` cores and the last one is ``S - c * (ceil(S / c) - 1)`` long. The *window*
of a core is the core grown by the halo ``h`` on every side:
``[core.start - h, core.stop + h)``. The part of the window inside the scene is the *read*
region; the rest is made up by padding (:func:`pad_window`), so every window of a plan has
the same shape ``core_shape + 2 * h`` whatever its place in the scene.

Example:
    >>> w = plan_chunks((5, 7), 4, 1)[1]
    >>> w.core, w.read, w.pad
    ((slice(0, 4, None), slice(4, 7, None)), (slice(0, 5, None), slice(3, 7, None)), ((1, 0), (0, 1)))
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from schemas.checks import as_int, as_int_tuple
from schemas.window import ChunkWindow

__all__ = [
    "PAD_MODES",
    "chunk_grid_shape",
    "pad_window",
    "plan_chunk",
    "plan_chunks",
]

#: Padding modes understood by :func:`pad_window` (``numpy.pad`` names).
PAD_MODES = ("reflect", "symmetric", "edge", "constant")


def _per_axis(value: int | Sequence[int], ndim: int, what: str) -> tuple[int, ...]:
    """Broadcast an int to ``ndim`` axes, or check a sequence has ``ndim`` entries."""
    if isinstance(value, Sequence | np.ndarray) and not isinstance(value, (str, bytes)):
        values = as_int_tuple(value, what)
        if len(values) != ndim:
            raise ValueError(f"{what} {tuple(values)} has {len(values)} axes but the scene has {ndim}")
        return values
    return (as_int(value, what),) * ndim


def _check_shape_chunk(shape: Sequence[int], chunk: int | Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    dims = as_int_tuple(shape, "scene shape")
    if not dims or min(dims) <= 0:
        raise ValueError(f"scene shape must have at least one axis, all > 0, got {tuple(dims)}")
    sizes = _per_axis(chunk, len(dims), "chunk")
    if min(sizes) <= 0:
        raise ValueError(f"chunk sizes must be > 0, got {sizes}")
    return dims, sizes


def chunk_grid_shape(shape: Sequence[int], chunk: int | Sequence[int]) -> tuple[int, ...]:
    """Number of chunks per axis, ``ceil(shape / chunk)``.

    Args:
        shape: Scene shape in voxels, e.g. ``(H, W)`` or ``(D, H, W)``; all > 0.
        chunk: Chunk size in voxels, one int for every axis or one per axis; all > 0.

    Returns:
        Grid shape, one entry per axis.

    Raises:
        ValueError: If a size is not a positive integer or the number of axes differs.
    """
    dims, sizes = _check_shape_chunk(shape, chunk)
    return tuple(-(-s // c) for s, c in zip(dims, sizes, strict=True))


def plan_chunk(
    shape: Sequence[int], chunk: int | Sequence[int], halo: int | Sequence[int], index: Sequence[int]
) -> ChunkWindow:
    """The window of one chunk of the grid, without enumerating the others.

    Per axis, with ``i`` the index, ``c`` the chunk size, ``h`` the halo and ``S`` the scene size:
    ``core = [i*c, min((i+1)*c, S))``, ``read = [max(core.start - h, 0), min(core.stop + h, S))``,
    ``pad = (h - (core.start - read.start), h - (read.stop - core.stop))``.

    Args:
        shape: Scene shape in voxels; all > 0.
        chunk: Chunk (core) size in voxels, one int or one per axis; all > 0.
        halo: Halo in voxels added on each side, one int or one per axis; all >= 0.
        index: Chunk grid index, ``0 <= index < chunk_grid_shape(shape, chunk)``.

    Returns:
        The chunk's :class:`ChunkWindow`.

    Raises:
        ValueError: On a bad size, a negative halo, mismatched axes or an index off the grid.
    """
    dims, sizes = _check_shape_chunk(shape, chunk)
    halos = _per_axis(halo, len(dims), "halo")
    if min(halos) < 0:
        raise ValueError(f"halo must be >= 0, got {halos}")
    idx = _per_axis(index, len(dims), "chunk index")
    grid = tuple(-(-s // c) for s, c in zip(dims, sizes, strict=True))
    if any(not 0 <= i < g for i, g in zip(idx, grid, strict=True)):
        raise ValueError(f"chunk index {idx} is off the grid {grid} of scene {dims} with chunk {sizes}")
    return _window(dims, sizes, halos, idx)


def _window(dims: tuple[int, ...], sizes: tuple[int, ...], halos: tuple[int, ...], idx: tuple[int, ...]) -> ChunkWindow:
    core, read, pad = [], [], []
    for s, c, h, i in zip(dims, sizes, halos, idx, strict=True):
        c0, c1 = i * c, min((i + 1) * c, s)
        r0, r1 = max(c0 - h, 0), min(c1 + h, s)
        core.append(slice(c0, c1))
        read.append(slice(r0, r1))
        pad.append((h - (c0 - r0), h - (r1 - c1)))
    return ChunkWindow(index=idx, core=tuple(core), read=tuple(read), pad=tuple(pad))


def plan_chunks(shape: Sequence[int], chunk: int | Sequence[int], halo: int | Sequence[int]) -> list[ChunkWindow]:
    """Cut a scene into a regular grid of chunks, each with its halo window.

    The cores are the cells of the grid aligned at 0 with cell size ``chunk`` (the last cell per
    axis is smaller when ``chunk`` does not divide ``shape``); they are disjoint and cover the
    scene exactly. There are ``prod(ceil(shape / chunk))`` windows, in C order of their indices.
    See :func:`plan_chunk` for the formulas.

    Args:
        shape: Scene shape in voxels, e.g. ``(H, W)`` or ``(D, H, W)``; all > 0.
        chunk: Chunk (core) size in voxels, one int or one per axis; all > 0. Use the Zarr chunk
            size of the output arrays so that each window writes whole Zarr chunks.
        halo: Context in voxels added on each side of the core, one int or one per axis; all >= 0.
            May exceed the chunk size.

    Returns:
        The windows, in C order of ``index``.

    Raises:
        ValueError: On a non-positive shape or chunk, a negative halo or mismatched axes.
    """
    dims, sizes = _check_shape_chunk(shape, chunk)
    halos = _per_axis(halo, len(dims), "halo")
    if min(halos) < 0:
        raise ValueError(f"halo must be >= 0, got {halos}")
    grid = tuple(-(-s // c) for s, c in zip(dims, sizes, strict=True))
    return [_window(dims, sizes, halos, idx) for idx in itertools.product(*(range(g) for g in grid))]


def stripe_order(windows: Sequence[ChunkWindow], stripe: int = 4) -> list[ChunkWindow]:
    """The windows in stripes `stripe` chunks wide along the last axis, C order inside each.

    Consecutive halo windows share input blocks; visiting a narrow stripe top to bottom keeps
    the blocks still to be shared within a small, scene-size independent reader cache (a full
    row of a wide scene would not fit), at the cost of decoding the blocks on stripe borders twice.

    Args:
        windows: from :func:`plan_chunks` (any order).
        stripe: stripe width in chunks, >= 1.

    Returns:
        The same windows, sorted by (stripe, index).
    """
    if isinstance(stripe, bool) or not isinstance(stripe, int) or stripe < 1:
        raise ValueError(f"stripe must be an int >= 1, got {stripe!r}")
    return sorted(windows, key=lambda w: (w.index[-1] // stripe, w.index))


def pad_window(
    array: np.ndarray, window: ChunkWindow, *, mode: str = "reflect", constant_value: float = 0
) -> np.ndarray:
    """Pad the array read for a window to the full window shape.

    Only the trailing ``window.ndim`` axes are padded; leading axes (bands, channels) are kept.
    ``"reflect"`` mirrors without repeating the edge voxel (``numpy.pad``'s reflect: a read of
    ``[a, b, c]`` padded by 2 gives ``[c, b | a, b, c | b, a]``); a pad longer than the read
    keeps bouncing between the ends (the periodic reflection with period ``2 * (n - 1)``). An
    axis read with a single voxel cannot be reflected and is padded with ``"edge"`` instead.
    Whenever ``pad <= read_size - 1`` on every axis, the result equals the same window cut
    from ``np.pad(scene, halo, mode="reflect")``.

    Args:
        array: ``(..., *window.read_shape)`` voxels of the read region, any dtype.
        window: The window the array was read for.
        mode: One of :data:`PAD_MODES` (``numpy.pad`` names).
        constant_value: Fill value for ``mode="constant"`` (in the array's units).

    Returns:
        ``(..., *window.window_shape)`` array of the same dtype. When no padding is needed,
        ``array`` itself is returned (not copied).

    Raises:
        ValueError: If the array's trailing shape is not the read shape, or the mode is unknown.
    """
    if mode not in PAD_MODES:
        raise ValueError(f"pad mode must be one of {PAD_MODES}, got {mode!r}")
    array = np.asarray(array)
    nd = window.ndim
    if array.ndim < nd or array.shape[array.ndim - nd :] != window.read_shape:
        raise ValueError(
            f"array of shape {array.shape} does not end with the read shape {window.read_shape} "
            f"of window {window.index}"
        )
    lead = ((0, 0),) * (array.ndim - nd)
    if not any(b or a for b, a in window.pad):
        return array
    if mode == "constant":
        return np.pad(array, lead + window.pad, mode="constant", constant_values=constant_value)
    if mode != "reflect" or min(window.read_shape) > 1:
        return np.pad(array, lead + window.pad, mode=mode)
    # Reflect needs two voxels; pad single-voxel axes with edge, the others with reflect.
    single = tuple(p if n == 1 else (0, 0) for p, n in zip(window.pad, window.read_shape, strict=True))
    multi = tuple((0, 0) if n == 1 else p for p, n in zip(window.pad, window.read_shape, strict=True))
    out = np.pad(array, lead + single, mode="edge")
    return np.pad(out, lead + multi, mode="reflect")

