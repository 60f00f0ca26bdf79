"""Tests of pipelines.stats.merge in 2D: chunk partials merged across chunk borders, in memory
(merge_regions) and a row of chunks at a time (RowMerge), against skimage on the whole image."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipelines.stats import ChunkRegions, MergedRegions, RowMerge, chunk_regions, merge_regions
from schemas.store import GeoGrid
from tests.stats.cases import NODATA, assert_matches_golden, blobby_mask, chunk_parts, row_merge


def split_and_merge(
    mask: np.ndarray, chunk: int | tuple[int, int], *, shuffle: int | None = None, skip_empty: bool = False
) -> tuple[MergedRegions, np.ndarray]:
    """Label ``mask`` chunk by chunk and merge; also return the chunk-level id image."""
    parts, ids = chunk_parts(mask, chunk, skip_empty=skip_empty)
    if shuffle is not None:
        random.Random(shuffle).shuffle(parts)
    return merge_regions(parts), ids


def assert_row_merge_equals_merge(parts: list[ChunkRegions]) -> None:
    want, got = merge_regions(parts), row_merge(parts)
    for name in ("region_id", "class_id", "pixel_count", "centroid_row", "centroid_col", "min_row", "min_col",
                 "max_row", "max_col", "first_row", "first_col"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


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
    assert_matches_golden(merged, mask, ids)


def test_merge_skips_missing_all_nodata_chunks() -> None:
    mask = blobby_mask((40, 40), 3)
    mask[:, 8:16] = NODATA  # a whole column of chunks is nodata and never reaches the merge
    merged, ids = split_and_merge(mask, 8, skip_empty=True)
    assert_matches_golden(merged, mask, ids)


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
    assert_matches_golden(merged, mask, ids)


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
    with pytest.raises(ValueError, match=r"one slab \(one index along axis 0\), got \[0, 1\]"):
        RowMerge(ndim=2).add_row(parts)
    merger = RowMerge(ndim=2)
    merger.add_row(row1)
    with pytest.raises(ValueError, match="increasing order: slab 0 after slab 1"):
        merger.add_row(row0)
    with pytest.raises(ValueError, match=r"chunk \(1, 0\) is given twice"):
        merger.add_row(row1)
    with pytest.raises(ValueError, match="takes ChunkRegions"):
        RowMerge(ndim=2).add_row(["c0_0"])


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


def test_merge_errors() -> None:
    mask = np.zeros((4, 4), np.uint8)
    a = chunk_regions(mask[:2, :2], chunk_index=(0, 0), origin=(0, 0), id_offset=0)
    b = chunk_regions(mask[:2, 2:], chunk_index=(0, 1), origin=(0, 2), id_offset=0)  # same ids as a
    with pytest.raises(ValueError, match=r"chunk \(0, 0\) is given twice"):
        merge_regions([a, a])
    with pytest.raises(ValueError, match=r"region id 1 appears in chunks \[\(0, 0\), \(0, 1\)\]"):
        merge_regions([a, b])
    shifted = chunk_regions(mask[:2, 2:], chunk_index=(0, 1), origin=(0, 3), id_offset=10)
    with pytest.raises(ValueError, match=r"chunk \(0, 1\) at \(0, 3\) of \(2, 2\) does not line up with chunk \(0, 0\)"):
        merge_regions([a, shifted])
    below = chunk_regions(mask[2:, :1], chunk_index=(1, 0), origin=(2, 0), id_offset=10)
    with pytest.raises(ValueError, match=r"neighbour at grid offset \(1, 0\)"):
        merge_regions([a, below])
    with pytest.raises(ValueError, match="merge_regions takes ChunkRegions, got dict"):
        merge_regions([{}])  # type: ignore[list-item]


def test_merged_regions_validates_and_relabels() -> None:
    merged = split_and_merge(blobby_mask((12, 12), 5), 4)[0]
    arrays = dict(merged.arrays)

    def rebuilt(**changes: np.ndarray) -> MergedRegions:
        return MergedRegions(ndim=2, arrays=arrays | changes)

    with pytest.raises(ValueError, match="region_id must be 1"):
        rebuilt(region_id=merged.region_id[::-1].copy())
    with pytest.raises(ValueError, match="source_id must be strictly increasing"):
        rebuilt(source_id=merged.source_id[::-1].copy())
    with pytest.raises(ValueError, match=r"centroid_row must be 1-D float64, got \(\d+,\) float32"):
        rebuilt(centroid_row=merged.centroid_row.astype(np.float32))
    with pytest.raises(ValueError, match="arrays must be"):
        MergedRegions(ndim=3, arrays=arrays)
    assert rebuilt() == merged
    with pytest.raises(ValueError, match="ids must be integers, got float64"):
        merged.relabel(np.zeros(3))
    with pytest.raises(ValueError, match=r"ids \[-4\] are not in the relabel table"):
        merged.relabel(np.array([[-4]]))


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
                               work_dir=work, grid=GeoGrid(geo["transform"], geo["crs_wkt"]),
                               class_names=geo["class_names"])
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
                            grid=GeoGrid((1.0, 0.0, 0.0, 0.0, -1.0, 0.0)), class_names=["a"])
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
                      grid=GeoGrid((1.0, 0.0, 0.0, 0.0, -1.0, 0.0)), class_names=[f"c{k}" for k in range(8)])
    assert not table_path(tmp_path, "regions", "s").exists()
    assert list(table_path(tmp_path, "regions", "s").parent.iterdir()) == []  # no temp file left
    assert not (tmp_path / "regions.spill.parquet").exists()
