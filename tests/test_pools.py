"""The actor pools in a real local Ray. The split stages' scheduler (pipelines.split.SplitPool)
on the sleeping stand-in stages of tests/bench/split_scheduling.py: every chunk's record exactly
once, and a failed read or write task fails only its block's chunks, naming the scene's file.
Both pools: actors that cannot be built fail the job with one clear error."""

from __future__ import annotations

import pytest

from pipelines.fused import FusedPool
from pipelines.split import SplitPool
from schemas.errors import TesseraError
from tests.bench import split_scheduling as standin


def _run(ray_local, rows, *, block=3):
    records = []
    with SplitPool(predictor={"forward_s": 0.001}, actors=1, actor_options={"num_cpus": 0.5}, read_tasks=2,
                   write_tasks=2, task_cpus=0.25,
                   stages=(standin.SleepActor, standin.read_block, standin.write_block)) as pool:
        pool.run(rows, scenes=standin.scenes_stub(), on_record=records.append, batch_size=block)
    return records


def test_every_chunk_gets_exactly_one_record(ray_local):
    rows = standin.rows_of(11)
    records = _run(ray_local, rows)
    assert sorted(r["key"] for r in records) == sorted(str(r["index"]) for r in rows)
    assert all(r["error"] == "" for r in records)


@pytest.mark.parametrize("flag, problem", [("fail_read", "input gone (simulated)"),
                                           ("fail_write", "disk full (simulated)")])
def test_a_failed_task_fails_only_its_blocks_chunks(ray_local, flag, problem):
    rows = standin.rows_of(9)
    rows[4][flag] = True  # block 1 of 3 (rows 3..5)
    records = _run(ray_local, rows)
    assert len(records) == 9
    failed = sorted(r["error"].split(": chunk ")[1].split(":")[0] for r in records if r["error"])
    assert failed == sorted(str(r["index"]) for r in rows[3:6])
    for r in records:
        if r["error"]:
            assert r["error"].startswith("stand-in.tif: chunk ") and problem in r["error"]


@pytest.mark.parametrize("kind", ["fused", "split"])
def test_actors_that_cannot_be_built_fail_the_job_with_their_error(ray_local, kind):
    rows = standin.rows_of(4)
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
