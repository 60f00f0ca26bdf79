"""Train segmentation models on synthetic scenes, on the fly, and write their weights and card.

Training windows are rendered from :mod:`pipelines.tools.synthetic` over several scene seeds into a
small pool that is partly re-rendered every step; random crops of the pool, flipped and
rotated, make the batches. Validation uses windows of a scene seed never seen in training.
Inputs are normalised per band, ``x_norm = (x - mean) / std``, with mean and std of the valid
pixels of the first pool; both are written into the card.

Two entry points share that loop and its loss:

* :func:`train_demo_model`: the bundled demo U-Net (``unet-demo``). Run
  ``python -m pipelines.tools.train --out workers/weights`` to (re)build the shipped model.
* :func:`train_model`: any semantic architecture of :mod:`workers.registry` (or a plugin),
  written through :func:`workers.checkpoints.save_checkpoint`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pipelines.tools.synthetic import BAND_NAMES, CLASS_NAMES, NODATA_CLASS, SceneSpec, render_window
from workers.checkpoints import save_checkpoint
from workers.models.unet import UNet
from workers.registry import build_model, model_kind, native_stride

logger = logging.getLogger(__name__)

MODEL_NAME = "unet-demo"
CARD_VERSION = 1
CLASS_COLORS: tuple[str, ...] = ("#1f77b4", "#2ca02c", "#7f7f7f", "#d62728", "#8c564b")
"""Display colours, in :data:`pipelines.tools.synthetic.CLASS_NAMES` order."""
TILE_SIZE_PX = 512
HALO_PX = 32
DEMO_TILE_SIZE_PX = 1024 + 2 * HALO_PX
"""The demo card's tile: the whole window of a default 1024-px chunk (one forward pass per chunk,
nothing to blend; redundancy 1.13 against 2.25 for 512-px tiles at 25 % overlap). The U-Net is
fully convolutional, and with huge-page malloc (workers.runtime) CPU speed per px at 1088 is within
10 % of that at 512."""
MAX_FP32_WEIGHTS_BYTES = 5_000_000
DEFAULT_STEPS = 1000


@dataclass(frozen=True)
class TrainSettings:
    """Everything about a demo training run except its seed and step count.

    Attributes:
        base_channels: U-Net width of the first level.
        depth: U-Net poolings; the model stride is ``2**depth``.
        upsample: U-Net decoder upsampling, "transpose" or "bilinear".
        batch_size: crops per step.
        patch_px: crop side (px); a multiple of ``2**depth``.
        learning_rate: peak AdamW learning rate (one-cycle schedule).
        weight_decay: AdamW weight decay.
        boundary_weight: extra loss weight of pixels whose 3x3 neighbourhood has another class.
        train_scene_seeds: synthetic scene seeds windows are drawn from.
        val_scene_seed: held-out scene seed for validation (not in ``train_scene_seeds``).
        scene_px: side of the (virtual) synthetic scenes (px); only windows are rendered.
        pool_windows: windows kept in the training pool.
        pool_window_px: side of a pool window (px); >= ``patch_px``.
        pool_refresh: pool windows re-rendered per step.
        val_windows: validation windows.
        val_window_px: side of a validation window (px); a multiple of ``2**depth``.
        min_valid_fraction: windows with fewer valid (non-nodata) pixels are redrawn.
        torch_threads: CPU threads for torch.
        benchmark_batches: timed forward passes (batch 2 of 512 x 512); the card reports the fastest.
        bn_recalibration_batches: after the last step, re-estimate BatchNorm running statistics
            as a plain average over this many training batches (train-mode forwards, no
            gradients; :func:`torch.optim.swa_utils.update_bn`). 0 keeps the running averages.
            Short runs need it where BatchNorm momentum is slow (torchvision MobileNetV3: 0.01),
            or the eval-mode model lags its weights.
    """

    base_channels: int = 8
    depth: int = 4
    upsample: str = "transpose"
    batch_size: int = 16
    patch_px: int = 128
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    boundary_weight: float = 1.0
    train_scene_seeds: tuple[int, ...] = (11, 12, 13, 14, 15, 16, 17, 18)
    val_scene_seed: int = 99
    scene_px: int = 8192
    pool_windows: int = 48
    pool_window_px: int = 320
    pool_refresh: int = 3
    val_windows: int = 12
    val_window_px: int = 512
    min_valid_fraction: float = 0.3
    torch_threads: int = 2
    benchmark_batches: int = 5
    bn_recalibration_batches: int = 0

    def __post_init__(self) -> None:
        stride = 2**self.depth
        if self.patch_px % stride or self.val_window_px % stride:
            raise ValueError(
                f"patch_px {self.patch_px} and val_window_px {self.val_window_px} must be multiples "
                f"of the model stride {stride} (2**depth)"
            )
        if self.pool_window_px < self.patch_px or self.pool_window_px > self.scene_px:
            raise ValueError(
                f"pool_window_px must be in [patch_px, scene_px] = [{self.patch_px}, {self.scene_px}], "
                f"got {self.pool_window_px}"
            )
        if self.val_scene_seed in self.train_scene_seeds:
            raise ValueError(f"val_scene_seed {self.val_scene_seed} is also a training seed {self.train_scene_seeds}")
        if not self.train_scene_seeds:
            raise ValueError("train_scene_seeds is empty; give at least one scene seed")
        if not 1 <= self.pool_refresh <= self.pool_windows:
            raise ValueError(f"pool_refresh must be in [1, pool_windows={self.pool_windows}], got {self.pool_refresh}")
        if self.bn_recalibration_batches < 0:
            raise ValueError(f"bn_recalibration_batches must be >= 0, got {self.bn_recalibration_batches}")


def train_demo_model(
    out_dir: Path,
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    settings: TrainSettings | None = None,
) -> Path:
    """Train the demo U-Net and write ``unet-demo.safetensors`` and ``unet-demo.json``.

    Args:
        out_dir: folder for the weights and the card (created if missing).
        seed: seeds torch and the numpy generator that places windows and crops.
        steps: optimiser steps (batches).
        settings: model, data and optimiser settings; defaults build the shipped model.

    Returns:
        Path of the written card (``out_dir / "unet-demo.json"``).
    """
    settings = settings or TrainSettings()
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _torch_threads(settings.torch_threads):
        return _train_demo(out_dir, seed=seed, steps=steps, settings=settings)


def train_model(
    architecture: str,
    arch_args: Mapping[str, Any],
    out_dir: Path,
    *,
    name: str,
    seed: int = 0,
    steps: int,
    settings: TrainSettings | None = None,
) -> Path:
    """Train any semantic architecture on the synthetic generator; write its weights and card.

    Same data pipeline, normalisation, loss and optimiser as :func:`train_demo_model`; the model
    is ``build_model(architecture, in_channels=4, num_classes=5, arch_args=arch_args)`` with
    random init. Sizes the model cannot take are rounded up to its native stride ``s``
    (:func:`workers.registry.native_stride`): crops ``ceil(patch_px / s) * s``, validation windows
    ``ceil(val_window_px / s) * s``, pool windows at least one crop. The UNet-only fields of
    ``settings`` (``base_channels``, ``depth``, ``upsample``) are ignored. Written through
    :func:`workers.checkpoints.save_checkpoint` (float32 safetensors): card ``stride = s``,
    ``tile_size`` 512 rounded up to a multiple of ``s``, ``halo`` 32, and a ``training`` record as
    the demo's (``cpu_forward_*`` only when ``settings.benchmark_batches > 0``).

    Args:
        architecture: a semantic registry name or a plugin ``"package.module:callable"``.
        arch_args: the builder's keyword options (written to the card).
        out_dir: folder for ``<name>.safetensors`` and ``<name>.json`` (created if missing).
        name: model id and file stem.
        seed: seeds torch (init, dropout) and the numpy generator that places windows and crops.
        steps: optimiser steps (batches), >= 1.
        settings: data and optimiser settings (default :class:`TrainSettings`).
            ``batch_size`` must be >= 2: BatchNorm on the 1x1 pooled maps of PSPNet and the
            DeepLab image-pooling branch cannot train on one crop.

    Returns:
        Path of the written card (``out_dir / f"{name}.json"``).

    Raises:
        ModelCardError: unknown architecture or arch_args it rejects.
        ValueError: an instance architecture, steps < 1, batch_size < 2, or a rounded crop
            larger than ``settings.scene_px``.
    """
    settings = settings or TrainSettings()
    arch_args = dict(arch_args)
    if model_kind(architecture) != "semantic":
        raise ValueError(f"train_model trains semantic models; {architecture!r} is {model_kind(architecture)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if settings.batch_size < 2:
        raise ValueError(
            f"train_model needs batch_size >= 2, got {settings.batch_size}: BatchNorm on 1x1 pooled maps "
            "(PSPNet, DeepLab image pooling) cannot train on a single crop"
        )
    stride = native_stride(architecture, arch_args)
    patch_px = _round_up(settings.patch_px, stride)
    pool_window_px = max(settings.pool_window_px, patch_px)
    val_window_px = _round_up(settings.val_window_px, stride)
    if max(pool_window_px, val_window_px) > settings.scene_px:
        raise ValueError(
            f"{architecture!r} (stride {stride}): crops of {patch_px} px and validation windows of "
            f"{val_window_px} px must fit in scene_px {settings.scene_px}"
        )
    out_dir = Path(out_dir)

    def build() -> torch.nn.Module:
        return build_model(architecture, in_channels=len(BAND_NAMES), num_classes=len(CLASS_NAMES), arch_args=arch_args)

    with _torch_threads(settings.torch_threads):
        started = time.perf_counter()
        model, mean, std = _fit(
            build, seed=seed, steps=steps, settings=settings, patch_px=patch_px, pool_window_px=pool_window_px
        )
        train_seconds = time.perf_counter() - started
        iou, miou = _validated_iou(model, mean, std, settings, window_px=val_window_px)
        forward_mpx_s = (
            measure_forward_throughput(
                model, in_channels=len(BAND_NAMES), batches=settings.benchmark_batches,
                tile_px=_round_up(TILE_SIZE_PX, stride),
            )
            if settings.benchmark_batches > 0
            else None
        )
        training = _training_record(
            settings, seed=seed, steps=steps, iou=iou, miou=miou, started=started, train_seconds=train_seconds,
            forward_mpx_s=forward_mpx_s, dtype="float32", patch_px=patch_px, val_window_px=val_window_px,
        )
        training["parameters"] = sum(p.numel() for p in model.parameters())
        card_fields = {
            "version": CARD_VERSION,
            "architecture": architecture,
            "arch_args": arch_args,
            "in_channels": len(BAND_NAMES),
            "classes": _classes(),
            "bands": _bands(mean, std),
            "tile_size": _round_up(TILE_SIZE_PX, stride),
            "halo": HALO_PX,
            "stride": stride,
            "training": training,
        }
        card_path = save_checkpoint(model, card_fields, out_dir, name=name)
    logger.info("wrote %s (val mIoU %.4f, %d steps, %.0f s)", card_path, miou, steps, training["seconds"])
    return card_path


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads, then restore the previous count."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _train_demo(out_dir: Path, *, seed: int, steps: int, settings: TrainSettings) -> Path:
    started = time.perf_counter()

    def build() -> UNet:
        return UNet(
            len(BAND_NAMES),
            len(CLASS_NAMES),
            base_channels=settings.base_channels,
            depth=settings.depth,
            upsample=settings.upsample,
        )

    model, mean, std = _fit(
        build, seed=seed, steps=steps, settings=settings,
        patch_px=settings.patch_px, pool_window_px=settings.pool_window_px,
    )
    train_seconds = time.perf_counter() - started

    iou, miou = _validated_iou(model, mean, std, settings, window_px=settings.val_window_px)
    forward_mpx_s = measure_forward_throughput(model, in_channels=len(BAND_NAMES), batches=settings.benchmark_batches)

    weights_path = out_dir / f"{MODEL_NAME}.safetensors"
    dtype = _save_weights(model, weights_path)
    training = _training_record(
        settings, seed=seed, steps=steps, iou=iou, miou=miou, started=started, train_seconds=train_seconds,
        forward_mpx_s=forward_mpx_s, dtype=dtype, patch_px=settings.patch_px, val_window_px=settings.val_window_px,
    )
    # The demo card keeps its own writer (json.dumps + newline; safetensors metadata
    # {"format": "pt"}, fp16 above 5 MB): save_checkpoint would change the shipped files' bytes.
    card = _card(settings, mean=mean, std=std, weights_path=weights_path, training=training)
    card_path = out_dir / f"{MODEL_NAME}.json"
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    logger.info("wrote %s (%d bytes, %s) and %s", weights_path, weights_path.stat().st_size, dtype, card_path)
    return card_path


def _validated_iou(
    model: torch.nn.Module, mean: np.ndarray, std: np.ndarray, settings: TrainSettings, *, window_px: int
) -> tuple[np.ndarray, float]:
    """Validation IoU per class ``(K,)`` and its mean over present classes (0.0 if none)."""
    iou = _validate(model, mean, std, settings, window_px=window_px)
    miou = float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0
    logger.info("validation mIoU %.4f, per class %s", miou, dict(zip(CLASS_NAMES, np.round(iou, 4))))
    return iou, miou


def _training_record(
    settings: TrainSettings,
    *,
    seed: int,
    steps: int,
    iou: np.ndarray,
    miou: float,
    started: float,
    train_seconds: float,
    forward_mpx_s: float | None,
    dtype: str,
    patch_px: int,
    val_window_px: int,
) -> dict[str, Any]:
    """The card's ``training`` provenance (key order is part of the demo card's bytes)."""
    training: dict[str, Any] = {
        "seed": seed,
        "steps": steps,
        "loss": (
            "cross_entropy(ignore_index=255, class weights ~ 1/sqrt(pixel share)) "
            f"x (1 + {settings.boundary_weight:g} * class-boundary pixel)"
        ),
        "val_miou": round(miou, 4),
        "val_iou_per_class": {
            name: (round(float(v), 4) if np.isfinite(v) else None) for name, v in zip(CLASS_NAMES, iou)
        },
        "seconds": round(time.perf_counter() - started, 1),
        "train_seconds": round(train_seconds, 1),
    }
    if forward_mpx_s is not None:
        training["cpu_forward_mpx_s"] = round(forward_mpx_s, 3)
        training["cpu_forward_benchmark"] = (
            f"eval, batch 2 x {len(BAND_NAMES)} x {TILE_SIZE_PX} x {TILE_SIZE_PX} float32, "
            f"{settings.torch_threads} torch threads, fastest of {settings.benchmark_batches} passes"
        )
    training.update({
        "dtype": dtype,
        "generator": "pipelines.tools.synthetic",
        "batch_size": settings.batch_size,
        "patch_px": patch_px,
        "learning_rate": settings.learning_rate,
        "train_scene_seeds": list(settings.train_scene_seeds),
        "val_scene_seed": settings.val_scene_seed,
        "val_pixels": settings.val_windows * val_window_px**2,
        "torch_threads": settings.torch_threads,
        "torch": torch.__version__,
    })
    if settings.bn_recalibration_batches:
        training["bn_recalibration_batches"] = settings.bn_recalibration_batches
    return training


def _fit(
    build: Callable[[], torch.nn.Module],
    *,
    seed: int,
    steps: int,
    settings: TrainSettings,
    patch_px: int,
    pool_window_px: int,
) -> tuple[torch.nn.Module, np.ndarray, np.ndarray]:
    """Train ``build()`` from scratch; returns it in eval mode with the band mean and std ``(C,)`` float64.

    ``build`` is called after the data pool is drawn, right after ``torch.manual_seed(seed)``
    (the pool uses only numpy), so the model's random init depends on ``seed`` alone.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    num_classes = len(CLASS_NAMES)

    pool_x, pool_y = zip(*(_draw_window(rng, settings, pool_window_px) for _ in range(settings.pool_windows)))
    pool_x, pool_y = list(pool_x), list(pool_y)
    # Rounded so that the card's numbers are exactly what the model was trained with.
    mean, std = (np.round(v, 4) for v in band_statistics(pool_x, pool_y))
    counts = np.bincount(np.concatenate([y[y != NODATA_CLASS] for y in pool_y]), minlength=num_classes)
    class_weights = torch.from_numpy(_class_weights(counts))
    logger.info(
        "band mean %s std %s; class pixel shares %s", mean.round(1), std.round(1), (counts / counts.sum()).round(3)
    )

    model = build()
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=settings.learning_rate, total_steps=steps, pct_start=0.1
    )
    started = time.perf_counter()
    model.train()
    for step in range(steps):
        for _ in range(settings.pool_refresh):
            k = int(rng.integers(len(pool_x)))
            pool_x[k], pool_y[k] = _draw_window(rng, settings, pool_window_px)
        x, y = _sample_batch(rng, pool_x, pool_y, settings, patch_px=patch_px)
        logits = model(normalise(torch.from_numpy(x), mean, std))
        loss = segmentation_loss(
            logits, torch.from_numpy(y), class_weights=class_weights, boundary_weight=settings.boundary_weight
        )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            logger.info("step %d/%d loss %.4f (%.0f s)", step + 1, steps, loss.item(), time.perf_counter() - started)
    if settings.bn_recalibration_batches:
        batches = [
            normalise(torch.from_numpy(_sample_batch(rng, pool_x, pool_y, settings, patch_px=patch_px)[0]), mean, std)
            for _ in range(settings.bn_recalibration_batches)
        ]
        torch.optim.swa_utils.update_bn(batches, model)
    return model.eval(), mean, std


