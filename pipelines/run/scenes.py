"""One scene's life in a job, on the driver: prepare (validate, fingerprint, plan once, create or
resume its store) and finish (merge partial statistics, write its tables, mark it complete).

Resumability: each finished chunk leaves `<root>/_work/<scene>/<fingerprint>/<index>.json`
(written last, atomically) beside its partial stats. A re-run with the same fingerprint computes
only chunks without a marker; a complete scene is not touched at all.

The output root may be an ``s3://bucket/prefix`` (`pipelines.writers.outroot`): the store, the
work folder's markers and partials and the tables are then objects in the bucket, written in the
same order (a marker after its chunk, the store's complete status after everything), and the
merge's scratch files (the regions spill, DuckDB's temp folder) go to a local temporary folder."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from pipelines.georef import crs_linear_unit
from pipelines.plan.chunks import chunk_grid_shape, plan_chunks
from pipelines.plan.scenes import scene_fingerprint
from pipelines.readers import SceneInfo
from pipelines.run.resolve import WORK_DIR, ResolvedJob, check_scene_fits_model, scene_slice_axis
from pipelines.run.stages import (
    SceneContext,
    done_chunk_keys,
)
from pipelines.stats.partials import ChunkRegions
from pipelines.writers.instances_table import scene_max_instance_id, write_instances
from pipelines.writers.nifti_export import export_nifti
from pipelines.writers.outroot import (
    Location,
    as_location,
    exists,
    local_copy,
    read_text,
    scratch_dir,
    upload_from,
)
from pipelines.writers.overviews import build_overviews
from pipelines.writers.quicklook import quicklook_path, write_quicklook
from pipelines.writers.regions_table import RegionsSummary, write_regions
from pipelines.writers.tables import write_table, write_table_batches
from pipelines.writers.zarr_masks import (
    create_scene_store,
    mark_complete,
    read_store_state,
    remove_store,
    scene_grid,
)
from schemas import store as layout
from schemas.errors import InputError, OutputError
from schemas.records import chunk_key
from schemas.store import Grid, VolumeGrid
from schemas.tables import CHUNK_SKIPPED_NODATA, SCHEMAS, STATUS_COMPLETE
from schemas.uris import is_uri, redact_uri
from schemas.window import ChunkWindow
from workers.registry import model_kind


@dataclass
class SceneOutcome:
    """The driver's record of one scene during a job."""

    name: str
    source: str
    context: SceneContext | None = None
    input_sha256: str | None = None
    status: str = "pending"
    error: str | None = None
    plan: tuple[ChunkWindow, ...] = ()  # the scene's chunk windows, planned once (prepare_scene)
    n_chunks: int = 0
    n_todo: int = 0
    already_complete: bool = False
    row: dict[str, Any] | None = None


