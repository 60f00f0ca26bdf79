"""Train the light Mask R-CNN (``maskrcnn_light``) on synthetic building scenes; evaluate it tile by tile.

The model, ``buildings-maskrcnn-r18`` (:mod:`workers.registry` ``maskrcnn_light``: ResNet-18 FPN,
GroupNorm, 128-wide heads, no resizing; classes background and building), is trained from
scratch on CPU on random crops of :mod:`pipelines.tools.buildings` scenes of the seeds
:data:`TRAIN_SEEDS` (never the evaluation seed), flipped and rotated by multiples of 90
degrees; AdamW with a linear warm-up and cosine decay, gradient clipping, one torch thread, a
fixed seed and a fixed number of steps. Inputs are normalised by the card, ``(x - mean) / std``
per band with the statistics of the first training pool. It is written once through
:func:`workers.checkpoints.save_checkpoint` (safetensors + card) into a cache folder and reused
while its card records the same recipe (:func:`ensure_building_model`).

Until the job runs instance models, :func:`evaluate_model_on_scene` gives the honest baseline:
a fresh scene predicted on NON-overlapping tiles (objects cut by tile borders stay cut: this is
exactly what the cross-chunk merge is for), pasted into one label image, and scored with
:func:`pipelines.tools.metrics.evaluate_instances` against the generator's truth.

``python -m pipelines.tools.train_instances --out <folder>`` trains (or reuses) and evaluates.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.tools.buildings import BAND_NAMES, BuildingSceneSpec, render_building_window
from pipelines.tools.metrics import InstanceMetrics, evaluate_instances
from schemas.model_card import ModelCard, parse_model_card
from workers.checkpoints import build_from_checkpoint, load_checkpoint, save_checkpoint
from workers.registry import build_model

logger = logging.getLogger(__name__)

MODEL_NAME = "buildings-maskrcnn-r18"
ARCHITECTURE = "maskrcnn_light"
CLASSES: tuple[tuple[str, str], ...] = (("background", "#000000"), ("building", "#d62728"))
"""Card classes ``(name, colour)``: Mask R-CNN counts background as class 0."""
TRAIN_SEEDS: tuple[int, ...] = (201, 202, 203, 204, 205, 206, 207, 208)
EVAL_SEED = 7
TILE_SIZE_PX = 256
HALO_PX = 64
SCORE_THRESHOLD = 0.5
"""Detections at or above this score count for precision, recall and the split counts; AP
ranks every detection the model returns (down to its ``box_score_thresh``)."""
MASK_THRESHOLD = 0.5


@dataclass(frozen=True)
class InstanceTrainSettings:
    """The training recipe (recorded in the card; a cached model is reused only for the same one).

    Attributes:
        steps: optimiser steps.
        batch_size: crops per step.
        patch_px: crop side (px).
        learning_rate: peak AdamW learning rate.
        warmup_steps: linear warm-up from 0.1x, then cosine decay to 0.05x.
        weight_decay: AdamW weight decay.
        grad_clip: max global gradient norm.
        scene_px: side of the (virtual) training scenes; only pool windows are rendered.
        pool_windows: windows held in the pool crops are drawn from.
        pool_window_px: side of a pool window (px), >= patch_px.
        pool_refresh_every: re-render one pool window every this many steps (0: never).
        min_instance_px: instances with fewer visible pixels in a crop are not targets (they
            stay unlabelled pixels, neither object nor counted background).
        large_site_probability: of the training scenes (see BuildingSceneSpec).
        seed: numpy and torch seed.
        torch_threads: CPU threads (1 measured fastest per step on 2 busy cores).
        arch_args: the ``maskrcnn_light`` builder options.
    """

    steps: int = 300
    batch_size: int = 4
    patch_px: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 30
    weight_decay: float = 1e-4
    grad_clip: float = 10.0
    scene_px: int = 4096
    pool_windows: int = 12
    pool_window_px: int = 384
    pool_refresh_every: int = 4
    min_instance_px: int = 12
    large_site_probability: float = 0.35
    seed: int = 0
    torch_threads: int = 1
    arch_args: dict[str, Any] = field(default_factory=lambda: {"box_detections_per_img": 200})

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if not 32 <= self.patch_px <= self.pool_window_px <= self.scene_px:
            raise ValueError(
                f"need 32 <= patch_px <= pool_window_px <= scene_px, got {self.patch_px}, "
                f"{self.pool_window_px}, {self.scene_px}"
            )

    def record(self) -> dict[str, Any]:
        """JSON-ready form, as written in the card."""
        return json.loads(json.dumps(asdict(self)))


@dataclass(frozen=True)
class InstanceEvaluation:
    """The in-process baseline on one fresh scene.

    Attributes:
        metrics: at the score threshold (counts, precision, recall, split, ...), with the AP
            over every detection.
        scene: the evaluated scene.
        tile_px: non-overlapping tile side used.
        score_threshold: detections kept for the counts.
        predict_s: seconds spent predicting.
    """

    metrics: InstanceMetrics
    scene: BuildingSceneSpec
    tile_px: int
    score_threshold: float
    predict_s: float


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def instance_targets(ids: np.ndarray, *, min_pixels: int) -> dict[str, torch.Tensor]:
    """torchvision detection targets of one crop of a truth label image.

    Args:
        ids: ``(h, w)`` uint32 instance ids, 0 background.
        min_pixels: instances with fewer pixels here are left out.

    Returns:
        ``boxes`` ``(n, 4)`` float32 ``(x1, y1, x2, y2)`` px (pixel edges, so a 1-px object is
        1 px wide), ``labels`` ``(n,)`` int64 (all 1, building), ``masks`` ``(n, h, w)`` uint8.
    """
    present, counts = np.unique(ids[ids > 0], return_counts=True)
    present = present[counts >= min_pixels]
    boxes, masks = [], []
    for i in present:
        mask = ids == i
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        boxes.append((cols[0], rows[0], cols[-1] + 1, rows[-1] + 1))
        masks.append(mask)
    h, w = ids.shape
    return {
        "boxes": torch.tensor(np.asarray(boxes, np.float32).reshape(-1, 4)),
        "labels": torch.ones(len(present), dtype=torch.int64),
        "masks": torch.from_numpy(np.asarray(masks, np.uint8).reshape(-1, h, w)),
    }


def _random_window(rng: np.random.Generator, settings: InstanceTrainSettings) -> tuple[np.ndarray, np.ndarray]:
    seed = int(rng.choice(TRAIN_SEEDS))
    spec = BuildingSceneSpec(settings.scene_px, settings.scene_px, seed,
                             large_site_probability=settings.large_site_probability)
    r, c = (int(v) for v in rng.integers(0, settings.scene_px - settings.pool_window_px + 1, 2))
    return render_building_window(spec, r, c, settings.pool_window_px, settings.pool_window_px)


def _augmented_crop(rng: np.random.Generator, bands: np.ndarray, ids: np.ndarray,
                    patch: int) -> tuple[np.ndarray, np.ndarray]:
    r, c = (int(v) for v in rng.integers(0, bands.shape[1] - patch + 1, 2))
    x, y = bands[:, r:r + patch, c:c + patch], ids[r:r + patch, c:c + patch]
    k = int(rng.integers(4))
    x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k)
    if rng.random() < 0.5:
        x, y = x[:, :, ::-1], y[:, ::-1]
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def band_statistics(windows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and std ``(C,)`` float64 (raw units) of some ``(C, h, w)`` windows."""
    stacked = np.concatenate([w.reshape(w.shape[0], -1) for w in windows], axis=1).astype(np.float64)
    return stacked.mean(axis=1), np.maximum(stacked.std(axis=1), 1e-3)


