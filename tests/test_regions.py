"""Tests of pipelines.regions: per-chunk region partials merged across chunk borders.

The golden reference is skimage labelling the whole image at once:
``measure.label(mask, background=255, connectivity=2)`` and ``measure.regionprops``.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage
from skimage import measure

from pipelines.regions import (
    NPZ_FORMAT_VERSION,
    ChunkRegions,
    MergedRegions,
    RowMerge,
    chunk_regions,
    label_chunk,
    merge_regions,
    merged_regions_of,
    _first_positions,
    region_id_offset,
    region_rank,
)
from pipelines.tiling import chunk_grid_shape, plan_chunks

NODATA = 255


def blobby_mask(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Smoothed noise in 5 classes, a nodata area, thin diagonal lines and 1-px specks."""
    rng = np.random.default_rng(seed)
    h, w = shape
    noise = ndimage.gaussian_filter(rng.random(shape), sigma=2.5)
    mask = np.digitize(noise, np.quantile(noise, [0.2, 0.4, 0.6, 0.8])).astype(np.uint8)
    mask[h // 3 : h // 2, w // 4 : w // 2] = NODATA
    mask[ndimage.gaussian_filter(rng.random(shape), 2) > 0.56] = NODATA
    # 1-px diagonal lines: the main diagonal crosses the corner of every square chunk grid, the
    # anti-diagonals k + c = 2s - 1 cross the corners of grids of size s (down-left neighbours).
    k = np.arange(min(h, w))
    mask[k, k] = 6
    for s in (5, 7, 8, 12, 16):
        rows = np.arange(h)
        cols = 2 * s - 1 - rows
        ok = (cols >= 0) & (cols < w)
        mask[rows[ok], cols[ok]] = 6
    # single-pixel specks, some touching each other or the lines
    mask.flat[rng.choice(h * w, size=h * w // 40, replace=False)] = 7
    return mask


def golden(mask: np.ndarray) -> dict[str, np.ndarray]:
    """Region table of the whole image from skimage, in MergedRegions' order."""
    labels = measure.label(mask, background=NODATA, connectivity=2)
    rows = []
    for p in measure.regionprops(labels):
        r0, c0, r1, c1 = p.bbox
        first = p.coords[0]  # coords come in raster order
        rows.append((r0, c0, int(mask[tuple(first)]), p.area, first[0], first[1], r1 - 1, c1 - 1, *p.centroid))
    rows.sort(key=lambda t: t[:6])
    table = np.array(rows, dtype=np.float64).reshape(-1, 10)
    names = ["min_row", "min_col", "class_id", "pixel_count", "first_row", "first_col", "max_row", "max_col"]
    out = {name: table[:, i].astype(np.int64) for i, name in enumerate(names)}
    out["centroid_row"], out["centroid_col"] = table[:, 8], table[:, 9]
    return out


def split_and_merge(
    mask: np.ndarray, chunk: int | tuple[int, int], *, shuffle: int | None = None, skip_empty: bool = False
) -> tuple[MergedRegions, np.ndarray]:
    """Label ``mask`` chunk by chunk and merge; also return the chunk-level id image."""
    parts, ids = chunk_parts(mask, chunk, skip_empty=skip_empty)
    if shuffle is not None:
        random.Random(shuffle).shuffle(parts)
    return merge_regions(parts), ids


def chunk_parts(mask: np.ndarray, chunk: int | tuple[int, int], *,
                skip_empty: bool = False) -> tuple[list[ChunkRegions], np.ndarray]:
    """The ChunkRegions of ``mask`` cut into chunks (raster order), and the chunk-level id image."""
    grid = chunk_grid_shape(mask.shape, chunk)
    chunk_shape = (chunk, chunk) if isinstance(chunk, int) else chunk
    parts, ids = [], np.zeros(mask.shape, dtype=np.int64)
    for w in plan_chunks(mask.shape, chunk, 0):
        classes = mask[w.core]
        if skip_empty and (classes == NODATA).all():
            continue  # as the pipeline does for all-nodata chunks
        offset = region_id_offset(w.index, grid, chunk_shape)
        labels = label_chunk(classes, id_offset=offset)
        ids[w.core] = labels
        parts.append(chunk_regions(classes, chunk_index=w.index, origin=w.core_origin, id_offset=offset, labels=labels))
    return parts, ids


def row_merge(parts: list[ChunkRegions]) -> MergedRegions:
    """RowMerge over the parts row by row, its batches numbered like merge_regions does."""
    merger, batches = RowMerge(), []
    for i in sorted({p.chunk_index[0] for p in parts}):
        batches.append(merger.add_row([p for p in parts if p.chunk_index[0] == i]))
    batches.append(merger.finish())
    stats = {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}
    rank = region_rank(stats)
    return merged_regions_of({name: v[rank] for name, v in stats.items()})


def assert_row_merge_equals_merge(parts: list[ChunkRegions]) -> None:
    want, got = merge_regions(parts), row_merge(parts)
    for name in ("region_id", "class_id", "pixel_count", "centroid_row", "centroid_col", "min_row", "min_col",
                 "max_row", "max_col", "first_row", "first_col"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


def assert_matches_golden(merged: MergedRegions, ids: np.ndarray, mask: np.ndarray) -> None:
    want = golden(mask)
    assert len(merged) == len(want["pixel_count"])
    np.testing.assert_array_equal(merged.region_id, np.arange(1, len(merged) + 1))
    for name in ("min_row", "min_col", "class_id", "pixel_count", "first_row", "first_col", "max_row", "max_col"):
        np.testing.assert_array_equal(getattr(merged, name), want[name], err_msg=name)
    np.testing.assert_allclose(merged.centroid_row, want["centroid_row"], rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(merged.centroid_col, want["centroid_col"], rtol=1e-12, atol=1e-9)
    # the relabel table turns chunk ids into a labelling equal to skimage's up to renumbering
    relabelled = merged.relabel(ids)
    reference = measure.label(mask, background=NODATA, connectivity=2)
    assert ((relabelled == 0) == (reference == 0)).all()
    pairs = np.unique(np.stack([relabelled[reference > 0], reference[reference > 0]]), axis=1)
    assert pairs.shape[1] == len(merged) == reference.max()
    # and every region's first pixel carries its own id
    np.testing.assert_array_equal(relabelled[merged.first_row, merged.first_col], merged.region_id)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "chunk",
    [
        pytest.param(8, id="8"),
        pytest.param(7, id="7-not-dividing"),
        pytest.param((5, 13), id="5x13"),
        pytest.param(16, id="16"),
        pytest.param((1, 64), id="1px-row-strips"),
        pytest.param((64, 1), id="1px-col-strips"),
        pytest.param(1, id="1x1"),
        pytest.param((41, 53), id="single-chunk"),
        pytest.param(100, id="chunk-larger-than-scene"),
    ],
)
def test_merge_equals_whole_image_labelling(chunk: int | tuple[int, int], seed: int) -> None:
    mask = blobby_mask((41, 53), seed)
    merged, ids = split_and_merge(mask, chunk, shuffle=seed)
    assert_matches_golden(merged, ids, mask)


def test_merge_skips_missing_all_nodata_chunks() -> None:
    mask = blobby_mask((40, 40), 3)
    mask[:, 8:16] = NODATA  # a whole column of chunks is nodata and never reaches the merge
    merged, ids = split_and_merge(mask, 8, skip_empty=True)
    assert_matches_golden(merged, ids, mask)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.uint8,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=14),
        elements=st.sampled_from([0, 1, 2, NODATA]),
    ),
    st.integers(1, 6),
    st.integers(1, 6),
)
def test_merge_equals_whole_image_labelling_on_noise(mask: np.ndarray, ch: int, cw: int) -> None:
    """Salt-and-pepper masks: the worst case for connectivity across borders."""
    merged, ids = split_and_merge(mask, (ch, cw))
    assert_matches_golden(merged, ids, mask)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("chunk", [8, 7, (5, 13), (1, 64), (64, 1), 1, (41, 53), 100])
def test_row_merge_equals_merge(chunk: int | tuple[int, int], seed: int) -> None:
    # a row of chunks at a time, in memory bounded by a row: the same regions, exactly
    assert_row_merge_equals_merge(chunk_parts(blobby_mask((41, 53), seed), chunk)[0])


def test_row_merge_with_missing_chunks_and_a_missing_row() -> None:
    mask = blobby_mask((48, 40), 3)
    mask[:, 8:16] = NODATA  # a column of chunks never reaches the merge
    mask[16:24, :] = NODATA  # and a whole row of chunks: regions above it close there
    parts = chunk_parts(mask, 8, skip_empty=True)[0]
    assert not any(p.chunk_index[0] == 2 for p in parts)
    assert_row_merge_equals_merge(parts)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=14),
               elements=st.sampled_from([0, 1, 2, NODATA])),
    st.integers(1, 6),
    st.integers(1, 6),
)
def test_row_merge_equals_merge_on_noise(mask: np.ndarray, ch: int, cw: int) -> None:
    assert_row_merge_equals_merge(chunk_parts(mask, (ch, cw))[0])


