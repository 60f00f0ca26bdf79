"""Split stages: read tasks -> predictor actors -> write tasks, for accelerators.

A GPU actor runs a window's forward pass in a few milliseconds, while reading (decoding) the
window and writing its chunk with its statistics take tens of milliseconds of a CPU each. So
reads and writes run as Ray tasks on the CPUs beside the actors, and the actors only predict.

The driver schedules the three stages itself, like the fused pool (`pipelines.run.fused`), rather
than through Ray Data. Ray Data's streaming executor ran the write tasks about 2 at a time
with 15 CPUs free on the H200 machine (docs/benchmarks.md, GPU results), and a sleep-only
simulation of this pipeline on 16 logical CPUs and 1 logical GPU (reads 70 ms, forward 12 ms,
writes 57 ms a window, 256 windows) took 12.2 s in a fresh Ray with Ray Data and 6.7 s with
this loop (7.1 and 4.6 s with the worker processes already started; the GPU's share of its
span 0.57 against 0.90). Here:

- each read task reads a block of consecutive windows (stripe order, so the input blocks that
  neighbouring halo windows share are decoded once, in that worker's GDAL block cache);
- a block whose read is done goes to the predictor actor with the fewest calls queued (at most
  `in_flight` each); blocks read but not yet handed over count against the read limit, so the
  windows held in the object store stay bounded;
- a predicted block goes to a write task at once (labels only: pixels never come back);
- only the small per-chunk records come back to the driver.

The predictor actors start when the pool is made, so torch, the CUDA context and the model load
while the driver opens and hashes the inputs.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from pipelines.run.pools import ActorPool, actor_died, error_line, failed_result
from pipelines.run.stages import SceneContext, read_stage, write_stage
from schemas.records import ChunkResult, ChunkTask, Prediction, ReadWindow
from workers.actors import PredictorActor  # torch-free until an actor starts

log = logging.getLogger("tessera")


class SplitPredictActor:
    """Predicts blocks of read windows; the predictions carry labels instead of pixels."""

    def __init__(self, *, predictor: dict[str, Any]):
        self.actor = PredictorActor(**predictor)

    def run(self, reads: Sequence[ReadWindow]) -> tuple[int, list[Prediction]]:
        """(number of windows, their predictions for `write_stage`) of a block of read windows.

        Windows are batched into forward passes where the model takes them whole
        (`PredictorActor.predict_windows`); a window whose prediction fails carries the error
        alone, and windows that failed to read or are wholly nodata pass through. The count
        comes back as a separate small object, so the driver learns that a call is done (or
        that the actor died) without fetching the labels.
        """
        out = self.actor.predict_windows(list(reads))
        return len(out), out


def _read_block(tasks: Sequence[ChunkTask], scenes: dict[int, SceneContext]) -> list[ReadWindow]:
    return [read_stage(task, scenes=scenes) for task in tasks]


def _write_block(predictions: Sequence[Prediction], scenes: dict[int, SceneContext]) -> list[ChunkResult]:
    return [write_stage(p, scenes=scenes) for p in predictions]


class SplitPool(ActorPool):
    """Predictor actors plus the read and write tasks around them (see the module docstring).

    Use as a context manager: the actors are killed on exit.

    Args:
        predictor: PredictorActor keyword arguments.
        actors: number of predictor actors.
        actor_options: Ray options of the actors (num_cpus, num_gpus, runtime_env).
        read_tasks: read tasks in flight at most (blocks read but not yet predicted included).
        write_tasks: write tasks in flight at most.
        task_cpus: CPUs reserved per read or write task.
        task_options: further Ray options of the read and write tasks (a ``runtime_env``), or None.
        in_flight: calls queued per actor, so it never waits for the driver between blocks.
        stages: (actor class, read function, write function); the defaults are the real
            stages. Another triple (same signatures) runs the same scheduling on stand-ins, as
            the scheduling benchmark (tests/bench/split_scheduling.py) and tests do.
    """

    def __init__(self, *, predictor: dict[str, Any], actors: int, actor_options: dict[str, Any],
                 read_tasks: int, write_tasks: int, task_cpus: float = 0.5, in_flight: int = 2,
                 stages: tuple[type, Callable[..., Any], Callable[..., Any]] | None = None,
                 task_options: dict[str, Any] | None = None):
        actor_cls, self._read_fn, self._write_fn = stages or (SplitPredictActor, _read_block, _write_block)
        super().__init__(actor_cls, predictor=predictor, actors=actors, actor_options=actor_options)
        self.read_tasks, self.write_tasks = max(1, read_tasks), max(1, write_tasks)
        self.task_cpus, self.in_flight = task_cpus, max(1, in_flight)
        self.task_options = dict(task_options or {})

    def run(
        self,
        tasks: Sequence[ChunkTask],
        *,
        scenes: dict[int, SceneContext],
        on_record: Callable[[ChunkResult], None],
        batch_size: int,
    ) -> dict[str, float]:
        """Compute every chunk; call `on_record` once per chunk, as write tasks finish.

        Returns the tasks in flight per stage on average over the run (`split_reads_in_flight`,
        `split_calls_in_flight`, `split_writes_in_flight`), for the job's phases.

        Args:
            tasks: the chunks, in stripe order.
            scenes: the scenes the tasks refer to, by scene id.
            on_record: called in the driver for each chunk's record.
            batch_size: consecutive chunks per read task, actor call and write task.

        Failures: a read or write task that fails (after Ray's retries) fails its block's
        chunks; an actor is restarted once by Ray and its call retried once, after which the
        chunks of its failed calls fail and the other actors go on. Raises TesseraError only if
        every actor died before any predicted a block (e.g. the model cannot be built on the
        workers): a job-level problem.
        """
        import ray

        blocks = [list(tasks[i:i + batch_size]) for i in range(0, len(tasks), batch_size)]
        if not blocks:
            return {}
        read = ray.remote(num_cpus=self.task_cpus, **self.task_options)(self._read_fn)
        write = ray.remote(num_cpus=self.task_cpus, **self.task_options)(self._write_fn)
        scenes_ref = ray.put(scenes)
        todo = deque(range(len(blocks)))
        reading: dict[Any, int] = {}  # read ref -> block
        read_done: deque[tuple[Any, int]] = deque()  # read, not yet handed to an actor
        predicting: dict[Any, tuple[int, int, Any]] = {}  # count ref -> (actor, block, predictions ref)
        queued = [0] * len(self.handles)
        alive = set(range(len(self.handles)))
        to_write: deque[tuple[Any, int]] = deque()
        writing: dict[Any, int] = {}  # results ref -> block
        predicted = 0
        last_error = ""
        # in-flight counts integrated over time, for the log line at the end
        t_start = t_last = time.perf_counter()
        area = [0.0, 0.0, 0.0]

        def fail_block(b: int, problem: str) -> None:
            for task in blocks[b]:
                on_record(failed_result(task, scenes, problem))

        while True:
            if not alive:  # no actor left: nothing read or still to read can be predicted
                for b in [*todo, *(b for _, b in read_done)]:
                    fail_block(b, last_error or "no predictor actor left")
                todo.clear()
                read_done.clear()
            while todo and len(reading) + len(read_done) < self.read_tasks:
                b = todo.popleft()
                reading[read.remote(blocks[b], scenes_ref)] = b
            while read_done and alive:
                worker = min(alive, key=lambda w: (queued[w], w))
                if queued[worker] >= self.in_flight:
                    break
                ref, b = read_done.popleft()
                count_ref, predictions_ref = self.handles[worker].run.options(num_returns=2).remote(ref)
                predicting[count_ref] = (worker, b, predictions_ref)
                queued[worker] += 1
            while to_write and len(writing) < self.write_tasks:
                predictions_ref, b = to_write.popleft()
                writing[write.remote(predictions_ref, scenes_ref)] = b
            waiting = [*reading, *predicting, *writing]
            if not waiting:
                break
            ready, _ = ray.wait(waiting, num_returns=1, fetch_local=False)
            now = time.perf_counter()
            for i, n in enumerate((len(reading), len(predicting), len(writing))):
                area[i] += n * (now - t_last)
            t_last = now
            ref = ready[0]
            if ref in reading:
                b = reading.pop(ref)
                if alive:
                    read_done.append((ref, b))  # a failed read fails the actor call that gets it
                else:
                    fail_block(b, last_error or "no predictor actor left")
            elif ref in predicting:
                worker, b, predictions_ref = predicting.pop(ref)
                queued[worker] -= 1
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    last_error = actor_died(exc, worker, alive, any_done=predicted > 0)
                    fail_block(b, last_error)
                    continue
                except ray.exceptions.RayError as exc:  # the block's read task failed, or a bug
                    fail_block(b, f"reading or predicting the block failed: {error_line(exc)}")
                    continue
                predicted += 1
                to_write.append((predictions_ref, b))
            else:
                b = writing.pop(ref)
                try:
                    results = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    fail_block(b, f"writing the block failed: {error_line(exc)}")
                    continue
                for result in results:
                    on_record(result)
        span = max(t_last - t_start, 1e-9)
        log.info("split stages: %d blocks of %d chunks in %.1f s; tasks in flight on average: reads %.1f "
                 "(limit %d), actor calls %.1f (limit %d), writes %.1f (limit %d)", len(blocks), batch_size, span,
                 area[0] / span, self.read_tasks, area[1] / span, self.in_flight * len(self.handles),
                 area[2] / span, self.write_tasks)
        return {"split_reads_in_flight": area[0] / span, "split_calls_in_flight": area[1] / span,
                "split_writes_in_flight": area[2] / span}
