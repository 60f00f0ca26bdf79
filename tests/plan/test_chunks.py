"""Tests of pipelines.plan.chunks: chunk grids, halo windows and window padding."""

from __future__ import annotations

import itertools
import math
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.plan.chunks import (
    PAD_MODES,
    chunk_grid_shape,
    pad_window,
    plan_chunk,
    plan_chunks,
    stripe_order,
)
from schemas.window import ChunkWindow


@st.composite
def grids(draw: st.DrawFn, max_ndim: int = 3) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(shape, chunk, halo) with 1..max_ndim axes, including halo > chunk and chunk > shape."""
    ndim = draw(st.integers(1, max_ndim))
    shape = tuple(draw(st.lists(st.integers(1, 23), min_size=ndim, max_size=ndim)))
    chunk = tuple(draw(st.lists(st.integers(1, 12), min_size=ndim, max_size=ndim)))
    halo = tuple(draw(st.lists(st.integers(0, 9), min_size=ndim, max_size=ndim)))
    return shape, chunk, halo


def _scene(shape: tuple[int, ...]) -> np.ndarray:
    """A scene whose voxel values are their own C-order linear index."""
    return np.arange(math.prod(shape), dtype=np.int64).reshape(shape)


@settings(max_examples=150, deadline=None)
@given(grids())
def test_cores_are_disjoint_and_cover_the_scene(grid: tuple) -> None:
    shape, chunk, halo = grid
    windows = plan_chunks(shape, chunk, halo)
    cover = np.zeros(shape, dtype=np.int64)
    for w in windows:
        cover[w.core] += 1
    assert (cover == 1).all()
    assert len(windows) == math.prod(chunk_grid_shape(shape, chunk))


@settings(max_examples=150, deadline=None)
@given(grids())
def test_windows_are_consistent(grid: tuple) -> None:
    shape, chunk, halo = grid
    windows = plan_chunks(shape, chunk, halo)
    grid_shape = chunk_grid_shape(shape, chunk)
    assert [w.index for w in windows] == list(itertools.product(*(range(g) for g in grid_shape)))
    scene = _scene(shape)
    for w in windows:
        assert w.ndim == len(shape) and w.halo == halo
        for a in range(len(shape)):
            core, read, (before, after) = w.core[a], w.read[a], w.pad[a]
            # cores align with a Zarr grid of the chunk size
            assert core.start == w.index[a] * chunk[a]
            assert core.stop - core.start <= chunk[a]
            # reads stay in the scene, contain the core, and read + pad == core +- halo
            assert 0 <= read.start <= core.start < core.stop <= read.stop <= shape[a]
            assert read.start - before == core.start - halo[a]
            assert read.stop + after == core.stop + halo[a]
            # padding only where the scene ends
            assert (before > 0) == (core.start - halo[a] < 0)
            assert (after > 0) == (core.stop + halo[a] > shape[a])
        assert w.window_shape == tuple(c + 2 * h for c, h in zip(w.core_shape, halo))
        assert w.window_origin == tuple(c - h for c, h in zip(w.core_origin, halo))
        assert plan_chunk(shape, chunk, halo, w.index) == w
        # core_in_window / core_in_read / read_in_window pick the right voxels
        padded = pad_window(scene[w.read], w, mode="constant", constant_value=-1)
        assert padded.shape == w.window_shape
        np.testing.assert_array_equal(padded[w.core_in_window], scene[w.core])
        np.testing.assert_array_equal(scene[w.read][w.core_in_read], scene[w.core])
        np.testing.assert_array_equal(padded[w.read_in_window], scene[w.read])
        assert (padded == -1).sum() == math.prod(w.window_shape) - math.prod(w.read_shape)


@settings(max_examples=150, deadline=None)
@given(grids(), st.sampled_from(["reflect", "symmetric", "edge"]))
def test_pad_window_matches_padding_the_whole_scene(grid: tuple, mode: str) -> None:
    """Where numpy pads the whole scene the same way, a padded window is a cut of it."""
    shape, chunk, halo = grid
    scene = _scene(shape)
    whole = np.pad(scene, [(h, h) for h in halo], mode=mode)
    for w in plan_chunks(shape, chunk, halo):
        if mode == "reflect" and any(max(p) > n - 1 for p, n in zip(w.pad, w.read_shape)):
            continue  # reflect of a short read bounces off its own far end, not the scene's
        if mode == "symmetric" and any(max(p) > n for p, n in zip(w.pad, w.read_shape)):
            continue
        cut = tuple(slice(o + h, o + h + n) for o, h, n in zip(w.window_origin, halo, w.window_shape))
        np.testing.assert_array_equal(pad_window(scene[w.read], w, mode=mode), whole[cut])


def _reflect_index(i: int, n: int) -> int:
    """Index into a length-n axis of position i of its infinite mirror extension (no edge repeat)."""
    if n == 1:
        return 0
    period = 2 * (n - 1)
    m = i % period
    return m if m < n else period - m


@pytest.mark.parametrize(
    ("shape", "chunk", "halo"),
    [
        pytest.param((1, 1), 4, 3, id="single-voxel-scene"),
        pytest.param((3, 2), 8, 5, id="scene-smaller-than-chunk-pad-beyond-read"),
        pytest.param((1, 17), 4, 2, id="1px-row-strip"),
        pytest.param((17, 1), 4, 2, id="1px-col-strip"),
        pytest.param((9, 10), 3, 7, id="halo-larger-than-chunk"),
        pytest.param((5, 11, 7), (2, 4, 3), (1, 6, 0), id="anisotropic-3d"),
        pytest.param((13, 29), (5, 7), 2, id="odd-sizes"),
    ],
)
def test_pad_window_reflect_in_awkward_cases(shape: tuple, chunk: int | tuple, halo: int | tuple) -> None:
    """Reflect always works: single-voxel reads fall back to edge, long pads bounce periodically."""
    scene = _scene(shape).astype(np.float32)
    bands = np.stack([scene, -scene])  # a leading channel axis is kept as is
    for w in plan_chunks(shape, chunk, halo):
        out = pad_window(bands[(slice(None), *w.read)], w)
        assert out.shape == (2, *w.window_shape) and out.dtype == np.float32
        read = scene[w.read]
        for pos in itertools.product(*(range(n) for n in w.window_shape)):
            src = tuple(_reflect_index(p - b, n) for p, (b, _), n in zip(pos, w.pad, w.read_shape))
            assert out[(0, *pos)] == read[src] and out[(1, *pos)] == -read[src]


@pytest.mark.parametrize(
    ("shape", "chunk", "halo", "grid", "core_shapes"),
    [
        ((5, 7), 10, 2, (1, 1), {(5, 7)}),
        ((1, 9), 4, 3, (1, 3), {(1, 4), (1, 1)}),
        ((9, 1), 4, 0, (3, 1), {(4, 1), (1, 1)}),
        ((10, 10), 3, 8, (4, 4), {(3, 3), (3, 1), (1, 3), (1, 1)}),
        ((4, 9, 6), (2, 4, 6), (1, 2, 3), (2, 3, 1), {(2, 4, 6), (2, 1, 6)}),
        ((7,), 1, 0, (7,), {(1,)}),
    ],
)
def test_awkward_shapes(shape: tuple, chunk: int | tuple, halo: int | tuple, grid: tuple, core_shapes: set) -> None:
    windows = plan_chunks(shape, chunk, halo)
    assert chunk_grid_shape(shape, chunk) == grid
    assert {w.core_shape for w in windows} == core_shapes
    halos = (halo,) * len(shape) if isinstance(halo, int) else halo
    for w in windows:
        assert all(s.stop <= n for s, n in zip(w.read, shape))
        assert w.window_shape == tuple(c + 2 * h for c, h in zip(w.core_shape, halos))


def test_window_example_by_hand() -> None:
    w = plan_chunks((5, 7), 4, 1)[1]
    assert w.index == (0, 1)
    assert w.core == (slice(0, 4), slice(4, 7))
    assert w.read == (slice(0, 5), slice(3, 7))
    assert w.pad == ((1, 0), (0, 1))
    assert w.window_shape == (6, 5)
    assert w.core_in_window == (slice(1, 5), slice(1, 4))
    assert w.core_in_read == (slice(0, 4), slice(1, 4))
    assert w.window_origin == (-1, 3)


def test_window_is_frozen_hashable_and_pickles() -> None:
    windows = plan_chunks((9, 9, 9), 4, 2)
    w = windows[5]
    with pytest.raises(AttributeError):
        w.index = (0, 0, 0)  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(w)) == w
    assert len(set(windows)) == len(windows)
    assert {w: 1}[plan_chunk((9, 9, 9), 4, 2, w.index)] == 1


def test_window_normalises_numpy_integers() -> None:
    w = ChunkWindow(index=(np.int64(0),), core=(slice(np.int32(0), np.int64(3)),), read=(slice(0, 4),), pad=[(1, 0)])
    assert w.index == (0,) and type(w.core[0].stop) is int and w.pad == ((1, 0),)
    assert w.halo == (1,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(index=(0, 0), core=(slice(0, 2),), read=(slice(0, 2),), pad=((0, 0),)), "axes disagree"),
        (dict(index=(), core=(), read=(), pad=()), "at least one axis"),
        (dict(index=(-1,), core=(slice(0, 2),), read=(slice(0, 2),), pad=((0, 0),)), "index must be >= 0"),
        (dict(index=(0,), core=(slice(-1, 2),), read=(slice(0, 2),), pad=((0, 0),)), "start < stop"),
        (dict(index=(0,), core=(slice(2, 2),), read=(slice(0, 2),), pad=((0, 0),)), "start < stop"),
        (dict(index=(0,), core=(slice(0, 4, 2),), read=(slice(0, 4),), pad=((0, 0),)), "step None"),
        (dict(index=(0,), core=(slice(0, 2.0),), read=(slice(0, 2),), pad=((0, 0),)), "integer start"),
        (dict(index=(0,), core=((0, 2),), read=(slice(0, 2),), pad=((0, 0),)), "must be a slice"),
        (dict(index=(0,), core=(slice(0, 4),), read=(slice(1, 4),), pad=((0, 0),)), "does not contain"),
        (dict(index=(0,), core=(slice(0, 4),), read=(slice(0, 4),), pad=((-1, -1),)), r"pair >= 0"),
        (dict(index=(0,), core=(slice(2, 4),), read=(slice(1, 4),), pad=((0, 2),)), "halo before"),
        (dict(index=(0,), core=(slice(3, 4),), read=(slice(2, 4),), pad=((1, 2),)), "scene edge"),
    ],
)
def test_window_rejects_inconsistent_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ChunkWindow(**kwargs)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (((0, 5), 2, 1), r"all > 0, got \(0, 5\)"),
        (((), 2, 1), "at least one axis"),
        (((5, 5), 0, 1), r"chunk sizes must be > 0, got \(0, 0\)"),
        (((5, 5), (2, -1), 1), r"chunk sizes must be > 0, got \(2, -1\)"),
        (((5, 5), 2, -1), r"halo must be >= 0, got \(-1, -1\)"),
        (((5, 5), (2, 2, 2), 1), r"chunk \(2, 2, 2\) has 3 axes but the scene has 2"),
        (((5, 5), 2, (1,)), r"halo \(1,\) has 1 axes but the scene has 2"),
        (((5, 5), 2.5, 1), "chunk must be an integer, got 2.5"),
        (((5, True), 2, 1), "scene shape entry must be an integer, got True"),
        (("55", 2, 1), "must be a sequence of integers"),
    ],
)
def test_plan_chunks_rejects_bad_arguments(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan_chunks(*args)


def test_plan_chunk_rejects_index_off_grid() -> None:
    with pytest.raises(ValueError, match=r"chunk index \(0, 3\) is off the grid \(3, 3\)"):
        plan_chunk((5, 5), 2, 1, (0, 3))
    with pytest.raises(ValueError, match="off the grid"):
        plan_chunk((5, 5), 2, 1, (-1, 0))


def test_chunk_grid_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"all > 0, got \(-3,\)"):
        chunk_grid_shape((-3,), 2)


def test_pad_window_errors_and_no_copy() -> None:
    w = plan_chunks((6, 6), 3, 1)[0]
    with pytest.raises(ValueError, match=r"does not end with the read shape \(4, 4\)"):
        pad_window(np.zeros((4, 5)), w)
    with pytest.raises(ValueError, match=r"pad mode must be one of .*'wrap'"):
        pad_window(np.zeros((4, 4)), w, mode="wrap")
    inner = plan_chunks((6, 6), 2, 0)[4]
    array = np.ones(inner.read_shape)
    assert pad_window(array, inner) is array
    assert set(PAD_MODES) == {"reflect", "symmetric", "edge", "constant"}


def test_stripe_order_is_a_permutation_in_stripes():
    windows = plan_chunks((300, 700), 100, 10)  # grid 3 x 7
    ordered = stripe_order(windows, stripe=3)
    assert sorted(w.index for w in ordered) == sorted(w.index for w in windows)
    assert [w.index for w in ordered[:9]] == [(r, c) for r in range(3) for c in range(3)]
    assert [w.index for w in ordered[-3:]] == [(0, 6), (1, 6), (2, 6)]  # last stripe: one column
    assert stripe_order(windows, stripe=100) == windows  # one stripe: C order
    with pytest.raises(ValueError, match="stripe"):
        stripe_order(windows, stripe=0)
