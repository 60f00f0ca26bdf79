"""The fused CPU actor without Ray: one chunk whose prediction raises fails alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.fused import FusedChunkActor
from pipelines.job import SceneOutcome, _prepare_scene, resolve_job
from pipelines.stages import done_chunk_keys, open_and_hash, plan_row
from pipelines.tiling import plan_chunks
from schemas.job import JobSpec
from tests.helpers import oracle_checkpoint, smooth_scene, write_geotiff


@pytest.fixture
def fused(tmp_path):
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
    _prepare_scene(job, outcome, 0, info, sha)
    predictor = {"card_path": str(card), "options": job.predictor_options}
    actor = FusedChunkActor(scenes={0: outcome.context}, predictor=predictor)
    rows = [plan_row(0, w) for w in plan_chunks(info.shape, job.chunk_size, job.halo)]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    return actor, batch, outcome.context


def test_fused_actor_writes_every_chunk(fused):
    actor, batch, ctx = fused
    out = actor(batch)
    assert list(out["error"]) == [""] * 4
    assert done_chunk_keys(Path(ctx.work_dir)) == set(out["key"])


def test_a_chunk_whose_prediction_raises_fails_alone(fused, monkeypatch):
    actor, batch, ctx = fused
    real = actor.actor.predict_row

    def flaky(row):
        if tuple(row["index"]) == (0, 1):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(row)

    monkeypatch.setattr(actor.actor, "predict_row", flaky)
    out = actor(batch)
    errors = [e for e in out["error"] if e]
    assert len(errors) == 1
    assert "s.tif" in errors[0] and "[0, 1]" in errors[0] and "simulated" in errors[0]
    assert len([k for k in out["key"] if k]) == 3  # the other chunks were written
