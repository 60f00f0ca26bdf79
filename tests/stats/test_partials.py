"""Tests of pipelines.stats.partials in 2D: what one chunk computes from its labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from skimage import measure

from pipelines.stats import (
    NPZ_FORMAT_VERSION,
    ChunkRegions,
    chunk_regions,
    label_chunk,
    merge_regions,
    region_id_offset,
)
from pipelines.stats.partials import _first_positions
from tests.stats.cases import NODATA, blobby_mask


def test_chunk_regions_partials_by_hand() -> None:
    x = NODATA
    classes = np.array([[4, 4, x], [x, 4, 2], [2, x, 2]], dtype=np.uint8)
    part = chunk_regions(classes, chunk_index=(1, 2), origin=(10, 20), id_offset=100)
    assert part.ids.tolist() == [101, 102, 103]  # raster order of the first pixels
    assert part.class_id.tolist() == [4, 2, 2]
    assert part.pixel_count.tolist() == [3, 2, 1]
    assert part.sum_row.tolist() == [10 + 10 + 11, 11 + 12, 12]
    assert part.sum_col.tolist() == [20 + 21 + 21, 22 + 22, 20]
    assert part.min_row.tolist() == [10, 11, 12] and part.max_row.tolist() == [11, 12, 12]
    assert part.min_col.tolist() == [20, 22, 20] and part.max_col.tolist() == [21, 22, 20]
    assert part.first_row.tolist() == [10, 11, 12] and part.first_col.tolist() == [20, 22, 20]
    assert part.edge_top.tolist() == [101, 101, 0]
    assert part.edge_bottom.tolist() == [103, 0, 102]
    assert part.edge_left.tolist() == [101, 0, 103]
    assert part.edge_right.tolist() == [0, 102, 102]
    assert len(part) == 3
    assert np.isnan(part.area_m2).all()  # no pixel areas given
    assert part.nbytes == 13 * 3 * 8 - 3 * 7 + 4 * 3 * 8  # 13 per-region arrays, class_id is uint8
    with pytest.raises(ValueError, match="read-only"):
        part.ids[0] = 7


def test_nodata_value_is_configurable() -> None:
    classes = np.array([[0, 1, 1], [0, 0, 1]], dtype=np.uint8)
    part = chunk_regions(classes, chunk_index=(0, 0), origin=(0, 0), id_offset=0, nodata=0)
    assert part.class_id.tolist() == [1] and part.pixel_count.tolist() == [3]
    assert label_chunk(classes, id_offset=5, nodata=0).tolist() == [[0, 6, 6], [0, 0, 6]]


def test_npz_round_trip(tmp_path: Path) -> None:
    mask = blobby_mask((20, 30), 4)
    part = chunk_regions(mask[8:16, 16:30], chunk_index=(1, 2), origin=(8, 16), id_offset=12345)
    path = tmp_path / "chunk_1_2.npz"
    path.write_bytes(b"stale")  # replaced atomically
    part.to_npz(path)
    back = ChunkRegions.from_npz(path)
    assert back == part and back is not part
    for name in ("ids", "class_id", "sum_row", "edge_left"):
        assert getattr(back, name).dtype == getattr(part, name).dtype
    assert (back.chunk_index, back.origin, back.shape) == ((1, 2), (8, 16), (8, 14))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunk_1_2.npz"]  # no temp file left
    assert merge_regions([back]) == merge_regions([part])


def test_npz_errors(tmp_path: Path) -> None:
    part = chunk_regions(np.zeros((2, 2), np.uint8), chunk_index=(0, 0), origin=(0, 0), id_offset=0)
    bad = tmp_path / "bad.npz"
    np.savez(bad, ids=part.ids)
    with pytest.raises(ValueError, match=r"bad.npz: not a ChunkRegions file, missing \['format_version'"):
        ChunkRegions.from_npz(bad)
    good = tmp_path / "good.npz"
    part.to_npz(good)
    with np.load(good) as npz:
        fields = dict(npz)
    np.savez(bad, **{k: v for k, v in fields.items() if k != "edge_left"})
    with pytest.raises(ValueError, match=r"bad.npz: not a ChunkRegions file, missing \['edge_left'\]"):
        ChunkRegions.from_npz(bad)
    good = tmp_path / "good.npz"
    part.to_npz(good)
    with np.load(good) as npz:
        fields = dict(npz)
    np.savez(bad, **(fields | {"format_version": np.int64(NPZ_FORMAT_VERSION + 1)}))
    with pytest.raises(ValueError, match="bad.npz: ChunkRegions format version 2"):
        ChunkRegions.from_npz(bad)
    np.savez(bad, **(fields | {"ids": np.array([0], np.int64)}))
    with pytest.raises(ValueError, match=r"bad.npz: ChunkRegions of chunk \(0, 0\): ids must be > 0"):
        ChunkRegions.from_npz(bad)
    with pytest.raises(FileNotFoundError):
        part.to_npz(tmp_path / "missing" / "x.npz")


def test_region_id_offsets_are_disjoint() -> None:
    grid, chunk = (3, 4), (5, 6)
    spans = []
    for index in np.ndindex(*grid):
        offset = region_id_offset(index, grid, chunk)
        spans.append((offset + 1, offset + 30))
    spans.sort()
    assert spans[0][0] == 1 and all(a[1] < b[0] for a, b in zip(spans, spans[1:]))
    assert region_id_offset((2, 3), grid, chunk) == 11 * 31
    assert region_id_offset((1, 1, 1), (2, 2, 2), (4, 4, 4)) == 7 * 65


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (((0, 4), (3, 4), (5, 6)), r"chunk_index \(0, 4\) is off the grid \(3, 4\)"),
        (((0,), (3, 4), (5, 6)), "must have the same axes"),
        (((0, 0), (3, 0), (5, 6)), "must be > 0"),
        (((0, 0), (2**20, 2**20), (2**12, 2**12)), "overflow int64"),
    ],
)
def test_region_id_offset_errors(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        region_id_offset(*args)


def test_chunk_regions_argument_errors() -> None:
    good = np.zeros((2, 3), np.uint8)
    kw = dict(chunk_index=(0, 0), origin=(0, 0), id_offset=0)
    with pytest.raises(ValueError, match=r"2-D \(H, W\) or 3-D \(D, H, W\) uint8 array, got 2-D int64 \(2, 3\)"):
        chunk_regions(good.astype(np.int64), **kw)
    with pytest.raises(ValueError, match="got 1-D uint8"):
        chunk_regions(np.zeros(3, np.uint8), **kw)
    with pytest.raises(ValueError, match="nodata must be a uint8 value 0..255, got 256"):
        chunk_regions(good, **kw, nodata=256)
    with pytest.raises(ValueError, match="id_offset must be >= 0"):
        label_chunk(good, id_offset=-1)
    with pytest.raises(ValueError, match="origin must be 2 integers >= 0"):
        chunk_regions(good, chunk_index=(0, 0), origin=(-1, 0), id_offset=0)
    with pytest.raises(ValueError, match=r"labels must be int64 of the classes' shape \(2, 3\), got int32"):
        chunk_regions(good, **kw, labels=np.ones((2, 3), np.int32))
    with pytest.raises(ValueError, match="labels must be > 0 exactly where classes != nodata"):
        chunk_regions(good, **kw, labels=np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match=r"labels must lie in id_offset \+ 1 .. id_offset \+ 6"):
        chunk_regions(good, **kw, labels=np.full((2, 3), 7, np.int64))
    mixed = np.array([[1, 1, 2]], np.uint8)
    with pytest.raises(ValueError, match="must not join pixels of different classes"):
        chunk_regions(mixed, **kw, labels=np.ones((1, 3), np.int64))


def _part(**changes: object) -> ChunkRegions:
    base = chunk_regions(np.array([[1, 1], [2, 255]], np.uint8), chunk_index=(0, 0), origin=(4, 6), id_offset=10)
    meta = {name: changes.pop(name, getattr(base, name)) for name in ("chunk_index", "origin", "shape")}
    return ChunkRegions(**meta, arrays=dict(base.arrays) | changes)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(ids=np.array([11, 12], np.int32)), r"ids must be 1-D int64, got \(2,\) int32"),
        (dict(ids=[11, 12]), "ids must be a numpy array, got list"),
        (dict(class_id=np.array([1], np.uint8)), "per-region arrays differ in length"),
        (dict(ids=np.array([11, 11], np.int64)), "ids are not unique"),
        (dict(edge_top=np.array([11], np.int64)), r"edge_top must be of shape \(2,\) int64, got \(1,\) int64"),
        (dict(edge_top=np.array([11, 99], np.int64)), r"border ids \[99\] are not among the region ids"),
        (dict(min_row=np.array([3, 5], np.int64)), "region 11 has inconsistent bounds"),
        (dict(sum_col=np.array([100.0, 6.0])), "region 11 has inconsistent bounds or sums"),
        (dict(pixel_count=np.array([0, 1], np.int64)), "pixel_count must be >= 1"),
        (dict(shape=(0, 2)), r"shape must be 2 or 3 integers >= 1, got \(0, 2\)"),
        (dict(chunk_index=(0, 0, 0)), "chunk_index must be 2 integers"),
    ],
)
def test_chunk_regions_validates(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _part(**changes)


@pytest.mark.parametrize("raster_order", [True, False])
def test_first_positions_match_the_smallest_raster_position(raster_order):
    # skimage numbers labels by first pixel (the fast path); shuffled labels take the fallback.
    rng = np.random.default_rng(3)
    classes = rng.integers(0, 3, (40, 50)).astype(np.uint8)
    classes[rng.random(classes.shape) < 0.1] = NODATA
    local = measure.label(classes, background=NODATA, connectivity=2)
    if not raster_order:
        perm = np.concatenate(([0], rng.permutation(np.arange(1, local.max() + 1))))
        local = perm[local]
    flat = local.ravel()
    present = np.unique(flat[flat > 0])
    expected = np.array([np.flatnonzero(flat == k)[0] for k in present])
    assert np.array_equal(_first_positions(flat, present), expected)


@settings(max_examples=200, deadline=None)
@given(classes=hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, max_side=24),
                          elements=st.sampled_from([0, 1, 2, 254, 255])),
       nodata=st.sampled_from([255, 0, 2]))
def test_label_chunk_equals_skimage_labelling(classes, nodata):
    # The chunk labelling (cc3d, classes shifted so nodata is its background 0) is exactly
    # skimage's: same regions, numbered in raster order of their first pixel.
    expected = measure.label(classes, background=nodata, connectivity=2)
    assert np.array_equal(label_chunk(classes, id_offset=0, nodata=nodata), expected)
    assert np.array_equal(label_chunk(classes, id_offset=1000, nodata=nodata),
                          np.where(expected > 0, expected + 1000, 0))


@settings(max_examples=200, deadline=None)
@given(classes=hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, max_side=40),
                          elements=st.sampled_from([0, 1, 2, 255])),
       origin=st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)))
def test_chunk_regions_from_cc3d_statistics_equal_the_bincount_path(classes, origin):
    # chunk_regions takes counts, coordinate sums and boxes of its own labelling from one
    # cc3d.statistics pass (sums recovered from float centroids); caller-supplied labels take
    # the bincount / sort path. Both give the same partials, field by field.
    own = chunk_regions(classes, chunk_index=(3, 4), origin=origin, id_offset=7000)
    supplied = chunk_regions(classes, chunk_index=(3, 4), origin=origin, id_offset=7000,
                             labels=label_chunk(classes, id_offset=7000))
    assert own == supplied  # every array equal, dtypes included


def test_chunk_regions_sums_stay_exact_on_a_large_chunk():
    # Coordinate sums near the float64 rounding of a centroid: one region covering a
    # 2048 x 2048 chunk far from the origin, beside one-pixel regions.
    classes = np.zeros((2048, 2048), dtype=np.uint8)
    classes[::7, ::5] = 1
    own = chunk_regions(classes, chunk_index=(0, 0), origin=(10**7, 3 * 10**7), id_offset=0)
    supplied = chunk_regions(classes, chunk_index=(0, 0), origin=(10**7, 3 * 10**7), id_offset=0,
                             labels=label_chunk(classes, id_offset=0))
    for field in ("pixel_count", "sum_row", "sum_col", "min_row", "max_row", "min_col", "max_col"):
        assert np.array_equal(getattr(own, field), getattr(supplied, field)), field
    rows, cols = np.nonzero(classes == 0)
    big = int(np.argmax(own.pixel_count))
    assert own.sum_row[big] == rows.sum() + 10**7 * rows.size
    assert own.sum_col[big] == cols.sum() + 3 * 10**7 * cols.size
