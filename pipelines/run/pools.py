"""What the two stage layouts' actor pools share (`pipelines.run.fused`, `pipelines.run.split`): the
actors' lifetime, and the record of a chunk that failed."""

from __future__ import annotations

import logging
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
