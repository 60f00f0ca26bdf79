"""Instance outputs: the contract between the predictor (one window's objects), the chunk writer
and the cross-chunk merge on the driver. Pure numpy; no torch, Ray or I/O.

How an object cut by chunk borders becomes one instance (DESIGN.md, "Instances"):

1. The predictor labels the objects of a whole halo window (core and halo), ids local to the
   window (1, 2, ...; 0 = background or nodata): an :class:`InstanceWindow`. An object cut by
   the core border is seen whole where it fits in the halo.
2. The writer gives each local id a provisional scene id, ``id_offset + local`` with
   ``id_offset = pipelines.stats.partials.region_id_offset(chunk_index, grid, chunk_shape)``
   (disjoint across chunks, no packing limit), writes the core of the provisional id map to the
   store's :data:`INSTANCES` array, and keeps the window's ids in the work folder
   (:func:`instances_file`) for the merge.
3. On the driver, for each pair of neighbouring chunks A, B (faces, edges and corners), the
   pixels R = A's window ∩ B's core are labelled twice: by A (its halo view) and by B (its core
   view). Objects matched there by mask overlap of the same pixels (never by boxes) are one
   instance; the matches feed a union-find over provisional ids, one per scene. Only ids present
   in their own chunk's core take part (an object A sees only in its halo belongs to others).
4. Every set's final id is its smallest provisional id, so a chunk whose ids are all roots is
   never rewritten; the relabel table (provisional -> final, only the ids that change) is
   applied to the chunks that hold such ids. Applying it twice changes nothing (idempotent).

Each output pixel is owned by exactly one chunk core, hence by exactly one instance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INSTANCES = "instances"  # store array beside `classes`: (y, x) or (z, y, x), 0 = no instance
INSTANCE_BACKGROUND = 0
INSTANCES_FILE_SUFFIX = ".instances.npz"  # <work_dir>/<chunk key>.instances.npz


def instances_dtype(max_id: int) -> str:
    """The store dtype for provisional ids up to `max_id`: uint32 where they fit, else uint64."""
    if max_id < 0:
        raise ValueError(f"max_id must be >= 0, got {max_id}")
    return "uint32" if max_id < 2**32 else "uint64"


def instances_file(key: str) -> str:
    """The work-folder file name of a chunk's instance ids: ``"c2_5" -> "c2_5.instances.npz"``."""
    return f"{key}{INSTANCES_FILE_SUFFIX}"


@dataclass(frozen=True)
class InstanceWindow:
    """The objects one window holds, as the predictor's instance stitcher returns them.

    Attributes:
        ids: window-shaped (``(H, W)`` or ``(D, H, W)``) uint32 local ids, 0 = background or
            nodata; each pixel belongs to at most one object (overlapping masks are resolved
            in the window by score: the higher-scoring object keeps the pixel).
        class_id: ``(n,)`` uint8 class of local id ``i + 1`` (the card's class ids; 0 is the
            background class of a Mask R-CNN card and never an object's class).
        score: ``(n,)`` float32 confidence of local id ``i + 1`` in [0, 1] (1.0 for models
            without scores, e.g. a label-image plugin).
        band_sums: ``(n, C)`` float64 sums of the input channels over the object's pixels
            *in the core* (the per-band means of the instances table), or None.
        core_pixels: ``(n,)`` int64 pixels of each object in the core (0 for halo-only objects).
    """

    ids: np.ndarray
    class_id: np.ndarray
    score: np.ndarray
    core_pixels: np.ndarray
    band_sums: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.ids, np.ndarray) or self.ids.dtype != np.uint32 or self.ids.ndim not in (2, 3):
            raise ValueError("InstanceWindow.ids must be a 2-D or 3-D uint32 array")
        n = len(self.class_id)
        for name, dtype in (("class_id", np.uint8), ("score", np.float32), ("core_pixels", np.int64)):
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or value.dtype != dtype or value.shape != (n,):
                raise ValueError(f"InstanceWindow.{name} must be a ({n},) {np.dtype(dtype).name} array")
        if self.band_sums is not None and (self.band_sums.dtype != np.float64 or self.band_sums.ndim != 2
                                           or self.band_sums.shape[0] != n):
            raise ValueError(f"InstanceWindow.band_sums must be a ({n}, C) float64 array or None")

    @property
    def count(self) -> int:
        """Objects in the window (local ids 1..count)."""
        return len(self.class_id)


@dataclass(frozen=True)
class LabelImage:
    """One tile's objects as an id image: what an instance plugin may return instead of
    torchvision's detection dict.

    Attributes:
        ids: tile-shaped integer ids, 0 = background; any positive ids (they need not be
            consecutive: each distinct id is one object).
        classes: class of id ``k`` at ``classes[k - 1]`` (``ids.max()`` entries), or None
            (every object class 1).
        scores: confidence of id ``k`` at ``scores[k - 1]`` in [0, 1], or None (1.0).
    """

    ids: np.ndarray
    classes: np.ndarray | None = None
    scores: np.ndarray | None = None
