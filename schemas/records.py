"""The records the stages of a job hand each other: small frozen values, not dicts.

    plan ──ChunkTask──> read ──ReadWindow──> predict ──Prediction──> write ──ChunkResult──> driver

The same records flow through both stage layouts (one fused actor per chunk run, or read tasks,
predictor actors and write tasks), so a typo is an AttributeError at once instead of a missing key
three processes later. Ray pickles them like dicts; their numpy arrays travel out of band.
Pure contracts: no Ray, torch or I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from schemas.instances import InstanceWindow
    from schemas.window import ChunkWindow


def chunk_key(index: tuple[int, ...]) -> str:
    """The name of a chunk's files in the work folder: ``(2, 5) -> "c2_5"``."""
    return "c" + "_".join(str(int(i)) for i in index)


@dataclass(frozen=True)
class ChunkTask:
    """One chunk to compute: the scene (its id in the job) and the chunk's halo window.

    Attributes:
        scene_id: index of the scene in the job's scene table.
        window: the chunk's :class:`schemas.window.ChunkWindow` (core, read region, padding).
    """

    scene_id: int
    window: ChunkWindow

    @property
    def key(self) -> str:
        """The chunk's work-folder key (:func:`chunk_key`)."""
        return chunk_key(self.window.index)


@dataclass(frozen=True)
class ReadWindow:
    """A chunk's window as read: what the predictor needs, and no more.

    Attributes:
        task: the chunk.
        pixels: ``(C, *window_shape)`` raw channel values (any numeric dtype); an empty array when
            the read failed or the chunk is skipped.
        valid: ``window_shape`` bool, False at nodata; empty when ``pixels`` is.
        read_s: seconds the read took.
        skip: the chunk's core is wholly nodata: nothing to predict.
        error: why the read failed (names the file and the window), "" if it did not.
        slice_axis: for a slice-wise model (card ``slices``), the spatial axis of ``pixels``
            its slices are cut across, from the scene's orientation; None otherwise.
        spacing_mm: a volume's voxel spacing per spatial axis of ``pixels`` (mm), for models
            whose card declares the spacing they take (`workers.spacing`); None for images.
    """

    task: ChunkTask
    pixels: np.ndarray
    valid: np.ndarray
    read_s: float
    skip: bool = False
    error: str = ""
    slice_axis: int | None = None
    spacing_mm: tuple[float, ...] | None = None

    @property
    def needs_prediction(self) -> bool:
        """Neither failed nor skipped."""
        return not (self.error or self.skip)

    @property
    def core_in_window(self) -> tuple[slice, ...]:
        """Slices of the chunk's core inside ``pixels``' spatial axes."""
        return self.task.window.core_in_window

    def core_intensity(self) -> np.ndarray | None:
        """The first channel's values on the core as float32 for a volume (3 spatial axes), the
        input of its regions' mean intensity; None for an image or a window without pixels."""
        if not self.needs_prediction or self.pixels.ndim != 4:
            return None
        return np.ascontiguousarray(self.pixels[(0, *self.core_in_window)], dtype=np.float32)

    def core_image(self) -> np.ndarray | None:
        """Every channel's values on the core, ``(C, *core_shape)`` in the reader's dtype, for a
        volume (3 spatial axes): what its store's root image holds; None for an image or a window
        without pixels."""
        if not self.needs_prediction or self.pixels.ndim != 4:
            return None
        return np.ascontiguousarray(self.pixels[(slice(None), *self.core_in_window)])


@dataclass(frozen=True)
class Prediction:
    """A chunk's model output, cropped to its core; pixels of the window are gone.

    Attributes:
        task: the chunk.
        labels: ``core_shape`` uint8 class ids (255 at nodata); None when skipped or failed.
        probabilities: ``(K, *core_shape)`` float16 (NaN at nodata) when the job writes them, else None.
        read_s: seconds the read took.
        predict_s: seconds of the predictor's work for this chunk (a batch's time shared equally).
        skip: the chunk's core is wholly nodata (nothing was predicted).
        error: why reading or predicting failed, "" if nothing did.
        intensity: ``core_shape`` float32 input values of the first channel on the core, for the
            region statistics' mean intensity (volumes: HU of a CT); None for images.
        instances: an instance model's objects of the window, else None.
        image: ``(C, *core_shape)`` input values of every channel on the core in the reader's
            dtype (`ReadWindow.core_image`), written to a volume store's root image; None for
            images, and when skipped or failed.
    """

    task: ChunkTask
    labels: np.ndarray | None
    probabilities: np.ndarray | None
    read_s: float
    predict_s: float
    skip: bool = False
    error: str = ""
    intensity: np.ndarray | None = None
    instances: InstanceWindow | None = None
    image: np.ndarray | None = None

    @classmethod
    def passed_on(cls, read: ReadWindow, *, error: str = "") -> Prediction:
        """The prediction of a window that was not predicted: skipped, failed to read, or
        failed in the predictor with `error`."""
        return cls(task=read.task, labels=None, probabilities=None, read_s=read.read_s, predict_s=0.0,
                   skip=read.skip, error=error or read.error)


@dataclass(frozen=True)
class ChunkResult:
    """What comes back to the driver for one chunk (no pixels).

    Attributes:
        scene_id: the chunk's scene.
        key: the chunk's key (:func:`chunk_key`); "" when the chunk could not be identified.
        error: why the chunk failed (names the scene's file), "" if it was written.
    """

    scene_id: int
    key: str
    error: str = ""
