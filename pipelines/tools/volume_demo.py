"""`tessera demo --volume`: a synthetic CT phantom, a small 3D U-Net trained for it on first use,
the whole volume job on local Ray (chunked, with halos), Dice against the phantom's truth.

The model (``phantom-unet3d``: :mod:`workers.registry` ``unet3d``, base_channels 8, depth 2) is
trained on random crops of phantoms of other seeds (:data:`TRAIN_SEEDS`; the demo's default seed
7 is not among them), weighted cross-entropy, AdamW with a one-cycle schedule, CPU, a fixed seed,
and written once through :func:`workers.checkpoints.save_checkpoint` under ``<root>/models``;
later runs reuse it while its card records the same training recipe.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from pipelines.tools.phantom import CLASS_COLORS, CLASS_NAMES, PhantomSpec, read_labels, render_phantom, write_phantom
from pipelines.tools.train import segmentation_loss
from schemas.job import JobSpec
from schemas.model_card import parse_model_card
from schemas.tables import TABLE_NAMES
from workers.checkpoints import save_checkpoint
from workers.registry import build_model, native_stride

VOLUME_SCENE = "phantom-ct"
MODEL_NAME = "phantom-unet3d"
ARCHITECTURE = "unet3d"
ARCH_ARGS: dict[str, Any] = {"base_channels": 8, "depth": 2}
TRAIN_SEEDS: tuple[int, ...] = (101, 102, 103, 104, 105, 106)
CT_WINDOW: tuple[float, float] = (-200.0, 300.0)
"""HU clip window of the card's band: air saturates at -200, every tissue class is inside."""
TILE_SIZE = 48
HALO = 8
CHUNK_SIZE = 32


@dataclass(frozen=True)
class VolumeTrainSettings:
    """The training recipe (recorded in the card; a cached model is reused only for the same one)."""

    steps: int = 300
    batch_size: int = 4
    patch: tuple[int, int, int] = (16, 48, 48)
    foreground_fraction: float = 0.75
    learning_rate: float = 5e-3
    weight_decay: float = 1e-4
    seed: int = 0
    torch_threads: int = 1  # 2 OpenMP threads on 2 busy cores ran 7x slower (spin-waiting)


