"""A thin shell over the plain Predictor for the actors of both stage layouts
(`pipelines.fused.FusedChunkActor`, `pipelines.split.SplitPredictActor`).

The model loads once per actor in __init__; `predict_rows_isolated` maps read rows to core
labels, whole windows batched into forward passes where they fit (Predictor.predict_cores).
Rows that carry an error (a failed read) pass through untouched so one bad scene never stops
the stream.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from workers.options import PredictorOptions


class PredictorActor:
    """Read rows {"pixels", "valid", "core_in_window", "error", "skip", ...} -> labels, seconds."""

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
        """(labels, probabilities or an empty array, seconds) of one read row."""
        if row["error"] or row["skip"]:
            return _EMPTY_LABELS, _EMPTY_PROBS, 0.0
        t0 = time.perf_counter()
        lab, prob = self.predictor.predict_core(row["pixels"], row["valid"], core=_core(row),
                                                with_probabilities=self.with_probabilities)
        prob = prob if prob is not None else _EMPTY_PROBS
        return lab, prob, time.perf_counter() - t0

    def windows_per_pass(self, row: dict) -> int:
        """How many rows shaped like `row` one forward pass takes (Predictor.windows_per_pass)."""
        if row["error"] or row["skip"]:
            return 1
        return self.predictor.windows_per_pass(tuple(row["pixels"].shape[1:]))

    def predict_rows(self, rows: list[dict]) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """predict_row of each row, whole windows batched into forward passes where they fit
        (Predictor.predict_cores); seconds are the batch's, shared equally by its rows.

        Raises what a window's prediction raises; callers that must isolate a bad window
        retry the rows one by one with predict_row.
        """
        todo = [i for i, row in enumerate(rows) if not (row["error"] or row["skip"])]
        out = [(_EMPTY_LABELS, _EMPTY_PROBS, 0.0)] * len(rows)
        if not todo:
            return out
        t0 = time.perf_counter()
        results = self.predictor.predict_cores(
            [(rows[i]["pixels"], rows[i]["valid"], _core(rows[i])) for i in todo],
            with_probabilities=self.with_probabilities)
        seconds = (time.perf_counter() - t0) / len(todo)
        for i, (lab, prob) in zip(todo, results):
            out[i] = (lab, prob if prob is not None else _EMPTY_PROBS, seconds)
        return out

    def predict_rows_isolated(self, rows: list[dict]) -> list[tuple[np.ndarray, np.ndarray, float, str]]:
        """predict_rows, and where the batch raises, each row alone: a window the model cannot
        take fails alone. Returns (labels, probabilities, seconds, error) per row ("" if fine)."""
        try:
            return [(*r, "") for r in self.predict_rows(rows)]
        except (RuntimeError, ValueError):
            pass
        out = []
        for row in rows:
            try:
                out.append((*self.predict_row(row), ""))
            except (RuntimeError, ValueError) as exc:  # e.g. a window the model cannot take
                out.append((_EMPTY_LABELS, _EMPTY_PROBS, 0.0, f"predicting it failed: {exc}"))
        return out


_EMPTY_LABELS = np.zeros((0, 0), dtype=np.uint8)
_EMPTY_PROBS = np.zeros((0, 0, 0), dtype=np.float16)


def _core(row: dict) -> tuple[slice, ...]:
    return tuple(slice(int(a), int(b)) for a, b in row["core_in_window"])
