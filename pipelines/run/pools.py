"""What the two stage layouts' actor pools share (`pipelines.run.fused`, `pipelines.run.split`): the
actors' lifetime, and the record of a chunk that failed."""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from pipelines.run.stages import SceneContext
from schemas.errors import TesseraError
from schemas.records import ChunkResult, ChunkTask

log = logging.getLogger("tessera")


class ActorPool:
    """`actors` Ray actors of `actor_cls`, made with `predictor=predictor`; they start (import
    torch, load the model) as soon as the pool is made, so their start-up overlaps whatever the
    driver does next (opening and hashing the scenes). Ray restarts a dead actor once and
    retries its call once.

    Use as a context manager: the actors are killed on exit.
    """

    def __init__(self, actor_cls: type, *, predictor: dict[str, Any], actors: int, actor_options: dict[str, Any]):
        import ray

        self._cls = ray.remote(actor_cls).options(max_restarts=1, max_task_retries=1, **actor_options)
        self._predictor = predictor
        self.handles = [self._cls.remote(predictor=predictor) for _ in range(max(1, actors))]

    def replace(self, i: int) -> Any:
        """Start a fresh actor in place of actor `i` (which the caller killed, e.g. hung); returns it."""
        self.handles[i] = self._cls.remote(predictor=self._predictor)
        return self.handles[i]

    def __enter__(self) -> ActorPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        import ray

        for handle in self.handles:
            ray.kill(handle)
        self.handles = []


def failed_result(task: ChunkTask, scenes: dict[int, SceneContext], problem: str) -> ChunkResult:
    """The result of a chunk that failed outside the stages' own guards (a dead actor, a failed
    task): names the scene's file and the chunk index."""
    path = scenes[task.scene_id].info.path
    return ChunkResult(scene_id=task.scene_id, key=task.key,
                       error=f"{path}: chunk {list(task.window.index)}: {problem}")


