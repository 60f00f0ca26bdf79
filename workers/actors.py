"""A thin shell over the plain Predictor for the actors of both stage layouts
(`pipelines.run.fused.FusedChunkActor`, `pipelines.run.split.SplitPredictActor`).

The model loads once per actor in __init__; `predict_windows` maps read windows
(`schemas.records.ReadWindow`) to predictions of their cores (`schemas.records.Prediction`;
an instance model's also carry the window's objects, `Prediction.instances`), whole windows
batched into forward passes where they fit (Predictor.predict_results). Windows that failed
to read or are wholly nodata pass through untouched, and a window the model cannot take fails
alone, so one bad scene never stops the stream.
"""

from __future__ import annotations

import time
from pathlib import Path

from schemas.records import Prediction, ReadWindow
from workers.options import PredictorOptions


class PredictorActor:
    """ReadWindow records in, Prediction records out (see the module docstring)."""

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

    def windows_per_pass(self, read: ReadWindow) -> int:
        """How many windows shaped like `read` one forward pass takes (Predictor.windows_per_pass)."""
        if not read.needs_prediction:
            return 1
        return self.predictor.windows_per_pass(tuple(read.pixels.shape[1:]))

    def predict_one(self, read: ReadWindow) -> Prediction:
        """The prediction of one window (passed on untouched when it needs none)."""
        if not read.needs_prediction:
            return Prediction.passed_on(read)
        t0 = time.perf_counter()
        result = self.predictor.predict_result(read.pixels, read.valid, core=read.core_in_window,
                                               with_probabilities=self.with_probabilities)
        return Prediction(task=read.task, labels=result.labels, probabilities=result.probabilities,
                          read_s=read.read_s, predict_s=time.perf_counter() - t0, intensity=read.core_intensity(),
                          instances=result.instances)

    def predict_batch(self, reads: list[ReadWindow]) -> list[Prediction]:
        """`predict_one` of each window, whole windows batched into forward passes where they fit
        (Predictor.predict_results); seconds are the batch's, shared equally by its windows.

        Raises what a window's prediction raises; `predict_windows` isolates a bad window.
        """
        todo = [i for i, r in enumerate(reads) if r.needs_prediction]
        out = [Prediction.passed_on(r) for r in reads]
        if not todo:
            return out
        t0 = time.perf_counter()
        results = self.predictor.predict_results(
            [(reads[i].pixels, reads[i].valid, reads[i].core_in_window) for i in todo],
            with_probabilities=self.with_probabilities)
        seconds = (time.perf_counter() - t0) / len(todo)
        for i, result in zip(todo, results):
            out[i] = Prediction(task=reads[i].task, labels=result.labels, probabilities=result.probabilities,
                                read_s=reads[i].read_s, predict_s=seconds, intensity=reads[i].core_intensity(),
                                instances=result.instances)
        return out

    def predict_windows(self, reads: list[ReadWindow]) -> list[Prediction]:
        """`predict_batch`, and where the batch raises, each window alone: a window the model
        cannot take fails alone, with the error in its Prediction."""
        try:
            return self.predict_batch(reads)
        except (RuntimeError, ValueError):
            pass
        out = []
        for read in reads:
            try:
                out.append(self.predict_one(read))
            except (RuntimeError, ValueError) as exc:  # e.g. a window the model cannot take
                out.append(Prediction.passed_on(
                    read, error=f"chunk {list(read.task.window.index)}: predicting it failed: {exc}"))
        return out
