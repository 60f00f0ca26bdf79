"""`tessera demo --instances`: buildings found one by one, end to end, scored against the truth.

A seeded synthetic 0.5 m building scene (`pipelines.tools.buildings`: terraced houses sharing
walls, detached houses, sites larger than a chunk) runs through the real job with a light Mask
R-CNN (`maskrcnn_light`, ResNet-18 FPN, `pipelines.tools.train_instances`), trained on first use
on scenes of other seeds and cached beside the outputs. The job predicts each chunk's halo
window, merges objects across chunk borders (`pipelines.stats.instances`), writes the
`instances` array and the `instances` GeoParquet table; the demo then scores the stored array
against the generator's truth (counts, precision, recall, mask AP at IoU 0.5, split and
duplicated objects: `pipelines.tools.metrics.evaluate_instances`).

The chunk grid (200 px) is deliberately not aligned with the generator's 256 px street grid,
so chunk borders cut through buildings and the cross-chunk merge has work to do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pipelines.tools.buildings import BuildingSceneSpec
from pipelines.tools.metrics import InstanceMetrics
from pipelines.tools.train_instances import InstanceTrainSettings

SCENE_SIDE = 1024
CHUNK_SIZE = 200


@dataclass(frozen=True)
class InstanceDemoReport:
    """What `run_instance_demo` did and measured."""

    root: Path
    card_path: Path
    trained: bool
    train_s: float
    metrics: InstanceMetrics
    job_wall_s: float
    wall_s: float


def run_instance_demo(root: Path, *, seed: int = 7, size: int = SCENE_SIDE, chunk_size: int = CHUNK_SIZE,
                      actors: int | None = 1, ray_address: str | None = None,
                      settings: InstanceTrainSettings | None = None) -> InstanceDemoReport:
    """Generate the scene, train (or reuse) the model, run the job, score it (see the module docstring).

    `settings`: the training recipe (default: the demo's, about 10 CPU-minutes on first use).
    """
    from pipelines.tools.train_instances import ensure_building_model, evaluate_job_on_scene

    t0 = time.perf_counter()
    root = Path(root).resolve()
    card_path, trained, train_s = ensure_building_model(root / "models", settings)
    metrics, job_wall_s = evaluate_job_on_scene(card_path, root, BuildingSceneSpec(size, size, seed),
                                                chunk_size=chunk_size, actors=actors, ray_address=ray_address)
    return InstanceDemoReport(root=root, card_path=card_path, trained=trained, train_s=train_s, metrics=metrics,
                              job_wall_s=job_wall_s, wall_s=time.perf_counter() - t0)
