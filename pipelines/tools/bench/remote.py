"""`tessera bench --remote-latency MS`: the same job on the same scene read from local disk and over
HTTP with added latency per request, side by side in one run.

The scene is the benchmark's synthetic scene as a COG (512-px tiles, DEFLATE, overviews); the HTTP
side serves that very file from a
loopback Range server (:class:`pipelines.tools.rangeserver.RangeServer`) that waits ``MS``
milliseconds before answering each request, as a round trip to an object store would. Every side
runs the same model, tiling, actors and chunks (equal work); the local side runs without
read-ahead (the job default for local files), each HTTP side with it (the default for URIs) and,
to show what it buys, without it. Reported per side: whole-job wall time, the rate after the first
chunk (predictor start-up excluded), requests and bytes fetched, and the ratio to the local side.
Outputs are compared byte for byte with the local side's classes.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.tools.bench.config import BenchConfig
from pipelines.tools.bench.maths import safe_div, steady_state
from pipelines.tools.bench.report import write_results
from pipelines.tools.bench.resolve import ResolvedBench
from pipelines.tools.bench.run import _run_job, _warm_ray, ensure_bench_scene

log = logging.getLogger("tessera")


def _classes(root, scene: str) -> np.ndarray:
    import zarr

    from schemas import store as layout

    return zarr.open_array(str(root / f"{scene}.zarr"), path=layout.classes_path(2), mode="r")[:]


def ensure_cog(scene: Path) -> Path:
    """`scene` as a Cloud-Optimized GeoTIFF beside it (512-px tiles, DEFLATE, overviews), written
    once: what object stores serve, and what both sides of this benchmark read."""
    import rasterio.shutil

    cog = scene.with_name(f"{scene.stem}.cog.tif")
    if not cog.is_file() or cog.stat().st_mtime < scene.stat().st_mtime:
        tmp = cog.with_name(f".{cog.name}.tmp")
        rasterio.shutil.copy(scene, tmp, driver="COG", blocksize=512, compress="deflate",
                             overview_resampling="nearest")
        tmp.replace(cog)
    return cog


def run_remote_bench(config: BenchConfig, *, latencies_ms: Sequence[float],
                     on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Local disk vs HTTP with each added latency, with and without read-ahead, for the first
    size of `config`; writes out_dir/bench-remote-<UTC>.json and bench-remote-latest.json.

    Raises:
        ValueError: a negative latency.
        RuntimeError: a job failed, or an HTTP side's classes differ from the local side's.
    """
    from pipelines.tools.rangeserver import RangeServer

    if any(ms < 0 for ms in latencies_ms):
        raise ValueError(f"latencies must be >= 0 ms, got {list(latencies_ms)}")
    say = on_progress or (lambda line: log.info("%s", line))
    r = ResolvedBench.from_config(config)
    r.out_dir.mkdir(parents=True, exist_ok=True)
    size = config.sizes[0]
    scene = ensure_cog(ensure_bench_scene(r.out_dir / "inputs", size=size, seed=config.seed)[0])
    say("Ray: starting / connecting (not timed)")
    _warm_ray(malloc_tuning=config.malloc_tuning)
    file_bytes = scene.stat().st_size

    def run(name: str, source: str, *, prefetch: bool, server: RangeServer | None = None) -> dict[str, Any]:
        root = r.out_dir / "runs" / f"remote-{name}"
        shutil.rmtree(root, ignore_errors=True)
        spec = r.job_spec(scene, root)
        spec = spec.model_copy(update={"inputs": (source,),
                                       "resources": spec.resources.model_copy(update={"prefetch": prefetch})})
        if server is not None:
            server.reset()
        say(f"{size}^2 {name}: {source} (read-ahead {'on' if prefetch else 'off'})")
        t0 = time.perf_counter()
        job = _run_job(spec, r.out_dir)
        wall = time.perf_counter() - t0
        outcome = job.scenes[0]
        steady = steady_state(job.phases, size * size, outcome.n_chunks, 0.0)
        row = {"side": name, "source": source, "prefetch": prefetch, "wall_s": wall,
               "e2e_px_s": size * size / wall, "chunks_s": job.phases.get("chunks_s"),
               "first_chunk_s": steady["start_s"], "steady_px_s": steady["steady_px_s"],
               "read_s": float(outcome.row["read_s"]), "n_chunks": outcome.n_chunks,
               "root": str(root), "scene": outcome.name}
        if server is not None:
            row["requests"] = len(server.requests)
            row["bytes_fetched"] = sum(server.bytes_sent.values())
            row["fetched_share_of_file"] = row["bytes_fetched"] / file_bytes
        return row

    warm = r.out_dir / "runs" / "remote-warmup"
    shutil.rmtree(warm, ignore_errors=True)
    say("warm-up job (not timed)")
    _run_job(r.job_spec(ensure_bench_scene(r.out_dir / "inputs", size=min(config.chunk_size, size),
                                           seed=config.seed)[0], warm), r.out_dir)
    rows = [run("local", str(scene), prefetch=False)]
    reference = _classes(r.out_dir / "runs" / "remote-local", rows[0]["scene"])
    for ms in latencies_ms:
        with RangeServer(scene.parent, latency_s=ms / 1000.0) as server:
            url = f"{server.url}/{scene.name}"
            for prefetch in (True, False):
                row = run(f"http-{ms:g}ms-{'ahead' if prefetch else 'inline'}", url, prefetch=prefetch, server=server)
                row["latency_ms"] = ms
                if not np.array_equal(_classes(r.out_dir / "runs" / f"remote-{row['side']}", row["scene"]), reference):
                    raise RuntimeError(f"{row['side']}: classes differ from the local side's")
                row["classes_equal_local"] = True
                rows.append(row)
    local = rows[0]
    for row in rows:
        row["e2e_vs_local"] = safe_div(row["e2e_px_s"], local["e2e_px_s"])
        row["steady_vs_local"] = safe_div(row["steady_px_s"], local["steady_px_s"])
    result = {
        "kind": "remote",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config.to_json(),
        "resolved": {"card_path": str(r.card_path), "model": r.card.name, "halo": r.halo, "tile_size": r.tile,
                     "actors": r.actors, "torch_threads_per_actor": r.threads_per_actor, "device": r.device,
                     "chunk_size": config.chunk_size, "size": size, "file_bytes": file_bytes},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
        "notes": ["one loopback HTTP server with the latency added before each response; GDAL's /vsicurl/ in "
                  "each actor; equal model, tiling, actors and chunks on every side",
                  "steady = the rate after the first chunk (predictor start-up excluded)"],
        "rows": rows,
    }
    result["json_path"] = str(write_results(result, r.out_dir, prefix="bench-remote"))
    return result


def format_rows(result: dict[str, Any]) -> list[str]:
    """One line per side for the CLI."""
    lines = []
    for row in result["rows"]:
        fetched = (f", {row['requests']} requests, {row['bytes_fetched'] / 2**20:.1f} MiB "
                   f"({row['fetched_share_of_file']:.2f} of the file)") if "requests" in row else ""
        steady = row["steady_px_s"]
        lines.append(f"{row['side']}: wall {row['wall_s']:.1f} s, e2e {row['e2e_px_s'] / 1e6:.2f} Mpx/s "
                     f"(x{row['e2e_vs_local']:.3f} local), after 1st chunk "
                     f"{'-' if steady is None else f'{steady / 1e6:.2f}'} Mpx/s "
                     f"(x{row['steady_vs_local'] or float('nan'):.3f} local){fetched}")
    return lines