def train_building_model(out_dir: Path, settings: InstanceTrainSettings | None = None) -> Path:
    """Train ``buildings-maskrcnn-r18`` and write its safetensors and card into ``out_dir``.

    Returns:
        The card path, ``out_dir / "buildings-maskrcnn-r18.json"``.
    """
    settings = settings or InstanceTrainSettings()
    rng = np.random.default_rng(settings.seed)
    pool = [_random_window(rng, settings) for _ in range(settings.pool_windows)]
    mean, std = band_statistics([b for b, _ in pool])
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    with _torch_threads(settings.torch_threads):
        torch.manual_seed(settings.seed)
        model = build_model(ARCHITECTURE, in_channels=len(BAND_NAMES), num_classes=len(CLASSES),
                            arch_args=settings.arch_args)
        optimiser = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate,
                                      weight_decay=settings.weight_decay)

        def factor(step: int) -> float:
            if step < settings.warmup_steps:
                return 0.1 + 0.9 * step / settings.warmup_steps
            t = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
            return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * t))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
        model.train()
        losses: list[float] = []
        started, cpu_started = time.perf_counter(), time.process_time()
        for step in range(settings.steps):
            if settings.pool_refresh_every and step and step % settings.pool_refresh_every == 0:
                pool[int(rng.integers(len(pool)))] = _random_window(rng, settings)
            images, targets = [], []
            for _ in range(settings.batch_size):
                bands, ids = pool[int(rng.integers(len(pool)))]
                x, y = _augmented_crop(rng, bands, ids, settings.patch_px)
                images.append((torch.from_numpy(x.astype(np.float32)) - mean_t) / std_t)
                targets.append(instance_targets(y, min_pixels=settings.min_instance_px))
            loss_parts = model(images, targets)
            loss = sum(loss_parts.values())
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimiser.step()
            schedule.step()
            losses.append(float(loss.detach()))
            if step % 25 == 0 or step == settings.steps - 1:
                logger.info("step %d/%d loss %.4f (%s) %.1f s", step + 1, settings.steps, losses[-1],
                            ", ".join(f"{k} {float(v.detach()):.3f}" for k, v in loss_parts.items()),
                            time.perf_counter() - started)
        train_s = time.perf_counter() - started
        train_cpu_s = time.process_time() - cpu_started
    model.eval()
    card_fields = {
        "architecture": ARCHITECTURE,
        "arch_args": settings.arch_args,
        "in_channels": len(BAND_NAMES),
        "classes": [{"id": i, "name": n, "color": c} for i, (n, c) in enumerate(CLASSES)],
        "bands": [{"name": n, "mean": float(m), "std": float(s)} for n, m, s in zip(BAND_NAMES, mean, std)],
        "tile_size": TILE_SIZE_PX,
        "halo": HALO_PX,
        "stride": 1,
        "training": {
            "data": "pipelines.tools.buildings", "train_seeds": list(TRAIN_SEEDS),
            "settings": settings.record(),
            "seconds": round(train_s, 2),
            "cpu_seconds": round(train_cpu_s, 2),
            "loss_first10_mean": round(float(np.mean(losses[:10])), 4),
            "loss_last20_mean": round(float(np.mean(losses[-20:])), 4),
            "parameters": sum(p.numel() for p in model.parameters()),
        },
    }
    return save_checkpoint(model, card_fields, Path(out_dir), name=MODEL_NAME)


