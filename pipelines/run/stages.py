"""The per-chunk stages that run in Ray tasks: read a window, write a chunk, open a scene.

They take and return the records of `schemas.records` (ChunkTask -> ReadWindow; Prediction ->
ChunkResult).

Kept apart from `pipelines.run.job` so that the task workers import rasterio, zarr and numpy but not
torch (the predictor actors are the only processes that need it): smaller worker processes.
Every function here is plain Python, testable without Ray.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.georef import scene_row_areas_m2
from pipelines.readers import InputPolicy, SceneInfo, open_scene, read_window
from pipelines.readers.remote import remote_input_sha256
from pipelines.readers.stac import stac_input_sha256
from pipelines.stats.instances import instance_chunk
from pipelines.stats.partials import chunk_regions, region_id_offset
from pipelines.writers.outroot import Location, as_location, list_names, write_file, write_text
from pipelines.writers.zarr_masks import write_chunk, write_instance_chunk
from schemas import store as layout
from schemas.errors import InputError, OutputError
from schemas.instances import instances_file
from schemas.records import ChunkResult, ChunkTask, Prediction, ReadWindow
from schemas.tables import CHUNK_SKIPPED_NODATA, CHUNK_WRITTEN
from schemas.uris import is_uri
from workers.hashing import input_sha256


@dataclass(frozen=True)
class SceneContext:
    """What the read and write stages need to know about one scene (small, picklable)."""

    scene_id: int
    name: str
    info: SceneInfo
    bands: tuple[int, ...] | None
    zarr_path: str
    work_dir: str
    fingerprint: str
    grid_shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    slice_axis: int | None = None  # a slice-wise model's slice axis in this scene (resolve.scene_slice_axis)
    prefetch: bool = False  # fused actors read this scene's next window while predicting (resources.prefetch)


def done_chunk_keys(work_dir: Location | str) -> set[str]:
    """Keys of chunks whose manifest marker exists (the marker is written last); one listing of
    the work folder, local or on S3."""
    return {name[: -len(".json")] for name in list_names(as_location(work_dir))
            if name.startswith("c") and name.endswith(".json")}


_NO_PIXELS = np.zeros((0,), np.uint8)
_NO_MASK = np.zeros((0,), bool)


def read_stage(task: ChunkTask, *, scenes: dict[int, SceneContext]) -> ReadWindow:
    """Read a chunk's window through its scene's reader (a fused actor, or a split read task).

    A failed read is the record's error (it names the file and the window); a window whose core
    is wholly nodata is skipped and sends no pixels on.
    """
    ctx = scenes[task.scene_id]
    window = task.window
    t0 = time.perf_counter()
    try:
        pixels, valid = read_window(ctx.info, window, bands=ctx.bands)
    except InputError as exc:
        return ReadWindow(task=task, pixels=_NO_PIXELS, valid=_NO_MASK, read_s=time.perf_counter() - t0,
                          error=str(exc))
    if not bool(valid[window.core_in_window].any()):  # wholly nodata: nothing to predict or send on
        return ReadWindow(task=task, pixels=_NO_PIXELS, valid=_NO_MASK, read_s=time.perf_counter() - t0, skip=True)
    return ReadWindow(task=task, pixels=pixels, valid=valid, read_s=time.perf_counter() - t0,
                      slice_axis=ctx.slice_axis, spacing_mm=ctx.info.spacing if ctx.info.ndim == 3 else None)


def chunk_row_areas_m2(info: SceneInfo, core: tuple[slice, ...]) -> np.ndarray | None:
    """m² of one pixel per row of a chunk core of a 2D scene with a CRS (cached per chunk row,
    at the scene's centre column: see ``scene_row_areas_m2``); None for volumes or without a CRS."""
    if len(core) != 2 or info.transform is None or not info.crs_wkt:
        return None
    rows = core[0]
    return scene_row_areas_m2(tuple(info.transform), info.crs_wkt, row0=rows.start, n_rows=rows.stop - rows.start,
                              width=info.shape[-1])


def write_stage(prediction: Prediction, *, scenes: dict[int, SceneContext]) -> ChunkResult:
    """Write the chunk (idempotent: a retry rewrites the same bytes), its partial stats, then its
    manifest marker (a fused actor, or a split write task). A volume's chunk also writes the core
    of its input (`Prediction.image`) to the store's root image; a skipped chunk writes nothing,
    so its classes and image read as their fill values.

    With instances (`prediction.instances`, an instance model): the core's provisional ids
    (`id_offset + local`, `schemas.instances`) go to the store's `instances` array, and the
    window's ids with the objects' core partials to `<key>.instances.npz` for the driver's
    merge, both before the marker.

    Returns a small record (no pixels) for the driver.
    """
    task = prediction.task
    ctx = scenes[task.scene_id]
    window = task.window
    key = task.key
    if prediction.error:
        error = prediction.error
        if ctx.info.path not in error:  # e.g. a prediction error from a split-stage actor
            error = f"{ctx.info.path}: {error}"
        return ChunkResult(scene_id=ctx.scene_id, key=key, error=error)
    try:
        t0 = time.perf_counter()
        if prediction.skip:
            labels = np.full(window.core_shape, layout.NODATA_CLASS, dtype=np.uint8)
        else:
            labels = np.asarray(prediction.labels, dtype=np.uint8).reshape(window.core_shape)
            probs = prediction.probabilities
            image = prediction.image
            if len(window.core) == 3 and image is None:  # a volume store's root image needs the input
                raise OutputError(f"chunk {list(window.index)}: its prediction carries no input image "
                                  "(Prediction.image) for the volume store")
            write_chunk(as_location(ctx.zarr_path), window.core, labels,
                        probabilities=None if probs is None or np.size(probs) == 0 else np.asarray(probs),
                        image=image)
        t1 = time.perf_counter()
        parts = chunk_regions(
            labels,
            chunk_index=window.index,
            origin=tuple(s.start for s in window.core),
            id_offset=region_id_offset(window.index, ctx.grid_shape, ctx.chunk_shape),
            nodata=layout.NODATA_CLASS,
            pixel_area_m2_by_row=chunk_row_areas_m2(ctx.info, window.core),
            values=prediction.intensity,
        )
        work = as_location(ctx.work_dir)
        if prediction.instances is not None and not prediction.skip:
            write_instances(prediction, ctx, work)
        write_file(work / f"{key}.npz", parts.to_npz)
        t2 = time.perf_counter()
        manifest_row = {
            "scene": ctx.name,
            "chunk_index": [int(i) for i in window.index],
            "origin": [int(s.start) for s in window.core],
            "shape": [int(n) for n in window.core_shape],
            "status": CHUNK_SKIPPED_NODATA if prediction.skip else CHUNK_WRITTEN,
            "valid_pixels": int((labels != layout.NODATA_CLASS).sum()),
            "n_regions_partial": int(len(parts.ids)),
            "read_s": float(prediction.read_s),
            "predict_s": float(prediction.predict_s),
            "write_s": t1 - t0,
            "stats_s": t2 - t1,
            "fingerprint": ctx.fingerprint,
        }
        write_text(work / f"{key}.json", json.dumps(manifest_row))  # last: the chunk is done
    except (OSError, ValueError, OutputError) as exc:
        return ChunkResult(scene_id=ctx.scene_id, key=key,
                           error=f"{ctx.info.path}: writing chunk {list(window.index)} failed: {exc}")
    return ChunkResult(scene_id=ctx.scene_id, key=key)


def write_instances(prediction: Prediction, ctx: SceneContext, work: Location) -> None:
    """The instance part of `write_stage`: the core's provisional ids to the store, the chunk's
    :class:`~pipelines.stats.instances.InstanceChunk` to the work folder (idempotent: the same
    prediction writes the same bytes and the same file)."""
    window = prediction.task.window
    chunk = instance_chunk(
        prediction.instances,
        chunk_index=window.index,
        window_origin=window.window_origin,
        core_origin=window.core_origin,
        core_shape=window.core_shape,
        chunk_shape=ctx.chunk_shape,
        id_offset=region_id_offset(window.index, ctx.grid_shape, ctx.chunk_shape),
        pixel_area_m2_by_row=chunk_row_areas_m2(ctx.info, window.core),
    )
    write_instance_chunk(as_location(ctx.zarr_path), window.core, chunk.provisional_core())
    write_file(work / instances_file(prediction.task.key), chunk.to_npz)


def open_and_hash(path: str, policy: InputPolicy = InputPolicy()) -> tuple[SceneInfo | None, str | None, str | None]:
    """(info, sha256, error) of one input; errors are returned, not raised (one scene fails alone).

    The checksum of a local input is that of its bytes (`workers.hashing.input_sha256`); a remote
    one cannot be hashed without downloading it, so its identity stands in: the SHA-256 of its URI,
    ETag, Last-Modified and size (`pipelines.readers.remote.remote_input_sha256`), for a Zarr store
    of the listing of every object under its prefix, for a DICOM series in S3 of the listing of
    the objects directly under its prefix (what its reader downloads); a STAC item's, that of its
    JSON and its assets (`pipelines.readers.stac.stac_input_sha256`).
    """
    try:
        info = open_scene(path, policy=policy)
        if info.format == "stac":
            return info, stac_input_sha256(path, policy.assets), None
        if is_uri(path):
            return info, remote_input_sha256(path, is_store=info.format in ("zarr", "dicom"),
                                             recursive=info.format != "dicom"), None
        return info, input_sha256(Path(path)), None
    except InputError as exc:
        return None, None, str(exc)
    except OSError as exc:
        return None, None, f"{path}: {exc}"
