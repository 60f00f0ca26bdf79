"""The per-chunk stages that run in Ray tasks: read a window, write a chunk, open a scene.

Kept apart from `pipelines.job` so that the task workers import rasterio, zarr and numpy but not
torch (the predictor actors are the only processes that need it): smaller worker processes.
Every function here is plain Python, testable without Ray.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.readers.geotiff import SceneInfo, open_scene, read_window
from pipelines.regions import chunk_regions, region_id_offset
from pipelines.tiling import ChunkWindow
from pipelines.writers.zarr_masks import write_chunk
from schemas import store as layout
from schemas.errors import InputError
from schemas.tables import CHUNK_SKIPPED_NODATA, CHUNK_WRITTEN
from workers.hashing import file_sha256


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


def chunk_key(index: tuple[int, ...]) -> str:
    return "c" + "_".join(str(i) for i in index)


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def done_chunk_keys(work_dir: Path) -> set[str]:
    """Keys of chunks whose manifest marker exists (the marker is written last)."""
    if not work_dir.is_dir():
        return set()
    return {p.stem for p in work_dir.glob("c*.json")}


def window_from_row(row: dict[str, Any]) -> ChunkWindow:
    index = tuple(int(i) for i in row["index"])
    core = tuple(slice(int(a), int(b)) for a, b in row["core"])
    read = tuple(slice(int(a), int(b)) for a, b in row["read"])
    pad = tuple((int(a), int(b)) for a, b in row["pad"])
    return ChunkWindow(index=index, core=core, read=read, pad=pad)


def plan_row(scene_id: int, w: ChunkWindow) -> dict[str, Any]:
    return {
        "scene_id": scene_id,
        "index": np.asarray(w.index, dtype=np.int64),
        "core": np.asarray([(s.start, s.stop) for s in w.core], dtype=np.int64),
        "read": np.asarray([(s.start, s.stop) for s in w.read], dtype=np.int64),
        "pad": np.asarray(w.pad, dtype=np.int64),
    }


def read_stage(row: dict[str, Any], *, scenes: dict[int, SceneContext]) -> dict[str, Any]:
    """A chunk plan row -> + pixels (C, H, W), valid (H, W), skip, error, read_s (a fused actor,
    or a split read task)."""
    ctx = scenes[int(row["scene_id"])]
    window = window_from_row(row)
    t0 = time.perf_counter()
    out = dict(row)
    out["core_in_window"] = np.asarray([(s.start, s.stop) for s in window.core_in_window], dtype=np.int64)
    try:
        pixels, valid = read_window(ctx.info, window, bands=ctx.bands)
    except InputError as exc:
        out.update(pixels=np.zeros((0, 0, 0), np.uint8), valid=np.zeros((0, 0), bool),
                   skip=False, error=str(exc), read_s=time.perf_counter() - t0)
        return out
    skip = not bool(valid[window.core_in_window].any())
    if skip:  # wholly nodata: nothing to predict or send on
        pixels, valid = np.zeros((0, 0, 0), pixels.dtype), np.zeros((0, 0), bool)
    out.update(pixels=pixels, valid=valid, skip=skip, error="", read_s=time.perf_counter() - t0)
    return out


def write_stage(row: dict[str, Any], *, scenes: dict[int, SceneContext]) -> dict[str, Any]:
    """Write the chunk (idempotent: a retry rewrites the same bytes), its partial stats, then its
    manifest marker (a fused actor, or a split write task).

    Returns a small record (no pixels) for the driver.
    """
    ctx = scenes[int(row["scene_id"])]
    window = window_from_row(row)
    key = chunk_key(window.index)
    record = {"scene_id": ctx.scene_id, "key": key, "error": str(row["error"])}
    if record["error"]:
        if ctx.info.path not in record["error"]:  # e.g. a prediction error from a split-stage actor
            record["error"] = f"{ctx.info.path}: {record['error']}"
        return record
    try:
        t0 = time.perf_counter()
        if row["skip"]:
            labels = np.full(window.core_shape, layout.NODATA_CLASS, dtype=np.uint8)
        else:
            labels = np.asarray(row["labels"], dtype=np.uint8).reshape(window.core_shape)
            probs = row.get("probabilities")
            write_chunk(Path(ctx.zarr_path), window.core, labels,
                        probabilities=None if probs is None or np.size(probs) == 0 else np.asarray(probs))
        t1 = time.perf_counter()
        parts = chunk_regions(
            labels,
            chunk_index=window.index,
            origin=tuple(s.start for s in window.core),
            id_offset=region_id_offset(window.index, ctx.grid_shape, ctx.chunk_shape),
            nodata=layout.NODATA_CLASS,
        )
        work = Path(ctx.work_dir)
        parts.to_npz(work / f"{key}.npz")
        t2 = time.perf_counter()
        manifest_row = {
            "scene": ctx.name,
            "chunk_index": [int(i) for i in window.index],
            "origin": [int(s.start) for s in window.core],
            "shape": [int(n) for n in window.core_shape],
            "status": CHUNK_SKIPPED_NODATA if row["skip"] else CHUNK_WRITTEN,
            "valid_pixels": int((labels != layout.NODATA_CLASS).sum()),
            "n_regions_partial": int(len(parts.ids)),
            "read_s": float(row["read_s"]),
            "predict_s": float(row["predict_s"]),
            "write_s": t1 - t0,
            "stats_s": t2 - t1,
            "fingerprint": ctx.fingerprint,
        }
        atomic_write_text(work / f"{key}.json", json.dumps(manifest_row))
    except (OSError, ValueError) as exc:
        record["error"] = f"{ctx.info.path}: writing chunk {list(window.index)} failed: {exc}"
    return record


def open_and_hash(path: str) -> tuple[SceneInfo | None, str | None, str | None]:
    """(info, sha256, error) of one input; errors are returned, not raised (one scene fails alone)."""
    try:
        info = open_scene(path)
        return info, file_sha256(Path(path)), None
    except InputError as exc:
        return None, None, str(exc)
    except OSError as exc:
        return None, None, f"{path}: {exc}"
