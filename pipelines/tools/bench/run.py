"""`tessera bench` orchestration: per scene size, the job, the bare model and the MONAI peer.

:func:`run_bench` warms Ray, runs an untimed warm-up job, then for each size generates (or reuses)
the synthetic scene (never timed), runs the job with its memory and GPU sampled, the bare model
once per tile shape and the peer in child processes, and puts the figures of
:mod:`pipelines.tools.bench.maths` into one row per size. The result is written as JSON by
:func:`pipelines.tools.bench.report.write_results`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.plan.chunks import plan_chunks
from pipelines.tools.bench.children import run_in_child
from pipelines.tools.bench.config import BenchConfig
from pipelines.tools.bench.maths import (
    BREAKDOWN_STAGES,
    breakdown_shares,
    model_tile_shape,
    monai_memory_estimate,
    monai_overlap_for_redundancy,
    monai_redundancy,
    monai_skip_reason,
    nodata_skip_gain,
    peer_comparison,
    predict_model_share,
    redundancy_factor,
    safe_div,
    scaling_summary,
    steady_state,
    throughput_ratios,
    to_mib,
)
from pipelines.tools.bench.probes import GpuSampler
from pipelines.tools.bench.report import write_results
from pipelines.tools.bench.resolve import ResolvedBench
from workers.runtime import with_malloc_tunables

log = logging.getLogger("tessera")


def ensure_bench_scene(inputs_dir: Path, *, size: int, seed: int) -> tuple[Path, float]:
    """The synthetic size x size scene (written once; reused when size and seed match).

    Returns:
        (path, seconds spent generating: 0.0 when reused).
    """
    from pipelines.tools.synthetic import SceneSpec, write_scene

    inputs_dir.mkdir(parents=True, exist_ok=True)
    image = inputs_dir / f"bench-{size}-seed{seed}.tif"
    stamp = image.with_suffix(".json")
    wanted = {"size": size, "seed": seed}
    if image.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return image, 0.0
    t0 = time.perf_counter()
    write_scene(SceneSpec(height=size, width=size, seed=seed), image)
    stamp.write_text(json.dumps(wanted))
    return image, time.perf_counter() - t0



def _read_skipped(root: Path, scene: str) -> list[tuple[int, ...]]:
    """Chunk indices the job skipped as wholly nodata, from its `chunks` table."""
    import pyarrow.parquet as pq

    from pipelines.writers.tables import table_path
    from schemas.tables import CHUNK_SKIPPED_NODATA

    rows = pq.read_table(table_path(root, "chunks", scene), columns=["chunk_index", "status"]).to_pylist()
    return [tuple(r["chunk_index"]) for r in rows if r["status"] == CHUNK_SKIPPED_NODATA]


def _warm_ray(*, malloc_tuning: bool) -> None:
    """Ray up and able to run a task before any timing (a job on a fresh Ray pays worker start).
    A local Ray started here gives its workers the jobs' malloc tunables, as `tessera run` does."""
    import ray

    from pipelines.run.cluster import ensure_ray

    ensure_ray(worker_env=with_malloc_tunables() if malloc_tuning else None)
    ray.get(ray.remote(num_cpus=0)(lambda: None).remote())


def _run_job(spec: Any, base_dir: Path) -> Any:
    """Run a one-scene job and return its pipelines.run.job.JobResult.

    Raises:
        RuntimeError: the scene failed (its error quoted).
    """
    from pipelines.run.job import run_job
    from schemas.tables import STATUS_COMPLETE

    result = run_job(spec, base_dir=base_dir)
    outcome = result.scenes[0]
    if outcome.status != STATUS_COMPLETE or outcome.row is None:
        raise RuntimeError(f"benchmark job failed on {outcome.source}: {outcome.error}")
    return result


