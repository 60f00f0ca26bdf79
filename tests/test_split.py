"""The split stages' scheduler (pipelines.split.SplitPool) in a real local Ray, on the sleeping
stand-in stages of tests/bench/split_scheduling.py: every chunk's record exactly once, and a
failed read or write task fails only its block's chunks, naming the scene's file."""

from __future__ import annotations

import pytest

from pipelines.split import SplitPool
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
