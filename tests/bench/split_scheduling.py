"""How well the split stages' scheduling keeps a fast accelerator fed, without an accelerator.

    python -m tests.bench.split_scheduling [--windows 256] [--cpus 16]

Runs the split stages' own scheduler (`pipelines.run.split.SplitPool`) and, side by side, the Ray
Data pipeline it replaced (read map -> `map_batches` actor pool -> write map, as
`pipelines.run.job` built it before), on stand-in stages that sleep instead of working: a read of
70 ms and a write (statistics and Zarr) of 57 ms per window on a CPU, a forward pass of 12 ms
per window on the "GPU" (the per-window times measured on the NVIDIA H200 machine with the
bundled U-Net). Ray is started with `--cpus` logical CPUs and one logical GPU, so the
scheduling decisions are those of a 16-CPU GPU node whatever this machine has; only the
processes' start-up runs on the real cores. Each pipeline runs twice in a fresh Ray: `cold` (its
worker processes start during the run, as in a job) and `warm`.

It prints wall seconds and, per stage, the mean number of windows in work at once over the
stage's span (busy seconds / span); the "GPU" share is the figure the GPU target is about. A
measurement, not a test: the stand-ins themselves are exercised by tests/test_split.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from pipelines.plan.chunks import plan_chunk
from schemas.records import ChunkResult, ChunkTask, Prediction, ReadWindow

READ_S, FORWARD_S, WRITE_S = 0.070, 0.012, 0.057
BLOCK = 8
WINDOW = 1088
EVENTS = "TESSERA_SPLIT_BENCH_EVENTS"


def _log(kind: str, t0: float) -> None:
    path = os.environ.get(EVENTS)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps([kind, t0, time.time()]) + "\n")


def _window(row: dict[str, Any]) -> dict[str, Any]:
    """A read of the Ray Data pipeline (dict rows, as Ray Data needs)."""
    t0 = time.time()
    time.sleep(READ_S)
    out = dict(row, pixels=np.zeros((4, WINDOW, WINDOW), np.uint16), valid=np.ones((WINDOW, WINDOW), bool))
    _log("read", t0)
    return out


def _written(row: dict[str, Any]) -> dict[str, Any]:
    """A write of the Ray Data pipeline."""
    t0 = time.time()
    time.sleep(WRITE_S)
    _log("write", t0)
    return {"scene_id": row["scene_id"], "key": str(row["index"]), "error": ""}


def _read(task: ChunkTask) -> ReadWindow:
    t0 = time.time()
    time.sleep(READ_S)
    read = ReadWindow(task=task, pixels=np.zeros((4, WINDOW, WINDOW), np.uint16),
                      valid=np.ones((WINDOW, WINDOW), bool), read_s=READ_S)
    _log("read", t0)
    return read


def read_block(tasks: list[ChunkTask], scenes: Any) -> list[ReadWindow]:
    """Stand-in of pipelines.run.split._read_block; fails for a block holding a chunk in the
    scene's `fail_read`."""
    if any(t.window.index in scenes[t.scene_id].fail_read for t in tasks):
        raise OSError("input gone (simulated)")
    return [_read(task) for task in tasks]


def write_block(predictions: list[Prediction], scenes: Any) -> list[ChunkResult]:
    """Stand-in of pipelines.run.split._write_block; fails at a chunk in the scene's `fail_write`."""
    out = []
    for p in predictions:
        t0 = time.time()
        time.sleep(WRITE_S)
        _log("write", t0)
        if p.task.window.index in scenes[p.task.scene_id].fail_write:
            raise OSError(f"disk full (simulated) at chunk {list(p.task.window.index)}")
        out.append(ChunkResult(scene_id=p.task.scene_id, key=p.task.key, error=p.error))
    return out


class SleepActor:
    """Stand-in of pipelines.run.split.SplitPredictActor: FORWARD_S per window."""

    def __init__(self, *, predictor: dict[str, Any]):
        self.forward_s = float(predictor.get("forward_s", FORWARD_S))

    def run(self, reads: list[ReadWindow]) -> tuple[int, list[Prediction]]:
        t0 = time.time()
        time.sleep(self.forward_s * len(reads))
        _log("forward", t0)
        out = [Prediction(task=r.task, labels=np.zeros((WINDOW - 64, WINDOW - 64), np.uint8), probabilities=None,
                          read_s=r.read_s, predict_s=self.forward_s) for r in reads]
        return len(out), out


class BrokenActor:
    """A predictor actor that cannot be built (as with a model that does not load on the workers)."""

    def __init__(self, *, predictor: dict[str, Any]):
        raise RuntimeError("no model here (simulated)")

    def run(self, reads: list[ReadWindow]) -> tuple[int, list[Prediction]]:
        raise AssertionError("never called")


