"""Segmentation metrics (pure numpy): confusion matrices and IoU; instance matching, precision,
recall, mask AP and split / duplicate / merge counts."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from schemas.store import NODATA_CLASS


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, *, num_classes: int, ignore: int = NODATA_CLASS) -> np.ndarray:
    """(K, K) int64 counts, rows = truth, cols = prediction; pixels where either is `ignore` skip.

    Raises:
        ValueError: shapes differ, or a label outside 0..K-1 (other than `ignore`) appears.
    """
    if truth.shape != pred.shape:
        raise ValueError(f"truth shape {truth.shape} != prediction shape {pred.shape}")
    keep = (truth != ignore) & (pred != ignore)
    t = truth[keep].astype(np.int64)
    p = pred[keep].astype(np.int64)
    if t.size and (t.max() >= num_classes or p.max() >= num_classes):
        raise ValueError(f"labels must be < num_classes={num_classes}, got max truth {t.max()}, pred {p.max()}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """IoU_k = TP / (TP + FP + FN) per class; NaN for classes absent from truth and prediction."""
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(axis=0) + cm.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / denom, np.nan)


def mean_iou(cm: np.ndarray) -> float:
    """Mean IoU over classes present in truth or prediction."""
    return float(np.nanmean(iou_per_class(cm)))


# =========================================================================================
# instances
# =========================================================================================

INSTANCE_IOU_THRESHOLD = 0.5
FRAGMENT_OWN_FRACTION = 0.5
"""A prediction is a fragment of a true object when MORE than this share of its pixels lie in it."""
FRAGMENT_MIN_COVERAGE = 0.1
"""... and it covers at least this share of the true object's pixels (specks do not split)."""


@dataclass(frozen=True)
class InstanceOverlaps:
    """Areas of true and predicted instances and their pairwise intersections (px), sparse.

    Attributes:
        true_ids: ``(T,)`` uint64 sorted true ids (0 excluded).
        true_areas: ``(T,)`` int64 pixels of each.
        pred_ids: ``(P,)`` uint64 sorted predicted ids (0 excluded).
        pred_areas: ``(P,)`` int64 pixels of each.
        pair_true: ``(K,)`` int64 index into ``true_ids`` of each overlapping pair.
        pair_pred: ``(K,)`` int64 index into ``pred_ids``.
        pair_pixels: ``(K,)`` int64 pixels the pair shares (> 0).
    """

    true_ids: np.ndarray
    true_areas: np.ndarray
    pred_ids: np.ndarray
    pred_areas: np.ndarray
    pair_true: np.ndarray
    pair_pred: np.ndarray
    pair_pixels: np.ndarray

    def iou(self) -> np.ndarray:
        """``(K,)`` float64 IoU of each pair: ``|t & p| / (|t| + |p| - |t & p|)``."""
        union = self.true_areas[self.pair_true] + self.pred_areas[self.pair_pred] - self.pair_pixels
        return self.pair_pixels / union