def _card(
    settings: TrainSettings, *, mean: np.ndarray, std: np.ndarray, weights_path: Path, training: dict
) -> dict:
    """The model card as a JSON-able dict (the schema of ``schemas.model_card.ModelCard``)."""
    return {
        "version": CARD_VERSION,
        "name": MODEL_NAME,
        "architecture": "unet",
        "arch_args": {"base_channels": settings.base_channels, "depth": settings.depth, "upsample": settings.upsample},
        "in_channels": len(BAND_NAMES),
        "classes": _classes(),
        "bands": _bands(mean, std),
        "tile_size": DEMO_TILE_SIZE_PX,
        "halo": HALO_PX,
        "stride": 2**settings.depth,
        "weights": weights_path.name,
        "weights_sha256": hashlib.sha256(weights_path.read_bytes()).hexdigest(),
        "training": training,
    }


def _classes() -> list[dict[str, Any]]:
    """The card's ``classes``: ids, :data:`CLASS_NAMES` and :data:`CLASS_COLORS`."""
    return [{"id": i, "name": name, "color": color} for i, (name, color) in enumerate(zip(CLASS_NAMES, CLASS_COLORS))]


def _bands(mean: np.ndarray, std: np.ndarray) -> list[dict[str, Any]]:
    """The card's ``bands``: :data:`BAND_NAMES` with their normalisation (raw units)."""
    return [{"name": name, "mean": float(m), "std": float(s)} for name, m, s in zip(BAND_NAMES, mean, std)]