def _measure_raw_actors(r: ResolvedBench, tile_shape: tuple[int, ...]) -> dict[str, Any]:
    """The bare model as the job runs it: one process per predictor actor, side by side, each
    with the actor's torch threads; px_s is their sum (the model's limit on this machine in the
    job's configuration)."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    c = r.config
    with tempfile.TemporaryDirectory(prefix="tessera-raw-") as barrier, ThreadPoolExecutor(r.actors) as pool:
        kwargs = dict(card_path=str(r.card_path), tile_shape=tile_shape, batch_size=r.batch, device=r.device,
                      precision=c.precision, threads=r.threads_per_actor, batches=c.raw_batches,
                      warmup=c.raw_warmup, iterations=c.raw_iterations, seed=c.seed,
                      barrier_dir=barrier if r.actors > 1 else None, parties=r.actors,
                      channels_last=c.channels_last, fold_bn=c.fold_batchnorm)
        runs = list(pool.map(lambda _: run_in_child("measure_raw", malloc_tuning=c.malloc_tuning, **kwargs),
                             range(r.actors)))
    gpu = [run["gpu_peak_bytes"] for run in runs if run["gpu_peak_bytes"] is not None]
    return {
        "px_s": sum(run["px_s"] for run in runs),
        "px_s_per_process": [run["px_s"] for run in runs],
        "processes": r.actors,
        "pass_s": runs[0]["pass_s"],
        "px_per_pass": runs[0]["px_per_pass"],
        "threads": runs[0]["threads"],
        "device_name": runs[0]["device_name"],
        "gpu_peak_bytes": max(gpu) if gpu else None,
        "startup_s": runs[0]["startup_s"],
    }


def _bench_size(r: ResolvedBench, size: int, raw_by_tile: dict[tuple[int, ...], dict[str, Any]],
                say: Callable[[str], None]) -> dict[str, Any]:
    """Measure one scene size: the job (timed, memory sampled), raw (once per tile shape), the peer."""
    import psutil

    from pipelines.tools.monitor import MemorySampler

    c, card = r.config, r.card
    scene, generate_s = ensure_bench_scene(r.out_dir / "inputs", size=size, seed=c.seed)
    if generate_s:
        say(f"{size}^2: generated {scene.name} in {generate_s:.1f} s (not timed)")
    root = r.out_dir / "runs" / str(size)
    shutil.rmtree(root, ignore_errors=True)  # earlier outputs: the job must really run
    spec = r.job_spec(scene, root)
    say(f"{size}^2: end-to-end job ({r.actors} actor(s), {r.device}, chunk {c.chunk_size}, halo {r.halo}, "
        f"tile {r.tile}, overlap {c.tile_overlap}, batch {r.batch})")
    with MemorySampler() as memory, GpuSampler(enabled=r.device == "cuda") as gpu:
        t0 = time.perf_counter()
        job = _run_job(spec, r.out_dir)
        wall_s = time.perf_counter() - t0
    outcome = job.scenes[0]

    shape = (size, size)
    skipped = _read_skipped(root, outcome.name)
    redundancy = redundancy_factor(shape, c.chunk_size, r.halo, r.tile, c.tile_overlap,
                                   stride=card.stride, skipped=skipped)
    window_shape = plan_chunks(shape, c.chunk_size, r.halo)[0].window_shape
    tile_shape = model_tile_shape(window_shape, r.tile, c.tile_overlap, stride=card.stride)
    if tile_shape not in raw_by_tile:
        say(f"{size}^2: bare model on {c.raw_batches} x {r.batch} tiles of {tile_shape}"
            + (f" ({r.actors} process(es) x {r.threads_per_actor} torch threads)" if r.device == "cpu" else ""))
        raw_by_tile[tile_shape] = _measure_raw_actors(r, tile_shape)
    raw = raw_by_tile[tile_shape]

    estimate = monai_memory_estimate(shape, channels=card.in_channels, classes=card.num_classes, input_itemsize=2)
    monai_skipped = monai_skip_reason(size, enabled=c.monai, max_side=c.monai_max_side, estimate_bytes=estimate,
                                      available_bytes=psutil.virtual_memory().available)
    skip = nodata_skip_gain(shape, c.chunk_size, r.halo, r.tile, c.tile_overlap, stride=card.stride,
                            skipped=skipped, raw_px_s=raw["px_s"])
    peer_redundancy = monai_redundancy(shape, r.tile, c.tile_overlap, stride=card.stride)
    eq_overlap = monai_overlap_for_redundancy(shape, r.tile, skip["redundancy_without_skip"], stride=card.stride)
    eq_redundancy = monai_redundancy(shape, r.tile, eq_overlap, stride=card.stride)

    def run_peer(overlap: float) -> dict[str, Any]:
        return run_in_child(
            "run_monai_peer", malloc_tuning=c.malloc_tuning, card_path=str(r.card_path), scene_path=str(scene), tile_size=r.tile,
            overlap=overlap, batch_size=r.batch, device=r.device, precision=c.precision,
            threads=r.model_threads, zarr_path=str(outcome.context.zarr_path), channels_last=c.channels_last,
            fold_bn=c.fold_batchnorm,
        )

    peer: dict[str, Any] = {}
    peer_eq: dict[str, Any] = {}
    if monai_skipped:
        say(f"{size}^2: MONAI peer skipped: {monai_skipped}")
    else:
        say(f"{size}^2: MONAI sliding_window_inference over the whole scene (separate process)")
        peer = run_peer(c.tile_overlap)
        if c.monai_equal_redundancy:
            say(f"{size}^2: MONAI again at equal redundancy: overlap {eq_overlap:.4f}, "
                f"{eq_redundancy:.3f} model px per output px (tessera {skip['redundancy_without_skip']:.3f} "
                "without nodata skipping)")
            peer_eq = run_peer(eq_overlap)

    seconds = {stage: float(outcome.row[f"{stage}_s"]) for stage in BREAKDOWN_STAGES}
    e2e_px_s = size * size / wall_s
    peaks = memory.peaks
    tessera_total, monai_rss = to_mib(peaks.total_rss), to_mib(peer.get("peak_rss_bytes"))
    tessera_job = to_mib(peaks.job_pss)
    tessera_all = to_mib(peaks.all_pss)
    row = {
        "size": size,
        "scene_px": size * size,
        "scene": str(scene),
        "n_chunks": outcome.n_chunks,
        "n_chunks_skipped": len(skipped),
        "window_shape": list(window_shape),
        "tile_shape": list(tile_shape),
        "redundancy": redundancy,
        "raw_px_s": raw["px_s"],
        "e2e_px_s": e2e_px_s,
        **throughput_ratios(raw["px_s"], e2e_px_s, redundancy),
        "wall_s": wall_s,
        "time_per_mpx_s": wall_s / (size * size / 1e6),
        **steady_state(job.phases, size * size, outcome.n_chunks, raw["px_s"]),
        "predictor_busy": seconds["predict"] / (wall_s * r.actors),
        "predict_model_share": predict_model_share(model_px=redundancy * size * size, raw_px_s=raw["px_s"],
                                                   predict_s=seconds["predict"], actors=r.actors),
        "breakdown": breakdown_shares(seconds),
        "breakdown_s": seconds,
        "job_phases_s": job.phases,
        "tessera_driver_peak_mib": to_mib(peaks.driver_rss),
        "tessera_worker_peak_mib": to_mib(peaks.max_child_rss) if peaks.max_child_rss else None,
        "tessera_total_peak_mib": tessera_total,
        "tessera_job_pss_peak_mib": tessera_job,
        "tessera_job_rss_peak_mib": to_mib(peaks.job_rss),
        "tessera_system_pss_peak_mib": to_mib(peaks.system_pss),
        "tessera_all_pss_peak_mib": tessera_all,
        "tessera_gpu_peak_mib": gpu.increase_mib,
        "tessera_gpu_busy": gpu.busy,
        "raw_gpu_peak_mib": to_mib(raw["gpu_peak_bytes"]),
        "monai_px_s": peer.get("px_s"),
        "monai_s": peer.get("seconds"),
        "monai_read_s": peer.get("read_s"),
        "monai_peak_rss_mib": monai_rss,
        "monai_gpu_peak_mib": to_mib(peer.get("gpu_peak_bytes")),
        "monai_agreement": peer.get("agreement"),
        "monai_estimate_mib": to_mib(estimate),
        "monai_skipped": monai_skipped,
        "tessera_vs_monai": safe_div(e2e_px_s, peer.get("px_s")),
        "memory_vs_monai": safe_div(tessera_job, monai_rss),
        "memory_all_vs_monai": safe_div(tessera_all, monai_rss),
        # nodata skipping as its own gain, and the peer per model px computed
        **skip,
        "monai_redundancy": peer_redundancy,
        **peer_comparison(e2e_px_s=e2e_px_s, redundancy=redundancy,
                          redundancy_without_skip=skip["redundancy_without_skip"],
                          monai_px_s=peer.get("px_s"), monai_redundancy=peer_redundancy),
        # the peer run again at tessera's redundancy (without the skip)
        "monai_eq_overlap": eq_overlap if peer_eq else None,
        "monai_eq_redundancy": eq_redundancy if peer_eq else None,
        "monai_eq_px_s": peer_eq.get("px_s"),
        "monai_eq_s": peer_eq.get("seconds"),
        "monai_eq_peak_rss_mib": to_mib(peer_eq.get("peak_rss_bytes")),
        "monai_eq_agreement": peer_eq.get("agreement"),
        "tessera_vs_monai_eq": safe_div(e2e_px_s, peer_eq.get("px_s")),
    }
    say(f"{size}^2: e2e {e2e_px_s / 1e6:.3f} Mpx/s, raw {raw['px_s'] / 1e6:.3f} Mpx/s, "
        f"redundancy {redundancy:.3f}, wall {wall_s:.1f} s")
    return row


def run_bench(config: BenchConfig, *, on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark for every size; write out_dir/bench-<UTC time>.json and bench-latest.json.

    Uses the connected Ray, or starts a local one (memory figures of Ray workers need a local
    Ray started by this process: they are sampled as its descendants).

    Args:
        config: what to measure.
        on_progress: called with a short line before each step (for a CLI); default: log INFO.

    Returns:
        The result dict written to the JSON file (its path under "json_path"): "config",
        "resolved", "model", "machine", "raw" (per tile shape), "sizes" (one row per size).

    Raises:
        ModelCardError: the model card cannot be loaded.
        RuntimeError: a job or a measurement child failed (its error quoted).
    """
    say = on_progress or (lambda line: log.info("%s", line))
    r = ResolvedBench.from_config(config)
    r.out_dir.mkdir(parents=True, exist_ok=True)
    result = r.header()
    say("Ray: starting / connecting (not timed)")
    _warm_ray(malloc_tuning=config.malloc_tuning)
    if config.warmup_job:
        side = min(config.chunk_size, min(config.sizes))
        scene, _ = ensure_bench_scene(r.out_dir / "inputs", size=side, seed=config.seed)
        say(f"warm-up job on a {side}^2 scene (not timed into any size)")
        root = r.out_dir / "runs" / "warmup"
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        _run_job(r.job_spec(scene, root), r.out_dir)
        result["warmup_job_s"] = time.perf_counter() - t0
    raw_by_tile: dict[tuple[int, ...], dict[str, Any]] = {}
    rows = [_bench_size(r, size, raw_by_tile, say) for size in config.sizes]
    for row, scaling in zip(rows, scaling_summary(rows)):
        row.update(scaling)
    result["machine"]["device_name"] = next(iter(raw_by_tile.values()))["device_name"]
    result["raw"] = [{"tile_shape": list(shape), **{k: v for k, v in raw.items() if k != "device_name"}}
                     for shape, raw in raw_by_tile.items()]
    result["sizes"] = rows
    result["json_path"] = str(write_results(result, r.out_dir))
    return result

