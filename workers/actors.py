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

import numpy as np

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
        image = read.core_image()  # a copy taken before the predictor sees the pixels
        t0 = time.perf_counter()
        pixels, valid, core = slice_axis_first(read)
        spacing = self._resample_spacing(read)
        instances = None
        if spacing is None:
            result = self.predictor.predict_result(pixels, valid, core=core,
                                                   with_probabilities=self.with_probabilities)
            labels, probs, instances = result.labels, result.probabilities, result.instances
        elif self.predictor.kind == "instance":
            raise ValueError(f"model {self.predictor.card.name!r} is an instance model: it runs at the scene's "
                             f"spacing, not resampled to the card's spacing_mm {list(self.predictor.card.spacing_mm)} "
                             "(drop spacing_mm from the card)")
        else:  # the card's spacing differs from the scene's: predict at the card's (workers.spacing)
            from workers.spacing import predict_core_resampled

            labels, probs = predict_core_resampled(self.predictor, pixels, valid, core, scene_spacing=spacing[0],
                                                   target_spacing=spacing[1],
                                                   with_probabilities=self.with_probabilities)
        labels, probs = slice_axis_back(read, labels, probs)
        return Prediction(task=read.task, labels=labels, probabilities=probs, read_s=read.read_s,
                          predict_s=time.perf_counter() - t0, intensity=read.core_intensity(), instances=instances,
                          image=image)

    def predict_batch(self, reads: list[ReadWindow]) -> list[Prediction]:
        """`predict_one` of each window, whole windows batched into forward passes where they fit
        (Predictor.predict_results); seconds are the batch's, shared equally by its windows.

        Raises what a window's prediction raises; `predict_windows` isolates a bad window.
        """
        out = [Prediction.passed_on(r) for r in reads]
        todo = []
        for i, read in enumerate(reads):
            if read.needs_prediction and self._resample_spacing(read) is not None:
                out[i] = self.predict_one(read)  # resampled one by one, each to its own shape
            elif read.needs_prediction:
                todo.append(i)
        if not todo:
            return out
        images = {i: reads[i].core_image() for i in todo}  # copies taken before the predictor sees the pixels
        t0 = time.perf_counter()
        results = self.predictor.predict_results([slice_axis_first(reads[i]) for i in todo],
                                                 with_probabilities=self.with_probabilities)
        seconds = (time.perf_counter() - t0) / len(todo)
        for i, result in zip(todo, results):
            labels, probs = slice_axis_back(reads[i], result.labels, result.probabilities)
            out[i] = Prediction(task=reads[i].task, labels=labels, probabilities=probs, read_s=reads[i].read_s,
                                predict_s=seconds, intensity=reads[i].core_intensity(), instances=result.instances,
                                image=images[i])
        return out

    def _resample_spacing(self, read: ReadWindow) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """(window spacing, model spacing) in mm per axis of the window as the predictor sees it
        (`slice_axis_first`), when the card's spacing_mm differs from the scene's
        (`workers.spacing.model_spacing`); None when the window runs at its own spacing."""
        if read.spacing_mm is None or self.predictor.card.spacing_mm is None:
            return None
        from workers.spacing import model_spacing

        spacing = tuple(read.spacing_mm)
        if read.slice_axis:
            spacing = tuple(spacing[a] for a in _slice_first_order(len(spacing), read.slice_axis))
        target = model_spacing(self.predictor.card, spacing, slice_axis=0)
        return None if target is None else (spacing, target)

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


def _slice_first_order(ndim: int, axis: int) -> tuple[int, ...]:
    """Spatial axes with `axis` first, the others in their order: ``(2, 0, 1)`` for axis 2 of 3."""
    return (axis, *(a for a in range(ndim) if a != axis))


def slice_axis_first(read: ReadWindow) -> tuple[np.ndarray, np.ndarray | None, tuple[slice, ...]]:
    """(pixels, valid, core) of a window with its slice axis (``read.slice_axis``, a slice-wise
    model's) moved to the first spatial axis, where `workers.models.slicewise.SliceWise` (as
    `workers.checkpoints.build_from_checkpoint` builds it) cuts slices; the other spatial axes keep
    their order (views, no copy). The window itself when it has no slice axis or it is first."""
    axis = read.slice_axis
    core = read.core_in_window
    if not axis:
        return read.pixels, read.valid, core
    order = _slice_first_order(len(core), axis)
    pixels = read.pixels.transpose(0, *(1 + a for a in order))
    valid = None if read.valid is None else read.valid.transpose(order)
    return pixels, valid, tuple(core[a] for a in order)


def slice_axis_back(read: ReadWindow, labels: np.ndarray,
                    probs: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels (core) and probabilities (K, core) of a window predicted by `slice_axis_first`'s
    order, back in the window's own axis order (C-contiguous)."""
    axis = read.slice_axis
    if not axis:
        return labels, probs
    inverse = tuple(np.argsort(_slice_first_order(labels.ndim, axis)))
    labels = np.ascontiguousarray(labels.transpose(inverse))
    if probs is not None:
        probs = np.ascontiguousarray(probs.transpose(0, *(1 + a for a in inverse)))
    return labels, probs