def normalise(x: torch.Tensor, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """``(x - mean) / std`` per band, float32.

    Args:
        x: ``(N, C, H, W)`` raw band values (any real dtype).
        mean: ``(C,)`` band means, raw units.
        std: ``(C,)`` band standard deviations, raw units.
    """
    mean_t = torch.as_tensor(np.asarray(mean, np.float32)).view(1, -1, 1, 1)
    std_t = torch.as_tensor(np.asarray(std, np.float32)).view(1, -1, 1, 1)
    return (x.to(torch.float32) - mean_t) / std_t


def band_statistics(images: list[np.ndarray], labels: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and std of the valid pixels of some windows.

    Args:
        images: ``(C, h, w)`` uint16 windows.
        labels: ``(h, w)`` uint8 labels of the same windows; NODATA_CLASS marks invalid pixels.

    Returns:
        ``(mean, std)``: ``(C,)`` float64 each, in raw band units.
    """
    total = np.zeros(images[0].shape[0], np.float64)
    total_sq = np.zeros_like(total)
    count = 0
    for image, label in zip(images, labels):
        valid = image[:, label != NODATA_CLASS].astype(np.float64)
        total += valid.sum(axis=1)
        total_sq += (valid * valid).sum(axis=1)
        count += valid.shape[1]
    if count == 0:
        raise ValueError(f"no valid pixels in {len(images)} windows to compute band statistics from")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 1e-6))
    return mean, std


def segmentation_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    class_weights: torch.Tensor | None = None,
    boundary_weight: float = 0.0,
) -> torch.Tensor:
    """Weighted cross-entropy over valid pixels, heavier on class boundaries.

    ``loss = sum(w_class * (1 + boundary_weight * b) * ce) / sum(w_class * (1 + boundary_weight * b))``
    over pixels whose label is not NODATA_CLASS, where ``b`` is 1 if the 3x3 neighbourhood holds
    another valid class.

    Args:
        logits: ``(N, K, H, W)`` float32.
        labels: ``(N, H, W)`` int64, 0..K-1 or NODATA_CLASS.
        class_weights: ``(K,)`` float32, or None for equal weights.
        boundary_weight: extra weight of boundary pixels (0 disables it).

    Returns:
        Scalar loss tensor.
    """
    valid = labels != NODATA_CLASS
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    ce = F.cross_entropy(logits, safe, reduction="none")
    weight = valid.to(logits.dtype)
    if class_weights is not None:
        weight = weight * class_weights.to(logits.dtype)[safe]
    if boundary_weight:
        weight = weight * (1.0 + boundary_weight * class_boundaries(labels).to(logits.dtype))
    return (weight * ce).sum() / weight.sum().clamp_min(1.0)


def class_boundaries(labels: torch.Tensor) -> torch.Tensor:
    """Pixels whose 3x3 neighbourhood holds two different valid classes.

    Args:
        labels: ``(N, H, W)`` int64 class ids, NODATA_CLASS for invalid pixels (ignored).

    Returns:
        ``(N, H, W)`` bool.
    """
    valid = labels != NODATA_CLASS
    lab = torch.where(valid, labels, torch.full_like(labels, -1)).unsqueeze(1).to(torch.float32)
    high = F.max_pool2d(lab, 3, stride=1, padding=1)
    # Minimum over valid neighbours: nodata (-1) becomes -1e3 in the negated max-pool.
    low = -F.max_pool2d(torch.where(lab < 0, torch.full_like(lab, -1e3), -lab), 3, stride=1, padding=1)
    return ((high != low) & (high >= 0)).squeeze(1)


def measure_forward_throughput(
    model: torch.nn.Module, *, in_channels: int, batches: int = 5, tile_px: int = TILE_SIZE_PX, batch_size: int = 2
) -> float:
    """Forward throughput of ``model`` in eval mode on CPU (Mpx/s) with the current torch threads.

    Times ``batches`` single passes of ``(batch_size, in_channels, tile_px, tile_px)`` after one
    warm-up and reports the fastest, so that other load on the machine inflates it less.
    """
    x = torch.randn(batch_size, in_channels, tile_px, tile_px, generator=torch.Generator().manual_seed(0))
    model.eval()
    fastest = math.inf
    with torch.inference_mode():
        model(x)
        for _ in range(batches):
            start = time.perf_counter()
            model(x)
            fastest = min(fastest, time.perf_counter() - start)
    return batch_size * tile_px * tile_px / fastest / 1e6


def _draw_window(rng: np.random.Generator, settings: TrainSettings, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Render a random window of a random training scene with enough valid pixels."""
    while True:
        scene_seed = int(rng.choice(settings.train_scene_seeds))
        image, label = _render_random(rng, SceneSpec(settings.scene_px, settings.scene_px, scene_seed), size)
        if (label != NODATA_CLASS).mean() >= settings.min_valid_fraction:
            return image, label


def _render_random(rng: np.random.Generator, spec: SceneSpec, size: int) -> tuple[np.ndarray, np.ndarray]:
    row0 = int(rng.integers(0, spec.height - size + 1))
    col0 = int(rng.integers(0, spec.width - size + 1))
    return render_window(spec, row0, col0, size, size)


def _sample_batch(
    rng: np.random.Generator,
    pool_x: list[np.ndarray],
    pool_y: list[np.ndarray],
    settings: TrainSettings,
    *,
    patch_px: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Random crops with random flips and quarter turns: ``(B, C, P, P)`` float32, ``(B, P, P)`` int64."""
    p = patch_px
    xs, ys = [], []
    for _ in range(settings.batch_size):
        k = int(rng.integers(len(pool_x)))
        image, label = pool_x[k], pool_y[k]
        r = int(rng.integers(0, label.shape[0] - p + 1))
        c = int(rng.integers(0, label.shape[1] - p + 1))
        x, y = image[:, r : r + p, c : c + p], label[r : r + p, c : c + p]
        turns = int(rng.integers(4))
        x, y = np.rot90(x, turns, axes=(1, 2)), np.rot90(y, turns)
        if rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, ::-1]
        xs.append(x.astype(np.float32))
        ys.append(y.astype(np.int64))
    return np.stack(xs), np.stack(ys)


def _class_weights(counts: np.ndarray) -> np.ndarray:
    """Class loss weights ~ 1 / sqrt(pixel share), mean 1, float32; absent classes get the max."""
    share = counts / max(counts.sum(), 1)
    weights = np.where(share > 0, 1.0 / np.sqrt(np.maximum(share, 1e-12)), 0.0)
    weights = np.where(share > 0, weights, weights.max() if weights.max() > 0 else 1.0)
    return (weights / weights.mean()).astype(np.float32)


def _validate(
    model: torch.nn.Module, mean: np.ndarray, std: np.ndarray, settings: TrainSettings, *, window_px: int
) -> np.ndarray:
    """IoU per class ``(K,)`` float64 on held-out ``window_px`` windows (valid pixels only).

    NaN for a class absent from both truth and prediction.
    """
    rng = np.random.default_rng(settings.val_scene_seed)
    spec = SceneSpec(settings.scene_px, settings.scene_px, settings.val_scene_seed)
    num_classes = len(CLASS_NAMES)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    drawn = 0
    while drawn < settings.val_windows:
        image, label = _render_random(rng, spec, window_px)
        if (label != NODATA_CLASS).mean() < settings.min_valid_fraction:
            continue
        drawn += 1
        x = normalise(torch.from_numpy(image.astype(np.float32))[None], mean, std)
        with torch.inference_mode():
            predicted = model(x).argmax(dim=1)[0].numpy()
        valid = label != NODATA_CLASS
        confusion += np.bincount(
            label[valid].astype(np.int64) * num_classes + predicted[valid], minlength=num_classes**2
        ).reshape(num_classes, num_classes)
    true_positive = np.diag(confusion).astype(np.float64)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - true_positive
    return np.where(union > 0, true_positive / np.maximum(union, 1), math.nan)


def _save_weights(model: torch.nn.Module, path: Path) -> str:
    """Save the state dict as safetensors, fp32 if it fits in 5 MB else fp16; returns the dtype name."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    float_bytes = sum(v.numel() * v.element_size() for v in state.values() if v.is_floating_point())
    dtype = "float32"
    if float_bytes > MAX_FP32_WEIGHTS_BYTES:
        state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
        dtype = "float16"
    # One metadata key only: safetensors writes metadata in hash-map order, so several keys
    # would make the file bytes (and the card's sha256) differ between identical runs.
    save_file(state, str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors creates the file owner-only; it ships as package data
    return dtype


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m pipelines.tools.train --out workers/weights``."""
    parser = argparse.ArgumentParser(description="Train the demo U-Net on synthetic scenes.")
    parser.add_argument("--out", type=Path, required=True, help="folder for unet-demo.safetensors and .json")
    parser.add_argument("--seed", type=int, default=0, help="training seed (torch and numpy)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimiser steps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    card = train_demo_model(args.out, seed=args.seed, steps=args.steps)
    logger.info("card: %s", card)


if __name__ == "__main__":
    main()
