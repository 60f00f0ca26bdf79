"""Instance metrics against hand-made label images: perfect, split, duplicate, missed, merged, AP."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.tools.metrics import OverlapAccumulator, evaluate_instances, instance_overlaps, score_instances


def _scene() -> np.ndarray:
    """Three 10 x 10 true objects; A and B touch (shared edge), C stands alone."""
    truth = np.zeros((40, 40), np.uint32)
    truth[5:15, 5:15] = 11  # A
    truth[5:15, 15:25] = 12  # B, touching A
    truth[25:35, 25:35] = 13  # C
    return truth


def test_perfect_prediction_with_other_ids():
    truth = _scene()
    pred = np.zeros_like(truth)
    for new, old in ((3, 11), (1, 12), (7, 13)):
        pred[truth == old] = new
    m = evaluate_instances(pred, truth, {1: 0.9, 3: 0.8, 7: 0.7})
    assert (m.n_true, m.n_pred, m.tp, m.fp, m.fn) == (3, 3, 3, 0, 0)
    assert m.precision == m.recall == m.f1 == m.ap == m.mean_matched_iou == 1.0
    assert (m.split_objects, m.duplicated_objects, m.merged_predictions) == (0, 0, 0)
    assert m.count_error_per_1000 == 0.0


def test_one_split_object():
    truth = _scene()
    pred = np.zeros_like(truth)
    pred[5:15, 5:11] = 1  # 60 % of A: IoU 0.6, matches
    pred[5:15, 11:15] = 2  # 40 % of A: a fragment, no match
    pred[truth == 12] = 3
    pred[truth == 13] = 4
    m = evaluate_instances(pred, truth, None)
    assert (m.tp, m.fp, m.fn) == (3, 1, 0)
    assert m.split_objects == 1 and m.duplicated_objects == 0 and m.merged_predictions == 0
    assert m.precision == pytest.approx(0.75) and m.recall == 1.0
    assert m.count_error_per_1000 == pytest.approx(1000 / 3)
    assert m.split_per_1000 == pytest.approx(1000 / 3)


def test_a_speck_inside_an_object_is_no_split():
    truth = _scene()
    pred = truth.copy()
    pred[7, 7] = 99  # 1 px: < 10 % of A
    m = evaluate_instances(pred, truth, None)
    assert m.split_objects == 0 and m.fp == 1


def test_one_duplicated_object_from_overlapping_predictions():
    """Two masks of A kept (as box NMS may keep them), given as two layers of predictions."""
    truth = _scene()
    first = np.zeros_like(truth)
    first[truth == 11] = 1
    first[truth == 12] = 2
    first[truth == 13] = 3
    second = np.zeros_like(truth)
    second[6:16, 5:15] = 4  # A shifted by one row: IoU 90 / 110
    acc = OverlapAccumulator()
    acc.add(truth, first)
    acc.add_predictions(truth, second)
    m = score_instances(acc.finalize(), {1: 0.9, 2: 0.9, 3: 0.9, 4: 0.5})
    assert (m.n_true, m.n_pred, m.tp, m.fp) == (3, 4, 3, 1)
    assert m.duplicated_objects == 1 and m.duplicate_predictions == 1
    assert m.split_objects == 0
    assert m.ap == 1.0  # the duplicate ranks last, after every true positive


def test_greedy_matching_follows_scores():
    """The higher-scoring duplicate takes the object even with the lower IoU."""
    truth = np.zeros((20, 20), np.uint32)
    truth[2:12, 2:12] = 5
    exact = np.zeros_like(truth)
    exact[truth == 5] = 1
    shifted = np.zeros_like(truth)
    shifted[3:13, 2:12] = 2
    acc = OverlapAccumulator()
    acc.add(truth, exact)
    acc.add_predictions(truth, shifted)
    m = score_instances(acc.finalize(), {1: 0.3, 2: 0.9})
    assert m.tp == 1 and m.mean_matched_iou == pytest.approx(90 / 110)
    assert m.ap == 1.0


def test_one_missed_object():
    truth = _scene()
    pred = np.zeros_like(truth)
    pred[truth == 11] = 1
    pred[truth == 12] = 2
    m = evaluate_instances(pred, truth, {1: 0.9, 2: 0.8})
    assert (m.tp, m.fp, m.fn) == (2, 0, 1)
    assert m.precision == 1.0 and m.recall == pytest.approx(2 / 3)
    assert m.ap == pytest.approx(2 / 3)
    assert m.count_error_per_1000 == pytest.approx(-1000 / 3)


def test_touching_objects_found_as_one_are_a_merge():
    truth = _scene()
    pred = np.zeros_like(truth)
    pred[5:15, 5:25] = 1  # A and B as one: IoU 0.5 with each
    pred[truth == 13] = 2
    m = evaluate_instances(pred, truth, None)
    assert m.merged_predictions == 1
    assert m.tp == 2 and m.fn == 1  # the merge matches one of them (IoU exactly 0.5), not both


def test_ap_on_a_known_ranking():
    """Ranked TP, FP, TP with 3 true objects: precision 1, 1/2, 2/3 at recall 1/3, 1/3, 2/3;
    all-point envelope 1, 2/3, 2/3: AP = 1/3 * 1 + 0 + 1/3 * 2/3 = 5/9."""
    truth = _scene()
    pred = np.zeros_like(truth)
    pred[truth == 11] = 1
    pred[30:38, 2:10] = 2  # on background
    pred[truth == 12] = 3
    m = evaluate_instances(pred, truth, {1: 0.9, 2: 0.8, 3: 0.7})
    assert m.ap == pytest.approx(5 / 9)
    assert (m.tp, m.fp, m.fn) == (2, 1, 1)


def test_blocks_give_the_same_table_as_the_whole_image():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 6, (37, 23)).astype(np.uint32)
    pred = rng.integers(0, 9, (37, 23)).astype(np.uint16)
    whole = instance_overlaps(truth, pred, block_rows=1000)
    blocked = instance_overlaps(truth, pred, block_rows=4)
    for name in whole.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(whole, name), getattr(blocked, name))
    # golden check of one intersection against a direct count
    k = 0
    t, p = whole.true_ids[whole.pair_true[k]], whole.pred_ids[whole.pair_pred[k]]
    assert whole.pair_pixels[k] == np.sum((truth == t) & (pred == p))


def test_empty_cases_and_errors():
    truth = _scene()
    m = evaluate_instances(np.zeros_like(truth), truth)
    assert (m.tp, m.fn, m.ap) == (0, 3, 0.0) and math.isnan(m.precision)
    m = evaluate_instances(truth, np.zeros_like(truth))
    assert m.fp == 3 and math.isnan(m.recall) and math.isnan(m.ap)
    with pytest.raises(ValueError, match="no score"):
        evaluate_instances(truth, truth, {11: 1.0})
    with pytest.raises(ValueError, match="shape"):
        evaluate_instances(truth[:5], truth)
    with pytest.raises(ValueError, match="non-negative"):
        evaluate_instances(truth.astype(np.int32) - 1, truth)
