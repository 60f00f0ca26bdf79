"""Tests of pipelines.stats.instances: instances cut by chunk borders become one instance, never
two, never a duplicate. Each chunk's window is labelled by an oracle cut from a known global
label image (tests/stats/instance_cases.py); after the merge, the stitched instances must equal
the global labelling up to renumbering, and the merged statistics must equal skimage's."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.measure import label, regionprops

from pipelines.plan.chunks import chunk_grid_shape
from pipelines.stats.instances import (
    InstanceChunk,
    UnionFind,
    apply_relabel,
    match_chunks,
    merge_instance_ids,
    merge_instance_stats,
    neighbour_offsets,
)
from schemas.instances import InstanceWindow
from tests.stats.instance_cases import oracle_chunks, splits_and_duplicates, stitch

CHUNK, HALO = 8, 3


def merged(truth: np.ndarray, chunk: int = CHUNK, halo: int = HALO, n_bands: int = 0):
    chunks = oracle_chunks(truth, chunk, halo, n_bands)
    result = merge_instance_ids(chunks, chunks.get, grid_shape=chunk_grid_shape(truth.shape, chunk))
    return chunks, result, stitch(chunks, truth.shape, result.relabel)


def assert_same_instances(truth: np.ndarray, **kw) -> np.ndarray:
    chunks, result, stitched = merged(truth, **kw)
    assert splits_and_duplicates(stitched, truth) == (0, 0)
    assert len(np.unique(stitched[stitched > 0])) == len(np.unique(truth[truth > 0]))
    return stitched


def awkward_scene() -> np.ndarray:
    """30 x 27 (odd sizes, chunk 8): every awkward case of the issue, by hand."""
    t = np.zeros((30, 27), dtype=np.int64)
    t[6:10, 2:8] = 1  # touching objects across a chunk border (row 8), distinct
    t[6:10, 8:12] = 2
    t[10:12, 2:12] = 3  # touches 1 and 2 from below
    t[1:3, 5:7] = 4  # one object in two disconnected parts, across the border at col 8 (within one halo)
    t[1:3, 9:11] = 4
    t[7:9, 15:17] = 5  # exactly on the corner of four chunks (rows 7-8, cols 15-16)
    t[12:14, 0:27] = 6  # larger than a chunk: the scene's width (4 chunks); touches 3 and 7
    t[14:30, 17:27] = 7  # a ring larger than a chunk, with a hole
    t[17:27, 20:23] = 0
    t[18:20, 21:22] = 8  # an object inside the ring's hole
    t[16, 0] = 9  # single pixels just either side of a chunk border: each is in another chunk's halo
    t[16, 8] = 10
    t[15, 7] = 11  # diagonal neighbours across a corner, distinct
    t[16, 9] = 12
    return t


def test_the_awkward_cases_become_one_instance_each():
    assert_same_instances(awkward_scene())


def test_touching_objects_stay_distinct_and_a_ring_with_its_island_is_two():
    truth = awkward_scene()
    stitched = assert_same_instances(truth)
    for a, b in ((1, 2), (1, 3), (2, 3), (7, 8), (11, 12)):
        assert stitched[truth == a][0] != stitched[truth == b][0]
    assert len(np.unique(stitched[truth == 4])) == 1  # the two parts: one id


def test_final_id_is_the_smallest_provisional_id_and_only_non_roots_are_relabelled():
    truth = awkward_scene()
    chunks, result, stitched = merged(truth)
    provisional = {}
    for c in chunks.values():
        core = tuple(slice(o, o + n) for o, n in zip(c.core_origin, c.core_shape))
        for g, p in zip(truth[core].ravel(), c.provisional_core().ravel()):
            if g:
                provisional.setdefault(int(g), set()).add(int(p))
    for g, ids in provisional.items():
        assert int(stitched[truth == g][0]) == min(ids)
        assert {k for k in ids if k != min(ids)} <= set(result.relabel)
    assert set(result.relabel) == {k for ids in provisional.values() for k in ids if k != min(ids)}
    assert all(v not in result.relabel for v in result.relabel.values())  # maps to roots only: idempotent


def test_an_object_larger_than_several_chunks_and_a_full_scene_object():
    truth = np.ones((40, 33), dtype=np.int64)  # one object covering 5 x 5 chunks
    truth[10:12, :] = 0
    assert_same_instances(truth)  # two objects, each several chunks wide
    assert_same_instances(np.ones((17, 17), dtype=np.int64), chunk=4, halo=1)


def test_a_halo_larger_than_the_chunk():
    assert_same_instances(awkward_scene(), chunk=4, halo=6)


@pytest.mark.parametrize("halo", [1, 2])
def test_random_blobs_of_connected_components(halo):
    rng = np.random.default_rng(halo)
    truth = label(rng.random((45, 38)) < 0.45, connectivity=2)
    assert_same_instances(truth, halo=halo)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), rows=st.integers(5, 40), cols=st.integers(5, 40), chunk=st.integers(3, 12),
       halo=st.integers(1, 5), density=st.floats(0.1, 0.8))
def test_random_label_images_merge_exactly(seed, rows, cols, chunk, halo, density):
    rng = np.random.default_rng(seed)
    truth = label(rng.random((rows, cols)) < density, connectivity=2)
    assert_same_instances(truth, chunk=chunk, halo=halo)


def test_touching_objects_of_a_random_partition_stay_distinct():
    """Every pixel in some object (no background at all), many objects touching each other."""
    rng = np.random.default_rng(5)
    blocks = rng.integers(1, 30, size=(8, 7)).repeat(5, axis=0).repeat(5, axis=1)
    truth = label(blocks, background=0, connectivity=1)
    assert_same_instances(truth[:37, :33])


def test_volumes_an_object_on_a_corner_of_eight_chunks_and_random_blobs():
    truth = np.zeros((19, 20, 17), dtype=np.int64)
    truth[7:9, 7:9, 7:9] = 1  # the 2x2x2 cube on the corner of 8 chunks
    truth[0:19, 3:5, 12:14] = 2  # a rod through 3 chunks
    truth[15, 15, 15] = 3
    stitched = assert_same_instances(truth)
    assert len(np.unique(stitched[truth == 1])) == 1
    rng = np.random.default_rng(3)
    assert_same_instances(label(rng.random((18, 17, 19)) < 0.3, connectivity=3), halo=2)


def test_merged_stats_equal_regionprops_on_the_stitched_array():
    truth = awkward_scene()
    chunks, result, stitched = merged(truth, n_bands=2)
    stats = merge_instance_stats(chunks.values(), result.relabel, n_classes=4)
    props = {p.label: p for p in regionprops(stitched.astype(np.int64))}
    assert sorted(props) == stats["instance_id"].tolist()
    for k, iid in enumerate(stats["instance_id"].tolist()):
        p = props[iid]
        g = int(truth[stitched == iid][0])
        assert stats["pixel_count"][k] == p.area
        np.testing.assert_allclose(stats["centroid"][k], p.centroid, rtol=0, atol=1e-9)
        assert tuple(stats["bbox_min"][k]) == p.bbox[:2]
        assert tuple(stats["bbox_max"][k] + 1) == p.bbox[2:]
        assert stats["class_id"][k] == 1 + g % 3
        assert stats["score"][k] == pytest.approx((g % 7 + 1) / 8)
        np.testing.assert_allclose(stats["band_means"][k], [g, 2 * g])
    assert np.isnan(stats["area_m2"]).all()  # no row areas given


def test_class_is_the_pixel_majority_and_score_the_pixel_weighted_mean():
    """One object across two chunks whose windows disagree on its class and score."""
    truth = np.zeros((8, 16), dtype=np.int64)
    truth[2:5, 5:11] = 1  # 3 pixels per row in chunk 0 (cols 5-7), 3 in chunk 1 (cols 8-10)
    truth[2:5, 4] = 1  # chunk 0 holds 12 pixels, chunk 1 holds 9
    chunks = oracle_chunks(truth, 8, 3)
    a, b = chunks[(0, 0)], chunks[(0, 1)]
    chunks[(0, 1)] = InstanceChunk(**{**b.__dict__, "class_id": np.array([2], np.uint8),
                                      "score": np.array([0.25], np.float32)})
    chunks[(0, 0)] = InstanceChunk(**{**a.__dict__, "class_id": np.array([1], np.uint8),
                                      "score": np.array([0.75], np.float32)})
    result = merge_instance_ids(chunks, chunks.get, grid_shape=(1, 2))
    stats = merge_instance_stats(chunks.values(), result.relabel, n_classes=3)
    assert stats["instance_id"].tolist() == [a.id_offset + 1]
    assert stats["class_id"].tolist() == [1]  # 12 pixels of class 1 against 9 of class 2
    assert stats["score"][0] == pytest.approx((0.75 * 12 + 0.25 * 9) / 21)


def window_of(ids: np.ndarray, origin, core_origin, core_shape, offset) -> InstanceChunk:
    from pipelines.stats.instances import instance_chunk

    n = int(ids.max())
    inside = tuple(slice(c - o, c - o + s) for c, o, s in zip(core_origin, origin, core_shape))
    core_pixels = np.bincount(ids[inside].ravel(), minlength=n + 1)[1:].astype(np.int64)
    w = InstanceWindow(ids=ids.astype(np.uint32), class_id=np.ones(n, np.uint8), score=np.ones(n, np.float32),
                       core_pixels=core_pixels)
    return instance_chunk(w, chunk_index=(0, 0), window_origin=origin, core_origin=core_origin,
                          core_shape=core_shape, chunk_shape=core_shape, id_offset=offset)


def test_match_needs_mutual_best_and_iou_over_the_threshold_on_the_shared_pixels():
    # A: core cols 0-3, window cols 0-5; B: core cols 4-7, window cols 2-7 (one row, halo 2)
    a_ids = np.array([[1, 1, 1, 1, 1, 2]])  # A sees object 1 over cols 0-4, object 2 at col 5
    b_ids = np.array([[0, 0, 1, 1, 1, 1]])  # B sees one object over cols 4-7
    a = window_of(a_ids, (0, 0), (0, 0), (1, 4), 100)
    b = window_of(b_ids, (0, 2), (0, 4), (1, 4), 200)
    # R = A.window ∩ B.core = cols 4-5: A has 1 at col 4, 2 at col 5 (2 is halo-only in A: not a candidate)
    # IoU of (A 1, B 1) on R: 1 shared pixel / (1 + 2 - 1) = 0.5, the default threshold
    assert match_chunks(a, b) == [(101, 201)]
    assert match_chunks(a, b, iou_threshold=0.5) == [(101, 201)]
    assert match_chunks(a, b, iou_threshold=0.6) == []


def test_a_halo_only_object_is_never_matched_from_its_halo_side():
    a_ids = np.array([[0, 0, 0, 0, 2, 2]])  # object 2 only in A's halo
    b_ids = np.array([[0, 0, 1, 1, 0, 0]])
    a = window_of(a_ids, (0, 0), (0, 0), (1, 4), 100)
    b = window_of(b_ids, (0, 2), (0, 4), (1, 4), 200)
    assert match_chunks(a, b, iou_threshold=0.1) == []


def test_union_find_roots_are_the_smallest_ids_with_uint64_sized_ids():
    uf = UnionFind()
    big = 2**40
    uf.union(big + 7, big + 3)
    uf.union(big + 3, 5)
    uf.union(9, 10)
    assert uf.find(big + 7) == 5 and uf.find(10) == 9 and uf.find(42) == 42
    assert uf.relabel_table() == {10: 9, big + 3: 5, big + 7: 5}


def test_apply_relabel_is_idempotent_and_keeps_roots_and_background():
    keys, finals = np.array([5, 9, 12], np.uint64), np.array([1, 2, 1], np.uint64)
    ids = np.array([[0, 5, 9], [12, 1, 7]], np.uint32)
    once = apply_relabel(ids, keys, finals)
    assert once.tolist() == [[0, 1, 2], [1, 1, 7]] and once.dtype == np.uint32
    assert np.array_equal(apply_relabel(once, keys, finals), once)


def test_neighbour_offsets_meet_each_pair_once():
    assert len(neighbour_offsets(2)) == 4 and len(neighbour_offsets(3)) == 13


def test_instance_file_round_trips(tmp_path):
    chunks = oracle_chunks(awkward_scene(), CHUNK, HALO, n_bands=2)
    c = chunks[(1, 1)]
    c.to_npz(tmp_path / "c1_1.instances.npz")
    back = InstanceChunk.from_npz(tmp_path / "c1_1.instances.npz")
    for name, value in c.__dict__.items():
        got = getattr(back, name)
        assert np.array_equal(got, value, equal_nan=isinstance(value, np.ndarray) and value.dtype.kind == "f"), name
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz"):
        InstanceChunk.from_npz(tmp_path / "bad.npz")
    data = (tmp_path / "c1_1.instances.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])  # e.g. a disk that filled up
    with pytest.raises(ValueError, match="cut.npz: not a readable instance file"):
        InstanceChunk.from_npz(tmp_path / "cut.npz")


def test_a_predictor_whose_core_pixels_disagree_with_its_ids_is_refused():
    ids = np.zeros((6, 6), np.uint32)
    ids[2:4, 2:4] = 1
    w = InstanceWindow(ids=ids, class_id=np.ones(1, np.uint8), score=np.ones(1, np.float32),
                       core_pixels=np.array([3], np.int64))
    from pipelines.stats.instances import instance_chunk

    with pytest.raises(ValueError, match="object 1 has 4 core pixels, the predictor says 3"):
        instance_chunk(w, chunk_index=(0, 0), window_origin=(-1, -1), core_origin=(0, 0), core_shape=(4, 4),
                       chunk_shape=(4, 4), id_offset=0)


def test_a_core_object_numbered_beyond_the_chunks_id_range_is_refused():
    """A 2x2 core owns 4 provisional ids; a window numbering its core object 5 (after 4 halo-only
    objects) would write another chunk's id."""
    ids = np.zeros((6, 6), np.uint32)
    ids[0, ::2] = [1, 2, 3]
    ids[5, 0] = 4
    ids[2, 2] = 5  # in the core (2:4, 2:4)
    w = InstanceWindow(ids=ids, class_id=np.ones(5, np.uint8), score=np.ones(5, np.float32),
                       core_pixels=np.array([0, 0, 0, 0, 1], np.int64))
    from pipelines.stats.instances import instance_chunk

    with pytest.raises(ValueError, match="core object 5 is beyond the chunk's 4 provisional ids"):
        instance_chunk(w, chunk_index=(0, 0), window_origin=(-2, -2), core_origin=(0, 0), core_shape=(2, 2),
                       chunk_shape=(2, 2), id_offset=0)


