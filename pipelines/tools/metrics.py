"""Segmentation metrics (pure numpy): confusion matrices and IoU."""

from __future__ import annotations

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
