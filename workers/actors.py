"""Thin Ray shells over the plain Predictor (Ray Data callable classes).

The model loads once per actor in __init__; __call__ maps a batch of windows to core labels.
Rows that carry an error (a failed read) pass through untouched so one bad scene never stops
the stream.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from workers.checkpoints import build_from_checkpoint, load_checkpoint
from workers.predictor import Predictor, PredictorOptions


class PredictorActor:
    """Ray Data callable: {"pixels", "valid", "core", ...} rows -> + {"labels", "predict_s"}."""

    def __init__(self, card_path: str, options: PredictorOptions):
        ckpt = load_checkpoint(Path(card_path))
        self.predictor = Predictor(build_from_checkpoint(ckpt), ckpt.card, options=options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["error"])
        labels, seconds = [], np.zeros(n, dtype=np.float64)
        for i in range(n):
            if batch["error"][i] or batch["skip"][i]:
                labels.append(np.zeros((0, 0), dtype=np.uint8))
                continue
            t0 = time.perf_counter()
            core = tuple(slice(int(a), int(b)) for a, b in batch["core_in_window"][i])
            labels.append(self.predictor.predict_labels(batch["pixels"][i], batch["valid"][i], core=core))
            seconds[i] = time.perf_counter() - t0
        out = {k: v for k, v in batch.items() if k not in ("pixels", "valid")}
        out["labels"] = _object_column(labels)
        out["predict_s"] = seconds
        return out


def _object_column(arrays: list[np.ndarray]) -> np.ndarray:
    """A 1-D object array holding arrays of varying shapes (Ray Data's ragged tensor column)."""
    column = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        column[i] = a
    return column