@dataclass(frozen=True)
class VolumeDemoReport:
    """What the volume demo measured."""

    result: Any  # pipelines.run.job.JobResult
    image_path: Path
    truth_path: Path
    export_path: Path
    card_path: Path
    trained: bool
    train_s: float
    dice: dict[str, float]
    class_volumes: list[dict[str, Any]]
    n_regions: int


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _random_crop(rng: np.random.Generator, hu: np.ndarray, labels: np.ndarray, patch: tuple[int, int, int],
                 foreground: np.ndarray | None = None):
    """A random crop, flipped in-plane at random; with ``foreground`` (voxel indices, (n, 3)),
    the crop holds a random one of them (organs are a few % of the voxels)."""
    if foreground is not None and len(foreground):
        centre = foreground[int(rng.integers(len(foreground)))]
        starts = [int(np.clip(c - int(rng.integers(0, p)), 0, s - p)) for c, s, p in zip(centre, hu.shape, patch)]
    else:
        starts = [int(rng.integers(0, s - p + 1)) for s, p in zip(hu.shape, patch)]
    sl = tuple(slice(a, a + p) for a, p in zip(starts, patch))
    x, y = hu[sl], labels[sl]
    for axis in (1, 2):  # in-plane flips
        if rng.random() < 0.5:
            x, y = np.flip(x, axis), np.flip(y, axis)
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def train_phantom_model(out_dir: Path, settings: VolumeTrainSettings | None = None) -> Path:
    """Train ``phantom-unet3d`` on phantoms of :data:`TRAIN_SEEDS`; write its weights and card.

    Returns:
        The card path, ``out_dir / "phantom-unet3d.json"``.
    """
    settings = settings or VolumeTrainSettings()
    stride = native_stride(ARCHITECTURE, ARCH_ARGS)
    if any(p % stride for p in settings.patch) or TILE_SIZE % stride:
        raise ValueError(f"patch {settings.patch} and tile {TILE_SIZE} must be multiples of the stride {stride}")
    spec = PhantomSpec()
    pool = [render_phantom(PhantomSpec(seed=s)) for s in TRAIN_SEEDS]
    lo, hi = CT_WINDOW
    clipped = np.concatenate([np.clip(hu, lo, hi).ravel().astype(np.float64) for hu, _ in pool])
    mean, std = float(clipped.mean()), float(clipped.std())
    counts = np.bincount(np.concatenate([lab.ravel() for _, lab in pool]), minlength=len(CLASS_NAMES))
    share = counts / counts.sum()
    weights = 1.0 / np.sqrt(np.maximum(share, 1e-12))
    class_weights = torch.from_numpy((weights / weights.mean()).astype(np.float32))

    foregrounds = [np.argwhere(lab > 0) for _, lab in pool]
    rng = np.random.default_rng(settings.seed)
    with _torch_threads(settings.torch_threads):
        torch.manual_seed(settings.seed)
        model = build_model(ARCHITECTURE, in_channels=1, num_classes=len(CLASS_NAMES), arch_args=ARCH_ARGS)
        # channels-last 3D: the CPU backward of Conv3d is ~15x faster than in the default layout
        model = model.to(memory_format=torch.channels_last_3d)
        optimiser = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=settings.learning_rate,
                                                       total_steps=settings.steps, pct_start=0.2)
        model.train()
        started = time.perf_counter()
        losses = []
        for _ in range(settings.steps):
            xs, ys = [], []
            for _ in range(settings.batch_size):
                i = int(rng.integers(len(pool)))
                hu, lab = pool[i]
                fg = foregrounds[i] if rng.random() < settings.foreground_fraction else None
                x, y = _random_crop(rng, hu, lab, settings.patch, fg)
                xs.append(x)
                ys.append(y)
            x = torch.from_numpy((np.clip(np.stack(xs), lo, hi).astype(np.float32) - mean) / std)[:, None]
            x = x.contiguous(memory_format=torch.channels_last_3d)
            y = torch.from_numpy(np.stack(ys).astype(np.int64))
            loss = segmentation_loss(model(x), y, class_weights=class_weights)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(float(loss.detach()))
        train_s = time.perf_counter() - started
        model.eval()
        card_fields = {
            "architecture": ARCHITECTURE,
            "arch_args": ARCH_ARGS,
            "in_channels": 1,
            "classes": [{"id": i, "name": n, "color": c} for i, (n, c) in enumerate(zip(CLASS_NAMES, CLASS_COLORS))],
            "bands": [{"name": "ct", "window": list(CT_WINDOW), "mean": mean, "std": std}],
            "tile_size": TILE_SIZE,
            "halo": HALO,
            "stride": stride,
            "spacing_mm": list(spec.spacing_mm),
            "training": {
                "data": "pipelines.tools.phantom", "train_seeds": list(TRAIN_SEEDS),
                "settings": {**asdict(settings), "patch": list(settings.patch)},
                "class_weights": [round(float(w), 6) for w in class_weights],
                "seconds": round(train_s, 2), "final_loss_mean_last10": round(float(np.mean(losses[-10:])), 5),
                "parameters": sum(p.numel() for p in model.parameters()),
            },
        }
        return save_checkpoint(model, card_fields, Path(out_dir), name=MODEL_NAME)


def ensure_phantom_model(models_dir: Path, settings: VolumeTrainSettings | None = None) -> tuple[Path, bool, float]:
    """The cached model's card if it was trained with ``settings``, else train it now.

    Returns:
        ``(card_path, trained_now, train_seconds)`` (the seconds recorded in the card when reused).
    """
    settings = settings or VolumeTrainSettings()
    card_path = Path(models_dir) / f"{MODEL_NAME}.json"
    wanted = {**asdict(settings), "patch": list(settings.patch)}
    if card_path.is_file():
        try:
            card = parse_model_card(card_path.read_text(), source=str(card_path))
            if card.training.get("settings") == wanted and (card_path.parent / card.weights).is_file():
                return card_path, False, float(card.training.get("seconds", 0.0))
        except Exception:  # a stale or broken cache: train again
            pass
    card_path = train_phantom_model(models_dir, settings)
    card = parse_model_card(card_path.read_text(), source=str(card_path))
    return card_path, True, float(card.training["seconds"])


