"""The actor pools in a real local Ray. The split stages' scheduler (pipelines.run.split.SplitPool)
on the sleeping stand-in stages of tests/bench/split_scheduling.py: every chunk's record exactly
once, and a failed read or write task fails only its block's chunks, naming the scene's file.
Both pools: actors that cannot be built fail the job with one clear error. The fused pool: a
batch whose actor died is handed once more to another actor; one that dies twice fails alone.
The split pool on faulty stand-ins: a hung actor call or read task times out and is retried, a
chunk that always hangs fails alone with the reason; the calls of an actor Ray gave up on go to
a fresh actor, and a block that kills every actor it touches fails alone after two."""

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


class SplitFaultyActor(standin.SleepActor):
    """Stands in for the split stages' predictor actor: as SleepActor, except that a call holding
    a chunk of `dies` ({key: n}) kills its own process, and one holding a chunk of `hangs`
    ({key: n}) sleeps an hour, while fewer than n files of that chunk and kind exist in `folder`
    (one per death or hang)."""

    def __init__(self, *, predictor):
        super().__init__(predictor={"forward_s": 0.001})
        self.folder = Path(predictor["folder"])
        self.dies, self.hangs = predictor.get("dies", {}), predictor.get("hangs", {})

    def run(self, reads):
        import time

        for r in reads:
            for kind, limit in (("died", self.dies), ("hung", self.hangs)):
                n = len(list(self.folder.glob(f"{r.task.key}.{kind}.*")))
                if n < limit.get(r.task.key, 0):
                    (self.folder / f"{r.task.key}.{kind}.{n}").touch()
                    if kind == "died":
                        os._exit(1)
                    time.sleep(3600)
        return super().run(reads)


def hanging_read(tasks, scenes):
    """standin.read_block, except that a block holding a chunk of the scene's `hang_read` ({key: n})
    sleeps an hour while fewer than n files `<key>.read.*` exist in the scene's `folder`."""
    import time

    ctx = scenes[0]
    for t in tasks:
        n = len(list(Path(ctx.folder).glob(f"{t.key}.read.*")))
        if n < ctx.hang_read.get(t.key, 0):
            (Path(ctx.folder) / f"{t.key}.read.{n}").touch()
            time.sleep(3600)
    return standin.read_block(tasks, scenes)


def _run_split_faults(tmp_path, *, n=9, block=3, actors=1, chunk_timeout_s=None, dies=None, hangs=None,
                      hang_read=None, read_tasks=2):
    tasks = standin.tasks_of(n)
    scenes = standin.scenes_stub()
    scenes[0].folder, scenes[0].hang_read = str(tmp_path), {tasks[i].key: k for i, k in (hang_read or {}).items()}
    predictor = {"folder": str(tmp_path), "dies": {tasks[i].key: k for i, k in (dies or {}).items()},
                 "hangs": {tasks[i].key: k for i, k in (hangs or {}).items()}}
    records = []
    with SplitPool(predictor=predictor, actors=actors, actor_options={"num_cpus": 0.25}, read_tasks=read_tasks,
                   write_tasks=2, task_cpus=0.25,
                   stages=(SplitFaultyActor, hanging_read, standin.write_block)) as pool:
        pool.run(tasks, scenes=scenes, on_record=records.append, batch_size=block, chunk_timeout_s=chunk_timeout_s)
    assert sorted(r.key for r in records) == sorted(t.key for t in tasks)  # each chunk once
    return tasks, records


def _files(tmp_path, kind):
    return len(list(tmp_path.glob(f"*.{kind}.*")))


def test_split_a_hung_actor_call_is_retried_one_chunk_per_block_on_a_fresh_actor(ray_local, tmp_path):
    tasks, records = _run_split_faults(tmp_path, hangs={4: 1}, chunk_timeout_s=3.0)
    assert _files(tmp_path, "hung") == 1
    assert all(r.error == "" for r in records)


def test_split_a_hung_read_task_is_cancelled_and_retried(ray_local, tmp_path):
    tasks, records = _run_split_faults(tmp_path, hang_read={4: 1}, chunk_timeout_s=3.0)
    assert _files(tmp_path, "read") == 1
    assert all(r.error == "" for r in records)


@pytest.mark.slow  # 21-24 s each on 2 cores
@pytest.mark.parametrize("stage", ["hangs", "hang_read"])
def test_split_a_chunk_that_always_hangs_fails_alone_with_the_reason(ray_local, tmp_path, stage):
    tasks, records = _run_split_faults(tmp_path, **{stage: {4: 99}}, chunk_timeout_s=3.0)
    assert _files(tmp_path, "hung" if stage == "hangs" else "read") == 3  # in its block, then twice alone
    failed = [r for r in records if r.error]
    assert [r.key for r in failed] == [tasks[4].key]
    assert failed[0].error.startswith("stand-in.tif: chunk [0, 4]: timed out twice")
    assert "resources.chunk_timeout_s: 3 per chunk" in failed[0].error


def test_split_the_calls_of_an_actor_ray_gave_up_on_go_to_a_fresh_actor(ray_local, tmp_path):
    # The second block's process dies twice: Ray restarts the actor and retries its calls once,
    # then gives up on it; the pool replaces it and hands its calls to the fresh actor.
    # one read task: blocks reach the actor in order, so the first block is done before the second
    # kills it (were the second block read first, no block would be done and, by design, losing
    # every actor before any block is done is a job-level error)
    tasks, records = _run_split_faults(tmp_path, dies={4: 2}, read_tasks=1)
    assert _files(tmp_path, "died") == 2
    assert all(r.error == "" for r in records)


def test_split_a_block_that_kills_every_actor_it_touches_fails_alone_after_two(ray_local, tmp_path):
    tasks, records = _run_split_faults(tmp_path, dies={4: 99}, read_tasks=1)  # in order, as above
    assert _files(tmp_path, "died") == 4  # two actors, each restarted once by Ray; then no more
    failed = sorted(r.key for r in records if r.error)
    assert failed == sorted(t.key for t in tasks[3:6])
    for r in records:
        if r.error:
            assert "the predictor actor died" in r.error and "(twice, on two actors)" in r.error