def error_line(exc: BaseException) -> str:
    """The last non-empty line of an exception's text (a Ray error's own message)."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def actor_died(exc: BaseException, worker: int, alive: set[int], *, any_done: bool) -> str:
    """Take `worker` out of `alive` after Ray gave up on it (restarted once, call retried once);
    returns the error its chunks get.

    Raises:
        TesseraError: no actor is left and none finished a call (e.g. the model cannot be built
            on the workers): a job-level problem.
    """
    alive.discard(worker)
    log.error("predictor actor %d died: %s", worker, exc)
    if not alive and not any_done:
        raise TesseraError(f"every predictor actor failed before finishing a chunk: {exc}") from exc
    return f"the predictor actor died: {error_line(exc)}"


def timed_out_reason(elapsed: float, chunk_timeout_s: float) -> str:
    """The error of chunks that timed out twice alone (a hung read, prediction or write)."""
    return (f"timed out twice after {elapsed:.0f} s (resources.chunk_timeout_s: {chunk_timeout_s:g} per chunk): "
            "a read or prediction that hangs")


class Batches:
    """The batches of consecutive chunks a pool runs (a fused actor's call, a split block), and
    what is retried after a batch hung or died with its actor.

    A batch of several chunks that hangs is tried again one chunk per batch, to find the chunk
    that hangs; a one-chunk batch is tried once more, then fails (`after_timeout`). A batch whose
    actor died (after Ray's own restart and retry) is tried once more, on another actor or a
    fresh one; a second death fails it (`after_death`). So a chunk that hangs or kills every
    process it touches costs a bounded number of actors and cannot loop. Plain Python.
    """

    def __init__(self, tasks: Sequence[ChunkTask], size: int):
        self.items = [list(tasks[i:i + size]) for i in range(0, len(tasks), size)]
        self.timeouts = [0] * len(self.items)  # times each batch timed out alone
        self.deaths = [0] * len(self.items)  # times a call of each batch died with its actor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, b: int) -> list[ChunkTask]:
        return self.items[b]

    def after_timeout(self, b: int) -> list[int]:
        """The batches to run next, in order, after batch `b` passed its deadline: new one-chunk
        batches of its chunks, or `b` itself once more; [] when `b` timed out twice alone (it fails)."""
        if len(self.items[b]) > 1:
            start = len(self.items)
            for task in self.items[b]:
                self.items.append([task])
                self.timeouts.append(0)
                self.deaths.append(0)
            return list(range(start, len(self.items)))
        self.timeouts[b] += 1
        return [b] if self.timeouts[b] < 2 else []

    def after_death(self, b: int) -> bool:
        """Whether batch `b`, whose call died with its actor, is tried once more."""
        self.deaths[b] += 1
        return self.deaths[b] < 2


class CallClock:
    """Deadlines of the calls queued on a pool's actors, for `resources.chunk_timeout_s`.

    An actor runs its calls in order; the call at the head of its queue may take
    `chunk_timeout_s` per chunk, counted from when the actor is ready (its model loaded) and
    its previous call returned, so neither start-up nor queueing counts. With
    `chunk_timeout_s` None nothing has a deadline. `refs` are what `ray.wait` must also wait
    on (the actors' readiness); a ready one is consumed with `is_ready_ref`.
    """

    def __init__(self, handles: Sequence[Any], chunk_timeout_s: float | None):
        self.chunk_timeout_s = chunk_timeout_s
        self.calls: list[deque[tuple[Any, int]]] = [deque() for _ in handles]  # (ref, chunks), in run order
        self.head_start: list[float | None] = [None] * len(handles)  # when the head call began
        self.ready_refs: dict[Any, int] = {}
        for worker, handle in enumerate(handles):
            self._watch(worker, handle)

    def _watch(self, worker: int, handle: Any) -> None:
        if self.chunk_timeout_s:
            self.ready_refs[handle.__ray_ready__.remote()] = worker

    @property
    def refs(self) -> list[Any]:
        return list(self.ready_refs)

    def queued(self, worker: int) -> int:
        return len(self.calls[worker])

    def add(self, worker: int, ref: Any, chunks: int) -> None:
        """A call of `chunks` chunks was queued on `worker`."""
        if not self.calls[worker] and self.head_start[worker] is not None:  # an idle actor: it starts now
            self.head_start[worker] = time.perf_counter()
        self.calls[worker].append((ref, chunks))

    def is_ready_ref(self, ref: Any) -> bool:
        """Whether `ref` is an actor's readiness (consumed here: its head call's clock starts)."""
        worker = self.ready_refs.pop(ref, None)
        if worker is None:
            return False
        if self.head_start[worker] is None:
            self.head_start[worker] = time.perf_counter()
        return True

    def done(self, worker: int, ref: Any) -> None:
        """`ref`, a call of `worker`, came back: the next call's clock starts now."""
        calls = self.calls[worker]
        if calls and calls[0][0] == ref:
            calls.popleft()
        else:  # not expected: an actor runs its calls in order
            self.calls[worker] = deque(c for c in calls if c[0] != ref)
        if self.head_start[worker] is not None:
            self.head_start[worker] = time.perf_counter()

    def head(self, worker: int) -> Any | None:
        """The call `worker` runs now (the oldest not come back), or None."""
        return self.calls[worker][0][0] if self.calls[worker] else None

    def elapsed(self, worker: int) -> float:
        return time.perf_counter() - (self.head_start[worker] or time.perf_counter())

    def deadline(self, worker: int) -> float:
        if self.head_start[worker] is None or not self.calls[worker] or not self.chunk_timeout_s:
            return math.inf
        return self.head_start[worker] + self.chunk_timeout_s * self.calls[worker][0][1]

    def wait_s(self, workers: Iterable[int], *, also: float = math.inf) -> float | None:
        """Seconds `ray.wait` may block before the first deadline of `workers` (or `also`, another
        deadline on the same clock) passes; None: none."""
        first = min([also, *(self.deadline(w) for w in workers)])
        return None if first == math.inf else max(0.0, first - time.perf_counter())

    def overdue(self, workers: Iterable[int]) -> list[int]:
        """The workers whose head call is past its deadline."""
        now = time.perf_counter()
        return [w for w in sorted(workers) if self.deadline(w) <= now]

    def reset(self, worker: int, handle: Any | None) -> list[Any]:
        """`worker` was killed (and replaced by `handle`, or dropped: None); returns the refs its
        calls had queued, in order (none of them will come back usefully)."""
        refs = [ref for ref, _ in self.calls[worker]]
        self.calls[worker].clear()
        self.head_start[worker] = None
        self.ready_refs = {r: w for r, w in self.ready_refs.items() if w != worker}
        if handle is not None:
            self._watch(worker, handle)
        return refs