def test_row_merge_errors() -> None:
    parts = chunk_parts(blobby_mask((16, 16), 0), 8)[0]
    row0, row1 = [p for p in parts if p.chunk_index[0] == 0], [p for p in parts if p.chunk_index[0] == 1]
    with pytest.raises(ValueError, match=r"one row, got rows \[0, 1\]"):
        RowMerge().add_row(parts)
    merger = RowMerge()
    merger.add_row(row1)
    with pytest.raises(ValueError, match="increasing order: row 0 after row 1"):
        merger.add_row(row0)
    with pytest.raises(ValueError, match=r"chunk \(1, 0\) is given twice"):
        merger.add_row(row1)
    with pytest.raises(ValueError, match="takes ChunkRegions"):
        RowMerge().add_row(["c0_0"])


def _merge_small(mask: list[list[int]], chunk: int | tuple[int, int]) -> MergedRegions:
    return split_and_merge(np.array(mask, dtype=np.uint8), chunk)[0]


def test_pixels_touching_only_at_a_chunk_corner_merge() -> None:
    x = NODATA
    down_right = [[x, x, x, x], [x, 3, x, x], [x, x, 3, x], [x, x, x, x]]
    merged = _merge_small(down_right, 2)  # (1, 1) in chunk (0, 0), (2, 2) in chunk (1, 1)
    assert len(merged) == 1 and merged.pixel_count.tolist() == [2]
    assert (merged.min_row[0], merged.min_col[0], merged.max_row[0], merged.max_col[0]) == (1, 1, 2, 2)
    assert (merged.centroid_row[0], merged.centroid_col[0]) == (1.5, 1.5)
    down_left = [[x, x, x, x], [x, x, 3, x], [x, 3, x, x], [x, x, x, x]]
    merged = _merge_small(down_left, 2)  # (1, 2) in chunk (0, 1), (2, 1) in chunk (1, 0)
    assert len(merged) == 1 and merged.pixel_count.tolist() == [2]
    assert (merged.first_row[0], merged.first_col[0]) == (1, 2)


