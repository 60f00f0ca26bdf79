"""Tests of workers.tiles: tile planning inside a window, blend weights and accumulation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.tiles import GAUSSIAN_FLOOR, BlendAccumulator, blend_weights, plan_tiles

EPS32 = float(np.finfo(np.float32).eps)


@st.composite
def tilings(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...], float]:
    ndim = draw(st.integers(1, 3))
    window = tuple(draw(st.lists(st.integers(1, 40), min_size=ndim, max_size=ndim)))
    tile = tuple(draw(st.lists(st.integers(1, 24), min_size=ndim, max_size=ndim)))
    overlap = draw(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99]))
    return window, tile, overlap


@settings(max_examples=200, deadline=None)
@given(tilings())
def test_tiles_cover_the_window_and_stay_inside(args: tuple) -> None:
    window, tile, overlap = args
    shape, offsets = plan_tiles(window, tile, overlap)
    assert shape == tuple(min(t, w) for t, w in zip(tile, window))
    cover = np.zeros(window, dtype=np.int32)
    for o in offsets:
        assert all(0 <= a and a + t <= w for a, t, w in zip(o, shape, window))
        cover[tuple(slice(a, a + t) for a, t in zip(o, shape))] += 1
    assert (cover >= 1).all()
    assert offsets == sorted(set(offsets))  # C order, no duplicates
    for axis, (w, t) in enumerate(zip(window, shape)):
        starts = sorted({o[axis] for o in offsets})
        assert starts[0] == 0 and starts[-1] == w - t  # last tile flush with the border
        step = max(1, math.floor(t * (1 - overlap)))
        assert len(starts) == -(-(w - t) // step) + 1
        assert all(0 < b - a <= step for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize(
    ("window", "tile", "overlap", "shape", "starts"),
    [
        ((10,), 4, 0.0, (4,), [(0,), (3,), (6,)]),  # n = ceil(6/4)+1 = 3, spread evenly
        ((12,), 4, 0.0, (4,), [(0,), (4,), (8,)]),  # exact fit, no overlap
        ((12,), 4, 0.5, (4,), [(0,), (2,), (4,), (6,), (8,)]),
        ((3,), 8, 0.5, (3,), [(0,)]),  # window smaller than the tile
        ((5,), 5, 0.9, (5,), [(0,)]),
        ((7,), 2, 0.99, (2,), [(i,) for i in range(6)]),  # step floors at 1
        ((5, 9), (8, 4), 0.0, (5, 4), [(0, 0), (0, 3), (0, 5)]),  # anisotropic, C order
    ],
)
def test_plan_tiles_by_hand(window: tuple, tile: int | tuple, overlap: float, shape: tuple, starts: list) -> None:
    assert plan_tiles(window, tile, overlap) == (shape, starts)


def test_plan_tiles_matches_nnunet_steps() -> None:
    """nnU-Net's compute_steps_for_sliding_window (overlap 0.5, even tiles so that its float step
    t * 0.5 equals our floor): same tile count, same ends, offsets equal up to rounding of halves."""
    for w, t in itertools.product(range(1, 60), range(2, 30, 2)):
        if t > w:
            continue
        n = int(np.ceil((w - t) / (t * 0.5))) + 1
        actual = (w - t) / (n - 1) if n > 1 else 99999999999
        expected = [int(np.round(actual * i)) for i in range(n)]
        _, offsets = plan_tiles((w,), t, 0.5)
        got = [o[0] for o in offsets]
        assert len(got) == n and got[0] == 0 and got[-1] == expected[-1] == w - t
        assert all(a == b or (abs(a - b) == 1 and actual * i % 1 == 0.5) for i, (a, b) in enumerate(zip(got, expected)))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (((0, 5), 4, 0.5), r"window_shape must have at least one axis, all > 0, got \(0, 5\)"),
        (((5, 5), 0, 0.5), "tile must be > 0, got 0"),
        (((5, 5), (4, 4, 4), 0.5), r"tile \(4, 4, 4\) has 3 axes but window_shape \(5, 5\) has 2"),
        (((5, 5), 4, 1.0), r"overlap must be a number in \[0, 1\), got 1.0"),
        (((5, 5), 4, -0.1), "got -0.1"),
        (((5, 5), 4, float("nan")), "got nan"),
        (((5, 5), 4.0, 0.5), "tile must be an integer, got 4.0"),
    ],
)
def test_plan_tiles_errors(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan_tiles(*args)


@pytest.mark.parametrize("shape", [(1,), (2,), (7,), (8, 8), (5, 12), (3, 4, 5), (1, 6, 1)])
def test_gaussian_weights(shape: tuple) -> None:
    w = blend_weights(shape)
    assert w.shape == shape and w.dtype == np.float32
    assert w.min() >= GAUSSIAN_FLOOR and w.max() == 1.0
    for axis in range(len(shape)):
        np.testing.assert_array_equal(w, np.flip(w, axis))  # exactly symmetric
    centre = tuple(n // 2 for n in shape)
    assert w[centre] == 1.0 and (w <= w[centre]).all()
    with pytest.raises(ValueError, match="read-only"):
        w[centre] = 0
    assert blend_weights(shape) is w  # cached
    assert blend_weights(list(shape)) is w


def test_gaussian_weights_formula_and_floor() -> None:
    n = 16
    w = blend_weights((n,), sigma_scale=0.125)
    x = np.arange(n) - (n - 1) / 2
    g = np.exp(-(x**2) / (2 * (0.125 * n) ** 2))
    np.testing.assert_allclose(w, np.maximum(g / g.max(), GAUSSIAN_FLOOR), rtol=1e-6)
    assert w[0] == np.float32(GAUSSIAN_FLOOR)  # the tail is floored, not zero
    assert blend_weights((n,), sigma_scale=1) is not w


def test_constant_weights() -> None:
    w = blend_weights((3, 4), mode="constant")
    np.testing.assert_array_equal(w, np.ones((3, 4), np.float32))
    assert not w.flags.writeable


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(tile_shape=(4, 0)), "all > 0"),
        (dict(tile_shape=(4,), mode="cosine"), "blend mode must be one of .*'cosine'"),
        (dict(tile_shape=(4,), sigma_scale=0), "sigma_scale must be a finite number > 0, got 0"),
        (dict(tile_shape=(4,), sigma_scale=float("inf")), "got inf"),
    ],
)
def test_blend_weights_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        blend_weights(**kwargs)


def _blend(x: torch.Tensor, tile: int | tuple, overlap: float, oracle, mode: str = "gaussian") -> torch.Tensor:
    """Run ``oracle`` on each tile of ``x`` (C, *window) and blend the tiles back."""
    window = tuple(x.shape[1:])
    shape, offsets = plan_tiles(window, tile, overlap)
    weights = blend_weights(shape, mode=mode)
    acc = BlendAccumulator(window, x.shape[0])
    for o in offsets:
        region = (slice(None), *(slice(a, a + t) for a, t in zip(o, shape)))
        acc.add(o, oracle(x[region]), weights)
    return acc.finalize()


@pytest.mark.parametrize(
    ("window", "tile", "overlap"),
    [((37, 50), 16, 0.5), ((20, 9), (8, 4), 0.25), ((9, 10, 11), 4, 0.5), ((5, 5), 8, 0.5), ((64,), 16, 0.0)],
)
def test_constant_field_stays_constant(window: tuple, tile: int | tuple, overlap: float) -> None:
    """Constant in, constant out: only float32 rounding of the sums (a few ulp, <= 8 tiles/voxel)."""
    x = torch.full((3, *window), 0.3)
    out = _blend(x, tile, overlap, lambda t: t)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert float((out - x).abs().max()) <= 16 * EPS32 * 0.3
    assert float(out.max() - out.min()) <= 16 * EPS32 * 0.3


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize(
    ("window", "tile", "overlap"),
    [((37, 50), 16, 0.5), ((33, 17), (8, 12), 0.3), ((9, 10, 11), 4, 0.5), ((3, 40), 16, 0.75)],
)
def test_x_plus_one_oracle_comes_back_exactly(window: tuple, tile: int | tuple, overlap: float, mode: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, *window), generator=gen)
    out = _blend(x, tile, overlap, lambda t: t + 1, mode)
    torch.testing.assert_close(out, x + 1, rtol=1e-6, atol=1e-6)


def test_argmax_of_blended_one_hot_oracle_is_exact() -> None:
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, (41, 29), generator=gen)
    one_hot = torch.nn.functional.one_hot(labels, 5).permute(2, 0, 1).float()
    out = _blend(one_hot, (16, 12), 0.5, lambda t: t)
    assert torch.equal(out.argmax(0), labels)


def test_add_batch_equals_add_and_float64() -> None:
    gen = torch.Generator().manual_seed(2)
    window = (20, 21)
    shape, offsets = plan_tiles(window, 8, 0.5)
    probs = torch.rand((len(offsets), 3, *shape), generator=gen)
    w = torch.from_numpy(blend_weights(shape).copy())
    one, batch = BlendAccumulator(window, 3), BlendAccumulator(window, 3, dtype=torch.float64)
    for o, p in zip(offsets, probs):
        one.add(o, p, w)
    batch.add_batch(offsets, probs.half(), w)  # half-precision input, float64 accumulation
    a, b = one.finalize(), batch.finalize()
    assert b.dtype == torch.float64
    torch.testing.assert_close(a.double(), b, rtol=2e-3, atol=2e-3)


def test_finalize_names_first_uncovered_voxel() -> None:
    acc = BlendAccumulator((4, 5), 1)
    acc.add((0, 0), torch.ones(1, 4, 2), torch.ones(4, 2))
    match = r"12 voxel\(s\) of the window \(4, 5\) got no weight, the first at \(0, 2\)"
    with pytest.raises(RuntimeError, match=match):
        acc.finalize()
    acc.add((0, 2), torch.ones(1, 4, 3), torch.ones(4, 3))  # still open after a failed finalize
    assert torch.equal(acc.finalize(), torch.ones(1, 4, 5))


def test_accumulator_refuses_use_after_finalize() -> None:
    acc = BlendAccumulator((2, 2), 1)
    acc.add((0, 0), torch.ones(1, 2, 2), blend_weights((2, 2)))
    acc.finalize()
    assert acc.finalized
    with pytest.raises(RuntimeError, match="already finalized"):
        acc.add((0, 0), torch.ones(1, 2, 2), torch.ones(2, 2))
    with pytest.raises(RuntimeError, match="already finalized"):
        acc.finalize()


@pytest.mark.parametrize(
    ("offset", "probs", "weights", "match"),
    [
        ((0, 4), torch.ones(2, 3, 3), torch.ones(3, 3), r"tile of shape \(3, 3\) at offset \(0, 4\) does not fit"),
        ((-1, 0), torch.ones(2, 3, 3), torch.ones(3, 3), r"offset \(-1, 0\) does not fit"),
        ((0,), torch.ones(2, 3, 3), torch.ones(3, 3), r"offset \(0,\) has 1 axes but the window \(6, 6\) has 2"),
        ((0, 0), torch.ones(3, 3, 3), torch.ones(3, 3), r"probs must be \(C=2, \*tile\) .* got \(3, 3, 3\)"),
        ((0, 0), torch.ones(2, 3), torch.ones(3), r"got \(2, 3\)"),
        ((0, 0), torch.ones(2, 3, 3), torch.ones(3, 2), r"weights of shape \(3, 2\) do not match the tile shape"),
        ((0, 0), torch.ones(2, 3, 3, dtype=torch.int64), torch.ones(3, 3), "floating point, got torch.int64"),
        ((0, 0), np.ones((2, 3, 3)), torch.ones(3, 3), "probs must be a torch.Tensor, got ndarray"),
        ((0, 0), torch.ones(2, 3, 3), [[1.0] * 3] * 3, "weights must be a torch.Tensor or numpy array, got list"),
        ((0.5, 0), torch.ones(2, 3, 3), torch.ones(3, 3), "offset entry must be an integer, got 0.5"),
    ],
)
def test_add_validates(offset: tuple, probs: object, weights: object, match: str) -> None:
    acc = BlendAccumulator((6, 6), 2)
    with pytest.raises(ValueError, match=match):
        acc.add(offset, probs, weights)  # type: ignore[arg-type]


def test_accumulator_constructor_and_batch_errors() -> None:
    with pytest.raises(ValueError, match="n_channels must be > 0, got 0"):
        BlendAccumulator((4, 4), 0)
    with pytest.raises(ValueError, match="float32 or torch.float64, got torch.float16"):
        BlendAccumulator((4, 4), 1, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"all > 0, got \(4, -1\)"):
        BlendAccumulator((4, -1), 1)
    acc = BlendAccumulator((4, 4), 1)
    with pytest.raises(ValueError, match="1 offsets for a batch of 2 tiles"):
        acc.add_batch([(0, 0)], torch.ones(2, 1, 4, 4), torch.ones(4, 4))
    assert acc.window_shape == (4, 4) and acc.n_channels == 1 and acc.device == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_accumulator_on_gpu() -> None:
    x = torch.randn(2, 30, 31)
    shape, offsets = plan_tiles((30, 31), 16, 0.5)
    acc = BlendAccumulator((30, 31), 2, device="cuda")
    for o in offsets:
        acc.add(o, x[(slice(None), *(slice(a, a + t) for a, t in zip(o, shape)))].cuda(), blend_weights(shape))
    out = acc.finalize()
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), x, rtol=1e-6, atol=1e-6)


def test_a_region_accumulates_the_cropped_window_and_names_uncovered_voxels_in_window_coordinates():
    """Blending only a core region gives the whole window's blend, cropped, in a core-sized buffer."""
    tile, offsets = plan_tiles((14, 17, 9), 6, 0.4)
    w = blend_weights(tile)
    gen = torch.Generator().manual_seed(3)
    probs = [torch.rand((3, *tile), generator=gen) for _ in offsets]
    core = (slice(2, 12), slice(3, 15), slice(1, 8))
    whole, part = BlendAccumulator((14, 17, 9), 3), BlendAccumulator((14, 17, 9), 3, region=core)
    for o, p in zip(offsets, probs, strict=True):
        whole.add(o, p, w)
        part.add(o, p, w)
    assert part.region == core
    got = part.finalize()
    assert tuple(got.shape) == (3, 10, 12, 7)
    torch.testing.assert_close(got, whole.finalize()[(slice(None), *core)], rtol=1e-6, atol=1e-7)

    lonely = BlendAccumulator((8, 8), 1, region=(slice(2, 6), slice(2, 6)))
    lonely.add((0, 0), torch.ones((1, 4, 4)), np.ones((4, 4), np.float32))  # covers (2..3, 2..3) of the region
    lonely.add((6, 6), torch.ones((1, 2, 2)), np.ones((2, 2), np.float32))  # outside the region: adds nothing
    with pytest.raises(RuntimeError, match=r"12 voxel\(s\) of the window \(8, 8\) got no weight, the first at \(2, 4\)"):
        lonely.finalize()
    with pytest.raises(ValueError, match="not a non-empty box"):
        BlendAccumulator((8, 8), 1, region=(slice(4, 4), slice(0, 8)))
