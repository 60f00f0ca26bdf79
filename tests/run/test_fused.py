"""The fused CPU actor and the split stages' predictor actor without Ray (one chunk whose
prediction raises fails alone), and the fused pool's batch queue."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pipelines.plan.chunks import plan_chunks
from pipelines.run.fused import BatchQueue, FusedChunkActor
from pipelines.run.resolve import resolve_job
from pipelines.run.scenes import SceneOutcome, prepare_scene
from pipelines.run.stages import done_chunk_keys, open_and_hash
from schemas.job import JobSpec
from schemas.records import ChunkTask, Prediction, ReadWindow
from tests.helpers import oracle_checkpoint, smooth_scene, write_geotiff


@pytest.fixture(params=[1, 3], ids=["batch1", "batch3"])
def fused(tmp_path, request):
    scene = write_geotiff(tmp_path / "s.tif", smooth_scene((100, 100), seed=8))
    card = oracle_checkpoint(tmp_path / "model")
    spec = JobSpec.model_validate({
        "inputs": [str(scene)], "model": {"card": str(card)},
        "tiling": {"chunk_size": 64, "halo": 8, "tile_size": 80},
        "resources": {"actors": 1, "torch_threads": 1}, "output": {"root": str(tmp_path / "out")},
    })
    job = resolve_job(spec, base_dir=tmp_path)
    outcome = SceneOutcome(name="s", source=str(scene))
    info, sha, error = open_and_hash(str(scene))
    assert error is None
    prepare_scene(job, outcome, 0, info, sha)
    # batch 3: whole 80-px windows (one tile each) go 3 to a forward pass
    predictor = {"card_path": str(card), "options": replace(job.predictor_options, batch_size=request.param)}
    actor = FusedChunkActor(predictor=predictor)
    tasks = [ChunkTask(scene_id=0, window=w) for w in plan_chunks(info.shape, job.chunk_size, job.halo)]
    assert outcome.plan == tuple(plan_chunks(info.shape, job.chunk_size, job.halo))  # planned once, kept
    return actor, tasks, outcome.context


def _run(actor, rows, ctx):
    return actor.run(rows, {0: ctx})


def test_fused_actor_writes_every_chunk(fused):
    actor, rows, ctx = fused
    out = _run(actor, rows, ctx)
    assert [r.error for r in out] == [""] * 4
    assert done_chunk_keys(Path(ctx.work_dir)) == {r.key for r in out} == {"c0_0", "c0_1", "c1_0", "c1_1"}


def test_a_chunk_whose_prediction_raises_fails_alone(fused, monkeypatch):
    actor, rows, ctx = fused
    real_one, real_batch = actor.actor.predict_one, actor.actor.predict_batch

    def flaky(read):
        if read.task.window.index == (0, 1):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_one(read)

    def flaky_batch(batch):  # the batch holding chunk (0, 1) fails as a whole
        if any(r.task.window.index == (0, 1) for r in batch):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_batch(batch)

    monkeypatch.setattr(actor.actor, "predict_one", flaky)
    monkeypatch.setattr(actor.actor, "predict_batch", flaky_batch)
    out = _run(actor, rows, ctx)
    errors = [r.error for r in out if r.error]
    assert len(errors) == 1
    assert errors[0].startswith(f"{ctx.info.path}: chunk [0, 1]: predicting it failed: CUDA out of memory (simulated)")
    assert [r.key for r in out if r.error] == ["c0_1"]
    assert done_chunk_keys(Path(ctx.work_dir)) == {r.key for r in out if not r.error}  # the other 3 were written
    assert len(done_chunk_keys(Path(ctx.work_dir))) == 3


def _drain(queue: BatchQueue, order: list[int]) -> list[tuple[int, int]]:
    """(worker, batch) handed out when workers ask in the repeating `order` until none is left."""
    out, i = [], 0
    while (b := queue.next(order[i % len(order)])) is not None:
        out.append((order[i % len(order)], b))
        i += 1
    return out


def test_batch_queue_gives_each_worker_its_own_contiguous_run():
    got = _drain(BatchQueue(10, 2), [0, 1])
    assert [b for w, b in got if w == 0] == [0, 1, 2, 3, 4]
    assert [b for w, b in got if w == 1] == [5, 6, 7, 8, 9]


def test_batch_queue_hands_every_batch_out_exactly_once():
    for n_batches in range(0, 23):
        for n_workers in range(1, 6):
            uneven = [w % n_workers for w in (0, 2, 1, 1, 0, 4, 3)]  # some workers ask more often
            got = _drain(BatchQueue(n_batches, n_workers), uneven)
            assert sorted(b for _, b in got) == list(range(n_batches))


def test_a_worker_whose_run_ends_steals_from_the_far_end_of_the_longest():
    queue = BatchQueue(12, 3)  # runs 0-3, 4-7, 8-11
    assert [queue.next(0) for _ in range(4)] == [0, 1, 2, 3]
    assert queue.next(1) == 4  # worker 1 is now on its run's front
    assert queue.next(0) == 11  # worker 0 steals: runs 1 (3 left) and 2 (4 left): the longer, its back
    assert queue.next(0) == 7  # now 3 and 3 left: the lowest worker's run, its back
    assert len(queue) == 5


def test_batch_queue_needs_a_worker():
    with pytest.raises(ValueError, match="n_workers"):
        BatchQueue(3, 0)


def test_split_actor_call_isolates_a_failing_window_and_the_write_names_the_file(fused, monkeypatch):
    # The split stages' predictor actor (SplitPredictActor.run) on a block of read rows: one
    # window's prediction raises; only its row carries the error, the rows come back without
    # pixels, and write_stage puts the scene's file in front of the error.
    from pipelines.run.split import SplitPredictActor
    from pipelines.run.stages import read_stage, write_stage

    fused_actor, rows, ctx = fused
    actor = SplitPredictActor.__new__(SplitPredictActor)  # the fixture's predictor, not built twice
    actor.actor = fused_actor.actor
    read = [read_stage(r, scenes={0: ctx}) for r in rows]
    bad = read[1].pixels
    real = actor.actor.predictor.predict_result

    def flaky(pixels, *args, **kwargs):
        if pixels is bad:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(pixels, *args, **kwargs)

    monkeypatch.setattr(actor.actor.predictor, "predict_result", flaky)
    monkeypatch.setattr(actor.actor.predictor, "windows_per_pass", lambda shape: 1)
    count, out = actor.run(read)
    assert count == 4 and all(isinstance(r, Prediction) for r in out) and isinstance(read[0], ReadWindow)
    errors = [r.error for r in out]
    assert [bool(e) for e in errors] == [False, True, False, False]
    assert errors[1] == f"chunk {list(read[1].task.window.index)}: predicting it failed: CUDA out of memory (simulated)"
    assert out[0].labels.shape == (64, 64) and out[1].labels is None
    assert write_stage(out[1], scenes={0: ctx}).error == f"{ctx.info.path}: {errors[1]}"
    records = [write_stage(r, scenes={0: ctx}) for r in out]
    assert [bool(r.error) for r in records] == [False, True, False, False]
