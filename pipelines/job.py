"""The Ray wiring of a job: plan -> read -> predict -> write chunk + partial stats -> merge.

Everything Ray lives here. The stream runs over the chunk plans of every scene: read windows
-> predictor actors (GPU/CPU, model loaded once per actor) -> write each chunk to Zarr
(idempotent: a retry rewrites the same bytes) with its partial region statistics and a manifest
marker. On CPU one fused actor per core does all three for its chunks (`pipelines.fused`); on
GPUs read and write tasks run beside the predictor actors (`pipelines.split`). The driver holds
plans and small records, never pixels; it merges partial statistics per scene.

Resumability: each finished chunk leaves `<root>/_work/<scene>/<fingerprint>/<index>.json`
(written last, atomically) beside its partial stats. A re-run with the same fingerprint computes
only chunks without a marker; a complete scene is not touched at all.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipelines.georef import crs_linear_unit
from pipelines.stages import (
    SceneContext,
    done_chunk_keys,
    open_and_hash,
)
from pipelines.readers import InputPolicy, SceneInfo, scene_name
from pipelines.stats.partials import ChunkRegions
from pipelines.tiling import ChunkWindow, chunk_grid_shape, plan_chunks, stripe_order
from pipelines.writers.atomic import atomic_write_text
from pipelines.writers.regions_table import write_regions
from pipelines.writers.tables import write_table, write_table_batches
from pipelines.writers.zarr_masks import (
    create_scene_store,
    mark_complete,
    read_store_state,
    remove_store,
)
from schemas import store as layout
from schemas.errors import InputError, JobSpecError, ModelCardError, OutputError, TesseraError
from schemas.job import JobSpec, default_batch_size
from schemas.model_card import ModelCard
from schemas.records import ChunkResult, ChunkTask, chunk_key
from schemas.tables import CHUNK_SKIPPED_NODATA, SCHEMAS, STATUS_COMPLETE, STATUS_FAILED
from workers.checkpoints import Checkpoint, load_checkpoint, resolve_card_path
from workers.options import PredictorOptions
from workers.registry import check_plugin_allowed, model_kind
from workers.runtime import GLIBC_TUNABLES, actor_env, process_env, with_malloc_tunables

log = logging.getLogger("tessera")

# Bump when the meaning of output bytes changes for the same inputs and parameters.
OUTPUT_FORMAT_VERSION = 1
WORK_DIR = "_work"
READ_STRIPE_CHUNKS = 4  # chunks per read stripe (pipelines.tiling.stripe_order)
FUSED_BATCH = READ_STRIPE_CHUNKS  # consecutive chunks per fused-actor call (one stripe row)
READ_BLOCK_CHUNKS = 2 * READ_STRIPE_CHUNKS  # split stages: consecutive chunks per read task (two stripe rows)


@dataclass(frozen=True)
class ResolvedJob:
    """A job spec with its model loaded and every default filled in."""

    spec: JobSpec
    root: Path
    checkpoint: Checkpoint
    ensemble: tuple[tuple[Checkpoint, float], ...]
    chunk_size: int
    halo: int
    predictor_options: PredictorOptions
    num_gpus_per_actor: float = 0.0
    actors: int = 1  # resources.actors, or the cluster's default (place_on_cluster)

    @property
    def card(self) -> ModelCard:
        return self.checkpoint.card

    def parameters(self) -> dict[str, Any]:
        """Everything that changes output bytes, except the input itself."""
        o = self.predictor_options
        return {
            "format": OUTPUT_FORMAT_VERSION,
            "model_sha256": self.card.weights_sha256,
            "model_name": self.card.name,
            "model_weight": self.spec.model.weight,
            "ensemble": [[c.card.weights_sha256, w] for c, w in self.ensemble],
            "tta": list(o.tta),
            "scales": list(o.scales),
            "write_probabilities": self.spec.output.write_probabilities,
            "bands": list(self.spec.bands) if self.spec.bands else None,
            # only when set: jobs without complex inputs keep the fingerprints they had
            **({"complex_bands": self.spec.complex_bands} if self.spec.complex_bands != "refuse" else {}),
            "chunk_size": self.chunk_size,
            "halo": self.halo,
            "tile_size": o.tile_size,
            "tile_overlap": o.tile_overlap,
            "blend": o.blend,
            "precision": o.precision,
            "channels_last": o.channels_last,
            "fold_batchnorm": o.fold_batchnorm,
            # GPU autocast changes output bytes: CPU and GPU results never share a fingerprint.
            "device_type": "cuda" if o.device.startswith("cuda") else "cpu",
        }


@dataclass
class SceneOutcome:
    """The driver's record of one scene during a job."""

    name: str
    source: str
    context: SceneContext | None = None
    input_sha256: str | None = None
    status: str = "pending"
    error: str | None = None
    plan: tuple[ChunkWindow, ...] = ()  # the scene's chunk windows, planned once (_prepare_scene)
    n_chunks: int = 0
    n_todo: int = 0
    already_complete: bool = False
    row: dict[str, Any] | None = None


