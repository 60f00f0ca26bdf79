"""Stitching: model outputs of one window's tiles in, the result of its core out.

One small interface with two verbs, as MONAI's mergers: :meth:`Stitcher.add` the outputs of
any number of tiles, then :meth:`Stitcher.finalize` exactly once; ``add`` after ``finalize``
raises. One implementation per output kind of :func:`workers.registry.model_kind`; the
predictor asks :func:`stitcher_factory` for the one of its model and never branches on the
kind itself. Adding a kind is one class and one entry in :data:`_STITCHERS`.

* ``"semantic"``: :class:`SemanticStitcher`. Per-class scores ``(N, K, *tile)`` are blended
  with a smooth weight map into a :class:`workers.tiles.BlendAccumulator`
  (``p[c, x] = sum_t w_t(x) p_t[c, x] / sum_t w_t(x)``), cropped to the core, and reduced to
  uint8 labels ``argmax_c p[c, x]`` (:data:`schemas.store.NODATA_CLASS` where the input is
  nodata), optionally with float16 probabilities (NaN at nodata).
* ``"instance"``: not built yet. What an instance stitcher must provide to fit here:

  - ``add(offsets, outputs)`` with ``outputs`` one detection set per tile (torchvision's dicts:
    ``boxes (M, 2 * ndim)`` in tile coordinates, ``labels (M,)``, ``scores (M,)``, ``masks
    (M, 1, *tile)`` soft masks), shifted by the tile's offset into window coordinates and kept
    per tile (no blending: masks are not averaged);
  - ``finalize()`` merging detections of overlapping tiles by mask overlap (IoU above a
    threshold: keep the higher score, or union the masks), pasting the survivors into a uint32
    id map of the window with ids local to the window (1, 2, ...; 0 = background, and a nodata
    value where the input is nodata), cropping to the core, and returning a frozen result
    with the id map of the core, per-id class and score, and the halo part of the masks
    touching the core faces (what the cross-chunk union-find of DESIGN.md "Instances" needs);
  - the same :class:`StitchWindow` to be built from, so the predictor builds it unchanged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from schemas.errors import ModelCardError
from schemas.model_card import ModelCard
from schemas.store import NODATA_CLASS
from workers.registry import model_kind
from workers.tiles import BlendAccumulator

Result = TypeVar("Result")


@dataclass(frozen=True)
class StitchWindow:
    """What a stitcher needs to know of one window, whatever the output kind.

    Attributes:
        shape: window size in px (voxels) per spatial axis, ``(H, W)`` or ``(D, H, W)``.
        core: slices of the core inside the window, one per spatial axis (None: the whole window).
        valid: ``shape`` bool, False at nodata, or None (all valid); a numpy array on the host.
        tile_weights: ``tile`` float32 blend weights shared by all tiles
            (:func:`workers.tiles.blend_weights`), or None when one tile is the whole window
            (then nothing is blended: the core is cropped from it, the U-Net overlap-tile way).
        with_probabilities: also return per-class probabilities of the core (semantic).
    """

    shape: tuple[int, ...]
    core: tuple[slice, ...] | None = None
    valid: np.ndarray | None = None
    tile_weights: torch.Tensor | np.ndarray | None = None
    with_probabilities: bool = False

    def __post_init__(self) -> None:
        if not self.shape or min(self.shape) <= 0:
            raise ValueError(f"window shape must have at least one axis, all > 0, got {self.shape}")
        if self.core is not None and len(self.core) != len(self.shape):
            raise ValueError(
                f"core {self.core} has {len(self.core)} axes but the window {self.shape} has {len(self.shape)}"
            )
        if self.valid is not None and tuple(self.valid.shape) != tuple(self.shape):
            raise ValueError(f"valid mask of shape {tuple(self.valid.shape)} does not match the window {self.shape}")

    @property
    def core_slices(self) -> tuple[slice, ...]:
        """The core's slices, ``slice(None)`` per axis when no core was given."""
        return self.core if self.core is not None else (slice(None),) * len(self.shape)


