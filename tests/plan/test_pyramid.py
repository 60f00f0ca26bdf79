"""Overview pyramid maths: which levels, and mode downsampling against a plain numpy reference."""

from __future__ import annotations

import itertools

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.plan.pyramid import NODATA, mode_downsample, plan_pyramid


def _reference_mode(block: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """One block at a time, by counting: most frequent non-nodata value, lowest on ties."""
    out_shape = tuple(-(-n // f) for n, f in zip(block.shape, factors))
    out = np.full(out_shape, NODATA, dtype=np.uint8)
    for idx in itertools.product(*(range(n) for n in out_shape)):
        cell = block[tuple(slice(i * f, (i + 1) * f) for i, f in zip(idx, factors))].ravel()
        values = cell[cell != NODATA]
        if values.size:
            counts = np.bincount(values, minlength=256)
            out[idx] = np.flatnonzero(counts == counts.max())[0]
    return out


@settings(max_examples=60, deadline=None)
@given(block=hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=9),
                        elements=st.sampled_from([0, 1, 2, 3, 7, NODATA])),
       data=st.data())
def test_mode_downsample_equals_the_reference(block, data):
    factors = tuple(data.draw(st.sampled_from([1, 2])) for _ in range(block.ndim))
    np.testing.assert_array_equal(mode_downsample(block, factors), _reference_mode(block, factors))


def test_mode_ties_nodata_and_odd_edges_by_hand():
    block = np.array([
        [1, 2, 3, 3, 5],
        [2, 1, 255, 255, 5],
        [255, 255, 0, 4, 255],
        [255, 255, 4, 0, 255],
        [6, 255, 255, 255, 255],
    ], dtype=np.uint8)
    # tie 1/2 -> 1; 3 beats nodata; odd column: 5 from two pixels; all nodata -> 255;
    # tie 0/4 -> 0; odd column nodata; odd row: 6 alone wins over nodata
    want = np.array([[1, 3, 5], [255, 0, 255], [6, 255, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(mode_downsample(block, (2, 2)), want)


def test_mode_3d_majority_and_tie():
    block = np.zeros((2, 2, 2), np.uint8)
    block[0, 0, 0] = block[1, 1, 1] = block[0, 1, 0] = 9  # 3 x 9 vs 5 x 0
    assert mode_downsample(block, (2, 2, 2)).tolist() == [[[0]]]
    block[1, 0, 1] = 9  # 4 x 9 vs 4 x 0: tie -> the lower id
    assert mode_downsample(block, (2, 2, 2)).tolist() == [[[0]]]
    block[1, 1, 0] = 9
    assert mode_downsample(block, (2, 2, 2)).tolist() == [[[9]]]


def test_mode_refuses_wrong_dtype_or_factors():
    with pytest.raises(ValueError, match="uint8"):
        mode_downsample(np.zeros((4, 4), np.int32), (2, 2))
    with pytest.raises(ValueError, match="factors"):
        mode_downsample(np.zeros((4, 4), np.uint8), (2,))


def test_plan_2d_halves_both_axes_until_one_chunk():
    levels = plan_pyramid((1000, 700), (256, 256))
    assert [lv.shape for lv in levels] == [(1000, 700), (500, 350), (250, 175)]
    assert [lv.cumulative for lv in levels] == [(1, 1), (2, 2), (4, 4)]
    assert all(lv.factors == (2, 2) for lv in levels[1:])
    assert plan_pyramid((200, 256), (256, 256)) == plan_pyramid((200, 256), (256, 256))[:1]


def test_plan_strip_keeps_going_on_the_long_axis():
    levels = plan_pyramid((1, 1000), (64, 64))
    assert levels[-1].shape == (1, 63) and all(lv.factors == (1, 2) for lv in levels[1:])


def test_plan_3d_anisotropic_halves_the_fine_axes_first():
    levels = plan_pyramid((40, 512, 512), (32, 64, 64), spacing=(3.0, 0.8, 0.8))
    assert [lv.factors for lv in levels[1:]] == [(1, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert [lv.shape for lv in levels] == [(40, 512, 512), (40, 256, 256), (20, 128, 128), (10, 64, 64)]
    spacing = [tuple(s * f for s, f in zip((3.0, 0.8, 0.8), lv.cumulative)) for lv in levels]
    assert spacing[-1] == (12.0, 6.4, 6.4)


def test_plan_refuses_bad_shapes():
    with pytest.raises(ValueError, match="positive"):
        plan_pyramid((0, 4), (2, 2))
    with pytest.raises(ValueError, match="spacing"):
        plan_pyramid((4, 4, 4), (2, 2, 2), spacing=(1.0, 0.0, 1.0))