def ensure_building_model(models_dir: Path, settings: InstanceTrainSettings | None = None) -> tuple[Path, bool, float]:
    """The cached model's card if it was trained with ``settings``, else train it now.

    Returns:
        ``(card_path, trained_now, train_seconds)`` (the seconds recorded in the card when reused).
    """
    settings = settings or InstanceTrainSettings()
    card_path = Path(models_dir) / f"{MODEL_NAME}.json"
    if card_path.is_file():
        try:
            card = parse_model_card(card_path.read_text(), source=str(card_path))
            if card.training.get("settings") == settings.record() and (card_path.parent / card.weights).is_file():
                return card_path, False, float(card.training.get("seconds", 0.0))
        except Exception:  # a stale or broken cache: train again
            logger.info("cached %s unusable; training again", card_path)
    card_path = train_building_model(Path(models_dir), settings)
    card = parse_model_card(card_path.read_text(), source=str(card_path))
    return card_path, True, float(card.training["seconds"])


def predict_tiles(
    model: torch.nn.Module, card: ModelCard, bands: np.ndarray, *, tile_px: int = TILE_SIZE_PX,
    score_thresholds: Sequence[float] = (0.0,), mask_threshold: float = MASK_THRESHOLD,
) -> list[tuple[np.ndarray, dict[int, float]]]:
    """Predict an image on non-overlapping tiles and paste the masks into label images.

    Within a tile, masks are painted in increasing score so a pixel goes to the highest-scoring
    detection covering it; ids count up over the image (1, 2, ...); detections left with no pixel
    are dropped. Objects cut by tile borders stay cut (naive tiling, no merge). One model pass
    serves several score thresholds.

    Args:
        model: an instance model in eval mode (torchvision detection outputs).
        card: its card (band normalisation).
        bands: ``(C, H, W)`` raw band values.
        tile_px: tile side (px); edge tiles are smaller.
        score_thresholds: one label image per threshold, painted with the detections scoring
            at least that much.
        mask_threshold: mask probability a pixel needs.

    Returns:
        Per threshold ``(labels, scores)``: ``(H, W)`` uint32 ids, and id -> score.
    """
    mean = torch.tensor([b.mean for b in card.bands], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor([b.std for b in card.bands], dtype=torch.float32).view(-1, 1, 1)
    _, height, width = bands.shape
    outputs = [(np.zeros((height, width), np.uint32), {}) for _ in score_thresholds]
    next_ids = [1] * len(score_thresholds)
    with torch.inference_mode():
        for r in range(0, height, tile_px):
            for c in range(0, width, tile_px):
                tile = torch.from_numpy(bands[:, r:r + tile_px, c:c + tile_px].astype(np.float32))
                out = model([(tile - mean) / std])[0]
                order = torch.argsort(out["scores"]).tolist()  # increasing: the best is painted last
                masks = (out["masks"][:, 0] >= mask_threshold).numpy()
                for j, threshold in enumerate(score_thresholds):
                    labels, scores = outputs[j]
                    view = labels[r:r + tile_px, c:c + tile_px]
                    for k in order:
                        s = float(out["scores"][k])
                        if s >= threshold and masks[k].any():
                            view[masks[k]] = next_ids[j]
                            scores[next_ids[j]] = s
                            next_ids[j] += 1
    result = []
    for labels, scores in outputs:
        present = set(np.unique(labels).tolist()) - {0}
        result.append((labels, {i: s for i, s in scores.items() if i in present}))
    return result


def evaluate_model_on_scene(
    card_path: Path, scene: BuildingSceneSpec | None = None, *, tile_px: int = TILE_SIZE_PX,
    score_threshold: float = SCORE_THRESHOLD, torch_threads: int = 1,
) -> InstanceEvaluation:
    """Baseline: predict a fresh scene on non-overlapping tiles, score against its truth.

    AP ranks every detection (painted without a threshold); the counts, precision, recall,
    split, duplicate and merge figures use the detections scoring >= ``score_threshold``.
    """
    scene = scene or BuildingSceneSpec(1024, 1024, EVAL_SEED)
    ckpt = load_checkpoint(card_path)
    model = build_from_checkpoint(ckpt)
    bands, truth = render_building_window(scene, 0, 0, scene.height, scene.width)
    started = time.perf_counter()
    with _torch_threads(torch_threads):
        (all_labels, all_scores), (kept_labels, kept_scores) = predict_tiles(
            model, ckpt.card, bands, tile_px=tile_px, score_thresholds=(0.0, score_threshold))
    predict_s = time.perf_counter() - started
    ranked = evaluate_instances(all_labels, truth, all_scores)
    kept = evaluate_instances(kept_labels, truth, kept_scores)
    metrics = InstanceMetrics(**{**{f: getattr(kept, f) for f in kept.__dataclass_fields__}, "ap": ranked.ap})
    return InstanceEvaluation(metrics=metrics, scene=scene, tile_px=tile_px, score_threshold=score_threshold,
                              predict_s=predict_s)


def evaluate_job_on_scene(
    card_path: Path, root: Path, scene: BuildingSceneSpec | None = None, *, chunk_size: int = 256,
    halo: int = HALO_PX, tile_size: int | None = None, score_threshold: float = SCORE_THRESHOLD,
    actors: int | None = 1, ray_address: str | None = None,
) -> tuple[InstanceMetrics, float]:
    """The whole job on a building scene (local Ray, chunked with halos, instances merged across
    chunks), its stored ``instances`` array scored against the generator's truth.

    Scores for the AP ranking are the ``instances`` table's per-object scores; the job keeps
    only objects scoring >= ``score_threshold``, so this AP ranks those alone (unlike the
    in-process baseline's).

    Args:
        card_path: the model card.
        root: output root (the scene is written under ``root/inputs``).
        scene: default the 1024 x 1024 scene of :data:`EVAL_SEED`.
        chunk_size: output chunk side (px).
        halo: context per side (px).
        tile_size: model tile; default chunk + 2 * halo (one pass per window).
        score_threshold: the job's ``inference.instances.score_threshold``.
        actors: predictor actors.
        ray_address: Ray to use (default local).

    Returns:
        ``(metrics, job_wall_s)``.
    """
    import pyarrow.parquet as pq
    import zarr

    from pipelines.run.job import run_job
    from pipelines.tools.buildings import ensure_building_scene
    from schemas.instances import INSTANCES
    from schemas.job import JobSpec

    scene = scene or BuildingSceneSpec(1024, 1024, EVAL_SEED)
    root = Path(root).resolve()
    image, truth_path = ensure_building_scene(root / "inputs", scene)
    spec = JobSpec.model_validate({
        "name": "buildings-instances",
        "inputs": [str(image)],
        "model": {"card": str(Path(card_path).resolve())},
        "tiling": {"chunk_size": chunk_size, "halo": halo, "tile_size": tile_size or chunk_size + 2 * halo},
        "inference": {"instances": {"score_threshold": score_threshold}},
        "resources": {"actors": actors, "torch_threads": 1},
        "output": {"root": str(root), "overwrite": True},
    })
    result = run_job(spec, base_dir=root, ray_address=ray_address)
    outcome = result.scenes[0]
    if outcome.error:
        raise RuntimeError(f"{image}: instance job failed: {outcome.error}")
    name = image.stem
    pred = zarr.open_array(str(root / f"{name}.zarr"), path=INSTANCES, mode="r")
    rows = pq.read_table(root / "tables" / "instances" / f"{name}.parquet", columns=["instance_id", "score"])
    scores = dict(zip(rows.column("instance_id").to_pylist(), rows.column("score").to_pylist()))
    with _GeoTiffRows(truth_path) as truth:  # read by row blocks, never the whole scene at once
        return evaluate_instances(pred, truth, scores), float(result.wall_s)


class _GeoTiffRows:
    """Band 1 of a GeoTIFF as an array sliceable by rows (``rows[r0:r1]``), read window by window."""

    def __init__(self, path: Path) -> None:
        import rasterio

        self._src = rasterio.open(path)
        self.shape = (self._src.height, self._src.width)

    def __enter__(self) -> _GeoTiffRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self._src.close()

    def __getitem__(self, rows: slice) -> np.ndarray:
        from rasterio.windows import Window

        r0, r1, _ = rows.indices(self.shape[0])
        return self._src.read(1, window=Window(0, r0, self.shape[1], max(0, r1 - r0)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="model cache folder")
    parser.add_argument("--steps", type=int, default=InstanceTrainSettings.steps)
    parser.add_argument("--eval-size", type=int, default=1024, help="side of the evaluation scene (px)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    card_path, trained, train_s = ensure_building_model(args.out, InstanceTrainSettings(steps=args.steps))
    ev = evaluate_model_on_scene(card_path, BuildingSceneSpec(args.eval_size, args.eval_size, EVAL_SEED))
    report = {"card": str(card_path), "trained_now": trained, "train_s": train_s,
              "predict_s": round(ev.predict_s, 2), **ev.metrics.as_dict()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