def ensure_phantom(inputs_dir: Path, spec: PhantomSpec) -> tuple[Path, Path]:
    """Write the phantom and its truth once; reused while the spec is the same."""
    inputs_dir.mkdir(parents=True, exist_ok=True)
    image, truth = inputs_dir / f"{VOLUME_SCENE}.nii.gz", inputs_dir / f"{VOLUME_SCENE}.truth.nii.gz"
    stamp = inputs_dir / f"{VOLUME_SCENE}.json"
    wanted = json.loads(json.dumps(asdict(spec)))
    if not (image.is_file() and truth.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == wanted):
        write_phantom(spec, image, truth)
        stamp.write_text(json.dumps(wanted))
    return image, truth


def dice_per_class(truth: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice_k = 2 |T_k & P_k| / (|T_k| + |P_k|); NaN where class k is in neither."""
    if truth.shape != pred.shape:
        raise ValueError(f"truth shape {truth.shape} != prediction shape {pred.shape}")
    out = np.full(num_classes, np.nan)
    for k in range(num_classes):
        t, p = truth == k, pred == k
        denom = int(t.sum()) + int(p.sum())
        if denom:
            out[k] = 2.0 * int((t & p).sum()) / denom
    return out


def run_volume_demo(
    root: Path, *, seed: int = 7, actors: int | None = 1, torch_threads: int | None = None,
    chunk_size: int = CHUNK_SIZE, ray_address: str | None = None, settings: VolumeTrainSettings | None = None,
) -> VolumeDemoReport:
    """Generate (or reuse) the phantom, train (or reuse) the model, run the job, score it."""
    from pipelines.run.job import run_job
    from pipelines.run.resolve import WORK_DIR

    root = Path(root).resolve()
    for stale in (root / f"{VOLUME_SCENE}.zarr", root / WORK_DIR / VOLUME_SCENE, root / f"{VOLUME_SCENE}.nii.gz"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    for table in TABLE_NAMES:
        (root / "tables" / table / f"{VOLUME_SCENE}.parquet").unlink(missing_ok=True)
    image, truth_path = ensure_phantom(root / "inputs", PhantomSpec(seed=seed))
    card_path, trained, train_s = ensure_phantom_model(root / "models", settings)
    spec = JobSpec.model_validate({
        "name": "tessera-demo-volume",
        "inputs": [str(image)],
        "model": {"card": str(card_path)},
        "tiling": {"volume_chunk_size": chunk_size},
        "resources": {"actors": actors, "torch_threads": torch_threads},
        "output": {"root": str(root), "overwrite": True, "export": ["nifti"]},
    })
    result = run_job(spec, base_dir=root, ray_address=ray_address)
    outcome = result.scenes[0]
    if outcome.error:
        raise RuntimeError(f"volume demo scene failed: {outcome.error}")
    export = root / f"{VOLUME_SCENE}.nii.gz"
    dice = dice_per_class(read_labels(truth_path), read_labels(export), len(CLASS_NAMES))
    scene_row = pq.read_table(root / "tables" / "scenes" / f"{VOLUME_SCENE}.parquet").to_pylist()[0]
    n_regions = pq.read_metadata(root / "tables" / "volume_regions" / f"{VOLUME_SCENE}.parquet").num_rows
    return VolumeDemoReport(
        result=result, image_path=image, truth_path=truth_path, export_path=export, card_path=card_path,
        trained=trained, train_s=train_s, dice={n: float(d) for n, d in zip(CLASS_NAMES, dice)},
        class_volumes=list(scene_row["class_volumes"] or []), n_regions=int(n_regions),
    )