class Stitcher(ABC, Generic[Result]):
    """Accumulate the model outputs of one window's tiles, then finalize once.

    Implementations are built from a :class:`StitchWindow` (plus what their kind needs, bound
    by :func:`stitcher_factory`) and hold at most one window's worth of state.
    """

    @abstractmethod
    def add(self, offsets: Sequence[Sequence[int]], outputs: Any) -> None:
        """Add the outputs of N tiles.

        Args:
            offsets: N first voxels of the tiles, in window coordinates (from
                :func:`workers.tiles.plan_tiles`).
            outputs: the model outputs of those tiles, in the kind's form (semantic:
                ``(N, K, *tile)`` float scores).

        Raises:
            RuntimeError: after :meth:`finalize`.
        """

    @abstractmethod
    def finalize(self) -> Result:
        """The result of the window's core; the stitcher is closed afterwards.

        Raises:
            RuntimeError: if already finalized.
        """


@dataclass(frozen=True)
class SemanticResult:
    """Labels (and probabilities) of one window's core.

    Attributes:
        labels: ``core`` uint8 class ids, NODATA_CLASS (255) at nodata.
        probabilities: ``(K, *core)`` float16 probabilities, NaN at nodata; None unless asked.
    """

    labels: np.ndarray
    probabilities: np.ndarray | None


class SemanticStitcher(Stitcher[SemanticResult]):
    """Gaussian- (or flat-) weighted blending of class scores, crop to the core, argmax.

    Args:
        window: the window (shape, core, nodata mask, tile weights, whether to keep probabilities).
        num_classes: K, the class planes of every output.
        device: torch device of the blend buffers (the model's device).

    The scores added are probabilities, or logits when the window is one tile and only labels
    are wanted (the argmax is the same; the caller then skips the softmax).
    """

    def __init__(self, window: StitchWindow, *, num_classes: int, device: str | torch.device = "cpu"):
        if num_classes <= 0:
            raise ValueError(f"num_classes must be > 0, got {num_classes}")
        self.window = window
        self.num_classes = num_classes
        self.device = torch.device(device)
        self._acc = (None if window.tile_weights is None
                     else BlendAccumulator(window.shape, num_classes, device=self.device))
        self._whole: torch.Tensor | None = None
        self._closed = False

    @property
    def finalized(self) -> bool:
        """Whether :meth:`finalize` (or :meth:`finalize_scores`) has returned."""
        return self._closed

    def add(self, offsets: Sequence[Sequence[int]], outputs: torch.Tensor) -> None:
        """Add N tiles' scores.

        Args:
            offsets: N tile offsets in window coordinates.
            outputs: ``(N, K, *tile)`` float scores on any device. Without tile weights, a
                single ``(1, K, *window)`` output at offset 0 (the model took the whole window).

        Raises:
            RuntimeError: after finalize.
            ValueError: shapes or offsets that do not fit the window.
        """
        if self._closed:
            raise RuntimeError("cannot add: this SemanticStitcher was already finalized; make a new one per window")
        if self._acc is not None:
            self._acc.add_batch(offsets, outputs, self.window.tile_weights)
            return
        shape = (1, self.num_classes, *self.window.shape)
        if self._whole is not None or len(offsets) != 1 or any(int(o) for o in offsets[0]) \
                or tuple(outputs.shape) != shape:
            raise ValueError(
                f"without tile weights a window takes one output of shape {shape} at offset 0, got "
                f"{tuple(outputs.shape)} at {list(offsets)}{' after one' if self._whole is not None else ''}"
            )
        self._whole = outputs[0]

    def finalize_scores(self) -> torch.Tensor:
        """The blended scores of the whole window, ``(K, *window)`` on the device; closes the
        stitcher (for callers that want the scores themselves, e.g. ``predict_probabilities``).

        Raises:
            RuntimeError: if already finalized, or if no tile (or an uncovered voxel) was added.
        """
        if self._closed:
            raise RuntimeError(
                "cannot finalize: this SemanticStitcher was already finalized; make a new one per window"
            )
        if self._acc is not None:
            scores = self._acc.finalize()  # raises, and stays open, if a voxel got no weight
        elif self._whole is None:
            raise RuntimeError("cannot finalize: no output was added for this window")
        else:
            scores = self._whole
        self._closed = True
        self._whole = self._acc = None
        return scores

    def finalize(self) -> SemanticResult:
        """Labels (and float16 probabilities) of the core (see :class:`SemanticResult`)."""
        return finish_semantic(self.finalize_scores(), self.window)