class OverlapAccumulator:
    """Builds :class:`InstanceOverlaps` block by block: memory bounded by the number of distinct
    ids and overlapping pairs, never by the scene's pixels.

    ``add(true_block, pred_block)`` counts one block of a true and a predicted label image
    (same shape, 0 = nothing). Predictions that overlap one another (masks before any
    label-image painting, e.g. boxes kept by NMS) can be counted too: give them as several
    predicted label images with disjoint id sets over the same truth, the first with ``add``,
    the others with ``add_predictions`` (which does not count the true areas again).
    """

    def __init__(self) -> None:
        self._true: list[tuple[np.ndarray, np.ndarray]] = []
        self._pred: list[tuple[np.ndarray, np.ndarray]] = []
        self._pairs: list[tuple[np.ndarray, np.ndarray]] = []
        self._finalized = False

    def add(self, true_block: np.ndarray, pred_block: np.ndarray) -> None:
        """Count a block: true areas, predicted areas and intersections."""
        self._check(true_block, pred_block)
        self._true.append(_counts(np.asarray(true_block).ravel()))
        self.add_predictions(true_block, pred_block)

    def add_predictions(self, true_block: np.ndarray, pred_block: np.ndarray) -> None:
        """Count predicted areas and intersections only (a further layer of overlapping predictions)."""
        self._check(true_block, pred_block)
        t = np.asarray(true_block).ravel().astype(np.uint64)
        p = np.asarray(pred_block).ravel().astype(np.uint64)
        self._pred.append(_counts(p))
        both = (t > 0) & (p > 0)
        if both.any():
            keys = np.stack([t[both], p[both]], axis=1)
            uniq, counts = np.unique(keys, axis=0, return_counts=True)
            self._pairs.append((uniq, counts.astype(np.int64)))
        self._compact()

    def finalize(self) -> InstanceOverlaps:
        """The overlaps of everything added; the accumulator refuses further blocks."""
        self._finalized = True
        true_ids, true_areas = _merge_counts(self._true)
        pred_ids, pred_areas = _merge_counts(self._pred)
        if self._pairs:
            keys = np.concatenate([k for k, _ in self._pairs])
            counts = np.concatenate([c for _, c in self._pairs])
            uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
            pixels = np.bincount(inverse.ravel(), weights=counts, minlength=len(uniq)).astype(np.int64)
        else:
            uniq, pixels = np.zeros((0, 2), np.uint64), np.zeros(0, np.int64)
        return InstanceOverlaps(
            true_ids=true_ids, true_areas=true_areas, pred_ids=pred_ids, pred_areas=pred_areas,
            pair_true=np.searchsorted(true_ids, uniq[:, 0]).astype(np.int64),
            pair_pred=np.searchsorted(pred_ids, uniq[:, 1]).astype(np.int64),
            pair_pixels=pixels,
        )

    def _check(self, true_block: np.ndarray, pred_block: np.ndarray) -> None:
        if self._finalized:
            raise RuntimeError("OverlapAccumulator is finalized; make a new one")
        if np.shape(true_block) != np.shape(pred_block):
            raise ValueError(f"true block shape {np.shape(true_block)} != predicted block shape {np.shape(pred_block)}")
        for name, block in (("true", true_block), ("predicted", pred_block)):
            dtype = np.asarray(block).dtype
            if dtype.kind not in "ui" or (dtype.kind == "i" and np.asarray(block).min(initial=0) < 0):
                raise ValueError(f"{name} labels must be non-negative integers, got dtype {dtype}")

    def _compact(self) -> None:
        """Merge the per-block tables once they pile up (bounded memory over many blocks)."""
        if len(self._pred) >= 64:
            self._true = [_merge_counts(self._true)] if self._true else []
            self._pred = [_merge_counts(self._pred)]
            if self._pairs:
                keys = np.concatenate([k for k, _ in self._pairs])
                counts = np.concatenate([c for _, c in self._pairs])
                uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
                self._pairs = [(uniq, np.bincount(inverse.ravel(), weights=counts).astype(np.int64))]