@dataclass(frozen=True)
class JobResult:
    """What a job did: one outcome per scene, the output root and the wall time."""

    root: Path
    scenes: tuple[SceneOutcome, ...]
    wall_s: float
    model_name: str
    phases: dict[str, float] = field(default_factory=dict)
    """Driver wall seconds: setup_s (model, Ray, spec), open_s (open and hash the scenes, plan),
    first_chunk_s and chunks_s (from the start of the chunk stream to its first and last chunk
    record), finish_s (merge statistics, tables). The actors start during open_s. With split
    stages also split_reads_in_flight, split_calls_in_flight, split_writes_in_flight: tasks
    in flight per stage on average over the stream (counts, not seconds)."""

    @property
    def failed(self) -> tuple[SceneOutcome, ...]:
        return tuple(s for s in self.scenes if s.status == STATUS_FAILED)


# ----------------------------------------------------------------------------- resolving


def resolve_job(spec: JobSpec, *, base_dir: Path) -> ResolvedJob:
    """Load and check the model, fill defaults from its card. Fails before any actor starts.

    Raises:
        ModelCardError: missing or invalid card/weights, or a job setting the card rejects.
    """
    card_path = resolve_card_path(spec.model.card, base_dir=base_dir)
    checkpoint = load_checkpoint(card_path)
    card = checkpoint.card
    check_plugin_allowed(card.architecture, where=str(card_path))
    if model_kind(card.architecture) != "semantic":
        raise ModelCardError(
            f"{card_path}: {card.architecture!r} is an instance model; this pipeline runs semantic "
            "segmentation models only (instance stitching is not built yet)"
        )
    if spec.model.architecture is not None and spec.model.architecture != card.architecture:
        raise ModelCardError(
            f"{card_path}: job asks for architecture {spec.model.architecture!r} "
            f"but the card is {card.architecture!r}"
        )
    if spec.bands is not None and len(spec.bands) != card.in_channels:
        raise ModelCardError(
            f"job bands {list(spec.bands)} give {len(spec.bands)} channels, model {card.name!r} "
            f"({card_path}) expects {card.in_channels}"
        )
    ensemble = []
    for member in spec.model.ensemble:
        extra = load_checkpoint(resolve_card_path(member.card, base_dir=base_dir))
        check_plugin_allowed(extra.card.architecture, where=str(extra.card_path))
        if extra.card.class_names != card.class_names or extra.card.in_channels != card.in_channels:
            raise ModelCardError(
                f"{extra.card_path}: ensemble member has classes {list(extra.card.class_names)} and "
                f"{extra.card.in_channels} bands; {card_path} has {list(card.class_names)} and "
                f"{card.in_channels} (ensemble members must agree)"
            )
        ensemble.append((extra, member.weight))
    tiling = spec.tiling
    tile_size = tiling.tile_size if tiling.tile_size is not None else card.tile_size
    options = PredictorOptions(
        device="cuda" if (spec.resources.num_gpus_per_actor or 0) > 0 else "cpu",
        precision=spec.inference.precision,
        batch_size=spec.resources.batch_size or default_batch_size(
            "cuda" if (spec.resources.num_gpus_per_actor or 0) > 0 else "cpu"),
        tile_size=tile_size,
        tile_overlap=tiling.tile_overlap,
        blend=tiling.blend,
        torch_threads=spec.resources.torch_threads or max(1, int(spec.resources.cpus_per_actor)),
        tta=spec.inference.tta,
        scales=spec.inference.scales,
        channels_last=spec.inference.channels_last,
        fold_batchnorm=spec.inference.fold_batchnorm,
    )
    root = Path(spec.output.root).expanduser()
    if not root.is_absolute():
        root = base_dir / root
    return ResolvedJob(
        spec=spec,
        root=root.resolve(),
        checkpoint=checkpoint,
        ensemble=tuple(ensemble),
        chunk_size=tiling.chunk_size,
        halo=tiling.halo if tiling.halo is not None else card.halo,
        predictor_options=options,
        num_gpus_per_actor=spec.resources.num_gpus_per_actor or 0.0,
    )


