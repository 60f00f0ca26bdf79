"""`tessera bench`: how close the whole job comes to the bare model, and to a whole-scene peer.

For each synthetic scene size, one run measures:

* **raw**: output px/s of the bare forward pass on tiles already on the device (same model,
  tile, batch, precision and torch threads as the job's predictors), in a child process;
* **end to end**: scene px / wall s of :func:`pipelines.run.job.run_job` (plan, read, predict,
  blend, write, stats, merge, tables), Ray already up, peak RSS of the driver and its Ray
  processes (and GPU memory from ``nvidia-smi`` on GPU);
* **redundancy**: model px computed / output px, exactly from the plan (halos, tile overlap,
  stride padding, skipped nodata chunks), so the *ideal* end-to-end/raw ratio is
  ``1 / redundancy`` and ``efficiency = (e2e / raw) * redundancy`` is the share of the
  model's bare speed that the pipeline delivers beyond what the plan makes it compute;
* **breakdown**: read / predict / write / stats / merge shares of the summed stage seconds
  (blending and cropping, the "stitch", happen inside predict);
* **peer**: MONAI ``sliding_window_inference`` over the whole scene held in memory (same
  model, tile, overlap, Gaussian blending, batch, device), in a child process so that its
  peak RSS is its own, with the agreement of its labels with tessera's stored classes;
* **equal redundancy**: the two sides compute different model px per output px (tessera: the
  halo, less the chunks skipped as nodata; the peer: its tile overlap), so the output-px ratio
  is also given per model px computed and factored into pipeline x plan x nodata skip
  (:func:`peer_comparison`, :func:`nodata_skip_gain`), and the peer runs a second time at the
  overlap that matches tessera's redundancy without the skip (:func:`monai_overlap_for_redundancy`).

The maths (:func:`redundancy_factor`, :func:`model_tile_shape`, :func:`throughput_ratios`,
:func:`predict_model_share`, :func:`breakdown_shares`, :func:`scaling_summary`,
:func:`monai_memory_estimate`, :func:`monai_skip_reason`, :func:`parse_sizes`,
:func:`monai_redundancy`, :func:`monai_overlap_for_redundancy`, :func:`nodata_skip_gain`,
:func:`peer_comparison`) is pure; the
rest is thin orchestration (:func:`run_bench`). Scene generation is never part of a
measurement. See docs/benchmarks.md for what each figure means.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.plan.chunks import plan_chunks
from schemas.job import default_batch_size
from workers.runtime import with_malloc_tunables
from workers.tileplan import plan_tiles

log = logging.getLogger("tessera")

#: Version of the result JSON layout.
BENCH_FORMAT_VERSION = 1
#: Stage timings of the `scenes` table, in the order they are reported.
BREAKDOWN_STAGES: tuple[str, ...] = ("read", "predict", "write", "stats", "merge")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MIB = 2**20
_ARGMAX_ROWS = 1024  # MONAI argmax in row strips: avoids a whole-scene int64 temporary


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """What to benchmark (all keyword, all with working defaults).

    Attributes:
        sizes: scene sides in px; each scene is square, sizes x sizes.
        model: model card reference ('builtin:<name>' or a card path).
        chunk_size: output chunk side in px.
        halo: px of context per side (None: the card's).
        tile_size: model tile side in px (None: the card's).
        tile_overlap: tile overlap as a fraction of the tile side, in [0, 1).
        batch_size: model tiles per forward pass (None: the job's default for the device).
        actors: predictor actors (None: one per CPU core on CPU, one per GPU: the job's default).
        torch_threads: torch threads per actor on CPU (None: all cores / actors, at least 1).
        device: "auto" (cuda when available), "cpu" or "cuda".
        precision: autocast precision: "auto", "fp32", "bf16", "fp16" (as the job's
            inference.precision: on CPU auto is fp32, bf16 autocasts, fp16 is refused).
        monai: run the MONAI whole-scene peer.
        monai_max_side: skip the peer above this scene side (it holds the scene in memory).
        monai_equal_redundancy: also run the peer at the overlap whose model px per output px
            equal tessera's plan without nodata skipping (:func:`monai_overlap_for_redundancy`).
        seed: synthetic scene seed.
        out_dir: folder for scenes (inputs/), job outputs (runs/) and result JSON files.
        raw_batches: distinct input batches put on the device for the raw measurement.
        raw_warmup: untimed passes over those batches.
        raw_iterations: timed passes (the median pass is reported).
        malloc_tuning: the job's resources.malloc_tuning; the bare-model and peer children
            get the same allocator setting.
        channels_last: the job's inference.channels_last; the bare model and the peer run the
            model in the same memory format.
        fold_batchnorm: the job's inference.fold_batchnorm; the bare model and the peer run the
            same (folded or not) model.
        warmup_job: first run an untimed job on a one-chunk scene, so that one-time costs of a
            fresh Ray (worker processes importing torch, rasterio, zarr) are not charged to the
            first size; its wall time is reported as "warmup_job_s".
    """

    sizes: tuple[int, ...] = (4096,)
    model: str = "builtin:unet-demo"
    chunk_size: int = 1024
    halo: int | None = None
    tile_size: int | None = None
    tile_overlap: float = 0.25
    batch_size: int | None = None
    actors: int | None = None
    torch_threads: int | None = None
    device: str = "auto"
    precision: str = "auto"
    monai: bool = True
    monai_max_side: int = 16384
    monai_equal_redundancy: bool = True
    seed: int = 7
    out_dir: Path = Path("tessera-bench")
    raw_batches: int = 2
    raw_warmup: int = 1
    raw_iterations: int = 5
    warmup_job: bool = True
    malloc_tuning: bool = True
    channels_last: bool = True
    fold_batchnorm: bool = True

    def __post_init__(self) -> None:
        sizes = tuple(self.sizes)
        if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"BenchConfig.sizes must be scene sides in px (ints >= 1), got {self.sizes!r}")
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"BenchConfig.batch_size must be >= 1, got {self.batch_size!r}")
        for name in ("chunk_size", "actors", "monai_max_side", "raw_batches", "raw_iterations"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"BenchConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("halo", "raw_warmup", "seed"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"BenchConfig.{name} must be >= 0, got {value!r}")
        if self.tile_size is not None and self.tile_size < 1:
            raise ValueError(f"BenchConfig.tile_size must be >= 1 px, got {self.tile_size!r}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"BenchConfig.torch_threads must be >= 1, got {self.torch_threads!r}")
        if not 0 <= self.tile_overlap < 1:
            raise ValueError(f"BenchConfig.tile_overlap must be in [0, 1), got {self.tile_overlap!r}")
        if self.device not in DEVICES:
            raise ValueError(f"BenchConfig.device must be one of {DEVICES}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"BenchConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(self).items()}


# ----------------------------------------------------------------------------- pure maths


def parse_sizes(values: Iterable[str]) -> tuple[int, ...]:
    """Scene sides from CLI strings: repeated and/or comma separated, 'k' = 1024.

    >>> parse_sizes(["4096,8k", "16k"])
    (4096, 8192, 16384)

    Raises:
        ValueError: naming the string that is not a positive size.
    """
    sizes = []
    for value in values:
        for part in str(value).split(","):
            text = part.strip().lower()
            if not text:
                continue
            scale = 1024 if text.endswith("k") else 1
            digits = text[:-1] if scale > 1 else text
            if not digits.isdigit() or int(digits) * scale < 1:
                raise ValueError(f"--size {part.strip()!r} is not a scene side in px (e.g. 4096 or 4k)")
            sizes.append(int(digits) * scale)
    if not sizes:
        raise ValueError("no scene size given (e.g. --size 4096)")
    return tuple(sizes)


def stride_padded(shape: Sequence[int], stride: int) -> tuple[int, ...]:
    """Each side rounded up to a multiple of the model stride (what the predictor feeds the model)."""
    return tuple(-(-int(n) // stride) * stride for n in shape)


def model_tile_shape(window_shape: Sequence[int], tile: int, overlap: float, *, stride: int = 1) -> tuple[int, ...]:
    """The tile the model sees for a window: min(tile, window) per axis, padded to the stride."""
    effective, _ = plan_tiles(tuple(window_shape), tile, overlap)
    return stride_padded(effective, stride)


def redundancy_factor(
    shape: Sequence[int],
    chunk: int,
    halo: int,
    tile: int,
    overlap: float,
    *,
    stride: int = 1,
    skipped: Collection[Sequence[int]] = (),
) -> float:
    """Model px computed per output px for a job plan.

    ``redundancy = sum_w n_tiles(w) * prod(tile_w) / prod(shape)`` over the chunk windows ``w``
    of :func:`pipelines.plan.chunks.plan_chunks` that are not skipped, with the tiles of
    :func:`workers.tiles.plan_tiles` (``tile_w = min(tile, window)`` per axis, rounded up to
    the model stride as the predictor pads it). A fully convolutional model taking each whole
    window costs ``(1 + 2h/c)^2`` (1.1289 for h=32, c=1024); 512-px tiles at 25% overlap on the
    same 1088-px window are 3 x 3 tiles, 2.25.

    Args:
        shape: scene shape in px, (H, W) or (D, H, W).
        chunk: output chunk side in px.
        halo: context px per side.
        tile: model tile side in px.
        overlap: tile overlap fraction in [0, 1).
        stride: model stride in px (tile sides padded up to a multiple of it).
        skipped: chunk indices not computed (wholly nodata); they still count as output px.

    Returns:
        The redundancy factor (> 0; >= 1 unless chunks were skipped).
    """
    skip = {tuple(int(i) for i in index) for index in skipped}
    per_window: dict[tuple[int, ...], int] = {}
    model_px = 0
    for window in plan_chunks(tuple(shape), chunk, halo):
        if window.index in skip:
            continue
        ws = window.window_shape
        if ws not in per_window:
            effective, offsets = plan_tiles(ws, tile, overlap)
            per_window[ws] = len(offsets) * math.prod(stride_padded(effective, stride))
        model_px += per_window[ws]
    return model_px / math.prod(int(n) for n in shape)


def throughput_ratios(raw_px_s: float, e2e_px_s: float, redundancy: float) -> dict[str, float]:
    """How the job's throughput compares with the bare model's.

    Returns:
        ratio: e2e / raw (px/s over model px/s).
        ideal_ratio: 1 / redundancy, the ratio of a pipeline with no cost beyond the model.
        efficiency: ratio / ideal_ratio = e2e * redundancy / raw, the share of the model's bare
            speed the pipeline delivers on the px the plan makes it compute (1 = no overhead).
    """
    if raw_px_s <= 0 or e2e_px_s <= 0 or redundancy <= 0:
        raise ValueError(
            f"throughputs and redundancy must be > 0, got raw {raw_px_s}, e2e {e2e_px_s}, redundancy {redundancy}"
        )
    ratio = e2e_px_s / raw_px_s
    return {"ratio": ratio, "ideal_ratio": 1.0 / redundancy, "efficiency": ratio * redundancy}


def monai_redundancy(shape: Sequence[int], roi: int, overlap: float, *, stride: int = 1) -> float:
    """Model px per output px of MONAI's ``sliding_window_inference`` over a whole scene.

    As MONAI 1.x plans it (``_get_scan_interval``, ``dense_patch_slices``): per axis the image
    is padded up to the roi if smaller, ``S = max(shape, roi)``; the interval is
    ``i = int(roi * (1 - overlap))`` (at least 1; ``roi`` when ``roi == S``); there are
    ``n = max(0, ceil((S - roi) / i)) + 1`` windows, the last shifted back to end at ``S``. Each
    window costs ``roi`` rounded up to the stride (the peer pads tiles as the predictor does):
    ``redundancy = prod_a(n_a * stride_padded(roi)) / prod(shape)``.

    Example: roi 1088, overlap 0.25 on 16384: i = 816, n = 20, (20 * 1088 / 16384)^2 = 1.764.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    if roi < 1:
        raise ValueError(f"roi must be >= 1 px, got {roi!r}")
    model_px = 1
    for n_px in shape:
        size = max(int(n_px), roi)
        interval = roi if roi == size else max(1, int(roi * (1 - overlap)))
        windows = max(0, -(-(size - roi) // interval)) + 1
        model_px *= windows * stride_padded((roi,), stride)[0]
    return model_px / math.prod(int(n) for n in shape)


def monai_overlap_for_redundancy(shape: Sequence[int], roi: int, target: float, *, stride: int = 1) -> float:
    """The peer's overlap whose redundancy (:func:`monai_redundancy`) is closest to ``target``.

    MONAI's plan depends on the overlap only through the integer interval
    ``int(roi * (1 - overlap))``, so every interval from ``roi`` (overlap 0) down to 1 is tried;
    ties go to the smaller overlap. The overlap returned is ``0.0`` for ``interval == roi`` and
    ``1 - (interval + 0.5) / roi`` otherwise, which MONAI turns back into exactly that interval.
    """
    if target <= 0:
        raise ValueError(f"target redundancy must be > 0, got {target!r}")
    best: tuple[float, float] | None = None
    for interval in range(roi, 0, -1):
        overlap = 0.0 if interval == roi else 1 - (interval + 0.5) / roi
        gap = abs(monai_redundancy(shape, roi, overlap, stride=stride) - target)
        if best is None or gap < best[0] - 1e-12:
            best = (gap, overlap)
    assert best is not None
    return best[1]


def nodata_skip_gain(
    shape: Sequence[int], chunk: int, halo: int, tile: int, overlap: float, *, stride: int = 1,
    skipped: Collection[Sequence[int]] = (), raw_px_s: float | None = None,
) -> dict[str, float | None]:
    """What skipping wholly nodata chunks saves, on its own (pure; from the plan).

    Returns:
        skipped_chunk_share: skipped chunks / chunks.
        skipped_px_share: scene px in the cores of skipped chunks / scene px.
        redundancy_without_skip: :func:`redundancy_factor` had every chunk been computed.
        skip_model_px_saved_share: ``1 - redundancy / redundancy_without_skip``, the share of
            model work the skip saves.
        skip_gain: ``redundancy_without_skip / redundancy``, the factor by which the skip cuts
            the model work (the speed-up of a model-bound job; inf when every chunk is skipped).
        skip_model_s_saved: bare-model seconds saved, ``(redundancy_without_skip - redundancy) *
            scene px / raw_px_s`` (None without raw_px_s).
    """
    skip = {tuple(int(i) for i in index) for index in skipped}
    windows = plan_chunks(tuple(shape), chunk, halo)
    scene_px = math.prod(int(n) for n in shape)
    skipped_px = sum(math.prod(w.core_shape) for w in windows if w.index in skip)
    with_skip = redundancy_factor(shape, chunk, halo, tile, overlap, stride=stride, skipped=skip)
    without = redundancy_factor(shape, chunk, halo, tile, overlap, stride=stride)
    return {
        "skipped_chunk_share": sum(1 for w in windows if w.index in skip) / len(windows),
        "skipped_px_share": skipped_px / scene_px,
        "redundancy_without_skip": without,
        "skip_model_px_saved_share": 1 - with_skip / without,
        "skip_gain": without / with_skip if with_skip > 0 else math.inf,
        "skip_model_s_saved": None if not raw_px_s else (without - with_skip) * scene_px / raw_px_s,
    }


def peer_comparison(
    *, e2e_px_s: float, redundancy: float, redundancy_without_skip: float, monai_px_s: float | None,
    monai_redundancy: float,
) -> dict[str, float | None]:
    """tessera against the peer per output px, and split into where the difference comes from.

    Output px/s hides that the two compute different amounts of model work per output px
    (tessera: the halo, less skipped nodata chunks; the peer: its tile overlap over the whole
    scene). Per model px computed, ``tessera_model_px_s = e2e_px_s * redundancy`` and
    ``monai_model_px_s = monai_px_s * monai_redundancy``, and the output-px ratio factors
    exactly into three:

        tessera_vs_monai = per_model_px * plan_gain * skip_gain

    with ``per_model_px = tessera_model_px_s / monai_model_px_s`` (how fast each side turns
    model work into results, the pipeline's own cost and gain), ``plan_gain = monai_redundancy
    / redundancy_without_skip`` (halo crop against overlapping tiles) and ``skip_gain =
    redundancy_without_skip / redundancy`` (nodata chunks not computed; reported by
    :func:`nodata_skip_gain`, not here). The peer's figures are None without a peer.
    """
    if redundancy <= 0 or redundancy_without_skip <= 0 or monai_redundancy <= 0:
        raise ValueError(f"redundancies must be > 0, got {redundancy}, {redundancy_without_skip}, {monai_redundancy}")
    if not monai_px_s:
        return {"tessera_model_px_s": e2e_px_s * redundancy, "monai_model_px_s": None,
                "tessera_vs_monai_per_model_px": None, "plan_gain_vs_monai": None}
    monai_model_px_s = monai_px_s * monai_redundancy
    return {
        "tessera_model_px_s": e2e_px_s * redundancy,
        "monai_model_px_s": monai_model_px_s,
        "tessera_vs_monai_per_model_px": e2e_px_s * redundancy / monai_model_px_s,
        "plan_gain_vs_monai": monai_redundancy / redundancy_without_skip,
    }


def predict_model_share(*, model_px: float, raw_px_s: float, predict_s: float, actors: int = 1) -> float | None:
    """Share of the predictors' busy seconds that the bare forward passes account for.

    ``actors x (model_px / raw_px_s) / predict_s`` (raw_px_s is all actors' processes together,
    predict_s is summed over the actors): the rest of `predict` is normalisation, cutting
    tiles, softmax, blending (the stitch), crop, argmax and host/device copies. An estimate:
    raw is measured alone, the job's predictors share the machine with reads and writes.
    None when nothing was predicted.
    """
    if raw_px_s <= 0:
        raise ValueError(f"raw_px_s must be > 0, got {raw_px_s}")
    return None if predict_s <= 0 else actors * (model_px / raw_px_s) / predict_s


def steady_state(phases: Mapping[str, float], scene_px: int, n_chunks: int, raw_px_s: float) -> dict[str, float | None]:
    """The job's rate once its first chunk is out (predictor start-up excluded).

    first_chunk_s (stream start -> first chunk record) is what a job pays once, however many
    scenes it holds: actor processes, torch, the CUDA context, the first pass. The chunks after
    it show what the pipeline sustains. Reads run ahead while the actors start, so this rate
    can exceed what reading alone sustains on a scene too small to use up the read-ahead.

    Returns:
        start_s, start_share (of the chunk stream's time), steady_px_s (px of the chunks after
        the first / seconds after the first; None with fewer than 2 chunks), steady_vs_raw.
    """
    first, total = phases.get("first_chunk_s", 0.0), phases.get("chunks_s", 0.0)
    steady = None
    if n_chunks > 1 and total > first:
        steady = scene_px * (n_chunks - 1) / n_chunks / (total - first)
    return {"start_s": first, "start_share": first / total if total > 0 else None,
            "steady_px_s": steady, "steady_vs_raw": _safe_div(steady, raw_px_s)}


def breakdown_shares(seconds: Mapping[str, float]) -> dict[str, float]:
    """Each stage's share of the summed stage seconds (same keys, same order; sums to 1).

    Stage seconds are summed over chunks that ran in parallel, so they are busy seconds, not
    wall seconds: shares say where the work goes, not how long the job took.

    Raises:
        ValueError: a negative or non-finite time (named).
    """
    for stage, value in seconds.items():
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"stage {stage!r} has time {value!r} s; times must be finite and >= 0")
    total = sum(seconds.values())
    if total == 0:
        return {stage: 0.0 for stage in seconds}
    return {stage: value / total for stage, value in seconds.items()}


def scaling_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, float | None]]:
    """Per size, time per Mpx and peak memory relative to the smallest size.

    Args:
        rows: per size, with "size", "time_per_mpx_s" and "tessera_job_pss_peak_mib" (the
            driver's and Ray workers' summed PSS).

    Returns:
        One dict per row (same order): "time_per_mpx_vs_smallest" (1.0 = time linear in px)
        and "memory_vs_smallest" (1.0 = memory flat).
    """
    if not rows:
        return []
    smallest = min(rows, key=lambda r: r["size"])
    t0, m0 = smallest["time_per_mpx_s"], smallest["tessera_job_pss_peak_mib"]
    return [
        {
            "time_per_mpx_vs_smallest": r["time_per_mpx_s"] / t0 if t0 else None,
            "memory_vs_smallest": r["tessera_job_pss_peak_mib"] / m0 if m0 else None,
        }
        for r in rows
    ]


def monai_memory_estimate(shape: Sequence[int], *, channels: int, classes: int, input_itemsize: int) -> int:
    """Rough peak bytes of the whole-scene peer: its input and output held at once.

    max(read: raw + float32 copy, inference: float32 input + float32 K-class output + count map)
    plus 1 GiB for the interpreter, libraries and model.
    """
    px = math.prod(int(n) for n in shape)
    read = px * channels * (input_itemsize + 4)
    infer = px * (4 * channels + 4 * classes + 4)
    return max(read, infer) + 2**30


def _mib(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else n_bytes / MIB


def _safe_div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


# ----------------------------------------------------------------------------- scenes


def ensure_bench_scene(inputs_dir: Path, *, size: int, seed: int) -> tuple[Path, float]:
    """The synthetic size x size scene (written once; reused when size and seed match).

    Returns:
        (path, seconds spent generating: 0.0 when reused).
    """
    from pipelines.tools.synthetic import SceneSpec, write_scene

    inputs_dir.mkdir(parents=True, exist_ok=True)
    image = inputs_dir / f"bench-{size}-seed{seed}.tif"
    stamp = image.with_suffix(".json")
    wanted = {"size": size, "seed": seed}
    if image.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return image, 0.0
    t0 = time.perf_counter()
    write_scene(SceneSpec(height=size, width=size, seed=seed), image)
    stamp.write_text(json.dumps(wanted))
    return image, time.perf_counter() - t0


# ----------------------------------------------------------------------------- GPU memory and utilization


class GpuSampler:
    """Peak `memory.used` (MiB, summed over GPUs) and mean `utilization.gpu` from nvidia-smi,
    sampled in a daemon thread.

    GPU memory and work of the job live in Ray actors, where the driver cannot ask torch;
    nvidia-smi sees every process. `utilization.gpu` is the share of the sample period in which
    a kernel ran (NVML), so `busy` is the fraction of the job's wall time the GPUs computed.
    `peak_mib`/`baseline_mib`/`busy` are None when disabled or nvidia-smi is unavailable.
    """

    QUERY = ("nvidia-smi", "--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader,nounits")

    def __init__(self, *, enabled: bool, interval_s: float = 0.5):
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.interval_s = interval_s
        self.baseline_mib: float | None = None
        self.peak_mib: float | None = None
        self.utilization: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tessera-gpu-sampler", daemon=True)

    @classmethod
    def _query(cls) -> tuple[float, float] | None:
        """(memory used MiB summed over GPUs, mean utilization % over GPUs), or None."""
        try:
            out = subprocess.run(cls.QUERY, capture_output=True, text=True, timeout=10, check=True).stdout
            rows = [[float(v) for v in line.split(",")] for line in out.splitlines() if line.strip()]
            if not rows or any(len(r) != 2 for r in rows):
                return None
            return sum(r[0] for r in rows), sum(r[1] for r in rows) / len(rows)
        except (OSError, subprocess.SubprocessError, ValueError):
            return None

    def _sample(self, *, busy: bool = True) -> None:
        got = self._query()
        if got is None:
            return
        used, util = got
        self.peak_mib = used if self.peak_mib is None else max(self.peak_mib, used)
        if busy:
            self.utilization.append(util)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> GpuSampler:
        if self.enabled:
            got = self._query()
            self.baseline_mib = got[0] if got else None
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join()
            self._sample(busy=False)

    @property
    def increase_mib(self) -> float | None:
        """Peak minus the use before the job started (what the job added)."""
        if self.peak_mib is None or self.baseline_mib is None:
            return None
        return self.peak_mib - self.baseline_mib

    @property
    def busy(self) -> float | None:
        """Mean GPU utilization during the job, 0..1 (None without samples)."""
        if not self.utilization:
            return None
        return sum(self.utilization) / len(self.utilization) / 100.0


# ----------------------------------------------------------------------------- child processes


_CHILD_FUNCTIONS = ("measure_raw", "run_monai_peer", "probe_device")


def _in_child(name: str, *, malloc_tuning: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Run one of this module's measurement functions in a fresh Python process.

    A fresh interpreter (not a fork of the driver, which holds Ray's threads) gives the
    measurement its own memory peak and torch threads, and needs no `__main__` guard in the
    caller's script. Arguments and the result travel as JSON files. With `malloc_tuning` the child
    starts with the malloc tunables the job gives its predictor actors (workers.runtime), so the
    bare model and the peer run under the same allocator as the job's model.

    Raises:
        RuntimeError: the child failed; the message ends with its stderr.
    """
    import tempfile

    if name not in _CHILD_FUNCTIONS:
        raise ValueError(f"unknown child function {name!r}; known: {_CHILD_FUNCTIONS}")
    repo_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH", "")) if p)
    if malloc_tuning:
        env.update(with_malloc_tunables(env))
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp:
        args, out = Path(tmp) / "args.json", Path(tmp) / "result.json"
        args.write_text(json.dumps({"name": name, "kwargs": kwargs}))
        proc = subprocess.run(
            [sys.executable, "-c", "import sys; from pipelines.tools.bench import _child_main; _child_main(*sys.argv[1:])",
             str(args), str(out)],
            env=env, capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"benchmark child {name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def _child_main(args_path: str, out_path: str) -> None:
    """Entry point of a measurement child: read arguments, run, write the result."""
    request = json.loads(Path(args_path).read_text())
    if request["name"] not in _CHILD_FUNCTIONS:
        raise ValueError(f"unknown child function {request['name']!r}")
    result = globals()[request["name"]](**request["kwargs"])
    Path(out_path).write_text(json.dumps(result))


def probe_device(*, device: str) -> dict[str, Any]:
    """{"type": "cpu" | "cuda", "count": CUDA devices} (run in a child: the benchmark's own
    process, which is the job's driver, stays without torch, like `tessera run`)."""
    import torch

    from workers.predictor import resolve_device

    dev = resolve_device(device)
    return {"type": dev.type, "count": torch.cuda.device_count() if dev.type == "cuda" else 0}


def measure_raw(
    *, card_path: str, tile_shape: Sequence[int], batch_size: int, device: str, precision: str,
    threads: int, batches: int, warmup: int, iterations: int, seed: int,
    barrier_dir: str | None = None, parties: int = 1, channels_last: bool = True, fold_bn: bool = True,
) -> dict[str, Any]:
    """Bare forward passes on random normalised tiles already on the device (run in a child).

    With `barrier_dir`, `parties` such children run side by side (one per predictor actor):
    each waits after its warm-up until all are warm, so their timed passes overlap.

    Returns:
        px_s (output px/s of the median pass), pass_s (all timed pass seconds), device_name,
        gpu_peak_bytes (torch.cuda.max_memory_allocated, None on CPU), threads.
    """
    import contextlib

    t_start = time.perf_counter()
    import torch

    from workers.checkpoints import build_from_checkpoint, load_checkpoint
    from workers.predictor import fold_batchnorm, memory_format, resolve_autocast_dtype, resolve_device

    t_imported = time.perf_counter()
    dev = resolve_device(device)
    if dev.type == "cpu":
        torch.set_num_threads(threads)
    else:
        torch.zeros(1, device=dev)  # the CUDA context, timed apart from the model
    t_device = time.perf_counter()
    ckpt = load_checkpoint(Path(card_path))
    model = build_from_checkpoint(ckpt).eval()
    model = (fold_batchnorm(model) if fold_bn else model).to(dev)
    fmt = memory_format(channels_last=channels_last)
    model = model.to(memory_format=fmt)
    t_model = time.perf_counter()
    dtype = resolve_autocast_dtype(precision, dev)
    generator = torch.Generator().manual_seed(seed)
    inputs = [
        torch.randn((batch_size, ckpt.card.in_channels, *tile_shape), generator=generator)
        .to(dev).contiguous(memory_format=fmt)
        for _ in range(batches)
    ]

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def one_pass() -> None:
        autocast = torch.autocast(device_type=dev.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            for x in inputs:
                model(x)
        sync()

    first_pass_s = None
    for _ in range(warmup):
        t0 = time.perf_counter()
        one_pass()
        first_pass_s = first_pass_s if first_pass_s is not None else time.perf_counter() - t0
    if barrier_dir is not None:
        Path(barrier_dir, f"ready-{os.getpid()}").touch()
        deadline = time.monotonic() + 600
        while len(list(Path(barrier_dir).glob("ready-*"))) < parties and time.monotonic() < deadline:
            time.sleep(0.05)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    seconds = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        one_pass()
        seconds.append(time.perf_counter() - t0)
    px_per_pass = batches * batch_size * math.prod(tile_shape)
    return {
        "px_s": px_per_pass / float(np.median(seconds)),
        "pass_s": seconds,
        "px_per_pass": px_per_pass,
        "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "gpu_peak_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
        # what a fresh predictor process pays before its first tile: what the job's actors pay too
        "startup_s": {"import_torch": t_imported - t_start, "device": t_device - t_imported,
                      "model": t_model - t_device, "first_pass": first_pass_s},
    }


def run_monai_peer(
    *, card_path: str, scene_path: str, tile_size: int, overlap: float, batch_size: int, device: str,
    precision: str, threads: int, zarr_path: str, channels_last: bool = True, fold_bn: bool = True,
) -> dict[str, Any]:
    """MONAI sliding_window_inference over the whole scene in memory (run in a child).

    Normalised as the predictor does ((x - mean) / std per band, nodata pixels -> 0), the model
    wrapped to pad tiles to its stride and return softmax probabilities (what tessera blends),
    Gaussian blending (sigma 0.125), the model and the blending on `device`. Only the inference
    call and the argmax are timed. Peak RSS is this process's own (ru_maxrss).

    Returns:
        seconds, px_s, peak_rss_bytes, gpu_peak_bytes (None on CPU), agreement (share of pixels
        valid in tessera's stored classes where both label the same), valid_pixels.
    """
    import contextlib
    import resource

    import rasterio
    import torch
    import torch.nn.functional as F
    import zarr
    from monai.inferers import sliding_window_inference

    from pipelines.readers import valid_mask
    from schemas import store as layout
    from workers.checkpoints import build_from_checkpoint, load_checkpoint
    from workers.predictor import fold_batchnorm, memory_format, resolve_autocast_dtype, resolve_device

    dev = resolve_device(device)
    if dev.type == "cpu":
        torch.set_num_threads(threads)
    ckpt = load_checkpoint(Path(card_path))
    card = ckpt.card
    fmt = memory_format(channels_last=channels_last)  # as the job's predictor runs the model
    model = build_from_checkpoint(ckpt).eval()
    model = (fold_batchnorm(model) if fold_bn else model).to(dev).to(memory_format=fmt)
    dtype = resolve_autocast_dtype(precision, dev)
    stride = card.stride

    t_read = time.perf_counter()
    with rasterio.open(scene_path) as ds:
        # The peer's whole point: the whole scene in one array (tessera never does this).
        pixels = ds.read()
        nodata = ds.nodata
    valid = valid_mask(pixels, nodata)
    x = np.empty(pixels.shape, np.float32)
    for b, band in enumerate(card.bands):
        np.subtract(pixels[b], np.float32(band.mean), out=x[b], dtype=np.float32)
        x[b] *= np.float32(1.0 / band.std)
        x[b] *= valid
    del pixels
    inputs = torch.from_numpy(x).unsqueeze(0)
    read_s = time.perf_counter() - t_read

    def predictor(tiles: torch.Tensor) -> torch.Tensor:
        h, w = tiles.shape[-2:]
        ph, pw = (-h) % stride, (-w) % stride
        if ph or pw:
            tiles = F.pad(tiles, (0, pw, 0, ph), mode="replicate")
        tiles = tiles.contiguous(memory_format=fmt)
        autocast = torch.autocast(device_type=dev.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with autocast:
            logits = model(tiles)
        return torch.softmax(logits[..., :h, :w].float(), dim=1)

    height, width = inputs.shape[-2:]
    labels = np.empty((height, width), np.uint8)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    with torch.inference_mode():
        probs = sliding_window_inference(
            inputs, roi_size=(tile_size, tile_size), sw_batch_size=batch_size, predictor=predictor,
            overlap=overlap, mode="gaussian", sigma_scale=0.125, sw_device=dev, device=dev,
        )
        del inputs
        for r in range(0, height, _ARGMAX_ROWS):
            strip = torch.argmax(probs[0, :, r : r + _ARGMAX_ROWS], dim=0)
            labels[r : r + _ARGMAX_ROWS] = strip.to(torch.uint8).cpu().numpy()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    gpu_peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    del probs, x

    stored = zarr.open_array(zarr_path, path=layout.CLASSES, mode="r")
    ch, cw = stored.chunks
    same = n_valid = 0
    for r in range(0, height, ch):
        for c in range(0, width, cw):
            ours = stored[r : r + ch, c : c + cw]
            mask = ours != layout.NODATA_CLASS
            n_valid += int(mask.sum())
            same += int((ours[mask] == labels[r : r + ch, c : c + cw][mask]).sum())
    return {
        "seconds": seconds,
        "read_s": read_s,
        "px_s": height * width / seconds,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        "gpu_peak_bytes": gpu_peak,
        "agreement": same / n_valid if n_valid else None,
        "valid_pixels": n_valid,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------- orchestration


def monai_skip_reason(
    side: int, *, enabled: bool, max_side: int, estimate_bytes: int, available_bytes: int
) -> str | None:
    """Why the whole-scene peer is not run for a scene side, or None to run it."""
    if not enabled:
        return "disabled (--no-monai)"
    if side > max_side:
        return (f"scene side {side} > monai_max_side {max_side}: the whole-scene peer would hold "
                f"~{estimate_bytes / 2**30:.1f} GiB")
    if estimate_bytes > 0.9 * available_bytes:
        return (f"the whole-scene peer would hold ~{estimate_bytes / 2**30:.1f} GiB, "
                f"only {available_bytes / 2**30:.1f} GiB available")
    return None


def machine_facts(device: str) -> dict[str, Any]:
    """Versions and sizes of this machine (no CUDA context is created here)."""
    from importlib.metadata import PackageNotFoundError, version

    import psutil
    import ray

    try:
        monai_version = version("monai")
    except PackageNotFoundError:
        monai_version = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_name(),
        "memory_gib": psutil.virtual_memory().total / 2**30,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": version("torch"),
        "ray": ray.__version__,
        "monai": monai_version,
        "device": device,
    }


@dataclass(frozen=True)
class _Resolved:
    """The config with the card's defaults and this machine's device and threads filled in."""

    config: BenchConfig
    out_dir: Path
    card_path: Path
    card: Any  # schemas.model_card.ModelCard
    device: str  # "cpu" or "cuda"
    halo: int
    tile: int
    threads_per_actor: int
    model_threads: int  # the bare model and the peer get the threads all predictors share
    gpus_per_actor: float
    batch: int  # tiles per forward pass (the job's default for the device unless set)
    actors: int = 1  # config.actors, or one per CPU core (CPU) / GPU

    @classmethod
    def from_config(cls, config: BenchConfig) -> _Resolved:
        from workers.checkpoints import load_checkpoint, resolve_card_path

        card_path = resolve_card_path(config.model, base_dir=Path.cwd()).resolve()
        card = load_checkpoint(card_path).card
        probe = _in_child("probe_device", device=config.device)
        device, n_gpus = probe["type"], probe["count"]
        cpus = os.cpu_count() or 1
        actors = config.actors or (max(1, n_gpus) if device == "cuda" else cpus)
        threads = config.torch_threads or max(1, cpus // actors)
        gpus_per_actor = min(1.0, max(n_gpus, 1) / actors) if device == "cuda" else 0.0
        return cls(
            config=config, out_dir=config.out_dir.expanduser().resolve(), card_path=card_path, card=card,
            device=device, halo=config.halo if config.halo is not None else card.halo,
            tile=config.tile_size or card.tile_size, threads_per_actor=threads,
            model_threads=min(cpus, threads * actors), gpus_per_actor=gpus_per_actor, actors=actors,
            batch=config.batch_size or default_batch_size(device),
        )

    @property
    def cpus_per_actor(self) -> float:
        """1 CPU per actor, less when the actors would leave no CPU for the read/write tasks
        (GPU actors run the split pipeline; CPU actors read and write themselves)."""
        cpus = os.cpu_count() or 1
        tasks = 1 if self.device == "cuda" else 0
        return min(1.0, max(0.25, (cpus - tasks) / self.actors))

    def job_spec(self, scene: Path, root: Path) -> Any:
        """The JobSpec of one benchmark job (same model, tiling and resources for every size)."""
        from schemas.job import JobSpec

        c = self.config
        return JobSpec.model_validate({
            "name": "tessera-bench",
            "inputs": [str(scene)],
            "model": {"card": str(self.card_path)},
            "tiling": {"chunk_size": c.chunk_size, "halo": self.halo, "tile_size": self.tile,
                       "tile_overlap": c.tile_overlap, "blend": "gaussian"},
            "resources": {"actors": self.actors, "num_gpus_per_actor": self.gpus_per_actor,
                          "cpus_per_actor": self.cpus_per_actor,
                          "batch_size": self.batch, "torch_threads": self.threads_per_actor,
                          "malloc_tuning": c.malloc_tuning},
            "inference": {"precision": c.precision, "channels_last": c.channels_last,
                          "fold_batchnorm": c.fold_batchnorm},
            "output": {"root": str(root), "overwrite": True},
        })

    def header(self) -> dict[str, Any]:
        card = self.card
        return {
            "format": BENCH_FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": self.config.to_json(),
            "resolved": {"card_path": str(self.card_path), "halo": self.halo, "tile_size": self.tile,
                         "actors": self.actors, "torch_threads_per_actor": self.threads_per_actor, "model_threads": self.model_threads,
                         "num_gpus_per_actor": self.gpus_per_actor, "device": self.device},
            "model": {"name": card.name, "architecture": card.architecture, "in_channels": card.in_channels,
                      "num_classes": card.num_classes, "stride": card.stride, "tile_size": card.tile_size,
                      "halo": card.halo, "weights_sha256": card.weights_sha256},
            "machine": machine_facts(self.device),
            "notes": [
                "stitch (Gaussian blending and crop to the chunk core) runs inside predict",
                "stage seconds are summed over chunks that ran in parallel: shares, not wall time",
                "tessera_total_peak_mib counts shared pages (Ray's object store) once per process: an upper bound",
                "tessera_job_pss_peak_mib: summed PSS of the driver and the Ray worker processes (Ray's "
                "daemons apart, in tessera_system_pss_peak_mib); compared with the peer's RSS",
                "tessera_all_pss_peak_mib: peak of the summed PSS of the driver, workers and Ray's daemons "
                "sampled together; memory_all_vs_monai compares it with the peer's RSS",
                "tessera_vs_monai = tessera_vs_monai_per_model_px * plan_gain_vs_monai * skip_gain; "
                "tessera_vs_monai_eq: against the peer run at tessera's redundancy without nodata skipping",
            ],
        }


def _read_skipped(root: Path, scene: str) -> list[tuple[int, ...]]:
    """Chunk indices the job skipped as wholly nodata, from its `chunks` table."""
    import pyarrow.parquet as pq

    from pipelines.writers.tables import table_path
    from schemas.tables import CHUNK_SKIPPED_NODATA

    rows = pq.read_table(table_path(root, "chunks", scene), columns=["chunk_index", "status"]).to_pylist()
    return [tuple(r["chunk_index"]) for r in rows if r["status"] == CHUNK_SKIPPED_NODATA]


def _warm_ray(*, malloc_tuning: bool) -> None:
    """Ray up and able to run a task before any timing (a job on a fresh Ray pays worker start).
    A local Ray started here gives its workers the jobs' malloc tunables, as `tessera run` does."""
    import ray

    from pipelines.run.cluster import ensure_ray

    ensure_ray(worker_env=with_malloc_tunables() if malloc_tuning else None)
    ray.get(ray.remote(num_cpus=0)(lambda: None).remote())


def _run_job(spec: Any, base_dir: Path) -> Any:
    """Run a one-scene job and return its pipelines.run.job.JobResult.

    Raises:
        RuntimeError: the scene failed (its error quoted).
    """
    from pipelines.run.job import run_job
    from schemas.tables import STATUS_COMPLETE

    result = run_job(spec, base_dir=base_dir)
    outcome = result.scenes[0]
    if outcome.status != STATUS_COMPLETE or outcome.row is None:
        raise RuntimeError(f"benchmark job failed on {outcome.source}: {outcome.error}")
    return result


def _measure_raw_actors(r: _Resolved, tile_shape: tuple[int, ...]) -> dict[str, Any]:
    """The bare model as the job runs it: one process per predictor actor, side by side, each
    with the actor's torch threads; px_s is their sum (the model's limit on this machine in the
    job's configuration)."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    c = r.config
    with tempfile.TemporaryDirectory(prefix="tessera-raw-") as barrier, ThreadPoolExecutor(r.actors) as pool:
        kwargs = dict(card_path=str(r.card_path), tile_shape=tile_shape, batch_size=r.batch, device=r.device,
                      precision=c.precision, threads=r.threads_per_actor, batches=c.raw_batches,
                      warmup=c.raw_warmup, iterations=c.raw_iterations, seed=c.seed,
                      barrier_dir=barrier if r.actors > 1 else None, parties=r.actors,
                      channels_last=c.channels_last, fold_bn=c.fold_batchnorm)
        runs = list(pool.map(lambda _: _in_child("measure_raw", malloc_tuning=c.malloc_tuning, **kwargs),
                             range(r.actors)))
    gpu = [run["gpu_peak_bytes"] for run in runs if run["gpu_peak_bytes"] is not None]
    return {
        "px_s": sum(run["px_s"] for run in runs),
        "px_s_per_process": [run["px_s"] for run in runs],
        "processes": r.actors,
        "pass_s": runs[0]["pass_s"],
        "px_per_pass": runs[0]["px_per_pass"],
        "threads": runs[0]["threads"],
        "device_name": runs[0]["device_name"],
        "gpu_peak_bytes": max(gpu) if gpu else None,
        "startup_s": runs[0]["startup_s"],
    }


def _bench_size(r: _Resolved, size: int, raw_by_tile: dict[tuple[int, ...], dict[str, Any]],
                say: Callable[[str], None]) -> dict[str, Any]:
    """Measure one scene size: the job (timed, memory sampled), raw (once per tile shape), the peer."""
    import psutil

    from pipelines.tools.monitor import MemorySampler

    c, card = r.config, r.card
    scene, generate_s = ensure_bench_scene(r.out_dir / "inputs", size=size, seed=c.seed)
    if generate_s:
        say(f"{size}^2: generated {scene.name} in {generate_s:.1f} s (not timed)")
    root = r.out_dir / "runs" / str(size)
    shutil.rmtree(root, ignore_errors=True)  # earlier outputs: the job must really run
    spec = r.job_spec(scene, root)
    say(f"{size}^2: end-to-end job ({r.actors} actor(s), {r.device}, chunk {c.chunk_size}, halo {r.halo}, "
        f"tile {r.tile}, overlap {c.tile_overlap}, batch {r.batch})")
    with MemorySampler() as memory, GpuSampler(enabled=r.device == "cuda") as gpu:
        t0 = time.perf_counter()
        job = _run_job(spec, r.out_dir)
        wall_s = time.perf_counter() - t0
    outcome = job.scenes[0]

    shape = (size, size)
    skipped = _read_skipped(root, outcome.name)
    redundancy = redundancy_factor(shape, c.chunk_size, r.halo, r.tile, c.tile_overlap,
                                   stride=card.stride, skipped=skipped)
    window_shape = plan_chunks(shape, c.chunk_size, r.halo)[0].window_shape
    tile_shape = model_tile_shape(window_shape, r.tile, c.tile_overlap, stride=card.stride)
    if tile_shape not in raw_by_tile:
        say(f"{size}^2: bare model on {c.raw_batches} x {r.batch} tiles of {tile_shape}"
            + (f" ({r.actors} process(es) x {r.threads_per_actor} torch threads)" if r.device == "cpu" else ""))
        raw_by_tile[tile_shape] = _measure_raw_actors(r, tile_shape)
    raw = raw_by_tile[tile_shape]

    estimate = monai_memory_estimate(shape, channels=card.in_channels, classes=card.num_classes, input_itemsize=2)
    monai_skipped = monai_skip_reason(size, enabled=c.monai, max_side=c.monai_max_side, estimate_bytes=estimate,
                                      available_bytes=psutil.virtual_memory().available)
    skip = nodata_skip_gain(shape, c.chunk_size, r.halo, r.tile, c.tile_overlap, stride=card.stride,
                            skipped=skipped, raw_px_s=raw["px_s"])
    peer_redundancy = monai_redundancy(shape, r.tile, c.tile_overlap, stride=card.stride)
    eq_overlap = monai_overlap_for_redundancy(shape, r.tile, skip["redundancy_without_skip"], stride=card.stride)
    eq_redundancy = monai_redundancy(shape, r.tile, eq_overlap, stride=card.stride)

    def run_peer(overlap: float) -> dict[str, Any]:
        return _in_child(
            "run_monai_peer", malloc_tuning=c.malloc_tuning, card_path=str(r.card_path), scene_path=str(scene), tile_size=r.tile,
            overlap=overlap, batch_size=r.batch, device=r.device, precision=c.precision,
            threads=r.model_threads, zarr_path=str(outcome.context.zarr_path), channels_last=c.channels_last,
            fold_bn=c.fold_batchnorm,
        )

    peer: dict[str, Any] = {}
    peer_eq: dict[str, Any] = {}
    if monai_skipped:
        say(f"{size}^2: MONAI peer skipped: {monai_skipped}")
    else:
        say(f"{size}^2: MONAI sliding_window_inference over the whole scene (separate process)")
        peer = run_peer(c.tile_overlap)
        if c.monai_equal_redundancy:
            say(f"{size}^2: MONAI again at equal redundancy: overlap {eq_overlap:.4f}, "
                f"{eq_redundancy:.3f} model px per output px (tessera {skip['redundancy_without_skip']:.3f} "
                "without nodata skipping)")
            peer_eq = run_peer(eq_overlap)

    seconds = {stage: float(outcome.row[f"{stage}_s"]) for stage in BREAKDOWN_STAGES}
    e2e_px_s = size * size / wall_s
    peaks = memory.peaks
    tessera_total, monai_rss = _mib(peaks.total_rss), _mib(peer.get("peak_rss_bytes"))
    tessera_job = _mib(peaks.job_pss)
    tessera_all = _mib(peaks.all_pss)
    row = {
        "size": size,
        "scene_px": size * size,
        "scene": str(scene),
        "n_chunks": outcome.n_chunks,
        "n_chunks_skipped": len(skipped),
        "window_shape": list(window_shape),
        "tile_shape": list(tile_shape),
        "redundancy": redundancy,
        "raw_px_s": raw["px_s"],
        "e2e_px_s": e2e_px_s,
        **throughput_ratios(raw["px_s"], e2e_px_s, redundancy),
        "wall_s": wall_s,
        "time_per_mpx_s": wall_s / (size * size / 1e6),
        **steady_state(job.phases, size * size, outcome.n_chunks, raw["px_s"]),
        "predictor_busy": seconds["predict"] / (wall_s * r.actors),
        "predict_model_share": predict_model_share(model_px=redundancy * size * size, raw_px_s=raw["px_s"],
                                                   predict_s=seconds["predict"], actors=r.actors),
        "breakdown": breakdown_shares(seconds),
        "breakdown_s": seconds,
        "job_phases_s": job.phases,
        "tessera_driver_peak_mib": _mib(peaks.driver_rss),
        "tessera_worker_peak_mib": _mib(peaks.max_child_rss) if peaks.max_child_rss else None,
        "tessera_total_peak_mib": tessera_total,
        "tessera_job_pss_peak_mib": tessera_job,
        "tessera_job_rss_peak_mib": _mib(peaks.job_rss),
        "tessera_system_pss_peak_mib": _mib(peaks.system_pss),
        "tessera_all_pss_peak_mib": tessera_all,
        "tessera_gpu_peak_mib": gpu.increase_mib,
        "tessera_gpu_busy": gpu.busy,
        "raw_gpu_peak_mib": _mib(raw["gpu_peak_bytes"]),
        "monai_px_s": peer.get("px_s"),
        "monai_s": peer.get("seconds"),
        "monai_read_s": peer.get("read_s"),
        "monai_peak_rss_mib": monai_rss,
        "monai_gpu_peak_mib": _mib(peer.get("gpu_peak_bytes")),
        "monai_agreement": peer.get("agreement"),
        "monai_estimate_mib": _mib(estimate),
        "monai_skipped": monai_skipped,
        "tessera_vs_monai": _safe_div(e2e_px_s, peer.get("px_s")),
        "memory_vs_monai": _safe_div(tessera_job, monai_rss),
        "memory_all_vs_monai": _safe_div(tessera_all, monai_rss),
        # nodata skipping as its own gain, and the peer per model px computed
        **skip,
        "monai_redundancy": peer_redundancy,
        **peer_comparison(e2e_px_s=e2e_px_s, redundancy=redundancy,
                          redundancy_without_skip=skip["redundancy_without_skip"],
                          monai_px_s=peer.get("px_s"), monai_redundancy=peer_redundancy),
        # the peer run again at tessera's redundancy (without the skip)
        "monai_eq_overlap": eq_overlap if peer_eq else None,
        "monai_eq_redundancy": eq_redundancy if peer_eq else None,
        "monai_eq_px_s": peer_eq.get("px_s"),
        "monai_eq_s": peer_eq.get("seconds"),
        "monai_eq_peak_rss_mib": _mib(peer_eq.get("peak_rss_bytes")),
        "monai_eq_agreement": peer_eq.get("agreement"),
        "tessera_vs_monai_eq": _safe_div(e2e_px_s, peer_eq.get("px_s")),
    }
    say(f"{size}^2: e2e {e2e_px_s / 1e6:.3f} Mpx/s, raw {raw['px_s'] / 1e6:.3f} Mpx/s, "
        f"redundancy {redundancy:.3f}, wall {wall_s:.1f} s")
    return row


def run_bench(config: BenchConfig, *, on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark for every size; write out_dir/bench-<UTC time>.json and bench-latest.json.

    Uses the connected Ray, or starts a local one (memory figures of Ray workers need a local
    Ray started by this process: they are sampled as its descendants).

    Args:
        config: what to measure.
        on_progress: called with a short line before each step (for a CLI); default: log INFO.

    Returns:
        The result dict written to the JSON file (its path under "json_path"): "config",
        "resolved", "model", "machine", "raw" (per tile shape), "sizes" (one row per size).

    Raises:
        ModelCardError: the model card cannot be loaded.
        RuntimeError: a job or a measurement child failed (its error quoted).
    """
    say = on_progress or (lambda line: log.info("%s", line))
    r = _Resolved.from_config(config)
    r.out_dir.mkdir(parents=True, exist_ok=True)
    result = r.header()
    say("Ray: starting / connecting (not timed)")
    _warm_ray(malloc_tuning=config.malloc_tuning)
    if config.warmup_job:
        side = min(config.chunk_size, min(config.sizes))
        scene, _ = ensure_bench_scene(r.out_dir / "inputs", size=side, seed=config.seed)
        say(f"warm-up job on a {side}^2 scene (not timed into any size)")
        root = r.out_dir / "runs" / "warmup"
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        _run_job(r.job_spec(scene, root), r.out_dir)
        result["warmup_job_s"] = time.perf_counter() - t0
    raw_by_tile: dict[tuple[int, ...], dict[str, Any]] = {}
    rows = [_bench_size(r, size, raw_by_tile, say) for size in config.sizes]
    for row, scaling in zip(rows, scaling_summary(rows)):
        row.update(scaling)
    result["machine"]["device_name"] = next(iter(raw_by_tile.values()))["device_name"]
    result["raw"] = [{"tile_shape": list(shape), **{k: v for k, v in raw.items() if k != "device_name"}}
                     for shape, raw in raw_by_tile.items()]
    result["sizes"] = rows
    result["json_path"] = str(write_results(result, r.out_dir))
    return result


def write_results(result: Mapping[str, Any], out_dir: Path) -> Path:
    """Write out_dir/bench-<UTC time>.json and a copy as bench-latest.json; return the former."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"bench-{stamp}.json"
    text = json.dumps({**result, "json_path": str(path)}, indent=2, default=str)
    path.write_text(text)
    (out_dir / "bench-latest.json").write_text(text)
    return path


# ----------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str = ".3f", scale: float = 1.0, suffix: str = "") -> str:
    return "-" if value is None else f"{value / scale:{spec}}{suffix}"


def render_tables(result: Mapping[str, Any]) -> list[Any]:
    """Rich tables of a result: throughput, memory, the MONAI peer, the peer at equal redundancy
    with the nodata skip apart, and the stage breakdown."""
    from rich.table import Table

    def table(title: str, *columns: str) -> Table:
        t = Table(title=title, title_justify="left")
        for col in columns:
            t.add_column(col, justify="right")
        return t

    rows = result["sizes"]
    resolved = result["resolved"]
    speed = table(
        f"throughput: {result['model']['name']} on {resolved['device']} "
        f"({result['machine'].get('device_name', '')}), tile {resolved['tile_size']}, halo {resolved['halo']}",
        "size", "wall s", "e2e Mpx/s", "raw Mpx/s", "e2e/raw", "ideal", "effic.", "redund.", "s/Mpx", "x smallest",
        "1st chunk s", "after it Mpx/s",
    )
    memory = table("peak memory, MiB", "size", "driver RSS", "largest worker RSS", "job PSS (driver+workers)",
                   "Ray daemons PSS", "all PSS (job+daemons)", "all RSS (upper bound)", "x smallest (job)", "GPU")
    peer = table("MONAI sliding_window_inference, whole scene in memory",
                 "size", "Mpx/s", "tessera / MONAI", "RSS MiB", "GPU MiB", "memory tessera / MONAI",
                 "memory incl. daemons / MONAI", "agreement")
    fair = table("tessera / MONAI at equal redundancy (model px per output px) and the nodata skip",
                 "size", "redund. tessera", "w/o skip", "redund. MONAI", "per model px", "plan gain",
                 "skip gain", "chunks skipped", "px skipped", "model s saved", "MONAI eq. overlap",
                 "MONAI eq. Mpx/s", "tessera / MONAI eq.", "eq. agreement")
    stages = table("where the job's busy seconds go (stitch runs inside predict)",
                   "size", *BREAKDOWN_STAGES, "predictor busy", "model share of predict", "GPU busy")
    skipped: list[str] = []
    for r in rows:
        size = f"{r['size']}²"
        speed.add_row(
            size, _fmt(r["wall_s"], ".1f"), _fmt(r["e2e_px_s"], ".3f", 1e6), _fmt(r["raw_px_s"], ".3f", 1e6),
            _fmt(r["ratio"], ".3g"), _fmt(r["ideal_ratio"]), _fmt(r["efficiency"], ".3g"), _fmt(r["redundancy"]),
            _fmt(r["time_per_mpx_s"], ".2f"), _fmt(r["time_per_mpx_vs_smallest"], ".2f"),
            _fmt(r.get("start_s"), ".1f"), _fmt(r.get("steady_px_s"), ".3f", 1e6),
        )
        memory.add_row(
            size, _fmt(r["tessera_driver_peak_mib"], ".0f"), _fmt(r["tessera_worker_peak_mib"], ".0f"),
            _fmt(r["tessera_job_pss_peak_mib"], ".0f"), _fmt(r["tessera_system_pss_peak_mib"], ".0f"),
            _fmt(r.get("tessera_all_pss_peak_mib"), ".0f"),
            _fmt(r["tessera_total_peak_mib"], ".0f"), _fmt(r["memory_vs_smallest"], ".2f"),
            _fmt(r["tessera_gpu_peak_mib"], ".0f"),
        )
        if r["monai_skipped"] is None:
            peer.add_row(
                size, _fmt(r["monai_px_s"], ".3f", 1e6), _fmt(r["tessera_vs_monai"], ".2f"),
                _fmt(r["monai_peak_rss_mib"], ".0f"), _fmt(r["monai_gpu_peak_mib"], ".0f"),
                _fmt(r["memory_vs_monai"], ".2f"), _fmt(r.get("memory_all_vs_monai"), ".2f"),
                _fmt(r["monai_agreement"], ".4f"),
            )
        else:
            peer.add_row(size, "skipped", *(["-"] * 6))
            skipped.append(f"{size}: {r['monai_skipped']}")
        fair.add_row(
            size, _fmt(r["redundancy"]), _fmt(r.get("redundancy_without_skip")), _fmt(r.get("monai_redundancy")),
            _fmt(r.get("tessera_vs_monai_per_model_px"), ".2f"), _fmt(r.get("plan_gain_vs_monai"), ".2f"),
            _fmt(r.get("skip_gain"), ".2f"), _fmt(r.get("skipped_chunk_share"), ".1%"),
            _fmt(r.get("skipped_px_share"), ".1%"), _fmt(r.get("skip_model_s_saved"), ".1f"),
            _fmt(r.get("monai_eq_overlap"), ".4f"), _fmt(r.get("monai_eq_px_s"), ".3f", 1e6),
            _fmt(r.get("tessera_vs_monai_eq"), ".2f"), _fmt(r.get("monai_eq_agreement"), ".4f"),
        )
        stages.add_row(size, *(_fmt(r["breakdown"][s], ".1%") for s in BREAKDOWN_STAGES),
                       _fmt(r["predictor_busy"], ".1%"), _fmt(r["predict_model_share"], ".1%"),
                       _fmt(r.get("tessera_gpu_busy"), ".1%"))
    if skipped:
        peer.caption = "\n".join(skipped)
        peer.caption_justify = "left"
    fair.caption = ("tessera / MONAI = per model px x plan gain x skip gain; "
                    "MONAI eq.: the peer at the overlap giving tessera's redundancy without the skip")
    fair.caption_justify = "left"
    return [speed, memory, peer, fair, stages]
