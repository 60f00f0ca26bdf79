"""The seam effect: chunked prediction vs one whole-scene pass, per architecture.

A model whose output at a pixel depends only on a neighbourhood smaller than the halo gives the
same labels whether the scene is predicted in one pass or chunk by chunk (halo windows, cropped
to their cores, stitched). Models with *global* context do not: PSPNet's pyramid pooling,
DeepLab's image-pooling branch, LR-ASPP's and MobileNetV3's squeeze-and-excitation average over
the whole input, so a chunk's labels depend on which window the model saw. Where two chunks
meet, their windows differ most, and the result can show a seam.

:func:`measure_seams` measures it on one held-out synthetic scene (no nodata footprint, so
every pixel is compared and valid masks play no part). For each architecture:

* **whole**: the model on the whole scene in one pass (a :class:`~workers.predictor.Predictor`
  whose tile covers the scene);
* **tiled**: exactly the pipeline's path without Ray or files: ``plan_chunks(scene, chunk,
  halo)``, each window cut from the scene and reflect-padded at scene edges (``pad_window``),
  predicted by a Predictor with the job's tile settings (the card's tile size unless given,
  overlap 0.25, Gaussian blending, the job's CPU batch size), cropped to the core and stitched;
* **agreement** ``= mean(tiled == whole)`` over all pixels, over the *seam* zone (pixels within
  :data:`SEAM_WIDTH_PX` of a chunk border inside the scene), the *scene edge* zone (within
  :data:`SEAM_WIDTH_PX` of the scene border, not seam) and the *interior* (everything else);
* **mIoU** of each prediction against the generator's truth.

Models are trained briefly here (:func:`pipelines.tools.train.train_model`, a time budget per
architecture, the checkpoint cached under ``out_dir`` for re-runs); parameter-free models (the
threshold oracle) are saved untrained; ``builtin:<name>`` or a card path is used as it is.

The maths (:func:`seam_zones`, :func:`agreement_stats`, :func:`parse_arch`,
:func:`checkpoint_name`) is pure; :func:`predict_tiled` and :func:`predict_whole` run a
Predictor; :func:`measure_seams` orchestrates. See docs/seams.md for results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.plan.chunks import pad_window, plan_chunks
from pipelines.tools.metrics import confusion_matrix, mean_iou
from pipelines.tools.synthetic import BAND_NAMES, CLASS_NAMES, NODATA_VALUE, SceneSpec, render_window
from pipelines.tools.train import TrainSettings, segmentation_loss, train_model
from schemas.job import BUILTIN_PREFIX, default_batch_size
from workers.checkpoints import (
    build_from_checkpoint,
    load_checkpoint,
    resolve_card_path,
    save_checkpoint,
)
from workers.predictor import Predictor, PredictorOptions
from workers.registry import build_model, model_kind, native_stride

log = logging.getLogger("tessera")

#: Version of the seams.json layout.
SEAMS_FORMAT_VERSION = 1
#: Half-width of the seam zone: pixels closer than this to a chunk border (px).
SEAM_WIDTH_PX = 8
#: Seed of the measured scene; not a training or validation seed of :data:`SEAMS_TRAIN_SETTINGS`.
SCENE_SEED = 2024
#: The card whose band statistics parameter-free models (oracles) are saved with.
DEMO_CARD = f"{BUILTIN_PREFIX}unet-demo"
#: Fewest optimiser steps a time budget may cut a training run to.
MIN_TRAIN_STEPS = 10
#: Tile overlap of the tiled path (the job spec's default; blending is Gaussian, batch the CPU default).
TILE_OVERLAP = 0.25

#: The measured set: (architecture or card reference, arch_args).
DEFAULT_ARCHITECTURES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("oracle_threshold", {"radius": 0}),
    (DEMO_CARD, {}),
    ("unet_smp", {}),
    ("lraspp", {}),
    ("deeplabv3", {"backbone": "mobilenet_v3_large"}),
    ("deeplabv3plus", {}),
    ("pspnet", {}),
    ("fcn_resnet50", {}),
    ("deeplabv3", {"backbone": "resnet50"}),
)

#: Brief training: small batches of 128-px crops from a small, slowly refreshed pool; BatchNorm
#: statistics re-estimated at the end (short runs leave MobileNetV3's slow running averages stale).
SEAMS_TRAIN_SETTINGS = TrainSettings(
    batch_size=4,
    patch_px=128,
    scene_px=4096,
    pool_windows=12,
    pool_window_px=256,
    pool_refresh=1,
    val_windows=2,
    val_window_px=256,
    benchmark_batches=0,
    bn_recalibration_batches=16,
)


# ----------------------------------------------------------------------------- pure maths


def parse_arch(text: str) -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``"name,key=value,..."`` -> ``(name, arch_args)``.

    Values are read as JSON when they parse (``depth=3`` -> 3, ``x=null`` -> None), else kept
    as strings (``backbone=resnet50``). The name may be a registry architecture, a plugin
    ``"package.module:callable"``, ``builtin:<name>`` or a card path.

    Raises:
        ValueError: empty name, or an argument without ``=``.
    """
    name, *pairs = [part.strip() for part in text.split(",")]
    if not name:
        raise ValueError(f"--arch {text!r}: give an architecture name first, e.g. 'deeplabv3,backbone=resnet50'")
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--arch {text!r}: argument {pair!r} is not key=value")
        try:
            args[key] = json.loads(value)
        except json.JSONDecodeError:
            args[key] = value
    return name, args


