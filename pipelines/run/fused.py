"""Fused stages: one actor does a chunk's whole path: read, predict, write, partial statistics.

On CPU nodes the read and write tasks of the split stages (`pipelines.run.split`) run
on the same cores as the model, and a torch thread pre-empted by a Ray task stalls its peers at
every OpenMP barrier: on the 2-core development VM the model ran at about half its bare speed
inside the job. Running one single-threaded fused actor per core instead keeps every core busy
with one process and nothing to pre-empt it (measured in docs/benchmarks.md). GPU actors keep
the split pipeline by default, where reads and writes overlap the accelerator's work.

The actors are a plain Ray actor pool (:class:`FusedPool`), not Ray Data: Ray Data's
executor state lives in more actors (0.65 GB more job PSS at 8192², measured) and its streaming
loop in the driver; here the driver only hands out batches of chunk plans and collects small
records. Batches are handed out with stripe affinity (:class:`BatchQueue`): each actor walks its
own contiguous run of stripe-ordered chunks, so the input blocks that neighbouring halo windows
share are decoded once, in its GDAL block cache, and an actor that finishes early takes work
from the far end of the longest remaining run.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
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
from schemas.records import ChunkResult, ChunkTask, ReadWindow
from workers.actors import PredictorActor  # torch-free until an actor starts

log = logging.getLogger("tessera")


class FusedChunkActor:
    """Reads, predicts and writes batches of chunks; one ChunkResult per chunk."""

    def __init__(self, *, predictor: dict[str, Any]):
        self.actor = PredictorActor(**predictor)
        self._reader: ThreadPoolExecutor | None = None  # read-ahead thread, started by the first call that wants it

    def run(self, tasks: Sequence[ChunkTask], scenes: dict[int, SceneContext]) -> list[ChunkResult]:
        """Each chunk, in order. A failure is that chunk's result; it never raises for one chunk.

        Windows are read, then predicted `windows_per_pass` at a time (one forward pass for
        several whole windows where the model takes them; 1 on CPU by default), then written.
        With read-ahead (the scenes' ``prefetch``: remote inputs by default) every read of the
        call runs on one background thread, the next window's while this one is predicted, so
        a read's network latency overlaps compute; one thread keeps the readers' open datasets
        to one thread, as without it.
        """
        results: list[ChunkResult] = []
        pending: list[ReadWindow] = []
        for read in self._reads(tasks, scenes):
            pending.append(read)
            if len(pending) >= max(self.actor.windows_per_pass(r) for r in pending):
                results += [write_stage(p, scenes=scenes) for p in self.actor.predict_windows(pending)]
                pending = []
        if pending:
            results += [write_stage(p, scenes=scenes) for p in self.actor.predict_windows(pending)]
        return results

    def _reads(self, tasks: Sequence[ChunkTask], scenes: dict[int, SceneContext]) -> Iterator[ReadWindow]:
        """The tasks' windows in order: read inline, or one ahead on the reader thread."""
        if not any(scenes[t.scene_id].prefetch for t in tasks):
            for task in tasks:
                yield read_stage(task, scenes=scenes)
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tessera-read")
        ahead = self._reader.submit(read_stage, tasks[0], scenes=scenes)
        for i in range(len(tasks)):
            read = ahead.result()
            if i + 1 < len(tasks):
                ahead = self._reader.submit(read_stage, tasks[i + 1], scenes=scenes)
            yield read


class BatchQueue:
    """Hands out batch numbers 0..n-1 to workers with affinity, stealing when a worker's run ends.

    Worker w owns the contiguous run of batches w * n / workers ... ((w + 1) * n / workers) - 1
    and takes them front to back. A worker whose run is empty takes the last batch of the
    longest remaining run (ties: the lowest worker), far from where that run's owner is working.
    Plain Python (no Ray), so the order is testable.
    """

    def __init__(self, n_batches: int, n_workers: int):
        if n_workers < 1:
            raise ValueError(f"n_workers must be >= 1, got {n_workers}")
        bounds = [round(w * n_batches / n_workers) for w in range(n_workers + 1)]
        self.runs = [deque(range(bounds[w], bounds[w + 1])) for w in range(n_workers)]

    def __len__(self) -> int:
        return sum(len(r) for r in self.runs)

    def next(self, worker: int) -> int | None:
        """The next batch for `worker`, or None when no batch is left anywhere."""
        if self.runs[worker]:
            return self.runs[worker].popleft()
        longest = max(range(len(self.runs)), key=lambda w: (len(self.runs[w]), -w))
        if not self.runs[longest]:
            return None
        return self.runs[longest].pop()

    def push_front(self, worker: int, batch: int) -> None:
        """Put `batch` back at the front of `worker`'s run (a retry, taken next)."""
        self.runs[worker].appendleft(batch)


class FusedPool(ActorPool):
    """A pool of FusedChunkActor (see pipelines.run.pools.ActorPool: they start as soon as it is made).

    Use as a context manager: the actors are killed on exit.
    """

    def __init__(self, *, predictor: dict[str, Any], actors: int, actor_options: dict[str, Any]):
        super().__init__(FusedChunkActor, predictor=predictor, actors=actors, actor_options=actor_options)

    def run(
        self,
        tasks: Sequence[ChunkTask],
        *,
        scenes: dict[int, SceneContext],
        on_record: Callable[[ChunkResult], None],
        batch_size: int,
        in_flight: int = 2,
        chunk_timeout_s: float | None = None,
    ) -> None:
        """Compute every chunk; call `on_record` once per chunk, as batches finish.

        Args:
            tasks: the chunks, in stripe order.
            scenes: the scenes the tasks refer to, by scene id.
            on_record: called in the driver for each chunk's record.
            batch_size: consecutive chunks per actor call.
            in_flight: calls queued per actor, so it never waits for the driver between batches.
            chunk_timeout_s: seconds a chunk may take (a call of n chunks gets n times this,
                counted from when the actor is ready and its previous call returned); None: no limit.

        An actor that dies is restarted once by Ray and its call retried once (where its node
        still has room). When Ray gives up on it (restarted and died again, or its node lost
        with no room left for a restart), the actor is dropped and each of its failed calls is
        handed once more to another alive actor: the death was most likely not the chunks'
        fault. A batch whose call dies a second time fails its chunks with the reason (their
        scenes fail, the rest go on), so a chunk that kills every process it touches costs at
        most two actors and cannot loop. The other actors take over the dropped actor's
        remaining batches. Raises TesseraError only if every actor died before any completed a
        batch (e.g. the model cannot be built on the workers): a job-level problem.

        A call past its deadline (a read that stalls, a model that hangs) is a hung chunk: its
        actor is killed and replaced by a fresh one, and the call's chunks are tried again one
        chunk per call; a chunk that times out a second time alone fails with the reason, and
        the job goes on. Chunks of the killed actor's other queued call go back to its queue
        untouched. A chunk written before the hang is rewritten with the same bytes (writes are
        idempotent) and reported once.
        """
        import ray

        batches = Batches(tasks, batch_size)
        if not len(batches):
            return
        handles = self.handles[:len(batches)]
        scenes_ref = ray.put(scenes)
        queue = BatchQueue(len(batches), len(handles))
        pending: dict[Any, tuple[int, int]] = {}
        clock = CallClock(handles, chunk_timeout_s)  # each actor's calls, in the order it runs them
        alive = set(range(len(handles)))
        completed = 0
        last_error = ""

        def submit(worker: int) -> None:
            b = queue.next(worker)
            if b is not None:
                ref = handles[worker].run.remote(batches[b], scenes_ref)
                pending[ref] = (worker, b)
                clock.add(worker, ref, len(batches[b]))

        def fail_batch(b: int, problem: str) -> None:
            for task in batches[b]:
                on_record(failed_result(task, scenes, problem))

        def hung(worker: int) -> None:
            """The actor's current call passed its deadline: replace the actor, retry or fail its chunks."""
            b = pending[clock.head(worker)][1]
            elapsed = clock.elapsed(worker)
            log.error("predictor actor %d: a call of %d chunks hung for %.0f s (chunk_timeout_s %.0f): replacing "
                      "the actor", worker, len(batches[b]), elapsed, chunk_timeout_s)
            ray.kill(handles[worker], no_restart=True)
            handles[worker] = self.replace(worker)
            queued = [pending.pop(ref)[1] for ref in clock.reset(worker, handles[worker])]
            for later in reversed(queued[1:]):  # the other queued call: back to the front, untouched
                queue.push_front(worker, later)
            again = batches.after_timeout(b)  # one chunk per call, to find the chunk that hangs; or b alone again
            for retry in reversed(again):
                queue.push_front(worker, retry)
            if not again:
                fail_batch(b, timed_out_reason(elapsed, chunk_timeout_s))
            for _ in range(in_flight):
                submit(worker)

        for worker in range(len(handles)):
            for _ in range(in_flight):
                submit(worker)
        while pending:
            ready, _ = ray.wait([*pending, *clock.refs], num_returns=1, timeout=clock.wait_s(alive))
            if not ready:
                for worker in clock.overdue(alive):
                    hung(worker)
                continue
            if clock.is_ready_ref(ready[0]):
                continue
            worker, b = pending.pop(ready[0])
            clock.done(worker, ready[0])
            try:
                results = ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:
                if worker in alive:  # the first of its calls to come back dead: drop the actor
                    last_error = actor_died(exc, worker, alive, any_done=completed > 0)
                    clock.reset(worker, None)
                if batches.after_death(b) and alive:  # once more, on the alive actor with the fewest calls queued
                    target = min(sorted(alive), key=clock.queued)
                    log.warning("predictor actor %d died with a call of %d chunks: handing it to actor %d",
                                worker, len(batches[b]), target)
                    queue.push_front(target, b)
                    if clock.queued(target) < in_flight:
                        submit(target)
                else:
                    fail_batch(b, last_error if batches.deaths[b] < 2 else f"{last_error} (twice, on two actors)")
                continue
            except ray.exceptions.RayTaskError as exc:  # a bug outside the per-chunk guards
                completed += 1
                fail_batch(b, f"the predictor actor raised: {error_line(exc)}")
                submit(worker)
                continue
            completed += 1
            for result in results:
                on_record(result)
            submit(worker)  # a dead actor's run is taken over here, from its far end
        while len(queue):  # no actor left alive
            fail_batch(queue.next(0), last_error or "no predictor actor left")  # type: ignore[arg-type]
