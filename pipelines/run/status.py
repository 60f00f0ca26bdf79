"""Where the scenes of an output root stand, read from what a job leaves there.

Complete or failed scenes have their row in `tables/scenes`; a scene being computed (or whose job
was interrupted) has a store marked `partial` and one manifest marker per finished chunk in its
work folder (`<root>/_work/<scene>/<fingerprint[:16]>/c*.json`). Nothing here needs Ray: this
works for a job running on a cluster whose output root is mounted here, or for one that stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from pipelines.run.resolve import WORK_DIR
from pipelines.run.stages import done_chunk_keys
from pipelines.writers.zarr_masks import read_store_state
from schemas import store as layout
from schemas.errors import OutputError
from schemas.tables import STATUS_COMPLETE, STATUS_FAILED

STATUS_PARTIAL = "partial"  # chunks being written, or the job stopped before the scene completed


@dataclass(frozen=True)
class SceneStatus:
    """One scene of an output root.

    Attributes:
        name: the scene's output name.
        status: "complete", "failed", or "partial" (running, or interrupted: a re-run resumes it).
        chunks_done: chunks with a manifest marker (all of them for a complete scene).
        chunks_total: chunks of the scene's grid (None when the scene failed before planning).
        error: why it failed ("" otherwise).
    """

    name: str
    status: str
    chunks_done: int
    chunks_total: int | None
    error: str = ""


def _grid_chunks(store: Path, state: dict) -> int | None:
    """Chunks of a store's grid: product over axes of ceil(shape / chunk)."""
    import zarr

    chunk = state.get(layout.KEY_CHUNK_SHAPE)
    try:
        shape = zarr.open_array(str(store), path=layout.classes_path(len(chunk or ())), mode="r").shape
    except (FileNotFoundError, KeyError, ValueError):
        return None
    if not chunk or len(chunk) != len(shape):
        return None
    return math.prod(-(-s // c) for s, c in zip(shape, chunk))


def read_root_status(root: Path) -> list[SceneStatus]:
    """Every scene of an output root, by name.

    Raises:
        OutputError: `root` is not a folder.
    """
    if not root.is_dir():
        raise OutputError(f"{root}: no such output root")
    rows: dict[str, dict] = {}
    scenes_dir = root / "tables" / "scenes"
    if scenes_dir.is_dir():
        for path in sorted(scenes_dir.glob("*.parquet")):
            row = pq.read_table(path, columns=["scene", "status", "error", "n_chunks"]).to_pylist()
            if row:
                rows[path.stem] = row[0]
    stores = {p.name[: -len(".zarr")]: p for p in root.glob("*.zarr") if p.is_dir()}
    out = []
    for name in sorted(set(rows) | set(stores)):
        row = rows.get(name, {})
        state = read_store_state(stores[name]) if name in stores else None
        total = _grid_chunks(stores[name], state) if state is not None else row.get("n_chunks")
        if state is not None and state.get(layout.KEY_STATUS) == layout.STORE_STATUS_COMPLETE:
            out.append(SceneStatus(name, STATUS_COMPLETE, total or 0, total))
            continue
        done = 0
        if state is not None and state.get(layout.KEY_FINGERPRINT):
            done = len(done_chunk_keys(root / WORK_DIR / name / str(state[layout.KEY_FINGERPRINT])[:16]))
        if row.get("status") == STATUS_FAILED:
            out.append(SceneStatus(name, STATUS_FAILED, done, total, row.get("error") or ""))
        else:
            out.append(SceneStatus(name, STATUS_PARTIAL, done, total))
    return out
