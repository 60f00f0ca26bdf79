"""The actor pools in a real local Ray. The split stages' scheduler (pipelines.run.split.SplitPool)
on the sleeping stand-in stages of tests/bench/split_scheduling.py: every chunk's record exactly
once, and a failed read or write task fails only its block's chunks, naming the scene's file.
Both pools: actors that cannot be built fail the job with one clear error. The fused pool: a
batch whose actor died is handed once more to another actor; one that dies twice fails alone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipelines.run.fused import FusedPool
from pipelines.run.pools import ActorPool
from pipelines.run.split import SplitPool
from schemas.errors import TesseraError
from schemas.records import ChunkResult
from tests.bench import split_scheduling as standin


def _run(ray_local, tasks, *, block=3, **failures):
    records = []
    with SplitPool(predictor={"forward_s": 0.001}, actors=1, actor_options={"num_cpus": 0.5}, read_tasks=2,
                   write_tasks=2, task_cpus=0.25,
                   stages=(standin.SleepActor, standin.read_block, standin.write_block)) as pool:
        pool.run(tasks, scenes=standin.scenes_stub(**failures), on_record=records.append, batch_size=block)
    return records


def test_every_chunk_gets_exactly_one_record(ray_local):
    tasks = standin.tasks_of(11)
    records = _run(ray_local, tasks)
    assert sorted(r.key for r in records) == sorted(t.key for t in tasks)
    assert all(r.error == "" for r in records)


@pytest.mark.parametrize("flag, problem", [("fail_read", "input gone (simulated)"),
                                           ("fail_write", "disk full (simulated)")])
def test_a_failed_task_fails_only_its_blocks_chunks(ray_local, flag, problem):
    tasks = standin.tasks_of(9)
    records = _run(ray_local, tasks, **{flag: (tasks[4].window.index,)})  # block 1 of 3 (chunks 3..5)
    assert len(records) == 9
    failed = sorted(r.key for r in records if r.error)
    assert failed == sorted(t.key for t in tasks[3:6])
    for r in records:
        if r.error:
            index = next(list(t.window.index) for t in tasks if t.key == r.key)
            assert r.error.startswith(f"stand-in.tif: chunk {index}: ") and problem in r.error


@pytest.mark.parametrize("kind", ["fused", "split"])
def test_actors_that_cannot_be_built_fail_the_job_with_their_error(ray_local, kind):
    rows = standin.tasks_of(4)
    if kind == "split":
        pool = SplitPool(predictor={}, actors=1, actor_options={"num_cpus": 0.5}, read_tasks=1, write_tasks=1,
                         task_cpus=0.25, stages=(standin.BrokenActor, standin.read_block, standin.write_block))
    else:  # the real fused actor, on a model card that does not exist
        from workers.options import PredictorOptions

        pool = FusedPool(predictor={"card_path": "/nonexistent/model.json", "options": PredictorOptions()},
                         actors=1, actor_options={"num_cpus": 0.5})
    records = []
    with pool, pytest.raises(TesseraError, match="every predictor actor failed before finishing a chunk") as err:
        pool.run(rows, scenes=standin.scenes_stub(), on_record=records.append, batch_size=2)
    assert ("no model here (simulated)" if kind == "split" else "/nonexistent/model.json") in str(err.value)
    assert records == []


class DyingActor:
    """Stands in for the fused actor: one good record per chunk, except that a call holding a
    chunk of `dies` ({key: n}) kills its own process (os._exit, as an OOM kill or a lost node
    would) while fewer than n death files of that chunk exist in `folder` (one per death)."""

    def __init__(self, *, predictor):
        self.folder, self.dies = Path(predictor["folder"]), predictor["dies"]

    def run(self, tasks, scenes):
        for task in tasks:
            deaths = len(list(self.folder.glob(f"{task.key}.*")))
            if deaths < self.dies.get(task.key, 0):
                (self.folder / f"{task.key}.{deaths}").touch()
                os._exit(1)
        return [ChunkResult(scene_id=task.scene_id, key=task.key) for task in tasks]


class DyingPool(FusedPool):
    """FusedPool's scheduling (run) over DyingActor."""

    def __init__(self, *, predictor, actors):
        ActorPool.__init__(self, DyingActor, predictor=predictor, actors=actors, actor_options={"num_cpus": 0.25})


def _run_dying(tmp_path, *, dies, actors, n=6, batch=2):
    tasks = standin.tasks_of(n)
    records = []
    with DyingPool(predictor={"folder": str(tmp_path), "dies": {tasks[0].key: dies}}, actors=actors) as pool:
        pool.run(tasks, scenes=standin.scenes_stub(), on_record=records.append, batch_size=batch)
    return tasks, records, len(list(tmp_path.glob(f"{tasks[0].key}.*")))


def test_a_batch_whose_actor_died_is_handed_once_more_to_another_actor(ray_local, tmp_path):
    # The first batch's process dies twice: Ray restarts its actor and retries the call once,
    # then gives up on it; the batch (and the dead actor's other queued call) go to actor 1.
    tasks, records, deaths = _run_dying(tmp_path, dies=2, actors=2)
    assert deaths == 2
    assert sorted(r.key for r in records) == sorted(t.key for t in tasks)  # each chunk once
    assert all(r.error == "" for r in records)


def test_a_batch_that_kills_every_actor_it_touches_fails_alone_after_two(ray_local, tmp_path):
    tasks, records, deaths = _run_dying(tmp_path, dies=99, actors=3, n=9, batch=3)
    assert deaths == 4  # two actors, each restarted once by Ray; then no more
    assert sorted(r.key for r in records) == sorted(t.key for t in tasks)
    failed = sorted(r.key for r in records if r.error)
    assert failed == sorted(t.key for t in tasks[:3])
    for r in records:
        if r.error:
            assert r.error.startswith("stand-in.tif: chunk [0, ") and "the predictor actor died" in r.error
            assert "(twice, on two actors)" in r.error
