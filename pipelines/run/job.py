"""The Ray wiring of a job: plan -> read -> predict -> write chunk + partial stats -> merge.

Everything Ray lives here. The stream runs over the chunk plans of every scene: read windows
-> predictor actors (GPU/CPU, model loaded once per actor) -> write each chunk to Zarr
(idempotent: a retry rewrites the same bytes) with its partial region statistics and a manifest
marker. On CPU one fused actor per core does all three for its chunks (`pipelines.run.fused`); on
GPUs read and write tasks run beside the predictor actors (`pipelines.run.split`). The driver holds
plans and small records, never pixels; it merges partial statistics per scene.

Resumability: each finished chunk leaves `<root>/_work/<scene>/<fingerprint>/<index>.json`
(written last, atomically) beside its partial stats. A re-run with the same fingerprint computes
only chunks without a marker; a complete scene is not touched at all."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipelines.plan.chunks import stripe_order
from pipelines.plan.scenes import assign_scene_names, expand_inputs, scene_name
from pipelines.readers import InputPolicy, SceneInfo, is_input_dir, known_suffixes
from pipelines.readers.remote import worker_env
from pipelines.readers.stac import stac_scene_paths
from pipelines.run.cluster import ensure_ray, inherited_worker_env, shared_output_problem
from pipelines.run.progress import JobProgress
from pipelines.run.resolve import (
    ResolvedJob,
    cluster_fit_problem,
    fused_stages,
    input_policy,
    place_on_cluster,
    resolve_job,
)
from pipelines.run.scenes import SceneOutcome, finish_scene, prepare_scene, scene_row
from pipelines.run.stages import (
    SceneContext,
    done_chunk_keys,
    open_and_hash,
)
from pipelines.writers.outroot import is_s3, write_text
from pipelines.writers.tables import write_table
from schemas.errors import InputError, JobSpecError, OutputError, TesseraError
from schemas.job import JobSpec
from schemas.records import ChunkResult, ChunkTask, chunk_key
from schemas.tables import STATUS_COMPLETE, STATUS_FAILED
from schemas.uris import is_uri
from workers.runtime import GLIBC_TUNABLES, actor_env, with_malloc_tunables

log = logging.getLogger("tessera")


READ_STRIPE_CHUNKS = 4  # chunks per read stripe (pipelines.plan.chunks.stripe_order)


FUSED_BATCH = READ_STRIPE_CHUNKS  # consecutive chunks per fused-actor call (one stripe row)

READ_BLOCK_CHUNKS = 2 * READ_STRIPE_CHUNKS  # split stages: consecutive chunks per read task (two stripe rows)


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


def run_job(
    spec: JobSpec,
    *,
    base_dir: Path,
    ray_address: str | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
    on_progress: Callable[[JobProgress], None] | None = None,
) -> JobResult:
    """Run a job: every scene in the spec; each chunk owned by one task per attempt, written idempotently.

    Args:
        spec: the validated job spec.
        base_dir: folder that relative paths in the spec are relative to (the spec's folder).
        ray_address: Ray cluster to connect to (default: RAY_ADDRESS or a local instance).
        on_chunk: progress callback (chunks done, chunks total).
        on_progress: progress callback with scene counts and speed (`JobProgress`): once the
            scenes are opened, at every chunk, and as each scene completes.

    Returns:
        JobResult with one outcome per scene; failed scenes carry their error and are also in
        `tables/scenes`. Raises only for job-level problems (model, output root, inputs that
        match nothing at all, a local output root on a multi-node cluster); those are raised
        before the output root is created and, except the last, before Ray starts.
    """
    import ray

    t_start = time.perf_counter()
    started_at = datetime.now(timezone.utc)
    job = resolve_job(spec, base_dir=base_dir)
    paths, unmatched = expand_inputs(spec.inputs, base_dir=base_dir, is_input_dir=is_input_dir)
    if spec.stac is not None:  # one scene per item (pipelines.readers.stac)
        paths += stac_scene_paths(spec.stac.items, base_dir=base_dir)
    if not paths:  # nothing to do: say so before Ray starts or any output folder exists
        raise InputError(f"inputs match no file: {', '.join(unmatched)} (relative paths are relative to "
                         f"{base_dir}; a manifest's entries to its folder)")
    outcomes = [SceneOutcome(name=n, source=p) for n, p in zip(assign_scene_names(paths, suffixes=known_suffixes()), paths)]
    for pattern in unmatched:
        name = scene_name(pattern, suffixes=known_suffixes())
        outcomes.append(SceneOutcome(name=name, source=pattern, status=STATUS_FAILED,
                                     error=f"{pattern}: no such file (or the pattern matched nothing)"))

    ensure_ray(ray_address, worker_env=with_malloc_tunables() if spec.resources.malloc_tuning else None)
    cluster = ray.cluster_resources()
    job = place_on_cluster(job, cluster)
    local_cluster = not (ray_address or os.environ.get("RAY_ADDRESS"))
    # an s3:// root is one store every node writes to, like a declared shared filesystem
    problem = shared_output_problem(ray.nodes(), root=job.root,
                                    shared_filesystem=spec.output.shared_filesystem or is_s3(job.root),
                                    cluster_may_grow=not local_cluster and cluster_fit_problem(job, cluster) is not None)
    if problem:
        raise OutputError(problem)
    job.root.mkdir(parents=True, exist_ok=True)
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
    # where and how to reach object storage, for the workers (never credentials: see remote.worker_env)
    remote_env = (worker_env() if spec.stac is not None or is_s3(job.root) or any(is_uri(o.source) for o in pending)
                  else {})
    # the actors start (import torch, load the model, on a GPU its context) while the scenes are hashed
    pool = None
    if pending:
        pool = (_fused_pool(job, remote_env=remote_env) if fused_stages(job)
                else _split_pool(job, cluster_cpus=cluster.get("CPU", 1.0), remote_env=remote_env))
    with pool or contextlib.nullcontext():
        t0 = time.perf_counter()
        sources = [o.source for o in pending]
        if local_cluster:  # this machine holds the inputs: no worker process to start for it
            opened = _open_local(sources, policy=input_policy(job))
        else:
            opened = _open_all(sources, policy=input_policy(job), cpus=cluster.get("CPU", 1.0),
                               task_cpus=0.0 if pool else 0.5,  # the pool holds the CPUs; hashing is I/O
                               remote_env=remote_env)
        scenes: dict[int, SceneContext] = {}
        for scene_id, (outcome, (info, sha, error)) in enumerate(zip(pending, opened)):
            try:
                if error is not None:
                    raise InputError(error)
                prepare_scene(job, outcome, scene_id, info, sha)
            except TesseraError as exc:
                outcome.status, outcome.error = STATUS_FAILED, str(exc)
                log.error("scene %s failed: %s", outcome.name, exc)
                continue
            if outcome.context is not None and not outcome.already_complete:
                scenes[scene_id] = outcome.context

        by_id = {o.context.scene_id: o for o in outcomes if o.context is not None}
        tasks = []
        for scene_id, ctx in scenes.items():
            done = done_chunk_keys(ctx.work_dir)
            for w in stripe_order(by_id[scene_id].plan, READ_STRIPE_CHUNKS):
                if chunk_key(w.index) not in done:
                    tasks.append(ChunkTask(scene_id=scene_id, window=w))
        phases["open_s"] = time.perf_counter() - t0
        progress = _Progress(tasks, by_id, on_chunk, outcomes=outcomes, on_progress=on_progress)
        progress.report()
        if tasks:
            phases.update(_stream(job, tasks, scenes, progress, pool))
        phases.update(progress.phases())

    t0 = time.perf_counter()
    for outcome in outcomes:
        if outcome.status == "running":
            try:
                finish_scene(job, outcome, started_at, t_start)
            except (TesseraError, OSError, ValueError) as exc:
                outcome.status, outcome.error = STATUS_FAILED, str(exc)
            progress.report()
        if outcome.status == STATUS_FAILED:
            outcome.row = scene_row(job, outcome, started_at, t_start)
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


def _fused_pool(job: ResolvedJob, *, remote_env: dict[str, str]) -> Any:
    """The fused actor pool of the job (pipelines.run.fused.FusedPool); its actors start now."""
    from pipelines.run.fused import FusedPool

    res = job.spec.resources
    return FusedPool(predictor=_predictor_kwargs(job), actors=job.actors,
                     actor_options={"num_cpus": res.cpus_per_actor, "num_gpus": job.num_gpus_per_actor,
                                    **_actor_remote_args(res, remote_env)})


def _split_pool(job: ResolvedJob, *, cluster_cpus: float, remote_env: dict[str, str]) -> Any:
    """The split stages of the job (pipelines.run.split.SplitPool); its actors start now."""
    from pipelines.run.split import SplitPool

    res = job.spec.resources
    tasks = read_concurrency(job, cluster_cpus=cluster_cpus)
    return SplitPool(predictor=_predictor_kwargs(job), actors=job.actors,
                     actor_options={"num_cpus": res.cpus_per_actor, "num_gpus": job.num_gpus_per_actor,
                                    **_actor_remote_args(res, remote_env)},
                     read_tasks=tasks, write_tasks=tasks,
                     task_options={"runtime_env": {"env_vars": remote_env}} if remote_env else None)


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
        pool.run(tasks, scenes=scenes, on_record=progress, batch_size=FUSED_BATCH,
                 chunk_timeout_s=job.spec.resources.chunk_timeout_s)
        return {}
    return pool.run(tasks, scenes=scenes, on_record=progress, batch_size=split_block_rows(job),
                    chunk_timeout_s=job.spec.resources.chunk_timeout_s)


def windows_per_call(job: ResolvedJob) -> int:
    """Windows per predictor-actor call in the split pipeline: the batch size when the model
    takes a whole chunk window as one tile (one forward pass then runs `batch_size` windows,
    which a GPU needs), else 1 (the window's own tiles fill the batches)."""
    from workers.tileplan import windows_per_pass

    o = job.predictor_options
    return windows_per_pass((job.chunk_size + 2 * job.halo,) * 2, o.tile_size, o.tile_overlap, o.batch_size)


def _open_all(paths: list[str], *, policy: InputPolicy, cpus: float, task_cpus: float = 0.5,
              remote_env: dict[str, str] | None = None) -> list[tuple[SceneInfo | None, str | None, str | None]]:
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
    env = {"runtime_env": {"env_vars": remote_env}} if remote_env else {}
    task = ray.remote(num_cpus=task_cpus, max_calls=1, **env)(_open_group)
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
    """Counts chunk records as they arrive; a failed chunk fails its scene (the first error is kept).

    Reports `on_chunk(done, total)` and, with scene counts and output pixels, `on_progress`
    (`report`, also called by the job as scenes finish)."""

    def __init__(self, tasks: list[ChunkTask], by_id: dict[int, SceneOutcome],
                 on_chunk: Callable[[int, int], None] | None, *, outcomes: list[SceneOutcome] = (),
                 on_progress: Callable[[JobProgress], None] | None = None):
        self.total, self.by_id, self.on_chunk, self.done = len(tasks), by_id, on_chunk, 0
        self.outcomes, self.on_progress = outcomes, on_progress
        # output pixels of each chunk's core, for Mpx/s
        self.core_px = {(t.scene_id, t.key): math.prod(t.window.core_shape) for t in tasks} if on_progress else {}
        self.pixels_done = 0
        self.t_start = self.t_first = self.t_last = 0.0

    def report(self) -> None:
        """Call on_progress with where the job stands now."""
        if self.on_progress is None:
            return
        statuses = [o.status for o in self.outcomes]
        self.on_progress(JobProgress(
            chunks_done=self.done, chunks_total=self.total, scenes_total=len(statuses),
            scenes_complete=statuses.count(STATUS_COMPLETE), scenes_failed=statuses.count(STATUS_FAILED),
            pixels_done=self.pixels_done,
            elapsed_s=(time.perf_counter() - self.t_start) if self.t_start else 0.0))

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
        self.pixels_done += self.core_px.get((record.scene_id, record.key), 0)
        if self.on_chunk:
            self.on_chunk(self.done, self.total)
        if record.error:
            outcome = self.by_id[record.scene_id]
            if outcome.status != STATUS_FAILED:
                log.error("scene %s failed: %s", outcome.name, record.error)
            outcome.status = STATUS_FAILED
            outcome.error = outcome.error or record.error
        self.report()


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


def _actor_remote_args(res: Any, remote_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Extra Ray options of the predictor actors: a runtime environment with the malloc tunables
    (resources.malloc_tuning), unless the local Ray this process started gives its workers the
    wanted environment already (ensure_ray's worker_env). Without malloc tuning, an actor of
    such a Ray whose workers inherit tunables gets this process's own GLIBC_TUNABLES instead;
    on any other Ray it inherits what the workers have, as before. `remote_env`, the non-secret
    object-storage settings of a job with remote inputs (`pipelines.readers.remote.worker_env`),
    is added to it."""
    inherited = inherited_worker_env()
    if res.malloc_tuning:
        env = actor_env(with_malloc_tunables(), inherited)
    elif inherited is not None:
        env = actor_env({GLIBC_TUNABLES: os.environ.get(GLIBC_TUNABLES, "")}, inherited)
    else:
        env = {}
    env = {**env, **(remote_env or {})}
    return {"runtime_env": {"env_vars": env}} if env else {}


def _save_resolved_spec(job: ResolvedJob) -> None:
    """Save the resolved spec beside the outputs (what ran, with defaults filled in)."""
    resolved = job.spec.model_dump(mode="json") | {"resolved": job.parameters()}
    write_text(job.root / "job.resolved.json", json.dumps(resolved, indent=2, sort_keys=True))