def test_views_that_disagree_on_some_halo_pixels_still_match_over_the_threshold():
    """A real model sees an object a little differently in a halo than in a core: each window here
    loses a fifth of its objects' halo pixels at random (the core is untouched). The IoU on the
    shared pixels stays about 0.8: over 0.5 the objects merge exactly; asking 0.95 leaves some split."""
    truth = np.zeros((24, 24), dtype=np.int64)
    truth[3:13, 4:20] = 1  # across the border at row 8
    truth[14:22, 6:11] = 2  # across the border at row 16
    chunks = oracle_chunks(truth, CHUNK, HALO)
    rng = np.random.default_rng(0)
    for index, c in chunks.items():
        ids = c.ids.copy()
        halo = np.ones(ids.shape, dtype=bool)
        halo[c.core_in_window] = False
        ids[halo & (ids > 0) & (rng.random(ids.shape) < 0.2)] = 0
        chunks[index] = InstanceChunk(**{**c.__dict__, "ids": ids})
    result = merge_instance_ids(chunks, chunks.get, grid_shape=(3, 3))
    assert splits_and_duplicates(stitch(chunks, truth.shape, result.relabel), truth) == (0, 0)
    strict = merge_instance_ids(chunks, chunks.get, grid_shape=(3, 3), iou_threshold=0.95)
    split, duplicate = splits_and_duplicates(stitch(chunks, truth.shape, strict.relabel), truth)
    assert split >= 1 and duplicate == 0  # either direction of a pair over 0.95 joins it
