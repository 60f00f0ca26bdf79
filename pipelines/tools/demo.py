"""`tessera demo`: a synthetic scene, the bundled model, the whole job on local Ray, a report."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import zarr
from rasterio.windows import Window

from pipelines.run.job import JobResult, run_job
from pipelines.run.resolve import WORK_DIR
from pipelines.tools.metrics import confusion_matrix, iou_per_class, mean_iou
from pipelines.tools.monitor import MemoryPeaks, MemorySampler
from pipelines.tools.synthetic import CLASS_NAMES, SceneSpec, write_scene
from schemas import store as layout
from schemas.job import JobSpec
from schemas.tables import TABLE_NAMES

DEMO_SCENE = "demo-scene"


@dataclass(frozen=True)
class DemoReport:
    """What the demo measured."""

    result: JobResult
    scene_path: Path
    truth_path: Path
    generate_s: float
    miou: float
    iou: dict[str, float]
    memory: MemoryPeaks


def ensure_demo_scene(inputs_dir: Path, *, size: int, seed: int) -> tuple[Path, Path, float]:
    """Write the synthetic scene and its truth once (reused when the same size/seed exist)."""
    inputs_dir.mkdir(parents=True, exist_ok=True)
    image = inputs_dir / f"{DEMO_SCENE}.tif"
    truth = inputs_dir / f"{DEMO_SCENE}.truth.tif"
    stamp = inputs_dir / f"{DEMO_SCENE}.json"
    wanted = {"size": size, "seed": seed}
    if image.is_file() and truth.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return image, truth, 0.0
    t0 = time.perf_counter()
    write_scene(SceneSpec(height=size, width=size, seed=seed), image, truth)
    stamp.write_text(json.dumps(wanted))
    return image, truth, time.perf_counter() - t0


def score_against_truth(zarr_path: Path, truth_path: Path, *, num_classes: int) -> np.ndarray:
    """Confusion matrix of a stored `classes` array vs a truth GeoTIFF, chunk by chunk."""
    classes = zarr.open_array(str(zarr_path), path=layout.classes_path(2), mode="r")
    ch, cw = classes.chunks
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    with rasterio.open(truth_path) as truth:
        for r in range(0, classes.shape[0], ch):
            for c in range(0, classes.shape[1], cw):
                pred = classes[r : r + ch, c : c + cw]
                h, w = pred.shape
                t = truth.read(1, window=Window(c, r, w, h))
                cm += confusion_matrix(t, pred, num_classes=num_classes, ignore=layout.NODATA_CLASS)
    return cm


def run_demo(
    root: Path, *, size: int = 4096, seed: int = 7, actors: int | None = None, torch_threads: int | None = None,
    chunk_size: int = 1024, ray_address: str | None = None, fresh: bool = True,
) -> DemoReport:
    """Generate (or reuse) the demo scene, run the job on it, score it against the truth.

    With `fresh`, earlier demo outputs under `root` are removed first so the job really runs;
    without it, a finished demo is recognised by its fingerprint and nothing is recomputed.
    """
    root = root.resolve()
    if fresh:
        for stale in (root / f"{DEMO_SCENE}.zarr", root / WORK_DIR / DEMO_SCENE):
            shutil.rmtree(stale, ignore_errors=True)
        for table in TABLE_NAMES:
            (root / "tables" / table / f"{DEMO_SCENE}.parquet").unlink(missing_ok=True)
    with MemorySampler() as sampler:
        image, truth, generate_s = ensure_demo_scene(root / "inputs", size=size, seed=seed)
        spec = JobSpec.model_validate({
            "name": "tessera-demo",
            "inputs": [str(image)],
            "model": {"card": "builtin:unet-demo"},
            "tiling": {"chunk_size": chunk_size},
            "resources": {"actors": actors, "torch_threads": torch_threads},
            "output": {"root": str(root), "overwrite": True},
        })
        result = run_job(spec, base_dir=root, ray_address=ray_address)
    outcome = result.scenes[0]
    if outcome.error:
        raise RuntimeError(f"demo scene failed: {outcome.error}")
    cm = score_against_truth(root / f"{DEMO_SCENE}.zarr", truth, num_classes=len(CLASS_NAMES))
    ious = iou_per_class(cm)
    return DemoReport(
        result=result, scene_path=image, truth_path=truth, generate_s=generate_s, miou=mean_iou(cm),
        iou={n: float(v) for n, v in zip(CLASS_NAMES, ious)}, memory=sampler.peaks,
    )
