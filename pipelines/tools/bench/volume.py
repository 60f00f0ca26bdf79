"""`tessera bench --volume`: tessera against MONAI ``sliding_window_inference`` on 3D volumes.

For each synthetic CT-like volume (:func:`ensure_bench_volume`, an uncompressed ``.nii`` written
slab by slab so that even 512 x 512 x 1024 is generated in bounded memory; never timed) and each
class count, one row measures, on the same model (the registry's ``unet3d``, random weights
seeded by the config's seed, :func:`pipelines.tools.bench.peers.make_volume_card`), ROI (the tile),
overlap, Gaussian blending and batch:

* **tessera**: the whole job (:func:`pipelines.run.job.run_job`: read windows through nibabel's
  proxy, predict, blend, write the Zarr store, stats, tables) in a child process with its own
  local Ray, warmed by an untimed job on a small volume; wall time, voxels/s and the peak of the
  summed PSS of that child (the job's driver), the Ray workers and Ray's daemons
  (:class:`pipelines.tools.monitor.MemorySampler`'s ``all_pss``, as the 2D bench counts it);
* **MONAI**: the volume read whole, ``sliding_window_inference`` (sw_batch_size = tessera's
  batch), argmax, in its own child process; peak RSS (ru_maxrss) of that process, and the share
  of voxels labelled as tessera labelled them;
* **MONAI at equal redundancy**: tessera's plan computes model voxels for its halos, MONAI's for
  its tile overlap; the peer runs again at the overlap whose model voxels per output voxel equal
  tessera's (:func:`pipelines.tools.bench.maths.monai_overlap_for_redundancy`).

Memory safety: both children run under the same memory budget (80 % of the memory available at
the start unless set): the summed PSS of each child's process tree is watched and the tree is
killed above it (:func:`pipelines.tools.bench.children.run_in_child`), and on CPU MONAI's
process has an address-space limit, so its K-class float32 output buffer fails to allocate at
once when it cannot fit. Either way the row says "OOM" with what the side needed, and the bench
goes on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.tools.bench.children import ChildOutOfMemory, run_in_child
from pipelines.tools.bench.config import VolumeBenchConfig
from pipelines.tools.bench.maths import (
    BREAKDOWN_STAGES,
    breakdown_shares,
    monai_memory_estimate,
    monai_overlap_for_redundancy,
    monai_redundancy,
    redundancy_factor,
    safe_div,
    steady_state,
    to_mib,
)
from pipelines.tools.bench.report import write_results
from schemas.job import default_batch_size

log = logging.getLogger("tessera")

#: Version of the volume result JSON layout.
VOLUME_FORMAT_VERSION = 1
#: Voxel spacing (z, y, x) mm of the synthetic volumes: a thin-slice CT.
VOLUME_SPACING_MM = (1.0, 0.8, 0.8)
#: Side of the untimed warm-up volume (one chunk at most).
WARMUP_SIDE = 32
#: The peer's run at equal redundancy is skipped when no overlap brings its redundancy this close
#: (relative) to tessera's (a volume no larger than the roi has one MONAI window whatever the overlap).
EQ_REDUNDANCY_TOLERANCE = 0.05
#: Tries at starting the tessera child's local Ray (its node start-up times out on a loaded machine).
RAY_START_ATTEMPTS = 3
#: Share of the memory available at the start that either side may hold by default.
DEFAULT_BUDGET_SHARE = 0.8


def volume_label(shape: tuple[int, ...]) -> str:
    """(z, y, x) -> "XxYxZ" as the CLI takes it (in-plane first, slices last); "Nx3" cubes as "N^3"."""
    z, y, x = shape
    return f"{x}^3" if x == y == z else f"{x}x{y}x{z}"


def ensure_bench_volume(inputs_dir: Path, *, shape: tuple[int, int, int], seed: int) -> tuple[Path, float]:
    """The synthetic CT-like volume of (z, y, x) `shape` as an uncompressed ``.nii`` (int16 HU),
    written slab by slab (:func:`pipelines.tools.phantom.write_phantom_image`) once and reused
    while shape and seed match.

    Returns:
        (path, seconds spent generating: 0.0 when reused).
    """
    from pipelines.tools.phantom import PhantomSpec, write_phantom_image

    inputs_dir.mkdir(parents=True, exist_ok=True)
    z, y, x = shape
    image = inputs_dir / f"bench-volume-{x}x{y}x{z}-seed{seed}.nii"
    stamp = image.with_suffix(".json")
    wanted = {"shape": list(shape), "seed": seed, "spacing_mm": list(VOLUME_SPACING_MM), "format": 1}
    if image.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return image, 0.0
    t0 = time.perf_counter()
    write_phantom_image(PhantomSpec(shape=shape, spacing_mm=VOLUME_SPACING_MM, seed=seed), image)
    stamp.write_text(json.dumps(wanted))
    return image, time.perf_counter() - t0


# ----------------------------------------------------------------------------- the tessera side (a child)


def run_tessera_volume(
    *, card_path: str, scene_path: str, warmup_path: str, root: str, chunk_size: int, halo: int, tile_size: int,
    overlap: float, batch_size: int, actors: int, torch_threads: int, cpus_per_actor: float,
    gpus_per_actor: float, precision: str, job_malloc_tuning: bool, channels_last: bool, fold_bn: bool,
) -> dict[str, Any]:
    """The tessera job on one volume, in a child process with its own local Ray.

    Ray is started and an untimed job runs on the small `warmup_path` volume first (worker
    processes importing torch, zarr, nibabel); then the timed job, its memory sampled over this
    process and every process it started (Ray's workers and daemons).

    Returns:
        wall_s, warmup_s, n_chunks, seconds per stage, job phases, zarr_path, and the memory
        peaks in bytes (all_pss, job_pss, system_pss, driver_rss, max_child_rss).
    """
    import ray

    from pipelines.run.cluster import ensure_ray
    from pipelines.run.job import run_job
    from pipelines.tools.monitor import MemorySampler
    from schemas.job import JobSpec
    from schemas.tables import STATUS_COMPLETE
    from workers.runtime import with_malloc_tunables

    def spec(scene: str, out: Path) -> JobSpec:
        return JobSpec.model_validate({
            "name": "tessera-bench-volume",
            "inputs": [scene],
            "model": {"card": card_path},
            "tiling": {"volume_chunk_size": chunk_size, "halo": halo, "tile_size": tile_size,
                       "tile_overlap": overlap, "blend": "gaussian"},
            "resources": {"actors": actors, "num_gpus_per_actor": gpus_per_actor, "cpus_per_actor": cpus_per_actor,
                          "batch_size": batch_size, "torch_threads": torch_threads, "malloc_tuning": job_malloc_tuning},
            "inference": {"precision": precision, "channels_last": channels_last, "fold_batchnorm": fold_bn},
            "output": {"root": str(out), "overwrite": True},
        })

    def run(scene: str, out: Path) -> Any:
        shutil.rmtree(out, ignore_errors=True)
        result = run_job(spec(scene, out), base_dir=out)
        outcome = result.scenes[0]
        if outcome.status != STATUS_COMPLETE or outcome.row is None:
            raise RuntimeError(f"benchmark job failed on {outcome.source}: {outcome.error}")
        return result

    for attempt in range(RAY_START_ATTEMPTS):  # a busy machine can time out Ray's node start-up
        try:
            ensure_ray(worker_env=with_malloc_tunables() if job_malloc_tuning else None)
            break
        except Exception:
            ray.shutdown()
            if attempt + 1 == RAY_START_ATTEMPTS:
                raise
            time.sleep(10)
    try:
        ray.get(ray.remote(num_cpus=0)(lambda: None).remote())
        t0 = time.perf_counter()
        run(warmup_path, Path(root) / "warmup")
        warmup_s = time.perf_counter() - t0
        with MemorySampler() as memory:
            t0 = time.perf_counter()
            job = run(scene_path, Path(root) / "job")
            wall_s = time.perf_counter() - t0
    finally:
        ray.shutdown()
    outcome = job.scenes[0]
    peaks = memory.peaks
    return {
        "wall_s": wall_s,
        "warmup_s": warmup_s,
        "n_chunks": outcome.n_chunks,
        "seconds": {stage: float(outcome.row[f"{stage}_s"]) for stage in BREAKDOWN_STAGES},
        "phases": dict(job.phases),
        "zarr_path": str(outcome.context.zarr_path),
        "all_pss": peaks.all_pss, "job_pss": peaks.job_pss, "system_pss": peaks.system_pss,
        "driver_rss": peaks.driver_rss, "max_child_rss": peaks.max_child_rss,
    }


# ----------------------------------------------------------------------------- orchestration


@dataclass(frozen=True)
class ResolvedVolumeBench:
    """The config with this machine's device, threads, batch and memory budget filled in."""

    config: VolumeBenchConfig
    out_dir: Path
    device: str  # "cpu" or "cuda"
    actors: int
    threads_per_actor: int
    model_threads: int  # the peer gets the threads all predictors share
    gpus_per_actor: float
    cpus_per_actor: float
    batch: int
    budget_bytes: int

    @classmethod
    def from_config(cls, config: VolumeBenchConfig) -> ResolvedVolumeBench:
        import psutil

        probe = run_in_child("probe_device", device=config.device)
        device, n_gpus = probe["type"], probe["count"]
        cpus = os.cpu_count() or 1
        actors = config.actors or (max(1, n_gpus) if device == "cuda" else cpus)
        threads = config.torch_threads or max(1, cpus // actors)
        budget = (int(config.memory_budget_gib * 2**30) if config.memory_budget_gib is not None
                  else int(DEFAULT_BUDGET_SHARE * psutil.virtual_memory().available))
        tasks = 1 if device == "cuda" else 0
        return cls(
            config=config, out_dir=config.out_dir.expanduser().resolve(), device=device, actors=actors,
            threads_per_actor=threads, model_threads=min(cpus, threads * actors),
            gpus_per_actor=min(1.0, max(n_gpus, 1) / actors) if device == "cuda" else 0.0,
            cpus_per_actor=min(1.0, max(0.25, (cpus - tasks) / actors)),
            batch=config.batch_size or default_batch_size(device), budget_bytes=budget,
        )

    def header(self) -> dict[str, Any]:
        from datetime import datetime, timezone

        from pipelines.tools.bench.probes import machine_facts

        c = self.config
        return {
            "format": VOLUME_FORMAT_VERSION,
            "kind": "volume",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": c.to_json(),
            "resolved": {"device": self.device, "actors": self.actors, "torch_threads_per_actor": self.threads_per_actor,
                         "model_threads": self.model_threads, "num_gpus_per_actor": self.gpus_per_actor,
                         "batch_size": self.batch, "memory_budget_mib": to_mib(self.budget_bytes)},
            "model": {"architecture": "unet3d", "arch_args": {"base_channels": c.base_channels, "depth": c.depth},
                      "stride": 2**c.depth, "weights": f"random, seed {c.seed}"},
            "machine": machine_facts(self.device),
            "notes": [
                "volumes are given as XxYxZ (slices last) and stored (z, y, x)",
                "tessera_peak_mib: peak summed PSS of the job's driver, Ray workers and Ray's daemons (all_pss), "
                "sampled once a second during the timed job; monai_peak_mib: the peer process's ru_maxrss",
                "tessera wall: the whole job (read, predict, blend, write, stats, tables), Ray up and warm; "
                "MONAI seconds: sliding_window_inference + argmax, the volume already read (monai_read_s apart), "
                "the model already loaded",
                "tessera_start_s: from the job's chunk stream start to its first chunk (the predictor actors "
                "starting, importing torch, loading the model: paid once per job); tessera_steady_voxels_s: "
                "the voxels of the other chunks over the seconds after the first",
                "redundancy: model voxels per output voxel of each side's plan",
                "OOM: a side over the memory budget (killed by the watchdog) or failing to allocate under it",
            ],
        }


def _tessera_row(r: ResolvedVolumeBench, card: str, scene: Path, warmup: Path, root: Path) -> dict[str, Any]:
    """The tessera side of one row (status "ok" or "oom")."""
    c = r.config
    try:
        got = run_in_child(
            # the child is the job's driver, which runs without the tunables, as in `tessera run`
            "run_tessera_volume", memory_limit_bytes=r.budget_bytes,
            card_path=card, scene_path=str(scene), warmup_path=str(warmup), root=str(root),
            chunk_size=c.chunk_size, halo=c.halo, tile_size=c.tile_size, overlap=c.tile_overlap,
            batch_size=r.batch, actors=r.actors, torch_threads=r.threads_per_actor, cpus_per_actor=r.cpus_per_actor,
            gpus_per_actor=r.gpus_per_actor, precision=c.precision, job_malloc_tuning=c.malloc_tuning,
            channels_last=c.channels_last, fold_bn=c.fold_batchnorm,
        )
    except ChildOutOfMemory as exc:
        return {"tessera_status": "oom", "tessera_error": str(exc), "tessera_peak_mib": to_mib(exc.peak_bytes)}
    return {
        "tessera_status": "ok",
        "tessera_error": None,
        "tessera_wall_s": got["wall_s"],
        "tessera_warmup_s": got["warmup_s"],
        "n_chunks": got["n_chunks"],
        "tessera_peak_mib": to_mib(got["all_pss"]),
        "tessera_job_pss_peak_mib": to_mib(got["job_pss"]),
        "tessera_system_pss_peak_mib": to_mib(got["system_pss"]),
        "tessera_driver_peak_mib": to_mib(got["driver_rss"]),
        "tessera_worker_peak_mib": to_mib(got["max_child_rss"]),
        "breakdown_s": got["seconds"],
        "breakdown": breakdown_shares(got["seconds"]),
        "job_phases_s": got["phases"],
        "zarr_path": got["zarr_path"],
    }


def _monai_run(r: ResolvedVolumeBench, card: str, scene: Path, overlap: float, zarr_path: str | None,
               estimate: int) -> dict[str, Any]:
    """One peer run: {"status": "ok" | "oom", ...} (an OOM message names what it needed)."""
    c = r.config
    needs = f"needs ~{estimate / 2**30:.1f} GiB, budget {r.budget_bytes / 2**30:.1f} GiB"
    try:
        got = run_in_child(
            "run_monai_volume_peer", malloc_tuning=c.malloc_tuning, memory_limit_bytes=r.budget_bytes,
            card_path=card, scene_path=str(scene), tile_size=c.tile_size, overlap=overlap, batch_size=r.batch,
            device=r.device, precision=c.precision, threads=r.model_threads, zarr_path=zarr_path,
            channels_last=c.channels_last, fold_bn=c.fold_batchnorm, memory_budget_bytes=r.budget_bytes,
        )
    except ChildOutOfMemory as exc:
        return {"status": "oom", "error": f"OOM ({needs}): {exc}", "peak_mib": to_mib(exc.peak_bytes)}
    if got["oom"]:
        return {"status": "oom", "error": f"OOM ({needs}): {got['error']}", "peak_mib": to_mib(got["peak_rss_bytes"]),
                "gpu_peak_mib": to_mib(got.get("gpu_peak_bytes"))}
    return {"status": "ok", "error": None, "seconds": got["seconds"], "read_s": got["read_s"],
            "voxels_s": got["voxels_s"], "peak_mib": to_mib(got["peak_rss_bytes"]),
            "gpu_peak_mib": to_mib(got["gpu_peak_bytes"]), "agreement": got["agreement"]}


def _bench_row(r: ResolvedVolumeBench, shape: tuple[int, int, int], classes: int, card: str, scene: Path,
               warmup: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Measure one (volume, class count): tessera, MONAI, MONAI at equal redundancy."""
    c = r.config
    label = volume_label(shape)
    voxels = shape[0] * shape[1] * shape[2]
    stride = 2**c.depth
    redundancy = redundancy_factor(shape, c.chunk_size, c.halo, c.tile_size, c.tile_overlap, stride=stride)
    peer_redundancy = monai_redundancy(shape, c.tile_size, c.tile_overlap, stride=stride)
    eq_overlap = monai_overlap_for_redundancy(shape, c.tile_size, redundancy, stride=stride)
    eq_redundancy = monai_redundancy(shape, c.tile_size, eq_overlap, stride=stride)
    estimate = monai_memory_estimate(shape, channels=1, classes=classes, input_itemsize=2)
    root = r.out_dir / "runs" / f"volume-{label.replace('^', '')}-k{classes}"

    say(f"{label}, {classes} classes: tessera job ({r.actors} actor(s), {r.device}, chunk {c.chunk_size}, "
        f"halo {c.halo}, tile {c.tile_size}, overlap {c.tile_overlap}, batch {r.batch}; own local Ray)")
    row: dict[str, Any] = {
        "shape_zyx": list(shape), "size": label, "voxels": voxels, "classes": classes, "scene": str(scene),
        "redundancy_tessera": redundancy, "redundancy_monai": peer_redundancy,
        "monai_estimate_mib": to_mib(estimate), "memory_budget_mib": to_mib(r.budget_bytes),
        **_tessera_row(r, card, scene, warmup, root),
    }
    if row["tessera_status"] == "ok":
        row["tessera_voxels_s"] = voxels / row["tessera_wall_s"]
        steady = steady_state(row["job_phases_s"], voxels, row["n_chunks"], 1.0)
        row["tessera_start_s"], row["tessera_steady_voxels_s"] = steady["start_s"], steady["steady_px_s"]
        say(f"{label}, {classes} classes: tessera {row['tessera_wall_s']:.1f} s, "
            f"{row['tessera_voxels_s'] / 1e6:.3f} Mvox/s, peak {row['tessera_peak_mib']:.0f} MiB")
    else:
        say(f"{label}, {classes} classes: tessera OOM: {row['tessera_error']}")
    zarr_path = row.get("zarr_path")

    peer: dict[str, Any] = {"status": "skipped", "error": "disabled (--no-monai)"}
    peer_eq: dict[str, Any] = {"status": "skipped", "error": "disabled"}
    if c.monai:
        say(f"{label}, {classes} classes: MONAI sliding_window_inference, whole volume (separate process; "
            f"estimated ~{estimate / 2**30:.2f} GiB)")
        peer = _monai_run(r, card, scene, c.tile_overlap, zarr_path, estimate)
        if c.monai_equal_redundancy:
            if abs(eq_redundancy - redundancy) > EQ_REDUNDANCY_TOLERANCE * redundancy:
                peer_eq = {"status": "skipped", "error": (
                    f"no overlap gives MONAI tessera's redundancy {redundancy:.3f} on this volume "
                    f"(closest {eq_redundancy:.3f})")}
            elif abs(eq_redundancy - peer_redundancy) <= 1e-9 * peer_redundancy:
                peer_eq = {**peer, "reused": True}  # the first run already computes as many model voxels
            elif peer["status"] == "ok":
                say(f"{label}, {classes} classes: MONAI at equal redundancy: overlap {eq_overlap:.4f}")
                peer_eq = _monai_run(r, card, scene, eq_overlap, zarr_path, estimate)
            else:
                peer_eq = {"status": peer["status"], "error": "not run: the first peer run already failed"}
        say(f"{label}, {classes} classes: MONAI " + (
            f"{peer['seconds']:.1f} s, {peer['voxels_s'] / 1e6:.3f} Mvox/s, peak {peer['peak_mib']:.0f} MiB"
            if peer["status"] == "ok" else peer["error"]))
    tessera_vox_s = row.get("tessera_voxels_s")
    row.update({
        "monai_status": peer["status"], "monai_error": peer.get("error"), "monai_s": peer.get("seconds"),
        "monai_read_s": peer.get("read_s"), "monai_voxels_s": peer.get("voxels_s"),
        "monai_peak_mib": peer.get("peak_mib"), "monai_gpu_peak_mib": peer.get("gpu_peak_mib"),
        "monai_agreement": peer.get("agreement"),
        "monai_eq_overlap": (c.tile_overlap if peer_eq.get("reused") else eq_overlap) if peer_eq["status"] == "ok" else None,
        "monai_eq_redundancy": eq_redundancy if peer_eq["status"] == "ok" else None,
        "monai_eq_status": peer_eq["status"], "monai_eq_error": peer_eq.get("error"),
        "monai_eq_s": peer_eq.get("seconds"), "monai_eq_voxels_s": peer_eq.get("voxels_s"),
        "monai_eq_peak_mib": peer_eq.get("peak_mib"), "monai_eq_agreement": peer_eq.get("agreement"),
        "tessera_vs_monai": safe_div(tessera_vox_s, peer.get("voxels_s")),
        "tessera_vs_monai_eq": safe_div(tessera_vox_s, peer_eq.get("voxels_s")),
        "tessera_steady_vs_monai_eq": safe_div(row.get("tessera_steady_voxels_s"), peer_eq.get("voxels_s")),
        "memory_tessera_vs_monai": safe_div(row.get("tessera_peak_mib") if row["tessera_status"] == "ok" else None,
                                            peer.get("peak_mib") if peer["status"] == "ok" else None),
    })
    shutil.rmtree(root / "warmup", ignore_errors=True)
    return row


def memory_scaling(rows: list[dict[str, Any]]) -> None:
    """Add each side's peak memory relative to the smallest row (fewest voxels, then fewest
    classes) where that side ran: 1.0 = flat in volume size and class count."""
    for side in ("tessera", "monai"):
        ok = [r for r in rows if r[f"{side}_status"] == "ok" and r.get(f"{side}_peak_mib")]
        base = min(ok, key=lambda r: (r["voxels"], r["classes"]))[f"{side}_peak_mib"] if ok else None
        for r in rows:
            r[f"{side}_memory_vs_smallest"] = (safe_div(r.get(f"{side}_peak_mib"), base)
                                               if r[f"{side}_status"] == "ok" else None)


def run_volume_bench(config: VolumeBenchConfig, *, on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the volume benchmark for every (volume, class count); write out_dir/bench-volume-<UTC>.json
    and bench-volume-latest.json.

    Returns:
        The result dict written to the JSON file (its path under "json_path"): "config",
        "resolved", "model", "machine", "cards" (per class count), "rows" (one per volume and
        class count, volumes outer).

    Raises:
        RuntimeError: a job or a measurement child failed for another reason than memory.
    """
    say = on_progress or (lambda line: log.info("%s", line))
    r = ResolvedVolumeBench.from_config(config)
    r.out_dir.mkdir(parents=True, exist_ok=True)
    result = r.header()
    say(f"memory budget per side: {r.budget_bytes / 2**30:.1f} GiB")
    cards: dict[int, str] = {}
    result["cards"] = []
    for k in config.classes:
        made = run_in_child("make_volume_card", out_dir=str(r.out_dir / "models"), num_classes=k,
                            base_channels=config.base_channels, depth=config.depth, tile_size=config.tile_size,
                            halo=config.halo, seed=config.seed)
        cards[k] = made["card_path"]
        result["cards"].append({"classes": k, **made})
    warmup, _ = ensure_bench_volume(r.out_dir / "inputs", shape=(WARMUP_SIDE,) * 3, seed=config.seed)
    rows = []
    for shape in config.volumes:
        scene, generate_s = ensure_bench_volume(r.out_dir / "inputs", shape=shape, seed=config.seed)
        if generate_s:
            say(f"{volume_label(shape)}: generated {scene.name} in {generate_s:.1f} s (not timed)")
        for k in config.classes:
            rows.append(_bench_row(r, shape, k, cards[k], scene, warmup, say))
    memory_scaling(rows)
    result["rows"] = rows
    result["json_path"] = str(write_results(result, r.out_dir, prefix="bench-volume"))
    return result
