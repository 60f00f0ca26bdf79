"""The benchmark's pure maths: model px per output px of a plan, ratios of throughputs, shares.

Functions of shapes, timings and counts only (no torch, no Ray, no I/O): the redundancy of
tessera's plan (:func:`redundancy_factor`) and of MONAI's (:func:`monai_redundancy`,
:func:`monai_overlap_for_redundancy`), the nodata skip as its own gain (:func:`nodata_skip_gain`),
the job against the bare model (:func:`throughput_ratios`, :func:`predict_model_share`,
:func:`steady_state`) and against the peer (:func:`peer_comparison`), where the busy seconds go
(:func:`breakdown_shares`), how figures scale with the scene (:func:`scaling_summary`) and whether
the whole-scene peer fits in memory (:func:`monai_memory_estimate`, :func:`monai_skip_reason`).
See docs/benchmarks.md for what each figure means.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from pipelines.plan.chunks import plan_chunks
from workers.tileplan import plan_tiles

#: Stage timings of the `scenes` table, in the order they are reported.
BREAKDOWN_STAGES: tuple[str, ...] = ("read", "predict", "write", "stats", "merge")
MIB = 2**20


# ----------------------------------------------------------------------------- redundancy of the plans


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



# ----------------------------------------------------------------------------- ratios, shares, the peer


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
            "steady_px_s": steady, "steady_vs_raw": safe_div(steady, raw_px_s)}


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



def to_mib(n_bytes: float | None) -> float | None:
    """Bytes in MiB (None stays None)."""
    return None if n_bytes is None else n_bytes / MIB


def safe_div(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    return None if a is None or not b else a / b