def prepare_scene(job: ResolvedJob, outcome: SceneOutcome, scene_id: int, info: SceneInfo, sha: str) -> None:
    """Validate a scene, create or resume its store, and list the chunks still to compute."""
    spec = job.spec
    check_scene_fits_model(info, bands=spec.bands, card=job.card)
    slice_axis = scene_slice_axis(info, job.card)
    instances = is_instance_job(job)
    if instances and info.ndim != 2:
        raise InputError(f"{info.path}: a {info.ndim}-D volume, but model {job.card.name!r} "
                         f"({job.card.architecture}) is an instance model; instance outputs are written for "
                         "2D scenes only (use a semantic model for volumes)")
    fingerprint = scene_fingerprint(job.parameters(info.ndim), sha)
    zarr_path = job.root / f"{outcome.name}.zarr"
    work_root = job.root / WORK_DIR / outcome.name
    state = read_store_state(zarr_path)
    if state is not None and state.get(layout.KEY_FINGERPRINT) != fingerprint:
        if not spec.output.overwrite:
            raise OutputError(
                f"{zarr_path}: holds results of another job fingerprint "
                f"({str(state.get(layout.KEY_FINGERPRINT))[:12]}..., this job {fingerprint[:12]}...); "
                "use another output root, or set output.overwrite: true to replace it"
            )
        remove_store(zarr_path)
        remove_store(work_root)
        state = None
    chunk_size = job.chunk_size_for(info.ndim)
    chunk_shape = (chunk_size,) * info.ndim
    windows = tuple(plan_chunks(info.shape, chunk_size, job.halo))
    work_dir = work_root / fingerprint[:16]
    grid_shape = chunk_grid_shape(info.shape, chunk_size)
    outcome.context = SceneContext(
        scene_id=scene_id, name=outcome.name, info=info, bands=spec.bands, zarr_path=str(zarr_path),
        work_dir=str(work_dir), fingerprint=fingerprint,
        grid_shape=grid_shape, chunk_shape=chunk_shape, slice_axis=slice_axis,
        prefetch=is_uri(outcome.source) if spec.resources.prefetch is None else spec.resources.prefetch,
    )
    outcome.input_sha256 = sha
    outcome.plan = windows
    outcome.n_chunks = len(windows)
    if state is not None and state.get(layout.KEY_STATUS) == layout.STORE_STATUS_COMPLETE:
        outcome.already_complete = True
        outcome.status = STATUS_COMPLETE
        export_missing(job, outcome.name, zarr_path, scene_grid(info))  # e.g. an export asked for later
        return
    if state is None:
        grid = scene_grid(info)
        create_scene_store(
            zarr_path,
            shape=info.shape,
            chunk_shape=chunk_shape,
            grid=grid,
            class_names=job.card.class_names,
            with_probabilities=spec.output.write_probabilities,
            instances_max_id=scene_max_instance_id(grid_shape, chunk_shape) if instances else None,
            # a volume store's root image: the channels the job reads, in the reader's dtype
            image=((len(spec.bands) if spec.bands else info.count, info.dtype)
                   if isinstance(grid, layout.VolumeGrid) else None),
            provenance={
                layout.KEY_FINGERPRINT: fingerprint,
                layout.KEY_MODEL: {"name": job.card.name, "architecture": job.card.architecture,
                                   "sha256": job.card.weights_sha256,
                                   "ensemble": [{"name": c.card.name, "sha256": c.card.weights_sha256, "weight": w}
                                                for c, w in job.ensemble]},
                layout.KEY_HALO: job.halo,
                layout.KEY_SOURCE: source_attribute(info.path),
                layout.KEY_INPUT_SHA256: sha,
            },
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    done = done_chunk_keys(work_dir)
    outcome.n_todo = sum(1 for w in windows if chunk_key(w.index) not in done)
    outcome.status = "running"


def source_attribute(path: str) -> str:
    """The store's ``source`` attribute: a local input's file name, a remote input's URI (redacted:
    `schemas.uris.redact_uri`; a job spec refuses URIs with credentials, this is a second guard)."""
    return redact_uri(path) if is_uri(path) else os.path.basename(path)


def finish_scene(job: ResolvedJob, outcome: SceneOutcome, started_at: datetime, t_start: float) -> None:
    """Merge partial stats, write the scene's tables, build its overview levels and quicklook
    (`<root>/quicklooks/<scene>.png`), and mark its store complete."""
    ctx = outcome.context
    if ctx is None:
        raise OutputError(f"scene {outcome.name}: cannot finish a scene that was never prepared")
    t0 = time.perf_counter()
    work_dir = as_location(ctx.work_dir)
    windows = outcome.plan
    done = done_chunk_keys(work_dir)
    missing = [w.index for w in windows if chunk_key(w.index) not in done]
    if missing:
        raise OutputError(f"{ctx.zarr_path}: {len(missing)} chunks have no manifest marker, e.g. {list(missing[0])}")
    grid_rows: dict[int, list[tuple[int, ...]]] = {}
    for w in windows:
        grid_rows.setdefault(w.index[0], []).append(w.index)

    def parts_by_row():  # read lazily: one row of chunk partials in memory at a time
        for i in sorted(grid_rows):
            yield [read_partials(work_dir / f"{chunk_key(index)}.npz") for index in grid_rows[i]]

    grid = scene_grid(ctx.info)
    with scratch_dir(work_dir) as scratch:  # the work folder itself locally, a local temp folder for S3
        regions = write_regions(job.root, ctx.name, parts_by_row(), work_dir=scratch, grid=grid,
                                class_names=job.card.class_names)
    n_instances = None
    if is_instance_job(job):  # merge across chunk halos, relabel the store, the instances table
        n_instances = write_instances(job.root, ctx.name, zarr_path=as_location(ctx.zarr_path), work_dir=work_dir,
                                      indices=[w.index for w in windows], grid_shape=ctx.grid_shape, grid=grid,
                                      class_names=job.card.class_names).n_instances
    merge_s = time.perf_counter() - t0
    totals = dict.fromkeys(("n_chunks_skipped_nodata", "valid_pixels", "read_s", "predict_s", "write_s", "stats_s"), 0)

    def manifest_by_row():  # the chunks table a row of chunks at a time, totals on the way
        for i in sorted(grid_rows):
            rows = [json.loads(read_text(work_dir / f"{chunk_key(index)}.json")) for index in grid_rows[i]]
            for m in rows:
                totals["n_chunks_skipped_nodata"] += m["status"] == CHUNK_SKIPPED_NODATA
                for name in ("valid_pixels", "read_s", "predict_s", "write_s", "stats_s"):
                    totals[name] += m[name]
            yield pa.Table.from_pylist(rows, schema=SCHEMAS["chunks"])

    write_table_batches(job.root, "chunks", ctx.name, manifest_by_row())
    outcome.status = STATUS_COMPLETE
    outcome.row = scene_row(job, outcome, started_at, t_start) | totals | {
        "n_regions": regions.n_regions,
        "valid_pixels": int(totals["valid_pixels"]),
        **class_summary(grid, job.card.class_names, regions),
        "merge_s": merge_s,
        "n_instances": n_instances,
    }
    write_table(job.root, "scenes", ctx.name, [outcome.row])
    zarr_path = as_location(ctx.zarr_path)
    export_missing(job, ctx.name, zarr_path, grid, replace=True)
    # overview levels before the store is complete (a complete store always has them), then a quicklook
    build_overviews(zarr_path, class_colors=job.card.class_colors)
    write_quicklook(zarr_path, quicklook_path(job.root, ctx.name), info=ctx.info,
                    model_bands=job.card.quicklook_model_bands, job_bands=ctx.bands)
    mark_complete(zarr_path)  # last: the commit point of the scene (schemas.store, "Completion")


def read_partials(location: Location) -> ChunkRegions:
    """A chunk's partial statistics from the work folder (a local file, or an object read into a
    local temporary file)."""
    with local_copy(location) as path:
        return ChunkRegions.from_npz(path)


def is_instance_job(job: ResolvedJob) -> bool:
    """Whether the job's model is an instance model (`workers.registry.model_kind`, torch-free)."""
    return model_kind(job.card.architecture) == "instance"


def scene_row(job: ResolvedJob, outcome: SceneOutcome, started_at: datetime, t_start: float) -> dict[str, Any]:
    ctx = outcome.context
    info = ctx.info if ctx else None
    return {
        "scene": outcome.name,
        "source": redact_uri(outcome.source),
        "status": outcome.status,
        "error": outcome.error,
        "fingerprint": ctx.fingerprint if ctx else None,
        "input_sha256": outcome.input_sha256,
        "model_name": job.card.name,
        "model_sha256": job.card.weights_sha256,
        "shape": list(info.shape) if info else None,
        "crs": info.crs if info else None,
        "crs_linear_unit": crs_linear_unit(info.crs_wkt) if info else None,
        "pixel_area_crs2": info.pixel_area_crs2 if info else None,
        "n_chunks": outcome.n_chunks if ctx else None,
        "n_chunks_computed": outcome.n_todo if ctx else None,
        "zarr_path": f"{outcome.name}.zarr" if ctx else None,
        "started_at": started_at,
        "finished_at": datetime.now(timezone.utc),
        "wall_s": time.perf_counter() - t_start,
    }


def export_missing(job: ResolvedJob, name: str, zarr_path: Location, grid: Grid, *, replace: bool = False) -> None:
    """Write the exports the job asks for (`output.export`) that apply to this scene: `nifti` for a
    volume, `<root>/<scene>.nii.gz`; with `replace`, even where the file exists (a fresh result)."""
    out = job.root / f"{name}.nii.gz"
    if "nifti" in job.spec.output.export and isinstance(grid, VolumeGrid) and (replace or not exists(out)):
        with upload_from(out) as tmp:  # local: atomic rename; S3: one PUT
            export_nifti(zarr_path, tmp, grid=grid, gzipped=True)


def class_summary(grid: Grid, class_names: Sequence[str], regions: RegionsSummary) -> dict[str, Any]:
    """The scenes table's per-class totals: `class_areas` of a 2D scene (pixels, squared CRS units,
    m² on the ellipsoid) or `class_volumes` of a volume (voxels, mm³)."""
    per_class = enumerate(zip(class_names, regions.class_pixels, regions.class_area_m2, strict=True))
    if isinstance(grid, VolumeGrid):
        voxel_mm3 = grid.voxel_volume_mm3
        return {"class_volumes": [{"class_id": k, "class_name": name, "voxel_count": count,
                                   "volume_mm3": count * voxel_mm3} for k, (name, count, _) in per_class]}
    pixel_area = grid.pixel_area_crs2
    return {"class_areas": [{"class_id": k, "class_name": name, "pixel_count": count, "area_crs2": count * pixel_area,
                             "area_m2": area_m2} for k, (name, count, area_m2) in per_class]}
