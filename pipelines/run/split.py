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

Faults are handled as in the fused pool, with its retry rules (`pipelines.run.pools.Batches`,
`CallClock`): a stage past `resources.chunk_timeout_s` is hung (see `SplitPool.run`), and the
calls in flight of an actor Ray gave up on go to a fresh actor.

The predictor actors start when the pool is made, so torch, the CUDA context and the model load
while the driver opens and hashes the inputs.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from pipelines.run.pools import (
    ActorPool,
    Batches,
    CallClock,
    actor_died,
    error_line,
    failed_result,
    timed_out_reason,
)
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
        chunk_timeout_s: float | None = None,
    ) -> dict[str, float]:
        """Compute every chunk; call `on_record` once per chunk, as write tasks finish.

        Returns the tasks in flight per stage on average over the run (`split_reads_in_flight`,
        `split_calls_in_flight`, `split_writes_in_flight`), for the job's phases.

        Args:
            tasks: the chunks, in stripe order.
            scenes: the scenes the tasks refer to, by scene id.
            on_record: called in the driver for each chunk's record.
            batch_size: consecutive chunks per read task, actor call and write task.
            chunk_timeout_s: seconds a chunk may take in each stage: an actor call of n chunks
                gets n times this from when its actor is ready and its previous call returned; a
                read or write task of n chunks n + 1 times this from when it is submitted (the
                one more for it to be scheduled and its worker process to start); None: no limit.

        Failures: a read or write task that fails (after Ray's retries) fails its block's
        chunks. An actor that dies is restarted once by Ray and its call retried once; when Ray
        gives up on it, it is replaced by a fresh actor (at most twice per actor of the pool,
        then dropped, as the fused pool drops it) and its calls in flight are handed to the
        alive actors: the one it was running counts a death, the ones queued behind it go back
        untouched. A block whose call dies a second time fails its chunks with the reason, so
        a chunk that kills every process it touches cannot loop. Raises TesseraError only if
        every actor died before any predicted a block (e.g. the model cannot be built on the
        workers): a job-level problem.

        A stage past its deadline (a read that stalls, a model that hangs, a write that never
        returns) is hung, as in the fused pool (`pipelines.run.fused.FusedPool.run`): a hung
        actor is killed and replaced, a hung task cancelled (its worker process killed); the
        block's chunks are tried again one chunk per block from the read on (a one-chunk block
        once more from the stage that hung); a chunk that times out a second time alone fails
        with the reason, and the job goes on. Blocks queued behind a hung call go back untouched.
        """
        import ray

        blocks = Batches(tasks, batch_size)
        if not len(blocks):
            return {}
        read = ray.remote(num_cpus=self.task_cpus, **self.task_options)(self._read_fn)
        write = ray.remote(num_cpus=self.task_cpus, **self.task_options)(self._write_fn)
        scenes_ref = ray.put(scenes)
        todo = deque(range(len(blocks)))
        reading: dict[Any, tuple[int, float]] = {}  # read ref -> (block, when submitted)
        read_done: deque[tuple[Any, int]] = deque()  # read, not yet handed to an actor
        predicting: dict[Any, tuple[int, int, Any, Any]] = {}  # count ref -> (actor, block, predictions, read)
        clock = CallClock(self.handles, chunk_timeout_s)  # each actor's calls, in the order it runs them
        alive = set(range(len(self.handles)))
        replacements = 2 * len(self.handles)  # fresh actors for ones Ray gave up on, at most
        to_write: deque[tuple[Any, int]] = deque()
        writing: dict[Any, tuple[int, float, Any]] = {}  # results ref -> (block, when submitted, predictions)
        predicted = 0
        last_error = ""
        # in-flight counts integrated over time, for the log line at the end
        t_start = t_last = time.perf_counter()
        area = [0.0, 0.0, 0.0]

        def fail_block(b: int, problem: str) -> None:
            for task in blocks[b]:
                on_record(failed_result(task, scenes, problem))

        def task_deadline(submitted: float, b: int) -> float:
            # one chunk_timeout_s more than the block's chunks: for the task to be scheduled and its worker to start
            return submitted + chunk_timeout_s * (len(blocks[b]) + 1) if chunk_timeout_s else math.inf

        def timed_out(b: int, stage: str, elapsed: float, again_here: Callable[[], None]) -> None:
            """Block `b` hung in `stage`: its chunks again one per block from the read on, `b`
            again from `stage` (`again_here`), or, having timed out twice alone, failed."""
            log.error("split stages: a %s of %d chunks hung for %.0f s (chunk_timeout_s %g)", stage,
                      len(blocks[b]), elapsed, chunk_timeout_s)
            again = blocks.after_timeout(b)
            if again == [b]:
                again_here()
            elif again:
                todo.extendleft(reversed(again))
            else:
                fail_block(b, timed_out_reason(elapsed, chunk_timeout_s))

        def take_calls(worker: int, handle: Any | None) -> list[tuple[Any, int]]:
            """The (read, block) of the calls queued on `worker`, which was killed or died; in order."""
            calls = [predicting.pop(ref) for ref in clock.reset(worker, handle) if ref in predicting]
            return [(read_ref, b) for _, b, _, read_ref in calls]

        def hung_actor(worker: int) -> None:
            b, read_ref = predicting[clock.head(worker)][1::2]
            elapsed = clock.elapsed(worker)
            ray.kill(self.handles[worker], no_restart=True)
            calls = take_calls(worker, self.replace(worker))
            read_done.extendleft(reversed(calls[1:]))  # the calls queued behind it: back, untouched
            timed_out(b, "predictor actor call", elapsed, lambda: read_done.appendleft((read_ref, b)))

        def died(worker: int, exc: BaseException) -> None:
            """Ray gave up on `worker` (restarted once, died again): replace or drop it, hand its calls on."""
            nonlocal last_error, replacements
            if replacements > 0 and predicted > 0:  # it could predict: a fresh one most likely can
                replacements -= 1
                log.error("predictor actor %d died: %s (replacing it)", worker, exc)
                last_error = f"the predictor actor died: {error_line(exc)}"
                ray.kill(self.handles[worker], no_restart=True)  # were it only unreachable, it holds its resources
                calls = take_calls(worker, self.replace(worker))
            else:
                last_error = actor_died(exc, worker, alive, any_done=predicted > 0)
                calls = take_calls(worker, None)
            again = calls[1:]  # queued behind the one it ran: untouched
            if calls:
                read_ref, b = calls[0]
                if blocks.after_death(b):
                    again.insert(0, (read_ref, b))
                    log.warning("predictor actor %d died with a call of %d chunks: handing it on", worker,
                                len(blocks[b]))
                else:
                    fail_block(b, f"{last_error} (twice, on two actors)")
            read_done.extendleft(reversed(again))

        while True:
            if not alive:  # no actor left: nothing read or still to read can be predicted
                for b in [*todo, *(b for _, b in read_done)]:
                    fail_block(b, last_error or "no predictor actor left")
                todo.clear()
                read_done.clear()
            while todo and len(reading) + len(read_done) < self.read_tasks:
                b = todo.popleft()
                reading[read.remote(blocks[b], scenes_ref)] = (b, time.perf_counter())
            while read_done and alive:
                worker = min(alive, key=lambda w: (clock.queued(w), w))
                if clock.queued(worker) >= self.in_flight:
                    break
                ref, b = read_done.popleft()
                count_ref, predictions_ref = self.handles[worker].run.options(num_returns=2).remote(ref)
                predicting[count_ref] = (worker, b, predictions_ref, ref)
                clock.add(worker, count_ref, len(blocks[b]))
            while to_write and len(writing) < self.write_tasks:
                predictions_ref, b = to_write.popleft()
                writing[write.remote(predictions_ref, scenes_ref)] = (b, time.perf_counter(), predictions_ref)
            waiting = [*reading, *predicting, *writing]
            if not waiting:
                break
            first = min([math.inf, *(task_deadline(t, b) for b, t in reading.values()),
                         *(task_deadline(t, b) for b, t, _ in writing.values())])
            ready, _ = ray.wait([*waiting, *clock.refs], num_returns=1, fetch_local=False,
                                timeout=clock.wait_s(alive, also=first))
            now = time.perf_counter()
            for i, n in enumerate((len(reading), len(predicting), len(writing))):
                area[i] += n * (now - t_last)
            t_last = now
            if not ready:  # a deadline passed
                for ref, (b, t) in list(reading.items()):
                    if task_deadline(t, b) <= now:
                        del reading[ref]
                        ray.cancel(ref, force=True)
                        timed_out(b, "read task", now - t, lambda b=b: todo.appendleft(b))
                for ref, (b, t, predictions_ref) in list(writing.items()):
                    if task_deadline(t, b) <= now:
                        del writing[ref]
                        ray.cancel(ref, force=True)
                        timed_out(b, "write task", now - t,
                                  lambda b=b, p=predictions_ref: to_write.appendleft((p, b)))
                for worker in clock.overdue(alive):
                    hung_actor(worker)
                continue
            ref = ready[0]
            if clock.is_ready_ref(ref):
                continue
            if ref in reading:
                b, _ = reading.pop(ref)
                if alive:
                    read_done.append((ref, b))  # a failed read fails the actor call that gets it
                else:
                    fail_block(b, last_error or "no predictor actor left")
            elif ref in predicting:
                worker, b, predictions_ref, _ = predicting[ref]
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    died(worker, exc)
                    continue
                except ray.exceptions.RayError as exc:  # the block's read task failed, or a bug
                    del predicting[ref]
                    clock.done(worker, ref)
                    fail_block(b, f"reading or predicting the block failed: {error_line(exc)}")
                    continue
                del predicting[ref]
                clock.done(worker, ref)
                predicted += 1
                to_write.append((predictions_ref, b))
            else:
                b, _, _ = writing.pop(ref)
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
