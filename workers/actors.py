"""Thin Ray shells over the plain Predictor (Ray Data callable classes).

The model loads once per actor in __init__; __call__ maps a batch of windows to core labels.
Rows that carry an error (a failed read) pass through untouched so one bad scene never stops
the stream.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from workers.options import PredictorOptions


class PredictorActor:
    """Ray Data callable: {"pixels", "valid", "core", ...} rows -> + {"labels", "predict_s"}."""

    def __init__(self, card_path: str, options: PredictorOptions, *, weight: float = 1.0,
                 ensemble: tuple[tuple[str, float], ...] = (), with_probabilities: bool = False):
        # torch is imported here, in the actor, not where the driver imports this class
        from workers.checkpoints import build_from_checkpoint, load_checkpoint
        from workers.predictor import Member, Predictor

        ckpt = load_checkpoint(Path(card_path))
        members = []
        for member_path, member_weight in ensemble:
            extra = load_checkpoint(Path(member_path))
            members.append(Member(build_from_checkpoint(extra), extra.card, member_weight))
        self.predictor = Predictor(build_from_checkpoint(ckpt), ckpt.card, options=options, weight=weight,
                                   extra_members=tuple(members))
        self.with_probabilities = with_probabilities

    def predict_row(self, row: dict) -> tuple[np.ndarray, np.ndarray, float]:
        """(labels, probabilities or an empty array, seconds) of one read row (see __call__)."""
        if row["error"] or row["skip"]:
            return np.zeros((0, 0), dtype=np.uint8), np.zeros((0, 0, 0), dtype=np.float16), 0.0
        t0 = time.perf_counter()
        core = tuple(slice(int(a), int(b)) for a, b in row["core_in_window"])
        lab, prob = self.predictor.predict_core(row["pixels"], row["valid"], core=core,
                                                with_probabilities=self.with_probabilities)
        prob = prob if prob is not None else np.zeros((0, 0, 0), dtype=np.float16)
        return lab, prob, time.perf_counter() - t0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["error"])
        labels, probs, seconds = [], [], np.zeros(n, dtype=np.float64)
        for i in range(n):
            lab, prob, seconds[i] = self.predict_row({k: batch[k][i] for k in
                                                      ("error", "skip", "core_in_window", "pixels", "valid")})
            labels.append(lab)
            probs.append(prob)
        out = {k: v for k, v in batch.items() if k not in ("pixels", "valid")}
        out["labels"] = _object_column(labels)
        if self.with_probabilities:
            out["probabilities"] = _object_column(probs)
        out["predict_s"] = seconds
        return out


def _object_column(arrays: list[np.ndarray]) -> np.ndarray:
    """A 1-D object array holding arrays of varying shapes (Ray Data's ragged tensor column)."""
    column = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        column[i] = a
    return column
