"""Tests of pipelines.tools.bench.instances: with the exact per-window oracle, tessera's merge
gives back the truth (no split, no duplicate) while box NMS / NMM fail where the case says."""

from __future__ import annotations

import numpy as np

from pipelines.plan.chunks import plan_chunks
from pipelines.tools.bench.instances import (
    Detection,
    bench_scene,
    oracle_tile,
    sahi_merge,
    score_detections,
    truth_scene,
)

CHUNK, HALO = 20, 3  # 60 x 60 scene: a 3 x 3 grid; tiles cols 0-23, 17-43, 37-60 (the same rows)


def hand_scene() -> np.ndarray:
    """Two failures of box merging, by hand.

    1: a bar 56 px long across three tiles: its parts' boxes overlap by the tiles' 6 px
       (IoU 0.15, IOS 0.29): no box rule joins them, the object is split in three.
    2, 3: two touching buildings, the triangles either side of a square's diagonal, only in
       tile (2, 0): box IoU 0.81, IOS 1: NMS drops 2 (lower oracle score), NMM merges them
       into one.
    """
    t = np.zeros((60, 60), np.uint32)
    t[2:6, 2:58] = 1
    r, c = np.mgrid[0:10, 0:10]
    square = t[45:55, 2:12]
    square[c >= r] = 2
    square[c < r] = 3
    return t


def test_tessera_merge_returns_the_truth_and_box_merging_fails_as_the_case_implies():
    truth = hand_scene()
    out = bench_scene(truth, chunk=CHUNK, halo=HALO)
    assert out["n_true"] == 3
    t = out["tessera"]
    assert (t["split_objects"], t["duplicated_objects"], t["n_pred"], t["recall"]) == (0, 0, 3, 1.0)
    nms = out["nms"]
    assert (nms["split_objects"], nms["duplicated_objects"], nms["n_pred"]) == (1, 0, 4)  # the bar in 3 + building 3
    assert nms["recall"] == 1 / 3  # only 3 is found: 1 is in pieces, 2 was suppressed
    nmm = out["nmm"]
    assert (nmm["split_objects"], nmm["duplicated_objects"], nmm["n_pred"], nmm["merged_predictions"]) == (1, 0, 4, 1)
    assert nmm["recall"] == 1 / 3  # the bar in pieces; 2 and 3 as one, which matches 2 (IoU 55 / 100)


def test_nms_keeps_one_of_two_copies_and_nmm_unions_their_masks():
    truth = hand_scene()
    dets = [d for w in plan_chunks(truth.shape, CHUNK, HALO) for d in oracle_tile(truth, w)]
    assert sorted(d.box for d in dets) == [(2, 2, 6, 23), (2, 17, 6, 43), (2, 37, 6, 58), (45, 2, 55, 12),
                                           (46, 2, 55, 11)]
    assert len(sahi_merge(dets, "NMS")) == 4 and len(sahi_merge(dets, "GREEDYNMM")) == 4
    a = Detection(box=(0, 0, 4, 4), mask=np.ones((4, 4), bool), score=0.5, area=16)
    b = Detection(box=(0, 1, 4, 5), mask=np.eye(4, dtype=bool), score=0.9, area=4)
    assert sahi_merge([a, b], "NMS") == [b]  # IoU 12/20 = 0.6 >= 0.5: the higher score stays
    (merged,) = sahi_merge([a, b], "GREEDYNMM")
    assert merged.box == (0, 0, 4, 5) and merged.score == 0.9 and merged.area == 16 + 1  # the eye adds (3, 4)
    m = score_detections([a, a], np.ones((4, 4), np.uint32))
    assert (m.n_pred, m.duplicated_objects) == (2, 1)  # overlapping kept masks both count


def test_a_building_scene_is_merged_without_split_or_duplicate():
    out = bench_scene(truth_scene(512, seed=3), chunk=200, halo=16)
    assert out["n_true"] > 100
    t = out["tessera"]
    assert (t["split_objects"], t["duplicated_objects"], t["count_error_per_1000"]) == (0, 0, 0.0)