def finish_semantic(scores: torch.Tensor, window: StitchWindow) -> SemanticResult:
    """(K, *window) scores -> labels (and float16 probabilities) of the window's core.

    ``labels[x] = argmax_c scores[c, x]`` (first on ties), NODATA_CLASS where ``window.valid``
    is False; probabilities NaN there.
    """
    core = window.core_slices
    core_probs = scores[(slice(None), *core)]
    labels = argmax_classes(core_probs)
    if window.valid is not None:
        core_valid = _mask_to_device(window.valid[core], core_probs.device)
        labels = torch.where(core_valid, labels, torch.full_like(labels, NODATA_CLASS))
        if window.with_probabilities:
            core_probs = torch.where(core_valid, core_probs, torch.full_like(core_probs, float("nan")))
    out_probs = core_probs.to(torch.float16).cpu().numpy() if window.with_probabilities else None
    return SemanticResult(labels.cpu().numpy(), out_probs)


def _mask_to_device(mask: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(mask))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def argmax_classes(probs: torch.Tensor) -> torch.Tensor:
    """(K, *spatial) scores -> spatial uint8 index of the maximum (first on ties, like torch.argmax).

    Scores in channels-last memory (the class axis innermost, stride 1: ``channels_last`` in
    2D, ``channels_last_3d`` in 3D) take the indices of torch.max over that axis (documented to
    be the first maximal index, as torch.argmax; on CPU 15 ms against torch.argmax's 22 ms for
    5 x 1024² random scores, 1 thread). Otherwise a running maximum over the K class planes:
    each step is a contiguous elementwise pass, about 10x faster on CPU than
    torch.argmax(dim=0) over a cropped (strided) NCHW view.
    """
    if probs.stride(0) == 1 and probs.shape[0] > 1:
        return torch.max(probs, dim=0).indices.to(torch.uint8)
    best = probs[0].contiguous()
    labels = torch.zeros(best.shape, dtype=torch.uint8, device=probs.device)
    for k in range(1, probs.shape[0]):
        plane = probs[k]
        better = plane > best
        best = torch.where(better, plane, best)
        labels.masked_fill_(better, k)
    return labels


StitcherFactory = Callable[[StitchWindow], Stitcher]


def _semantic(card: ModelCard, device: torch.device) -> StitcherFactory:
    return lambda window: SemanticStitcher(window, num_classes=card.num_classes, device=device)


#: Output kind -> (card, device) -> factory of that kind's stitchers.
_STITCHERS: dict[str, Callable[[ModelCard, torch.device], StitcherFactory]] = {"semantic": _semantic}


def stitcher_factory(card: ModelCard, *, device: str | torch.device = "cpu") -> StitcherFactory:
    """The stitcher factory for the output kind of the card's architecture.

    Raises:
        ModelCardError: the model's kind has no stitcher yet (instance models), naming the
            model; or an unknown architecture.
    """
    kind = model_kind(card.architecture)
    if kind not in _STITCHERS:
        raise ModelCardError(
            f"model {card.name!r} (architecture {card.architecture!r}) is an {kind} model; the predictor "
            f"stitches {', '.join(_STITCHERS)} outputs only (instance stitching is not built yet): "
            "use a semantic segmentation model"
        )
    return _STITCHERS[kind](card, torch.device(device))
