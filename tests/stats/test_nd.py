"""Region statistics in 2D and 3D against an independent computation: random label images and
volumes cut into chunks of awkward sizes, partials per chunk, merged in memory (merge_regions)
and slab by slab (RowMerge), compared with skimage labelling (connectivity = ndim) and
regionprops on the whole array."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from skimage import measure

from pipelines.stats import ChunkRegions, RowMerge, chunk_regions, label_chunk, merge_regions
from tests.stats.cases import NODATA, assert_matches_golden, blobby_volume, chunk_parts, row_merge

CLASSES = st.sampled_from([0, 1, 2, NODATA])


def assert_both_merges_match(mask: np.ndarray, chunk: tuple[int, ...], **kw: bool) -> None:
    parts, ids = chunk_parts(mask, chunk, **kw)
    assert_matches_golden(merge_regions(parts, ndim=mask.ndim), mask, ids)
    assert_matches_golden(row_merge(parts, ndim=mask.ndim), mask)


@settings(max_examples=80, deadline=None)
@given(mask=hnp.arrays(np.uint8, hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=9), elements=CLASSES),
       chunk=st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5)),
       own_labels=st.booleans())
def test_3d_merges_equal_whole_volume_labelling_on_noise(mask, chunk, own_labels):
    """Salt-and-pepper volumes: regions continue through chunk faces, edges and corners."""
    assert_both_merges_match(mask, chunk, supply_labels=not own_labels)


@settings(max_examples=60, deadline=None)
@given(mask=hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=16), elements=CLASSES),
       chunk=st.tuples(st.integers(1, 7), st.integers(1, 7)))
def test_2d_merges_of_own_labelling_equal_whole_image_labelling(mask, chunk):
    assert_both_merges_match(mask, chunk, supply_labels=False)


@pytest.mark.parametrize(
    "chunk",
    [
        pytest.param((4, 5, 6), id="4x5x6-not-dividing"),
        pytest.param((7, 7, 7), id="7-cube"),
        pytest.param((1, 23, 17), id="1-voxel-slabs"),
        pytest.param((20, 1, 3), id="1-voxel-rows"),
        pytest.param((3, 11, 1), id="anisotropic-1-voxel-cols"),
        pytest.param((2, 8, 32), id="anisotropic-wider-than-volume"),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_3d_merges_equal_whole_volume_labelling(chunk, seed):
    mask = blobby_volume((20, 23, 17), seed)
    assert_both_merges_match(mask, chunk)


def test_3d_merge_skips_missing_all_nodata_chunks():
    mask = blobby_volume((12, 12, 12), 2)
    mask[4:8] = NODATA  # a whole slab of chunks never reaches the merge
    mask[:, :, 0:4] = NODATA
    parts, ids = chunk_parts(mask, 4, skip_empty=True)
    assert not any(p.chunk_index[0] == 1 for p in parts)
    assert_matches_golden(merge_regions(parts, ndim=3), mask, ids)
    assert_matches_golden(row_merge(parts, ndim=3), mask)


@pytest.mark.parametrize(
    ("voxels", "chunks"),
    [
        pytest.param([(1, 1, 1), (2, 2, 2)], [(0, 0, 0), (1, 1, 1)], id="corner"),
        pytest.param([(1, 1, 2), (2, 2, 1)], [(0, 0, 1), (1, 1, 0)], id="corner-down-left"),
        pytest.param([(1, 2, 1), (2, 1, 2)], [(0, 1, 0), (1, 0, 1)], id="corner-mixed"),
        pytest.param([(1, 1, 3), (2, 2, 3)], [(0, 0, 1), (1, 1, 1)], id="edge"),
        pytest.param([(3, 1, 2), (3, 2, 1)], [(1, 0, 1), (1, 1, 0)], id="edge-within-a-slab"),
    ],
)
def test_3d_voxels_touching_only_at_a_chunk_corner_or_edge_merge(voxels, chunks):
    mask = np.full((4, 4, 4), NODATA, dtype=np.uint8)
    for v in voxels:
        mask[v] = 3
    parts, _ = chunk_parts(mask, 2, skip_empty=True)
    assert sorted(p.chunk_index for p in parts) == sorted(chunks)  # two chunks, one voxel each
    for merged in (merge_regions(parts, ndim=3), row_merge(parts, ndim=3)):
        assert len(merged) == 1 and merged.pixel_count.tolist() == [2]
        lo, hi = np.min(voxels, axis=0), np.max(voxels, axis=0)
        assert (merged.min_plane[0], merged.min_row[0], merged.min_col[0]) == tuple(lo)
        assert (merged.max_plane[0], merged.max_row[0], merged.max_col[0]) == tuple(hi)
        assert (merged.first_plane[0], merged.first_row[0], merged.first_col[0]) == min(voxels)
        assert (merged.centroid_plane[0], merged.centroid_row[0], merged.centroid_col[0]) == tuple(
            np.mean(voxels, axis=0))
    # a different class at one of the two voxels: two regions
    mask[voxels[1]] = 4
    parts, _ = chunk_parts(mask, 2, skip_empty=True)
    assert len(merge_regions(parts, ndim=3)) == 2


def test_3d_row_merge_holds_one_slab_and_only_the_open_regions():
    mask = blobby_volume((16, 12, 12), 4)
    parts, _ = chunk_parts(mask, (2, 5, 4))
    merger = RowMerge(ndim=3)
    for i in sorted({p.chunk_index[0] for p in parts}):
        slab = [p for p in parts if p.chunk_index[0] == i]
        merger.add_row(slab)
        far = np.concatenate([p.face(0, True).ravel() for p in slab])
        assert len(merger._open["pixel_count"]) <= len(np.unique(far[far > 0]))
        assert set(merger._row) == {p.chunk_index for p in slab}


def test_3d_chunk_regions_by_hand_and_faces():
    x = NODATA
    classes = np.array([[[1, x], [x, x]], [[x, x], [x, 1]]], dtype=np.uint8)  # (0,0,0) and (1,1,1): one region
    part = chunk_regions(classes, chunk_index=(0, 1, 2), origin=(10, 20, 30), id_offset=100)
    assert part.ids.tolist() == [101] and part.pixel_count.tolist() == [2]
    assert (part.sum_plane.tolist(), part.sum_row.tolist(), part.sum_col.tolist()) == ([21.0], [41.0], [61.0])
    assert (part.min_plane[0], part.max_plane[0], part.first_plane[0], part.first_col[0]) == (10, 11, 10, 30)
    assert part.face(0, False).tolist() == [[101, 0], [0, 0]]  # face_plane_lo: (H, W)
    assert part.face_col_hi.tolist() == [[0, 0], [0, 101]]  # (D, H)
    assert part.face_row_lo.shape == (2, 2) and part.ndim == 3
    assert part.nbytes == 17 * 8 - 7 + 6 * 4 * 8  # 17 per-region arrays (class_id uint8), 6 faces


def test_3d_npz_and_pickle_round_trip(tmp_path):
    part = chunk_parts(blobby_volume((6, 7, 5), 1), (3, 4, 5))[0][-1]
    part.to_npz(tmp_path / "c.npz")
    assert ChunkRegions.from_npz(tmp_path / "c.npz") == part
    assert pickle.loads(pickle.dumps(part)) == part
    merged = merge_regions([part], ndim=3)
    assert pickle.loads(pickle.dumps(merged)) == merged


def test_merge_refuses_mixed_axes():
    two = chunk_regions(np.zeros((2, 2), np.uint8), chunk_index=(0, 0), origin=(0, 0), id_offset=0)
    three = chunk_regions(np.zeros((2, 2, 2), np.uint8), chunk_index=(0, 0, 1), origin=(0, 0, 2), id_offset=9)
    with pytest.raises(ValueError, match=r"merges 2-D chunks, got chunk \(0, 0, 1\) .* \(pass ndim=3\)"):
        merge_regions([three])
    with pytest.raises(ValueError, match="merges 3-D chunks"):
        RowMerge(ndim=3).add_row([two])
    with pytest.raises(ValueError, match="ndim must be one of"):
        RowMerge(ndim=4)


@settings(max_examples=100, deadline=None)
@given(classes=hnp.arrays(np.uint8, hnp.array_shapes(min_dims=3, max_dims=3, max_side=10),
                          elements=st.sampled_from([0, 1, 2, 254, 255])),
       nodata=st.sampled_from([255, 0, 2]))
def test_3d_label_chunk_equals_skimage_labelling(classes, nodata):
    # The same regions as skimage's; numbered in raster order of their first voxel (skimage's
    # own 3D numbering is not raster order, so compare up to renumbering).
    expected = measure.label(classes, background=nodata, connectivity=3)
    got = label_chunk(classes, id_offset=0, nodata=nodata)
    assert np.array_equal(got == 0, expected == 0)
    pairs = np.unique(np.stack([got[got > 0], expected[expected > 0]]), axis=1)
    assert pairs.shape[1] == got.max() == expected.max()
    flat = got.ravel()
    first_seen = flat[np.sort(np.unique(flat, return_index=True)[1])]
    assert np.array_equal(first_seen[first_seen > 0], np.arange(1, got.max() + 1))


@settings(max_examples=100, deadline=None)
@given(classes=hnp.arrays(np.uint8, hnp.array_shapes(min_dims=3, max_dims=3, max_side=12),
                          elements=st.sampled_from([0, 1, 2, 255])),
       origin=st.tuples(st.integers(0, 10**5), st.integers(0, 10**5), st.integers(0, 10**5)))
def test_3d_chunk_regions_from_cc3d_statistics_equal_the_bincount_path(classes, origin):
    own = chunk_regions(classes, chunk_index=(1, 2, 3), origin=origin, id_offset=5000)
    supplied = chunk_regions(classes, chunk_index=(1, 2, 3), origin=origin, id_offset=5000,
                             labels=label_chunk(classes, id_offset=5000))
    assert own == supplied


def test_value_sums_are_per_region_sums_of_the_values_and_merge_by_addition():
    from pipelines.stats.merge import merge_regions
    from pipelines.stats.partials import chunk_regions

    classes = np.zeros((2, 2, 4), np.uint8)
    classes[:, :, 2:] = 1
    values = np.arange(16, dtype=np.float32).reshape(2, 2, 4)
    left = chunk_regions(classes[:, :, :2], chunk_index=(0, 0, 0), origin=(0, 0, 0), id_offset=0,
                         values=values[:, :, :2])
    right = chunk_regions(classes[:, :, 2:], chunk_index=(0, 0, 1), origin=(0, 0, 2), id_offset=100,
                          values=values[:, :, 2:])
    assert left.sum_value.tolist() == [float(values[:, :, :2].sum())]  # 0+1+4+5+8+9+12+13 = 52
    assert right.sum_value.tolist() == [float(values[:, :, 2:].sum())]
    merged = merge_regions([left, right], ndim=3)
    assert sorted(merged.sum_value.tolist()) == [52.0, 68.0]
    unknown = chunk_regions(classes[:, :, :2], chunk_index=(0, 0, 0), origin=(0, 0, 0), id_offset=0)
    assert np.isnan(unknown.sum_value).all()
    with pytest.raises(ValueError, match="values must be a float array of the chunk's shape"):
        chunk_regions(classes, chunk_index=(0, 0, 0), origin=(0, 0, 0), id_offset=0, values=values[:1])