def arch_label(architecture: str, arch_args: Mapping[str, Any]) -> str:
    """Short display name: ``deeplabv3(backbone=resnet50)``."""
    if not arch_args:
        return architecture
    return f"{architecture}({', '.join(f'{k}={v}' for k, v in arch_args.items())})"


def seam_zones(shape: Sequence[int], chunk: int, *, width: int = SEAM_WIDTH_PX) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the seam zone and of the scene-edge zone of a chunk grid.

    Along each axis of size ``S``, the chunk borders inside the scene are at ``b = k * chunk``,
    ``0 < b < S``; a pixel ``i`` is near one when ``b - width <= i < b + width`` (``width`` px
    on each side). It is near the scene edge when ``i < width`` or ``i >= S - width``.

    Args:
        shape: scene ``(H, W)`` in px.
        chunk: chunk (core) side in px, > 0.
        width: half-width of the zones in px, >= 1.

    Returns:
        ``(seam, edge)``: ``(H, W)`` bool each; ``seam`` is near a chunk border on either axis,
        ``edge`` is near the scene border and not in ``seam``. The rest is the interior.

    Raises:
        ValueError: a non-positive shape, chunk or width.
    """
    h, w = (int(s) for s in shape)
    if min(h, w) < 1 or chunk < 1 or width < 1:
        raise ValueError(f"seam_zones needs shape > 0, chunk > 0 and width >= 1, got {shape}, {chunk}, {width}")

    def near(size: int) -> tuple[np.ndarray, np.ndarray]:
        i = np.arange(size)
        borders = np.arange(chunk, size, chunk)
        to_border = np.abs(i[:, None] + 0.5 - borders[None, :]).min(axis=1) if borders.size else np.full(size, np.inf)
        return to_border < width, (i < width) | (i >= size - width)

    seam_r, edge_r = near(h)
    seam_c, edge_c = near(w)
    seam = seam_r[:, None] | seam_c[None, :]
    edge = (edge_r[:, None] | edge_c[None, :]) & ~seam
    return seam, edge


def agreement_stats(
    whole: np.ndarray, tiled: np.ndarray, *, chunk: int, width: int = SEAM_WIDTH_PX
) -> dict[str, float | int | None]:
    """Pixel agreement of two label maps, overall and per zone of :func:`seam_zones`.

    Args:
        whole: ``(H, W)`` labels of the one-pass prediction.
        tiled: ``(H, W)`` labels of the chunked prediction.
        chunk: chunk side (px) of the tiled prediction.
        width: half-width of the seam and edge zones (px).

    Returns:
        ``agreement``, ``agreement_seam``, ``agreement_edge``, ``agreement_interior``: fractions
        in [0, 1] (None for an empty zone); ``disagree_px``; ``disagree_in_seam``: share of the
        disagreeing pixels that lie in the seam zone (None when none disagree); ``seam_share``:
        the seam zone's share of the scene.

    Raises:
        ValueError: the shapes differ.
    """
    if whole.shape != tiled.shape or whole.ndim != 2:
        raise ValueError(f"label maps must be (H, W) of one shape, got {whole.shape} and {tiled.shape}")
    seam, edge = seam_zones(whole.shape, chunk, width=width)
    interior = ~(seam | edge)
    same = whole == tiled

    def share(mask: np.ndarray) -> float | None:
        return float(same[mask].mean()) if mask.any() else None

    disagree = int((~same).sum())
    return {
        "agreement": float(same.mean()),
        "agreement_seam": share(seam),
        "agreement_edge": share(edge),
        "agreement_interior": share(interior),
        "disagree_px": disagree,
        "disagree_in_seam": float((~same & seam).sum() / disagree) if disagree else None,
        "seam_share": float(seam.mean()),
    }


def checkpoint_name(
    architecture: str,
    arch_args: Mapping[str, Any],
    *,
    seed: int,
    steps: int,
    train_budget_s: float | None,
    settings: TrainSettings,
) -> str:
    """File stem of a cached training run: the architecture and a digest of everything that shaped it."""
    key = json.dumps(
        {"architecture": architecture, "arch_args": dict(arch_args), "seed": seed, "steps": steps,
         "train_budget_s": train_budget_s, "settings": asdict(settings)},
        sort_keys=True, default=str,
    )
    slug = re.sub(r"[^a-z0-9]+", "-", arch_label(architecture, arch_args).lower()).strip("-")
    return f"seams-{slug}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


# ----------------------------------------------------------------------------- prediction


def scene_valid(bands: np.ndarray, nodata: float = NODATA_VALUE) -> np.ndarray:
    """``(H, W)`` bool: False where every band equals nodata (the GeoTIFF reader's rule)."""
    return ~(bands == np.asarray(nodata).astype(bands.dtype)).all(axis=0)


def predict_whole(predictor: Predictor, bands: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Labels of the whole scene in one call of ``predictor`` (give it a tile >= the scene for one pass).

    Args:
        predictor: any Predictor.
        bands: ``(C, H, W)`` raw band values.
        valid: ``(H, W)`` bool.

    Returns:
        ``(H, W)`` uint8 labels.
    """
    return predictor.predict_labels(bands, valid)


def predict_tiled(
    predictor: Predictor, bands: np.ndarray, valid: np.ndarray, *, chunk: int, halo: int
) -> np.ndarray:
    """Labels of the scene as the pipeline makes them: halo windows, predicted, cropped, stitched.

    Per :func:`pipelines.plan.chunks.plan_chunks` window: the read region of ``bands`` and ``valid``,
    reflect-padded to the window at scene edges (:func:`pipelines.plan.chunks.pad_window`, as the
    GeoTIFF reader does), ``predictor.predict_labels(..., core=window.core_in_window)`` written
    to the core.

    Args:
        predictor: a Predictor with the job's tile settings.
        bands: ``(C, H, W)`` raw band values of the scene.
        valid: ``(H, W)`` bool.
        chunk: chunk (core) side in px.
        halo: context per side in px.

    Returns:
        ``(H, W)`` uint8 labels.
    """
    out = np.empty(bands.shape[1:], dtype=np.uint8)
    for window in plan_chunks(bands.shape[1:], chunk, halo):
        pixels = pad_window(bands[(slice(None), *window.read)], window)
        window_valid = pad_window(valid[window.read], window)
        out[window.core] = predictor.predict_labels(pixels, window_valid, core=window.core_in_window)
    return out


# ----------------------------------------------------------------------------- models


def probe_step_seconds(
    architecture: str, arch_args: Mapping[str, Any], settings: TrainSettings, *, passes: int = 2
) -> float:
    """Seconds of one training step (forward, loss, backward, AdamW) on random crops, after a warm-up.

    Uses the batch size and crop size (rounded up to the stride) :func:`train_model` will use and
    the current torch threads. Data rendering is not included.
    """
    stride = native_stride(architecture, arch_args)
    patch = -(-settings.patch_px // stride) * stride
    generator = torch.Generator().manual_seed(0)
    model = build_model(architecture, in_channels=len(BAND_NAMES), num_classes=len(CLASS_NAMES), arch_args=arch_args)
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate)
    x = torch.randn(settings.batch_size, len(BAND_NAMES), patch, patch, generator=generator)
    y = torch.randint(0, len(CLASS_NAMES), (settings.batch_size, patch, patch), generator=generator)

    def step() -> None:
        loss = segmentation_loss(model(x), y, boundary_weight=settings.boundary_weight)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    step()
    started = time.perf_counter()
    for _ in range(passes):
        step()
    return (time.perf_counter() - started) / passes


def _has_trainable_parameters(architecture: str, arch_args: Mapping[str, Any]) -> tuple[bool, torch.nn.Module]:
    model = build_model(architecture, in_channels=len(BAND_NAMES), num_classes=len(CLASS_NAMES), arch_args=arch_args)
    return any(p.requires_grad for p in model.parameters()), model


def prepare_checkpoint(
    architecture: str,
    arch_args: Mapping[str, Any],
    *,
    out_dir: Path,
    seed: int,
    steps: int,
    train_budget_s: float | None,
    settings: TrainSettings,
) -> tuple[Path, dict[str, Any]]:
    """The card to measure for one entry, trained (or reused from ``out_dir``) when needed.

    * ``builtin:<name>`` or a path ending in ``.json``: used as is (``source = "card"``).
    * a parameter-free architecture (the threshold oracle, a plugin without parameters): saved
      untrained with the band statistics of :data:`DEMO_CARD` (``source = "untrained"``).
    * anything else: :func:`pipelines.tools.train.train_model` for ``steps`` optimiser steps, cut to
      ``train_budget_s / probe_step_seconds`` (at least :data:`MIN_TRAIN_STEPS`) when a budget is
      given (``source = "trained"``); a card already in ``out_dir`` under
      :func:`checkpoint_name` is reused (``cached = True``).

    Returns:
        ``(card_path, info)``: info holds ``source``, ``cached``, ``train_steps``, ``train_s``,
        ``probe_step_s``, ``val_miou`` (None where not applicable).
    """
    info: dict[str, Any] = {"source": "card", "cached": False, "train_steps": None, "train_s": None,
                            "probe_step_s": None, "val_miou": None}
    if architecture.startswith(BUILTIN_PREFIX) or architecture.endswith(".json"):
        card_path = resolve_card_path(architecture)
        training = load_checkpoint(card_path).card.training
        info.update(train_steps=training.get("steps"), train_s=training.get("train_seconds"),
                    val_miou=training.get("val_miou"))
        return card_path, info
    name = checkpoint_name(architecture, arch_args, seed=seed, steps=steps, train_budget_s=train_budget_s,
                           settings=settings)
    card_path = out_dir / f"{name}.json"
    trainable, model = _has_trainable_parameters(architecture, arch_args)
    if not trainable:
        info["source"] = "untrained"
        demo = load_checkpoint(resolve_card_path(DEMO_CARD)).card
        stride = native_stride(architecture, arch_args)
        fields = {
            "architecture": architecture,
            "arch_args": dict(arch_args),
            "in_channels": demo.in_channels,
            "classes": [c.model_dump() for c in demo.classes],
            "bands": [b.model_dump() for b in demo.bands],
            "tile_size": -(-demo.tile_size // stride) * stride,
            "halo": demo.halo,
            "stride": stride,
            "training": {"note": f"parameter-free; band statistics of {DEMO_CARD}"},
        }
        return save_checkpoint(model, fields, out_dir, name=name), info
    info["source"] = "trained"
    if card_path.is_file():
        info["cached"] = True
    else:
        run_steps = steps
        if train_budget_s is not None:
            step_s = probe_step_seconds(architecture, arch_args, settings)
            info["probe_step_s"] = round(step_s, 3)
            run_steps = min(steps, max(MIN_TRAIN_STEPS, math.floor(train_budget_s / step_s)))
        train_model(architecture, arch_args, out_dir, name=name, seed=seed, steps=run_steps, settings=settings)
    training = load_checkpoint(card_path).card.training
    info.update(train_steps=training["steps"], train_s=training["train_seconds"], val_miou=training["val_miou"])
    return card_path, info


# ----------------------------------------------------------------------------- measurement


def _miou(truth: np.ndarray, labels: np.ndarray) -> float:
    return mean_iou(confusion_matrix(truth, labels, num_classes=len(CLASS_NAMES)))


def measure_one(
    card_path: Path,
    bands: np.ndarray,
    truth: np.ndarray,
    *,
    chunk_size: int,
    halo: int,
    tile_size: int | None,
    torch_threads: int,
) -> dict[str, Any]:
    """Whole vs tiled prediction of one checkpoint on one scene.

    Returns:
        The :func:`agreement_stats` fields plus ``model`` (card name), ``model_architecture``,
        ``params``, ``stride``, ``tile_size`` (of the tiled path), ``miou_whole``, ``miou_tiled``,
        ``whole_s``, ``tiled_s``, and the label maps under ``"_whole"`` and ``"_tiled"`` (``(H, W)`` uint8).
    """
    ckpt = load_checkpoint(card_path)
    card = ckpt.card
    model = build_from_checkpoint(ckpt)
    valid = scene_valid(bands)
    side = max(bands.shape[1:])
    tile = tile_size if tile_size is not None else card.tile_size
    common = {"device": "cpu", "precision": "fp32", "torch_threads": torch_threads}
    whole_options = PredictorOptions(**common, batch_size=1, tile_size=-(-side // card.stride) * card.stride)
    tiled_options = PredictorOptions(**common, batch_size=default_batch_size("cpu"), tile_size=tile,
                                     tile_overlap=TILE_OVERLAP, blend="gaussian")
    whole_predictor = Predictor(model, card, options=whole_options)
    tiled_predictor = Predictor(model, card, options=tiled_options)
    started = time.perf_counter()
    whole = predict_whole(whole_predictor, bands, valid)
    whole_s = time.perf_counter() - started
    started = time.perf_counter()
    tiled = predict_tiled(tiled_predictor, bands, valid, chunk=chunk_size, halo=halo)
    tiled_s = time.perf_counter() - started
    return {
        "model": card.name,
        "model_architecture": card.architecture,
        "params": sum(p.numel() for p in model.parameters()),
        "stride": card.stride,
        "tile_size": tile,
        **agreement_stats(whole, tiled, chunk=chunk_size),
        "miou_whole": _miou(truth, whole),
        "miou_tiled": _miou(truth, tiled),
        "whole_s": whole_s,
        "tiled_s": tiled_s,
        "_whole": whole,
        "_tiled": tiled,
    }


def measure_seams(
    architectures: Sequence[tuple[str, Mapping[str, Any]]] = DEFAULT_ARCHITECTURES,
    *,
    out_dir: Path,
    scene_size: int = 1024,
    chunk_size: int = 256,
    halo: int = 32,
    tile_size: int | None = None,
    steps: int = 3000,
    seed: int = 0,
    train_budget_s: float | None = 110.0,
    time_budget_s: float | None = None,
    scene_seed: int = SCENE_SEED,
    settings: TrainSettings = SEAMS_TRAIN_SETTINGS,
    on_progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Tiled vs whole-scene agreement, and mIoU vs truth, for each architecture on one scene.

    The scene is ``render_window(SceneSpec(scene_size, scene_size, scene_seed, footprint=False))``:
    no nodata, never seen in training. Label maps are saved as ``out_dir/<checkpoint>.labels.npz``
    (``whole``, ``tiled``, ``truth``).

    Args:
        architectures: ``(name, arch_args)`` pairs; see :func:`prepare_checkpoint` for names.
        out_dir: folder for cached checkpoints and label maps (created).
        scene_size: scene side in px.
        chunk_size: chunk (core) side of the tiled path in px.
        halo: context per side of the tiled path in px.
        tile_size: model tile side of the tiled path in px (None: each card's ``tile_size``).
        steps: most optimiser steps per trained architecture.
        seed: training seed.
        train_budget_s: training seconds aimed at per architecture (None: always ``steps``).
        time_budget_s: once this many seconds have passed, the remaining architectures are
            skipped, with the reason in their row (None: no limit).
        scene_seed: seed of the measured scene; must not be a training or validation seed.
        settings: training settings (crop, batch, pool, threads).
        on_progress: called with a short line per step (default: log INFO).

    Returns:
        One dict per architecture, in order: ``label``, ``architecture``, ``arch_args``,
        ``skipped`` (None or the reason), the :func:`prepare_checkpoint` info, the
        :func:`measure_one` figures (without the label maps), ``seconds`` (this run's wall time
        for the entry, training included), and the settings ``scene_size``, ``chunk_size``,
        ``halo``, ``scene_seed``.

    Raises:
        ValueError: ``scene_seed`` is used in training, or sizes are not positive.
    """
    say = on_progress or (lambda line: log.info("%s", line))
    if scene_seed in settings.train_scene_seeds or scene_seed == settings.val_scene_seed:
        raise ValueError(
            f"scene_seed {scene_seed} is a training or validation seed of the settings "
            f"({settings.train_scene_seeds}, {settings.val_scene_seed}); pick a held-out one"
        )
    if min(scene_size, chunk_size) < 1 or halo < 0:
        raise ValueError(f"scene_size and chunk_size must be > 0 and halo >= 0, got {scene_size}, {chunk_size}, {halo}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = SceneSpec(scene_size, scene_size, scene_seed, footprint=False)
    bands, truth = render_window(spec, 0, 0, scene_size, scene_size)
    common = {"scene_size": scene_size, "chunk_size": chunk_size, "halo": halo, "scene_seed": scene_seed}
    started_all = time.perf_counter()
    rows: list[dict[str, Any]] = []
    previous_threads = torch.get_num_threads()
    try:
        for architecture, arch_args in architectures:
            arch_args = dict(arch_args)
            label = arch_label(architecture, arch_args)
            row: dict[str, Any] = {"label": label, "architecture": architecture, "arch_args": arch_args,
                                   "skipped": None, **common}
            elapsed = time.perf_counter() - started_all
            is_card = architecture.startswith(BUILTIN_PREFIX) or architecture.endswith(".json")
            if time_budget_s is not None and elapsed > time_budget_s:
                row["skipped"] = f"time budget: {elapsed:.0f} s of {time_budget_s:.0f} s spent before it"
            elif not is_card and model_kind(architecture) != "semantic":
                row["skipped"] = "instance model: no per-pixel labels to compare"
            if row["skipped"]:
                say(f"{label}: skipped ({row['skipped']})")
                rows.append(row)
                continue
            t0 = time.perf_counter()
            torch.set_num_threads(settings.torch_threads)
            say(f"{label}: preparing the checkpoint")
            card_path, info = prepare_checkpoint(architecture, arch_args, out_dir=out_dir, seed=seed, steps=steps,
                                                 train_budget_s=train_budget_s, settings=settings)
            say(f"{label}: {info['source']}{' (cached)' if info['cached'] else ''}, measuring whole vs tiled")
            figures = measure_one(card_path, bands, truth, chunk_size=chunk_size, halo=halo, tile_size=tile_size,
                                  torch_threads=settings.torch_threads)
            if is_card:
                row["label"] = label = f"{figures['model_architecture']} ({architecture})"
            np.savez_compressed(out_dir / f"{card_path.stem}.labels.npz", whole=figures.pop("_whole"),
                                tiled=figures.pop("_tiled"), truth=truth)
            row.update(info, card=str(card_path), **figures, seconds=time.perf_counter() - t0)
            say(f"{label}: agreement {_format(row['agreement'], 'pct')} "
                f"(seam {_format(row['agreement_seam'], 'pct')}), "
                f"mIoU whole {row['miou_whole']:.3f} tiled {row['miou_tiled']:.3f}, {row['seconds']:.0f} s")
            rows.append(row)
    finally:
        torch.set_num_threads(previous_threads)
    return rows


def write_report(rows: Sequence[Mapping[str, Any]], out_dir: Path, *, settings: Mapping[str, Any]) -> Path:
    """Write ``out_dir/seams.json``: format version, UTC time, torch, settings and rows."""
    path = Path(out_dir) / "seams.json"
    report = {
        "format_version": SEAMS_FORMAT_VERSION,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__,
        "settings": dict(settings),
        "rows": list(rows),
    }
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


# ----------------------------------------------------------------------------- report

#: (header, row key, format) of the report table; percentages for agreements.
_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("agreement", "agreement", "pct"),
    ("seam ±8 px", "agreement_seam", "pct"),
    ("scene edge", "agreement_edge", "pct"),
    ("interior", "agreement_interior", "pct"),
    ("misses in seam", "disagree_in_seam", "pct"),
    ("mIoU whole", "miou_whole", ".3f"),
    ("mIoU tiled", "miou_tiled", ".3f"),
    ("params", "params", "params"),
    ("train steps", "train_steps", "d"),
    ("train s", "train_s", ".0f"),
    ("whole s", "whole_s", ".1f"),
    ("tiled s", "tiled_s", ".1f"),
)


def _format(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if spec == "pct":
        return f"{100 * value:.2f} %"
    if spec == "params":
        return f"{value / 1e6:.2f} M" if value >= 1e5 else f"{value:,}"
    return f"{value:{spec}}"


def table_cells(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the report (one row per architecture; skipped rows say why)."""
    header = ["model", *(h for h, _, _ in _COLUMNS)]
    cells = []
    for row in rows:
        name = row["label"]
        if row.get("skipped"):
            cells.append([name, f"skipped: {row['skipped']}", *([""] * (len(_COLUMNS) - 1))])
        else:
            cells.append([name, *(_format(row.get(key), spec) for _, key, spec in _COLUMNS)])
    return header, cells


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The report as a Markdown table."""
    header, cells = table_cells(rows)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines)


def render_table(rows: Sequence[Mapping[str, Any]], *, title: str = "") -> Any:
    """The report as a rich Table."""
    from rich.table import Table

    header, cells = table_cells(rows)
    table = Table(title=title or None, title_justify="left")
    table.add_column(header[0])
    for name in header[1:]:
        table.add_column(name, justify="right")
    for c in cells:
        table.add_row(*c)
    return table
