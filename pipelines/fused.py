"""One actor does a chunk's whole path: read, predict, write, partial statistics.

On CPU nodes the read and write tasks of the split pipeline (`pipelines.job._stream`) run on
the same cores as the model, and a torch thread pre-empted by a Ray task stalls its peers at
every OpenMP barrier: on the 2-core development VM the model ran at about half its bare speed
inside the job. Running one single-threaded fused actor per core instead keeps every core
busy with one process and nothing to pre-empt it (measured in docs/benchmarks.md). GPU actors
keep the split pipeline, where reads and writes overlap the accelerator's work.

Consecutive chunks (in stripe order) arrive in the same batch, so the actor's open dataset and
GDAL block cache serve the input blocks neighbouring windows share.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.stages import SceneContext, read_stage, write_stage
from workers.actors import PredictorActor, _object_column  # torch-free until an actor starts


class FusedChunkActor:
    """Ray Data callable: a batch of chunk plan rows -> one record per chunk {scene_id, key, error}."""

    def __init__(self, *, scenes: dict[int, SceneContext], predictor: dict[str, Any]):
        self.scenes = scenes
        self.actor = PredictorActor(**predictor)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["scene_id"])
        records = []
        for i in range(n):
            row = read_stage({k: batch[k][i] for k in batch}, scenes=self.scenes)
            try:
                labels, probs, seconds = self.actor.predict_row(row)
            except (RuntimeError, ValueError) as exc:  # e.g. a window the model cannot take
                ctx = self.scenes[int(row["scene_id"])]
                records.append({"scene_id": ctx.scene_id, "key": "",
                                "error": f"{ctx.info.path}: predicting chunk {[int(i) for i in row['index']]} failed: {exc}"})
                continue
            row.pop("pixels")
            row.pop("valid")
            row.update(labels=labels, predict_s=seconds)
            if self.actor.with_probabilities:
                row["probabilities"] = probs
            records.append(write_stage(row, scenes=self.scenes))
        return {
            "scene_id": np.asarray([r["scene_id"] for r in records], dtype=np.int64),
            "key": _object_column([r["key"] for r in records]),
            "error": _object_column([r["error"] for r in records]),
        }