def test_pixels_touching_diagonally_across_a_face_merge() -> None:
    x = NODATA
    mask = [[x, x, 1, x, x, x], [x, x, x, 1, x, x], [x] * 6]  # (0, 2) | (1, 3) across the face at col 3
    assert len(_merge_small(mask, 3)) == 1
    mask = [[x, x, x, 1, x, x], [x, x, 1, x, x, x], [x] * 6]  # (0, 3) | (1, 2)
    assert len(_merge_small(mask, 3)) == 1


def test_same_class_regions_that_do_not_touch_stay_apart() -> None:
    x = NODATA
    mask = [[x, x, 1, x, x, x], [x, x, x, x, x, x], [x, x, x, 1, x, x]]  # rows 0 and 2 across the face
    merged = _merge_small(mask, 3)
    assert len(merged) == 2 and merged.pixel_count.tolist() == [1, 1]
    mask = [[1, 1, x, x, 1, 1]]  # same class in neighbouring chunks, a nodata gap between
    assert len(_merge_small(mask, 3)) == 2
    mask = [[1, 1, 0, 0, 1, 1]]  # or a different class between
    assert len(_merge_small(mask, 2)) == 3


def test_different_classes_touching_do_not_merge() -> None:
    merged = _merge_small([[1, 1, 2, 2], [1, 1, 2, 2], [2, 2, 1, 1], [2, 2, 1, 1]], 2)
    # 1s: top-left and bottom-right blocks touch at the centre corner; 2s likewise
    assert len(merged) == 2
    assert merged.class_id.tolist() == [1, 2] and merged.pixel_count.tolist() == [8, 8]
    merged = _merge_small([[1, 2], [3, 4]], 1)
    assert len(merged) == 4 and sorted(merged.class_id.tolist()) == [1, 2, 3, 4]


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
    assert part.nbytes == 11 * 3 * 8 - 3 * 7 + 4 * 3 * 8  # class_id is uint8
    with pytest.raises(ValueError, match="read-only"):
        part.ids[0] = 7