def scenes_stub(*, fail_read: tuple[tuple[int, int], ...] = (),
                fail_write: tuple[tuple[int, int], ...] = ()) -> dict[int, Any]:
    """What the pools need of a scene (failed_result: its path), and the stand-ins' failures."""
    return {0: SimpleNamespace(scene_id=0, info=SimpleNamespace(path="stand-in.tif"),
                               fail_read=set(fail_read), fail_write=set(fail_write))}


def tasks_of(n: int) -> list[ChunkTask]:
    """n chunks of a scene 16 chunks wide, in C order."""
    shape = (-(-n // 16) * 64, 16 * 64)
    return [ChunkTask(scene_id=0, window=plan_chunk(shape, 64, 0, (i // 16, i % 16))) for i in range(n)]


def _dict_rows(n: int) -> list[dict[str, Any]]:
    return [{"scene_id": 0, "index": [i // 16, i % 16]} for i in range(n)]


def _run_pool(n: int, cpus: float) -> int:
    from pipelines.run.split import SplitPool

    tasks = max(2, int((cpus - 1) // 2))  # pipelines.run.job.read_concurrency with one GPU actor
    done = 0

    def on_record(record: ChunkResult) -> None:
        nonlocal done
        done += 1

    with SplitPool(predictor={}, actors=1, actor_options={"num_cpus": 1, "num_gpus": 1}, read_tasks=tasks,
                   write_tasks=tasks, stages=(SleepActor, read_block, write_block)) as pool:
        pool.run(tasks_of(n), scenes=scenes_stub(), on_record=on_record, batch_size=BLOCK)
    return done


def _run_ray_data(n: int, cpus: float) -> int:
    import ray

    rows = _dict_rows(n)
    ray.data.DataContext.get_current().enable_progress_bars = False
    tasks = max(2, int((cpus - 1) // 2))
    ds = (ray.data.from_items(rows, override_num_blocks=-(-len(rows) // BLOCK))
          .map(_window, num_cpus=0.5, compute=ray.data.TaskPoolStrategy(size=tasks))
          .map_batches(_RayDataActor, batch_size=BLOCK, batch_format="numpy",
                       compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1, num_gpus=1)
          .map(_written, num_cpus=0.5))
    return sum(len(b["key"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0))


class _RayDataActor:
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.time()
        n = len(batch["scene_id"])
        time.sleep(FORWARD_S * n)
        _log("forward", t0)
        return {"scene_id": batch["scene_id"], "index": batch["index"],
                "labels": np.zeros((n, WINDOW - 64, WINDOW - 64), np.uint8)}


def _stage_figures(path: Path, t0: float, t1: float) -> dict[str, float]:
    """Mean windows in work per stage (busy / span) over the events that started in [t0, t1]."""
    events = [json.loads(line) for line in path.read_text().splitlines()]
    out = {}
    for kind in ("read", "forward", "write"):
        spans = [(a, b) for k, a, b in events if k == kind and t0 <= a <= t1]
        busy = sum(b - a for a, b in spans)
        span = max(b for _, b in spans) - min(a for a, _ in spans)
        out[kind] = busy / span
    return out


def _child(which: str, windows: int, cpus: float, events_dir: str) -> None:
    import ray

    events = Path(events_dir) / f"{which}.jsonl"
    events.write_text("")
    os.environ[EVENTS] = str(events)
    ray.init(address="local", num_cpus=cpus, num_gpus=1, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", runtime_env={"env_vars": {EVENTS: str(events)}})
    run = _run_pool if which == "pool" else _run_ray_data
    results = []
    for label in ("cold", "warm"):
        t0 = time.time()
        n = run(windows, cpus)
        t1 = time.time()
        results.append({"pipeline": which, "run": label, "windows": n, "wall_s": t1 - t0,
                        **{f"{k}_in_work": v for k, v in _stage_figures(events, t0, t1).items()}})
    print(json.dumps(results))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=256)
    parser.add_argument("--cpus", type=float, default=16)
    args = parser.parse_args(argv)
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as events_dir:
        for which in ("pool", "ray_data"):
            out = subprocess.run([sys.executable, "-m", "tests.bench.split_scheduling", "--child", which,
                                  str(args.windows), str(args.cpus), events_dir],
                                 capture_output=True, text=True, check=True)
            rows += json.loads(next(line for line in out.stdout.splitlines() if line.startswith('[{')))
    ideal = args.windows * FORWARD_S
    print(f"{args.windows} windows, {args.cpus:g} logical CPUs, 1 logical GPU; forward passes alone: {ideal:.2f} s")
    print(f"{'pipeline':10s} {'run':5s} {'wall s':>7s} {'reads':>6s} {'GPU':>5s} {'writes':>6s}  (mean windows in work)")
    for r in rows:
        print(f"{r['pipeline']:10s} {r['run']:5s} {r['wall_s']:7.2f} {r['read_in_work']:6.2f} "
              f"{r['forward_in_work']:5.2f} {r['write_in_work']:6.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
    else:
        main()