ACTOR_MEMORY_BYTES = 1.5 * 2**30
"""Memory budgeted per predictor actor when choosing their number (measured on CPU: about 1 GB
PSS for the bundled U-Net on 1088-px tiles: torch alone is about 0.5 GB)."""


def place_on_cluster(job: ResolvedJob, cluster: dict[str, float]) -> ResolvedJob:
    """Fill the defaults that depend on the cluster's resources.

    GPU: 1 GPU per actor when the cluster has GPUs (else CPU). Actors (unless set): one per GPU;
    on CPU one per CPU (cpus_per_actor each, 0.5 CPU left for the split pipeline's tasks), at
    most one per ACTOR_MEMORY_BYTES of the cluster's memory, at least 1.
    """
    res = job.spec.resources
    gpus = cluster.get("GPU", 0.0)
    if res.num_gpus_per_actor is None and gpus > 0:
        batch = res.batch_size or default_batch_size("cuda")
        job = replace(job, num_gpus_per_actor=1.0,
                      predictor_options=replace(job.predictor_options, device="cuda", batch_size=batch))
    if res.actors is not None:
        return replace(job, actors=res.actors)
    if job.num_gpus_per_actor > 0:
        actors = int(gpus // job.num_gpus_per_actor)
    else:
        tasks = 0.0 if fused_stages(job) else 0.5
        actors = int((cluster.get("CPU", 1.0) - tasks) // res.cpus_per_actor)
        if cluster.get("memory"):
            actors = min(actors, int(cluster["memory"] // ACTOR_MEMORY_BYTES))
    return replace(job, actors=max(1, actors))


def fused_stages(job: ResolvedJob) -> bool:
    """Whether the actors read and write their chunks themselves (resources.stages)."""
    stages = job.spec.resources.stages
    return stages == "fused" or (stages == "auto" and job.num_gpus_per_actor <= 0)


def cluster_fit_problem(job: ResolvedJob, cluster: dict[str, float]) -> str | None:
    """Why the actor pool cannot start on `cluster` (Ray would wait forever), or None.

    The actors take actors x cpus_per_actor CPUs (and GPUs) for the whole job; the read and write
    tasks need 0.5 CPU besides.
    """
    res = job.spec.resources
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    tasks = 0.0 if fused_stages(job) else 0.5
    need_cpu = job.actors * res.cpus_per_actor + tasks
    if need_cpu > cpus:
        besides = f" plus {tasks:g} CPU for the read and write tasks" if tasks else ""
        return (f"resources: {job.actors} actor(s) x {res.cpus_per_actor} CPU{besides} need {need_cpu:g} CPUs, "
                f"the Ray cluster has {cpus:g}; lower resources.actors or resources.cpus_per_actor")
    need_gpu = job.actors * job.num_gpus_per_actor
    if need_gpu > gpus:
        return (f"resources: {job.actors} actor(s) x {job.num_gpus_per_actor:g} GPU need {need_gpu:g} GPUs, "
                f"the Ray cluster has {gpus:g}; lower resources.actors or resources.num_gpus_per_actor")
    return None


def expand_inputs(patterns: tuple[str, ...], *, base_dir: Path) -> tuple[list[str], list[str]]:
    """Expand paths/globs (relative ones against base_dir).

    Returns:
        (paths, unmatched): sorted unique existing paths, and patterns that matched nothing.
    """
    paths: set[str] = set()
    unmatched: list[str] = []
    for pattern in patterns:
        full = pattern if os.path.isabs(os.path.expanduser(pattern)) else str(base_dir / pattern)
        full = os.path.expanduser(full)
        if glob.has_magic(full):
            found = [p for p in glob.glob(full, recursive=True) if os.path.isfile(p)]
        else:
            found = [full] if os.path.exists(full) else []
        if not found:
            unmatched.append(pattern)
        paths.update(os.path.normpath(p) for p in found)
    return sorted(paths), unmatched


def assign_scene_names(paths: list[str]) -> list[str]:
    """Safe, unique scene names in input order (a repeated stem gets '-2', '-3', ...)."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        base = scene_name(path)
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def scene_fingerprint(parameters: dict[str, Any], input_sha256: str) -> str:
    """SHA-256 of the job parameters that change output bytes and the input's checksum."""
    payload = json.dumps({**parameters, "input_sha256": input_sha256}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def input_policy(spec: JobSpec) -> InputPolicy:
    """The readers' input policy of a job (complex bands)."""
    return InputPolicy(complex_bands=spec.complex_bands)


def check_scene_fits_model(info: SceneInfo, *, bands: tuple[int, ...] | None, card: ModelCard) -> None:
    """Raise InputError (naming the file and the fix) when a scene cannot feed the model."""
    if bands is not None:
        bad = [b for b in bands if b > info.count]
        if bad:
            raise InputError(f"{info.path}: has {info.count} bands, job asks for bands {bad}")
    elif info.count != card.in_channels:
        hint = list(range(1, card.in_channels + 1))
        raise InputError(
            f"{info.path}: {info.count} bands, model {card.name!r} expects {card.in_channels} "
            f"(set bands: {hint} in the job spec to choose them)"
        )
    if info.transform[1] != 0 or info.transform[3] != 0:
        log.warning("%s: rotated/sheared geotransform; x/y coordinates in the store are approximate, "
                    "GeoTransform is exact", info.path)


# ----------------------------------------------------------------------------- driver


_local_ray: tuple[str, dict[str, str]] | None = None
"""(GCS address, the environment its worker processes inherit) of the local Ray this process
started (ensure_ray), so that actors needing no other environment get no runtime env."""


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None,
               worker_env: Mapping[str, str] | None = None) -> None:
    """Connect to Ray (an address, RAY_ADDRESS, or a new local instance) unless connected.

    A new local instance starts with `worker_env` in its processes' environment (Ray's daemons
    and every worker inherit it): with the predictor actors' malloc tunables there, the actors
    need no runtime environment of their own and start 0.3-0.5 s sooner (a per-actor runtime
    environment goes through Ray's runtime-env agent; measured on the 2-core development VM,
    two actors ready in 2.4-2.7 s against 2.7-3.1 s). The daemons' memory was the same with and
    without them.
    """
    import ray

    global _local_ray
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": True,
        "logging_level": logging.getLogger("tessera").getEffectiveLevel(),
    }
    if address or os.environ.get("RAY_ADDRESS"):  # an existing cluster: its workers' environment is its own
        ray.init(address=address, **kwargs)
        return
    with process_env(worker_env or {}):
        inherited = {GLIBC_TUNABLES: os.environ.get(GLIBC_TUNABLES, "")}
        # address="local": a new instance even where `ray start` left a cluster (or its address
        # file) on this machine, which a bare ray.init() would try to join with these
        # local-only options. No idle workers started in advance for this driver: the predictor
        # actors get their own processes, so the prestarted ones only held memory (2 x 46 MiB
        # PSS on the 2-core VM, same job time without them).
        ray.init(address="local", num_cpus=num_cpus, _system_config={"prestart_worker_first_driver": False},
                 **kwargs)
    _local_ray = (ray.get_runtime_context().gcs_address, inherited)


def inherited_worker_env() -> dict[str, str] | None:
    """The environment the connected Ray's workers inherit, when this process started that Ray
    (ensure_ray); None for any other Ray."""
    import ray

    if _local_ray is None or not ray.is_initialized():
        return None
    gcs, env = _local_ray
    return dict(env) if ray.get_runtime_context().gcs_address == gcs else None


def _prepare_scene(job: ResolvedJob, outcome: SceneOutcome, scene_id: int, info: SceneInfo, sha: str) -> None:
    """Validate a scene, create or resume its store, and list the chunks still to compute."""
    spec = job.spec
    check_scene_fits_model(info, bands=spec.bands, card=job.card)
    fingerprint = scene_fingerprint(job.parameters(), sha)
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
    chunk_shape = (job.chunk_size,) * len(info.shape)
    windows = tuple(plan_chunks(info.shape, job.chunk_size, job.halo))
    work_dir = work_root / fingerprint[:16]
    outcome.context = SceneContext(
        scene_id=scene_id, name=outcome.name, info=info, bands=spec.bands, zarr_path=str(zarr_path),
        work_dir=str(work_dir), fingerprint=fingerprint,
        grid_shape=chunk_grid_shape(info.shape, job.chunk_size), chunk_shape=chunk_shape,
    )
    outcome.input_sha256 = sha
    outcome.plan = windows
    outcome.n_chunks = len(windows)
    if state is not None and state.get(layout.KEY_STATUS) == layout.STORE_STATUS_COMPLETE:
        outcome.already_complete = True
        outcome.status = STATUS_COMPLETE
        return
    if state is None:
        create_scene_store(
            zarr_path,
            shape=info.shape,
            chunk_shape=chunk_shape,
            transform=info.transform,
            crs_wkt=info.crs_wkt,
            class_names=job.card.class_names,
            with_probabilities=spec.output.write_probabilities,
            provenance={
                layout.KEY_FINGERPRINT: fingerprint,
                layout.KEY_MODEL: {"name": job.card.name, "architecture": job.card.architecture,
                                   "sha256": job.card.weights_sha256,
                                   "ensemble": [{"name": c.card.name, "sha256": c.card.weights_sha256, "weight": w}
                                                for c, w in job.ensemble]},
                layout.KEY_HALO: job.halo,
                layout.KEY_SOURCE: os.path.basename(info.path),
                layout.KEY_INPUT_SHA256: sha,
            },
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    done = done_chunk_keys(work_dir)
    outcome.n_todo = sum(1 for w in windows if chunk_key(w.index) not in done)
    outcome.status = "running"


def _finish_scene(job: ResolvedJob, outcome: SceneOutcome, started_at: datetime, t_start: float) -> None:
    """Merge partial stats, write the scene's tables, and mark its store complete."""
    ctx = outcome.context
    if ctx is None:
        raise OutputError(f"scene {outcome.name}: cannot finish a scene that was never prepared")
    t0 = time.perf_counter()
    work_dir = Path(ctx.work_dir)
    windows = outcome.plan
    missing = [w.index for w in windows if not (work_dir / f"{chunk_key(w.index)}.json").is_file()]
    if missing:
        raise OutputError(f"{ctx.zarr_path}: {len(missing)} chunks have no manifest marker, e.g. {list(missing[0])}")
    grid_rows: dict[int, list[tuple[int, ...]]] = {}
    for w in windows:
        grid_rows.setdefault(w.index[0], []).append(w.index)

    def parts_by_row():  # read lazily: one row of chunk partials in memory at a time
        for i in sorted(grid_rows):
            yield [ChunkRegions.from_npz(work_dir / f"{chunk_key(index)}.npz") for index in grid_rows[i]]

    regions = write_regions(job.root, ctx.name, parts_by_row(), work_dir=work_dir, transform=ctx.info.transform,
                            crs_wkt=ctx.info.crs_wkt, class_names=job.card.class_names)
    merge_s = time.perf_counter() - t0
    pixel_area = ctx.info.pixel_area_crs2
    class_areas = [{"class_id": class_id, "class_name": name, "pixel_count": count, "area_crs2": count * pixel_area}
                   for class_id, (name, count) in enumerate(zip(job.card.class_names, regions.class_pixels))]
    totals = dict.fromkeys(("n_chunks_skipped_nodata", "valid_pixels", "read_s", "predict_s", "write_s", "stats_s"), 0)

    def manifest_by_row():  # the chunks table a row of chunks at a time, totals on the way
        for i in sorted(grid_rows):
            rows = [json.loads((work_dir / f"{chunk_key(index)}.json").read_text()) for index in grid_rows[i]]
            for m in rows:
                totals["n_chunks_skipped_nodata"] += m["status"] == CHUNK_SKIPPED_NODATA
                for name in ("valid_pixels", "read_s", "predict_s", "write_s", "stats_s"):
                    totals[name] += m[name]
            yield pa.Table.from_pylist(rows, schema=SCHEMAS["chunks"])

    write_table_batches(job.root, "chunks", ctx.name, manifest_by_row())
    outcome.status = STATUS_COMPLETE
    outcome.row = _scene_row(job, outcome, started_at, t_start) | totals | {
        "n_regions": regions.n_regions,
        "valid_pixels": int(totals["valid_pixels"]),
        "class_areas": class_areas,
        "merge_s": merge_s,
    }
    write_table(job.root, "scenes", ctx.name, [outcome.row])
    mark_complete(Path(ctx.zarr_path))


def _scene_row(job: ResolvedJob, outcome: SceneOutcome, started_at: datetime, t_start: float) -> dict[str, Any]:
    ctx = outcome.context
    info = ctx.info if ctx else None
    return {
        "scene": outcome.name,
        "source": outcome.source,
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


def run_job(
    spec: JobSpec,
    *,
    base_dir: Path,
    ray_address: str | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
) -> JobResult:
    """Run a job: every scene in the spec; each chunk owned by one task per attempt, written idempotently.

    Args:
        spec: the validated job spec.
        base_dir: folder that relative paths in the spec are relative to (the spec's folder).
        ray_address: Ray cluster to connect to (default: RAY_ADDRESS or a local instance).
        on_chunk: progress callback (chunks done, chunks total).

    Returns:
        JobResult with one outcome per scene; failed scenes carry their error and are also in
        `tables/scenes`. Raises only for job-level problems (model, output root).
    """
    import ray

    t_start = time.perf_counter()
    started_at = datetime.now(timezone.utc)
    job = resolve_job(spec, base_dir=base_dir)
    job.root.mkdir(parents=True, exist_ok=True)
    paths, unmatched = expand_inputs(spec.inputs, base_dir=base_dir)
    outcomes = [SceneOutcome(name=n, source=p) for n, p in zip(assign_scene_names(paths), paths)]
    for pattern in unmatched:
        name = scene_name(pattern)
        outcomes.append(SceneOutcome(name=name, source=pattern, status=STATUS_FAILED,
                                     error=f"{pattern}: no such file (or the pattern matched nothing)"))

    ensure_ray(ray_address, worker_env=with_malloc_tunables() if spec.resources.malloc_tuning else None)
    cluster = ray.cluster_resources()
    job = place_on_cluster(job, cluster)
    local_cluster = not (ray_address or os.environ.get("RAY_ADDRESS"))
    if job.predictor_options.device == "cpu" and job.predictor_options.precision == "fp16":
        raise JobSpecError("inference.precision: fp16 needs GPU actors, and this job runs on CPU "
                           "(no GPU in the cluster, or resources.num_gpus_per_actor: 0); use bf16 or fp32")
    problem = cluster_fit_problem(job, cluster)
    if problem:
        if not local_cluster:
            log.warning("%s (waiting for the cluster to grow)", problem)
        else:
            raise JobSpecError(problem)
    _save_resolved_spec(job)
    phases = {"setup_s": time.perf_counter() - t_start}
    pending = [o for o in outcomes if o.status != STATUS_FAILED]
    # the actors start (import torch, load the model, on a GPU its context) while the scenes are hashed
    pool = None
    if pending:
        pool = _fused_pool(job) if fused_stages(job) else _split_pool(job, cluster_cpus=cluster.get("CPU", 1.0))
    with pool or contextlib.nullcontext():
        t0 = time.perf_counter()
        sources = [o.source for o in pending]
        if local_cluster:  # this machine holds the inputs: no worker process to start for it
            opened = _open_local(sources, policy=input_policy(spec))
        else:
            opened = _open_all(sources, policy=input_policy(spec), cpus=cluster.get("CPU", 1.0),
                               task_cpus=0.0 if pool else 0.5)  # the pool holds the CPUs; hashing is I/O
        scenes: dict[int, SceneContext] = {}
        for scene_id, (outcome, (info, sha, error)) in enumerate(zip(pending, opened)):
            try:
                if error is not None:
                    raise InputError(error)
                _prepare_scene(job, outcome, scene_id, info, sha)
            except TesseraError as exc:
                outcome.status, outcome.error = STATUS_FAILED, str(exc)
                log.error("scene %s failed: %s", outcome.name, exc)
                continue
            if outcome.context is not None and not outcome.already_complete:
                scenes[scene_id] = outcome.context

        by_id = {o.context.scene_id: o for o in outcomes if o.context is not None}
        tasks = []
        for scene_id, ctx in scenes.items():
            done = done_chunk_keys(Path(ctx.work_dir))
            for w in stripe_order(by_id[scene_id].plan, READ_STRIPE_CHUNKS):
                if chunk_key(w.index) not in done:
                    tasks.append(ChunkTask(scene_id=scene_id, window=w))
        phases["open_s"] = time.perf_counter() - t0
        progress = _Progress(len(tasks), by_id, on_chunk)
        if tasks:
            phases.update(_stream(job, tasks, scenes, progress, pool))
        phases.update(progress.phases())

    t0 = time.perf_counter()
    for outcome in outcomes:
        if outcome.status == "running":
            try:
                _finish_scene(job, outcome, started_at, t_start)
            except (TesseraError, OSError, ValueError) as exc:
                outcome.status, outcome.error = STATUS_FAILED, str(exc)
        if outcome.status == STATUS_FAILED:
            outcome.row = _scene_row(job, outcome, started_at, t_start)
            write_table(job.root, "scenes", outcome.name, [outcome.row])
    phases["finish_s"] = time.perf_counter() - t0
    return JobResult(root=job.root, scenes=tuple(outcomes), wall_s=time.perf_counter() - t_start,
                     model_name=job.card.name, phases=phases)


def _predictor_kwargs(job: ResolvedJob) -> dict[str, Any]:
    """PredictorActor keyword arguments of the job."""
    return {
        "card_path": str(job.checkpoint.card_path),
        "options": job.predictor_options,
        "weight": job.spec.model.weight,
        "ensemble": tuple((str(c.card_path), w) for c, w in job.ensemble),
        "with_probabilities": job.spec.output.write_probabilities,
    }


def _fused_pool(job: ResolvedJob) -> Any:
    """The fused actor pool of the job (pipelines.fused.FusedPool); its actors start now."""
    from pipelines.fused import FusedPool

    res = job.spec.resources
    return FusedPool(predictor=_predictor_kwargs(job), actors=job.actors,
                     actor_options={"num_cpus": res.cpus_per_actor, "num_gpus": job.num_gpus_per_actor,
                                    **_actor_remote_args(res)})


def _split_pool(job: ResolvedJob, *, cluster_cpus: float) -> Any:
    """The split stages of the job (pipelines.split.SplitPool); its actors start now."""
    from pipelines.split import SplitPool

    res = job.spec.resources
    tasks = read_concurrency(job, cluster_cpus=cluster_cpus)
    return SplitPool(predictor=_predictor_kwargs(job), actors=job.actors,
                     actor_options={"num_cpus": res.cpus_per_actor, "num_gpus": job.num_gpus_per_actor,
                                    **_actor_remote_args(res)},
                     read_tasks=tasks, write_tasks=tasks)


def split_block_rows(job: ResolvedJob) -> int:
    """Consecutive chunks per read task, actor call and write task of the split stages:
    READ_BLOCK_CHUNKS (two stripe rows, whose windows share input blocks), or more when one
    forward pass takes more windows (windows_per_call)."""
    return max(READ_BLOCK_CHUNKS, windows_per_call(job))


def _stream(job: ResolvedJob, tasks: list[ChunkTask], scenes: dict[int, SceneContext],
            progress: _Progress, pool: Any) -> dict[str, float]:
    """Compute every planned chunk on the job's pool (fused actors, or the split stages);
    returns the split stages' tasks in flight on average (SplitPool.run), for the job's phases."""
    progress.start()
    if fused_stages(job):
        # batches of FUSED_BATCH consecutive chunks (one stripe row), stripe affinity per actor
        pool.run(tasks, scenes=scenes, on_record=progress, batch_size=FUSED_BATCH)
        return {}
    return pool.run(tasks, scenes=scenes, on_record=progress, batch_size=split_block_rows(job))


def windows_per_call(job: ResolvedJob) -> int:
    """Windows per predictor-actor call in the split pipeline: the batch size when the model
    takes a whole chunk window as one tile (one forward pass then runs `batch_size` windows,
    which a GPU needs), else 1 (the window's own tiles fill the batches)."""
    from workers.tileplan import windows_per_pass

    o = job.predictor_options
    return windows_per_pass((job.chunk_size + 2 * job.halo,) * 2, o.tile_size, o.tile_overlap, o.batch_size)


def _open_all(paths: list[str], *, policy: InputPolicy, cpus: float,
              task_cpus: float = 0.5) -> list[tuple[SceneInfo | None, str | None, str | None]]:
    """open_and_hash every path in Ray tasks (on the workers, which read the inputs), in order.

    One task per group of paths, at most one group per cluster CPU; each task's worker process
    exits when it is done (max_calls=1), so no idle worker holding rasterio and the hashed
    file's pages stays beside the predictor actors for the rest of the job.
    """
    import ray

    if not paths:
        return []
    groups = max(1, min(len(paths), int(cpus)))
    size = -(-len(paths) // groups)
    task = ray.remote(num_cpus=task_cpus, max_calls=1)(_open_group)
    parts = ray.get([task.remote(paths[i:i + size], policy) for i in range(0, len(paths), size)])
    return [item for part in parts for item in part]


def _open_local(paths: list[str], *, policy: InputPolicy) -> list[tuple[SceneInfo | None, str | None, str | None]]:
    """open_and_hash every path in this process's threads, in order (a local Ray on this
    machine: the inputs are here). Starting a task worker for it would cost a second of a core
    while the actors start; hashlib releases the GIL, so threads hash in parallel.
    """
    from concurrent.futures import ThreadPoolExecutor

    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=min(4, len(paths)), thread_name_prefix="tessera-open") as pool:
        return list(pool.map(lambda p: open_and_hash(p, policy), paths))


def _open_group(paths: list[str], policy: InputPolicy) -> list[tuple[SceneInfo | None, str | None, str | None]]:
    return [open_and_hash(p, policy) for p in paths]


class _Progress:
    """Counts chunk records as they arrive; a failed chunk fails its scene (the first error is kept)."""

    def __init__(self, total: int, by_id: dict[int, SceneOutcome], on_chunk: Callable[[int, int], None] | None):
        self.total, self.by_id, self.on_chunk, self.done = total, by_id, on_chunk, 0
        self.t_start = self.t_first = self.t_last = 0.0

    def start(self) -> None:
        self.t_start = time.perf_counter()

    def phases(self) -> dict[str, float]:
        """first_chunk_s: stream start -> first record (what is left of actor start-up, first batch);
        chunks_s: stream start -> last record."""
        if not self.done:
            return {"first_chunk_s": 0.0, "chunks_s": 0.0}
        return {"first_chunk_s": self.t_first - self.t_start, "chunks_s": self.t_last - self.t_start}

    def __call__(self, record: ChunkResult) -> None:
        self.t_last = time.perf_counter()
        if not self.done:
            self.t_first = self.t_last
        self.done += 1
        if self.on_chunk:
            self.on_chunk(self.done, self.total)
        if record.error:
            outcome = self.by_id[record.scene_id]
            if outcome.status != STATUS_FAILED:
                log.error("scene %s failed: %s", outcome.name, record.error)
            outcome.status = STATUS_FAILED
            outcome.error = outcome.error or record.error


def read_concurrency(job: ResolvedJob, *, cluster_cpus: float) -> int:
    """Concurrent read tasks of the split stages (and as many write tasks): resources.read_tasks;
    else on GPU actors half of the CPUs the actors leave free (the other half writes and
    computes statistics), at least 2 per actor; on CPU actors 1 per actor (a read costs a
    fraction of a CPU pass).

    On a GPU a read costs far more time than the window's forward pass, so 2 readers per
    actor would leave the GPU waiting; on CPU, few readers keep consecutive windows (which
    share input blocks) in one process's block cache.
    """
    res = job.spec.resources
    if res.read_tasks is not None:
        return res.read_tasks
    if job.num_gpus_per_actor <= 0:
        return job.actors
    free = max(0.0, cluster_cpus - job.actors * res.cpus_per_actor)
    return max(2 * job.actors, int(free // 2))


def _actor_remote_args(res: Any) -> dict[str, Any]:
    """Extra Ray options of the predictor actors: a runtime environment with the malloc tunables
    (resources.malloc_tuning), unless the local Ray this process started gives its workers the
    wanted environment already (ensure_ray's worker_env). Without malloc tuning, an actor of
    such a Ray whose workers inherit tunables gets this process's own GLIBC_TUNABLES instead;
    on any other Ray it inherits what the workers have, as before."""
    inherited = inherited_worker_env()
    if res.malloc_tuning:
        env = actor_env(with_malloc_tunables(), inherited)
    elif inherited is not None:
        env = actor_env({GLIBC_TUNABLES: os.environ.get(GLIBC_TUNABLES, "")}, inherited)
    else:
        env = {}
    return {"runtime_env": {"env_vars": env}} if env else {}


def _save_resolved_spec(job: ResolvedJob) -> None:
    """Save the resolved spec beside the outputs (what ran, with defaults filled in)."""
    resolved = job.spec.model_dump(mode="json") | {"resolved": job.parameters()}
    atomic_write_text(job.root / "job.resolved.json", json.dumps(resolved, indent=2, sort_keys=True))