def test_all_nodata_chunk_and_empty_merge() -> None:
    part = chunk_regions(np.full((3, 4), NODATA, np.uint8), chunk_index=(0, 0), origin=(0, 0), id_offset=0)
    assert len(part) == 0 and part.edge_top.tolist() == [0, 0, 0, 0]
    # the shortcut for a wholly nodata core gives what the general path (taken with
    # caller-supplied labels) computes
    general = chunk_regions(np.full((3, 4), NODATA, np.uint8), chunk_index=(0, 0), origin=(0, 0), id_offset=0,
                            labels=np.zeros((3, 4), np.int64))
    assert part == general
    assert len(merge_regions([part])) == 0
    empty = merge_regions([])
    assert len(empty) == 0 and empty.relabel(np.zeros((2, 2), np.int64)).tolist() == [[0, 0], [0, 0]]
    with pytest.raises(ValueError, match=r"ids \[5\] are not in the relabel table"):
        empty.relabel(np.array([0, 5]))


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
    with pytest.raises(ValueError, match=r"bad.npz: not a ChunkRegions file, missing \['class_id'"):
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
    with pytest.raises(ValueError, match=r"2-D uint8 array \(H, W\), got 2-D int64 \(2, 3\)"):
        chunk_regions(good.astype(np.int64), **kw)
    with pytest.raises(ValueError, match="got 1-D uint8"):
        chunk_regions(np.zeros(3, np.uint8), **kw)
    with pytest.raises(ValueError, match="nodata must be a uint8 value 0..255, got 256"):
        chunk_regions(good, **kw, nodata=256)
    with pytest.raises(ValueError, match="id_offset must be >= 0"):
        label_chunk(good, id_offset=-1)
    with pytest.raises(ValueError, match="origin must be a pair of integers >= 0"):
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
    fields = {name: getattr(base, name) for name in base.__dataclass_fields__}
    return ChunkRegions(**(fields | changes))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(ids=np.array([11, 12], np.int32)), "ids must be 1-D int64, got 1-D int32"),
        (dict(ids=[11, 12]), "ids must be a numpy array, got list"),
        (dict(class_id=np.array([1], np.uint8)), "per-region arrays differ in length"),
        (dict(ids=np.array([11, 11], np.int64)), "ids are not unique"),
        (dict(edge_top=np.array([11], np.int64)), r"edge lengths .* do not fit the chunk shape \(2, 2\)"),
        (dict(edge_top=np.array([11, 99], np.int64)), r"border ids \[99\] are not among the region ids"),
        (dict(min_row=np.array([3, 5], np.int64)), "region 11 has inconsistent bounds"),
        (dict(sum_col=np.array([100.0, 6.0])), "region 11 has inconsistent bounds or sums"),
        (dict(pixel_count=np.array([0, 1], np.int64)), "pixel_count must be >= 1"),
        (dict(shape=(0, 2)), r"shape must be a pair of integers >= 1, got \(0, 2\)"),
        (dict(chunk_index=(0, 0, 0)), "chunk_index must be a pair"),
    ],
)
def test_chunk_regions_validates(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _part(**changes)


def test_merge_errors() -> None:
    mask = np.zeros((4, 4), np.uint8)
    a = chunk_regions(mask[:2, :2], chunk_index=(0, 0), origin=(0, 0), id_offset=0)
    b = chunk_regions(mask[:2, 2:], chunk_index=(0, 1), origin=(0, 2), id_offset=0)  # same ids as a
    with pytest.raises(ValueError, match=r"chunk \(0, 0\) is given twice"):
        merge_regions([a, a])
    with pytest.raises(ValueError, match=r"region id 1 appears in chunks \[\(0, 0\), \(0, 1\)\]"):
        merge_regions([a, b])
    shifted = chunk_regions(mask[:2, 2:], chunk_index=(0, 1), origin=(0, 3), id_offset=10)
    with pytest.raises(ValueError, match=r"chunk \(0, 1\) at \(0, 3\) of \(2, 2\) is not the right neighbour"):
        merge_regions([a, shifted])
    below = chunk_regions(mask[2:, :1], chunk_index=(1, 0), origin=(2, 0), id_offset=10)
    with pytest.raises(ValueError, match="is not the lower neighbour"):
        merge_regions([a, below])
    with pytest.raises(ValueError, match="merge_regions takes ChunkRegions, got dict"):
        merge_regions([{}])  # type: ignore[list-item]


def test_merged_regions_validates_and_relabels() -> None:
    merged = split_and_merge(blobby_mask((12, 12), 5), 4)[0]
    fields = {name: getattr(merged, name) for name in merged.__dataclass_fields__}
    with pytest.raises(ValueError, match="region_id must be 1..N|region_id must be 1"):
        MergedRegions(**(fields | {"region_id": merged.region_id[::-1].copy()}))
    with pytest.raises(ValueError, match="source_id must be strictly increasing"):
        MergedRegions(**(fields | {"source_id": merged.source_id[::-1].copy()}))
    with pytest.raises(ValueError, match="centroid_row must be 1-D float64"):
        MergedRegions(**(fields | {"centroid_row": merged.centroid_row.astype(np.float32)}))
    assert MergedRegions(**fields) == merged
    with pytest.raises(ValueError, match="ids must be integers, got float64"):
        merged.relabel(np.zeros(3))
    with pytest.raises(ValueError, match=r"ids \[-4\] are not in the relabel table"):
        merged.relabel(np.array([[-4]]))


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


@pytest.mark.parametrize("batch_rows", [7, 65536])
def test_write_regions_streams_the_same_table_as_the_in_memory_merge(tmp_path, monkeypatch, batch_rows):
    # Row by row, spilled, sorted by DuckDB, written in batches of `batch_rows`: the same
    # Parquet rows as regions_table(merge_regions(parts)).
    import pyarrow.parquet as pq

    import pipelines.writers.regions_table as rt
    from pipelines.georef import regions_table
    from pipelines.writers.tables import table_path

    monkeypatch.setattr(rt, "BATCH_ROWS", batch_rows)
    mask = blobby_mask((48, 40), 5)
    mask[16:24, :] = NODATA
    parts = chunk_parts(mask, 8, skip_empty=True)[0]
    grid_rows = sorted({p.chunk_index[0] for p in parts})
    k = int(mask[mask != NODATA].max()) + 1
    geo = {"transform": (10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0), "crs_wkt": "EPSG:32633",
           "class_names": [f"class{c}" for c in range(k)]}
    work = tmp_path / "work"
    work.mkdir()
    summary = rt.write_regions(tmp_path, "s", ([p for p in parts if p.chunk_index[0] == i] for i in grid_rows),
                               work_dir=work, **geo)
    got = pq.read_table(table_path(tmp_path, "regions", "s"))
    merged = merge_regions(parts)
    want = regions_table("s", merged, **geo)
    assert got.num_rows == want.num_rows == summary.n_regions > 7  # batches of 7: many
    assert got.equals(want.select(got.column_names).cast(got.schema))
    assert summary.class_pixels == tuple(int(merged.pixel_count[merged.class_id == c].sum()) for c in range(k))
    assert list(work.iterdir()) == []  # spill and DuckDB's temp folder removed


def test_write_regions_of_a_scene_without_regions(tmp_path):
    import pyarrow.parquet as pq

    from pipelines.writers.regions_table import write_regions
    from pipelines.writers.tables import table_path

    parts = chunk_parts(np.full((16, 16), NODATA, dtype=np.uint8), 8)[0]
    summary = write_regions(tmp_path, "empty", [parts[:2], parts[2:]], work_dir=tmp_path,
                            transform=(1.0, 0.0, 0.0, 0.0, -1.0, 0.0), crs_wkt=None, class_names=["a"])
    assert summary.n_regions == 0 and summary.class_pixels == (0,)
    assert pq.read_table(table_path(tmp_path, "regions", "empty")).num_rows == 0


def test_write_regions_turns_a_failed_sort_into_an_output_error_and_leaves_no_table(tmp_path, monkeypatch):
    import duckdb

    from pipelines.writers.regions_table import write_regions
    from pipelines.writers.tables import table_path
    from schemas.errors import OutputError

    def no_space(*args, **kwargs):
        raise duckdb.IOException("No space left on device")

    monkeypatch.setattr(duckdb, "connect", no_space)
    parts = chunk_parts(blobby_mask((16, 16), 1), 8)[0]
    with pytest.raises(OutputError, match="sorting the scene's regions failed: No space left"):
        write_regions(tmp_path, "s", [parts[:2], parts[2:]], work_dir=tmp_path,
                      transform=(1.0, 0.0, 0.0, 0.0, -1.0, 0.0), crs_wkt=None, class_names=[f"c{k}" for k in range(8)])
    assert not table_path(tmp_path, "regions", "s").exists()
    assert list(table_path(tmp_path, "regions", "s").parent.iterdir()) == []  # no temp file left
    assert not (tmp_path / "regions.spill.parquet").exists()


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
    # the bincount / find_objects path. Both give the same partials, field by field.
    own = chunk_regions(classes, chunk_index=(3, 4), origin=origin, id_offset=7000)
    supplied = chunk_regions(classes, chunk_index=(3, 4), origin=origin, id_offset=7000,
                             labels=label_chunk(classes, id_offset=7000))
    for field in dataclasses.fields(own):
        a, b = getattr(own, field.name), getattr(supplied, field.name)
        assert np.array_equal(np.asarray(a), np.asarray(b)), field.name
        assert np.asarray(a).dtype == np.asarray(b).dtype, field.name


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