def _counts(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids, counts = np.unique(labels.astype(np.uint64), return_counts=True)
    keep = ids > 0
    return ids[keep], counts[keep].astype(np.int64)


def _merge_counts(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    ids = np.concatenate([i for i, _ in parts])
    counts = np.concatenate([c for _, c in parts])
    uniq, inverse = np.unique(ids, return_inverse=True)
    return uniq, np.bincount(inverse, weights=counts, minlength=len(uniq)).astype(np.int64)


def instance_overlaps(true_labels: np.ndarray, pred_labels: np.ndarray, *, block_rows: int = 1024) -> InstanceOverlaps:
    """:class:`InstanceOverlaps` of two label images (0 = nothing), counted ``block_rows`` rows
    at a time (works on numpy arrays and on lazily read arrays such as zarr ones)."""
    if np.shape(true_labels) != np.shape(pred_labels):
        raise ValueError(f"truth shape {np.shape(true_labels)} != prediction shape {np.shape(pred_labels)}")
    acc = OverlapAccumulator()
    for r in range(0, max(1, np.shape(true_labels)[0]), block_rows):
        acc.add(np.asarray(true_labels[r:r + block_rows]), np.asarray(pred_labels[r:r + block_rows]))
    return acc.finalize()


@dataclass(frozen=True)
class InstanceMetrics:
    """Instance detection and segmentation quality of predictions against truth.

    Matching (COCO-style, greedy): predictions in decreasing score (ties: smaller id first) each
    take the still unmatched true object of highest mask IoU, if that IoU >= ``iou_threshold``.
    A matched prediction is a true positive (TP), an unmatched one a false positive (FP), an
    unmatched true object a false negative (FN).

    Attributes:
        n_true: true objects T.
        n_pred: predicted objects P.
        tp: matched pairs.
        fp: ``P - tp``.
        fn: ``T - tp``.
        precision: ``tp / P`` (NaN when P = 0).
        recall: ``tp / T`` (NaN when T = 0).
        f1: ``2 tp / (P + T)``.
        ap: mask average precision at ``iou_threshold``: the area under the precision-recall
            curve of the score-sorted predictions with all-point interpolation (Pascal VOC
            2010+; COCO samples the same envelope at 101 recall points, which differs by < 1/101):
            ``AP = sum_i (r_i - r_{i-1}) * max_{j >= i} p_j`` over the ranked predictions
            (NaN when T = 0). Predictions without scores all count 1.0, which ranks them by id.
        mean_matched_iou: mean IoU of the matched pairs (NaN without any).
        split_objects: true objects with >= 2 *fragments* and fewer than 2 predictions at IoU
            >= the threshold. A fragment of true object t is a prediction with more than
            :data:`FRAGMENT_OWN_FRACTION` of its pixels in t that covers at least
            :data:`FRAGMENT_MIN_COVERAGE` of t's pixels (an object cut in two by a chunk border
            and never re-joined).
        duplicated_objects: true objects with >= 2 predictions at IoU >= the threshold (only
            possible where predictions overlap each other: two masks of one object that box NMS
            kept).
        duplicate_predictions: predictions beyond the first at IoU >= the threshold with a true
            object (each is also a FP).
        merged_predictions: predictions holding more than half the pixels of >= 2 true objects
            each (touching buildings found as one).
        iou_threshold: the matching threshold.
    """

    n_true: int
    n_pred: int
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    ap: float
    mean_matched_iou: float
    split_objects: int
    duplicated_objects: int
    duplicate_predictions: int
    merged_predictions: int
    iou_threshold: float = INSTANCE_IOU_THRESHOLD

    @property
    def count_error_per_1000(self) -> float:
        """``1000 (P - T) / T``: signed count error per 1,000 true objects (NaN when T = 0)."""
        return 1000.0 * (self.n_pred - self.n_true) / self.n_true if self.n_true else math.nan

    @property
    def split_per_1000(self) -> float:
        """Split objects per 1,000 true objects."""
        return 1000.0 * self.split_objects / self.n_true if self.n_true else math.nan

    @property
    def duplicated_per_1000(self) -> float:
        """Duplicated objects per 1,000 true objects."""
        return 1000.0 * self.duplicated_objects / self.n_true if self.n_true else math.nan

    def as_dict(self) -> dict[str, float | int]:
        """Every field and the per-1,000 rates, for reports and JSON."""
        out: dict[str, float | int] = {f: getattr(self, f) for f in self.__dataclass_fields__}
        out.update(count_error_per_1000=self.count_error_per_1000, split_per_1000=self.split_per_1000,
                   duplicated_per_1000=self.duplicated_per_1000)
        return out


def score_instances(
    overlaps: InstanceOverlaps, scores: Mapping[int, float] | None = None, *,
    iou_threshold: float = INSTANCE_IOU_THRESHOLD,
) -> InstanceMetrics:
    """:class:`InstanceMetrics` from an overlap table (see there for every definition).

    Args:
        overlaps: from :func:`instance_overlaps` or an :class:`OverlapAccumulator`.
        scores: predicted id -> confidence; None: every prediction scores 1.0.
        iou_threshold: matching threshold in (0, 1].

    Raises:
        ValueError: a predicted id without a score, or a threshold outside (0, 1].
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    o = overlaps
    n_true, n_pred = len(o.true_ids), len(o.pred_ids)
    if scores is None:
        score = np.ones(n_pred)
    else:
        missing = [int(i) for i in o.pred_ids if int(i) not in scores]
        if missing:
            raise ValueError(f"{len(missing)} predicted ids have no score, e.g. {missing[:5]}")
        score = np.array([float(scores[int(i)]) for i in o.pred_ids], np.float64)
    iou = o.iou()

    # greedy matching by score, COCO-style
    order = np.lexsort((o.pred_ids, -score))  # decreasing score, then increasing id
    good = iou >= iou_threshold
    by_pred: dict[int, list[tuple[float, int]]] = {}
    for k in np.flatnonzero(good):
        by_pred.setdefault(int(o.pair_pred[k]), []).append((float(iou[k]), int(o.pair_true[k])))
    true_taken = np.zeros(n_true, bool)
    is_tp = np.zeros(n_pred, bool)
    matched_iou = []
    for p in order:
        best = None
        for value, t in sorted(by_pred.get(int(p), ()), key=lambda c: (-c[0], c[1])):
            if not true_taken[t]:
                best = (value, t)
                break
        if best is not None:
            true_taken[best[1]] = True
            is_tp[p] = True
            matched_iou.append(best[0])
    tp = int(is_tp.sum())

    # AP: precision-recall over the ranked predictions, all-point interpolation
    if n_true == 0:
        ap = math.nan
    elif n_pred == 0:
        ap = 0.0
    else:
        hits = is_tp[order].astype(np.float64)
        ctp = np.cumsum(hits)
        precision_at = ctp / np.arange(1, n_pred + 1)
        recall_at = ctp / n_true
        envelope = np.maximum.accumulate(precision_at[::-1])[::-1]
        steps = np.diff(np.concatenate([[0.0], recall_at]))
        ap = float(np.sum(steps * envelope))

    # duplicates, splits, merges
    good_per_true = np.bincount(o.pair_true[good], minlength=n_true)
    duplicated = good_per_true >= 2
    own = o.pair_pixels > FRAGMENT_OWN_FRACTION * o.pred_areas[o.pair_pred]
    covers = o.pair_pixels >= FRAGMENT_MIN_COVERAGE * o.true_areas[o.pair_true]
    fragments = np.bincount(o.pair_true[own & covers], minlength=n_true)
    split = (fragments >= 2) & ~duplicated
    most_of_true = o.pair_pixels > 0.5 * o.true_areas[o.pair_true]
    merged = np.bincount(o.pair_pred[most_of_true], minlength=n_pred) >= 2

    return InstanceMetrics(
        n_true=n_true, n_pred=n_pred, tp=tp, fp=n_pred - tp, fn=n_true - tp,
        precision=tp / n_pred if n_pred else math.nan,
        recall=tp / n_true if n_true else math.nan,
        f1=2.0 * tp / (n_pred + n_true) if (n_pred + n_true) else math.nan,
        ap=ap,
        mean_matched_iou=float(np.mean(matched_iou)) if matched_iou else math.nan,
        split_objects=int(split.sum()),
        duplicated_objects=int(duplicated.sum()),
        duplicate_predictions=int(np.maximum(good_per_true - 1, 0).sum()),
        merged_predictions=int(merged.sum()),
        iou_threshold=float(iou_threshold),
    )


def evaluate_instances(
    pred_labels: np.ndarray, true_labels: np.ndarray, scores: Mapping[int, float] | None = None, *,
    iou_threshold: float = INSTANCE_IOU_THRESHOLD, block_rows: int = 1024,
) -> InstanceMetrics:
    """Instance metrics of a predicted label image against a true one (e.g. a job's stitched
    ``instances`` array against the generator's truth).

    Args:
        pred_labels: ``(H, W)`` (or ``(D, H, W)``) non-negative integer predicted ids, 0 = none;
            numpy or any array sliceable by rows (zarr), read ``block_rows`` rows at a time.
        true_labels: same shape, true ids, 0 = background.
        scores: predicted id -> confidence for the AP ranking; None: all 1.0.
        iou_threshold: mask IoU a match needs.
        block_rows: rows read at a time (bounds memory).

    Returns:
        :class:`InstanceMetrics`.
    """
    return score_instances(instance_overlaps(true_labels, pred_labels, block_rows=block_rows), scores,
                           iou_threshold=iou_threshold)
