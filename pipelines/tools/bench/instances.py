"""`tessera bench --instances`: tessera's cross-chunk instance merge against per-tile prediction
merged by box NMS / NMM as SAHI does, on synthetic building scenes, with the same per-window input.

What is measured is the MERGE, not a model: every window (tessera's chunk core plus halo, and the
peer's tile, which is the same window clipped to the scene) is labelled by an exact oracle, the
truth objects visible in that window. An object crossing the window's edge, or larger than the
window, appears cut, as a per-window model would see it. Both sides get these identical inputs;
the only difference is how they put the windows back together.

**tessera** (:func:`tessera_merge`): each window's labelling becomes the chunk's
:class:`~pipelines.stats.instances.InstanceChunk`, written to a work folder as the write stage does
(``<key>.instances.npz``); the chunk's core gets its provisional ids in the scene's label image (the
store); :func:`~pipelines.stats.instances.merge_instance_ids` matches neighbours on their shared
halo pixels (mask IoU >= 0.5, mutual best) and solves the union-find from the files; the relabel
table is applied chunk by chunk. Result: one label image.

**SAHI-style peers** (:func:`sahi_merge`): SAHI's ``get_sliced_prediction`` runs the model on
overlapping slices, shifts each slice's detections (box, mask, score, category) to full-image
coordinates and merges the list with a postprocess: ``"NMS"`` (greedy non-maximum suppression:
highest score first, every remaining box whose match metric with it is >= the threshold is
dropped) or ``"GREEDYNMM"``, its default (greedy non-maximum *merging*: highest score first, the
remaining boxes whose metric with it is >= the threshold are merged into it one by one while the
merged box still matches (> threshold); a merge takes the union box, the maximum score and the
OR of the two masks), with ``postprocess_match_metric`` ``"IOU"`` or ``"IOS"`` (intersection over
the smaller box; its default) and ``postprocess_match_threshold`` 0.5 by default; per category
unless ``class_agnostic`` (one class here, so the same). Here:

* ``nms``: NMS, box IoU >= 0.5; score ties keep the larger mask (then the earlier tile);
* ``nmm``: GREEDYNMM, IOS 0.5 (SAHI's defaults).

Slices are tessera's windows clipped to the scene (slice side ``chunk + 2 halo``, neighbours
overlapping by ``2 halo``); SAHI's extra full-image pass (``perform_standard_pred``) is left out,
it would be a whole-scene oracle. The peer's kept detections overlap one another, as SAHI returns
them: they are scored as overlapping predictions (:class:`~pipelines.tools.metrics.OverlapAccumulator`),
so a kept duplicate counts as one, not painted over.

Memory. SAHI's ``Mask`` used to hold every shifted detection as a full-image bool array (recent
releases keep COCO polygons instead); at these sizes that is ``detections x H x W`` bytes, more
than this machine has. The peer here keeps each mask cropped to its box, the lean form, so its
measured peak is a lower bound of SAHI's. Both sides' peaks are measured the same way: the
tracemalloc peak (numpy reports its buffers to it) of the merge alone, from the per-window
oracle output to the merged result (tessera: label image and work files' buffers; peers: the
detection list), in a second pass after the timed one (tracing slows Python code, never timed).
Scene rendering, the oracle and the scoring are outside both.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from pipelines.plan.chunks import chunk_grid_shape, pad_window, plan_chunks
from pipelines.stats.instances import apply_relabel, instance_chunk, merge_instance_ids
from pipelines.stats.partials import region_id_offset
from pipelines.tools.buildings import BuildingSceneSpec, render_building_window
from pipelines.tools.metrics import InstanceMetrics, OverlapAccumulator, evaluate_instances, score_instances
from pipelines.writers.instances_table import instance_chunk_loader
from schemas.instances import InstanceWindow, instances_file
from schemas.records import chunk_key
from schemas.window import ChunkWindow

#: SAHI's default postprocess match threshold.
MATCH_THRESHOLD = 0.5
#: Rows of the truth rendered at a time.
_RENDER_ROWS = 1024


@dataclass(frozen=True, eq=False)
class Detection:
    """One shifted per-tile detection: its box ``(r0, c0, r1, c1)`` (scene px, end exclusive),
    its mask cropped to the box, score and area (px)."""

    box: tuple[int, int, int, int]
    mask: np.ndarray
    score: float
    area: int


def oracle_score(ids: np.ndarray) -> np.ndarray:
    """The oracle's confidence of truth id ``g``: ``(g % 7 + 1) / 8`` (as tests/stats/instance_cases.py)."""
    return ((np.asarray(ids, np.int64) % 7 + 1) / 8).astype(np.float32)


def truth_scene(size: int, seed: int) -> np.ndarray:
    """The ``size x size`` building scene's instance truth (uint32, 0 background), rendered in strips."""
    spec = BuildingSceneSpec(height=size, width=size, seed=seed)
    out = np.zeros(spec.shape, np.uint32)
    for r in range(0, size, _RENDER_ROWS):
        rows = min(_RENDER_ROWS, size - r)
        out[r:r + rows] = render_building_window(spec, r, 0, rows, size)[1]
    return out


def oracle_window(truth: np.ndarray, window: ChunkWindow) -> InstanceWindow:
    """The truth objects of one halo window as the contract numbers them: objects with core pixels
    first, each group by global id; the padding beyond the scene mirrors it, as the readers pad."""
    crop = pad_window(truth[window.read], window)
    in_core = np.unique(crop[window.core_in_window])
    in_core = in_core[in_core > 0]
    halo_only = np.setdiff1d(np.unique(crop[crop > 0]), in_core)
    present = np.concatenate([in_core, halo_only])
    order = np.argsort(present)
    ids = np.zeros(crop.shape, dtype=np.uint32)
    fg = crop > 0
    ids[fg] = order[np.searchsorted(present, crop[fg], sorter=order)] + 1
    core = ids[window.core_in_window]
    core_pixels = np.bincount(core.ravel(), minlength=len(present) + 1)[1:].astype(np.int64)
    return InstanceWindow(ids=ids, class_id=np.ones(len(present), np.uint8), score=oracle_score(present),
                          core_pixels=core_pixels)


def oracle_tile(truth: np.ndarray, window: ChunkWindow) -> list[Detection]:
    """The truth objects of one peer tile (the window clipped to the scene), each as a shifted
    detection: box and mask of the pixels it has in the tile, in scene coordinates."""
    r_read, c_read = window.read
    crop = truth[window.read]
    present = np.unique(crop[crop > 0])
    local = np.zeros(crop.shape, np.int32)
    fg = crop > 0
    local[fg] = np.searchsorted(present, crop[fg]) + 1
    scores = oracle_score(present)
    out = []
    for k, sl in enumerate(ndimage.find_objects(local)):
        mask = local[sl] == k + 1
        box = (r_read.start + sl[0].start, c_read.start + sl[1].start, r_read.start + sl[0].stop,
               c_read.start + sl[1].stop)
        out.append(Detection(box=box, mask=mask, score=float(scores[k]), area=int(mask.sum())))
    return out


# =========================================================================================
# tessera
# =========================================================================================


def tessera_merge(windows: Sequence[tuple[ChunkWindow, InstanceWindow]], shape: tuple[int, int], chunk: int,
                  work_dir: Path) -> np.ndarray:
    """tessera's path from the per-window labellings to the scene's instances (uint64 label image):
    chunk files written as the write stage does, cores stored with provisional ids, the halo
    matching and union-find read from the files, the relabel applied chunk by chunk."""
    grid = chunk_grid_shape(shape, chunk)
    out = np.zeros(shape, np.uint64)
    chunks = []
    for w, iw in windows:
        c = instance_chunk(iw, chunk_index=w.index, window_origin=w.window_origin, core_origin=w.core_origin,
                           core_shape=w.core_shape, chunk_shape=(chunk, chunk),
                           id_offset=region_id_offset(w.index, grid, (chunk, chunk)))
        c.to_npz(work_dir / instances_file(chunk_key(w.index)))
        out[_core(c)] = c.provisional_core()
        chunks.append((c.chunk_index, _core(c)))
    merge = merge_instance_ids([i for i, _ in chunks], instance_chunk_loader(work_dir, ids_only=True), grid_shape=grid)
    keys = np.fromiter(merge.relabel.keys(), dtype=np.uint64, count=len(merge.relabel))
    finals = np.fromiter(merge.relabel.values(), dtype=np.uint64, count=len(merge.relabel))
    order = np.argsort(keys)
    keys, finals = keys[order], finals[order]
    for _, core in chunks:
        out[core] = apply_relabel(out[core], keys, finals)
    return out


def _core(c) -> tuple[slice, slice]:
    return tuple(slice(o, o + n) for o, n in zip(c.core_origin, c.core_shape, strict=True))


# =========================================================================================
# SAHI-style peers
# =========================================================================================


def _boxes(dets: Sequence[Detection]) -> np.ndarray:
    return np.array([d.box for d in dets], np.float64).reshape(-1, 4)


def _metric(box: np.ndarray, others: np.ndarray, metric: str) -> np.ndarray:
    """IOU or IOS (intersection over the smaller box) of one box with each of `others`."""
    h = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    w = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = h * w
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    if metric == "IOU":
        return inter / (area + areas - inter)
    if metric == "IOS":
        return inter / np.minimum(area, areas)
    raise ValueError(f"match metric must be IOU or IOS, got {metric!r}")


def _greedy(dets: Sequence[Detection], metric: str, threshold: float) -> list[tuple[int, list[int]]]:
    """SAHI's greedy loop (``nms`` / ``greedy_nmm``): the best remaining box (score, then larger
    area, then earlier) takes every remaining box whose metric with it is >= `threshold`; returns
    ``(kept, matched)`` in the order kept."""
    boxes = _boxes(dets)
    score = np.array([d.score for d in dets])
    area = np.array([d.area for d in dets])
    order = np.lexsort((np.arange(len(dets)), -area, -score))  # best first
    out = []
    while len(order):
        best, rest = order[0], order[1:]
        hit = _metric(boxes[best], boxes[rest], metric) >= threshold if len(rest) else np.zeros(0, bool)
        out.append((int(best), [int(i) for i in rest[hit]]))
        order = rest[~hit]
    return out


def _merge_pair(a: Detection, b: Detection) -> Detection:
    """SAHI's ``merge_object_prediction_pair``: union box, OR of the masks, maximum score."""
    box = (min(a.box[0], b.box[0]), min(a.box[1], b.box[1]), max(a.box[2], b.box[2]), max(a.box[3], b.box[3]))
    mask = np.zeros((box[2] - box[0], box[3] - box[1]), bool)
    for d in (a, b):
        mask[d.box[0] - box[0]:d.box[2] - box[0], d.box[1] - box[1]:d.box[3] - box[1]] |= d.mask
    return Detection(box=box, mask=mask, score=max(a.score, b.score), area=int(mask.sum()))


def sahi_merge(dets: Sequence[Detection], postprocess: str, *, metric: str | None = None,
               threshold: float = MATCH_THRESHOLD) -> list[Detection]:
    """The kept (NMS) or merged (GREEDYNMM) detections of the shifted per-tile list.

    Args:
        dets: every tile's detections, shifted to the scene.
        postprocess: ``"NMS"`` or ``"GREEDYNMM"``.
        metric: ``"IOU"`` or ``"IOS"``; default: IOU for NMS, IOS for GREEDYNMM (the peers here).
        threshold: match threshold.
    """
    if postprocess == "NMS":
        return [dets[k] for k, _ in _greedy(dets, metric or "IOU", threshold)]
    if postprocess != "GREEDYNMM":
        raise ValueError(f"postprocess must be NMS or GREEDYNMM, got {postprocess!r}")
    metric = metric or "IOS"
    out = []
    for keep, matched in _greedy(dets, metric, threshold):
        d = dets[keep]
        for m in matched:  # SAHI's has_match: the merged box must still match, strictly
            if _metric(np.array(d.box, np.float64), _boxes([dets[m]]), metric)[0] > threshold:
                d = _merge_pair(d, dets[m])
        out.append(d)
    return out


def score_detections(dets: Sequence[Detection], truth: np.ndarray) -> InstanceMetrics:
    """Instance metrics of overlapping detections: painted in as few label layers as keep each
    layer's masks disjoint (ids 1..n in list order), counted as overlapping predictions."""
    layers: list[np.ndarray] = []
    for i, d in enumerate(dets, start=1):
        sl = (slice(d.box[0], d.box[2]), slice(d.box[1], d.box[3]))
        for layer in layers:
            if not layer[sl][d.mask].any():
                break
        else:
            layer = np.zeros(truth.shape, np.uint32)
            layers.append(layer)
        layer[sl][d.mask] = i
    acc = OverlapAccumulator()
    acc.add(truth, layers[0] if layers else np.zeros(truth.shape, np.uint32))
    for layer in layers[1:]:
        acc.add_predictions(truth, layer)
    return score_instances(acc.finalize(), {i: d.score for i, d in enumerate(dets, start=1)})


# =========================================================================================
# the run
# =========================================================================================


def _measure(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall s untraced, tracemalloc peak MiB of a second, traced call)."""
    t0 = time.perf_counter()
    result = fn()
    wall = time.perf_counter() - t0
    del result
    tracemalloc.start()
    try:
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, wall, peak / 2**20


def _row(metrics: InstanceMetrics, wall: float, peak_mib: float, **extra: Any) -> dict[str, Any]:
    return {"split_objects": metrics.split_objects, "duplicated_objects": metrics.duplicated_objects,
            "n_pred": metrics.n_pred, "split_per_1000": metrics.split_per_1000,
            "duplicated_per_1000": metrics.duplicated_per_1000, "count_error_per_1000": metrics.count_error_per_1000,
            "merged_predictions": metrics.merged_predictions, "recall": metrics.recall,
            "precision": metrics.precision, "wall_s": wall, "peak_mib": peak_mib, **extra}


def bench_scene(truth: np.ndarray, *, chunk: int, halo: int) -> dict[str, Any]:
    """One scene: tessera, the NMS peer and the NMM peer on the same oracle windows."""
    shape = tuple(int(s) for s in truth.shape)
    plan = plan_chunks(shape, chunk, halo)
    windows = [(w, oracle_window(truth, w)) for w in plan]
    dets = [d for w in plan for d in oracle_tile(truth, w)]
    n_true = int(len(np.unique(truth[truth > 0])))
    with tempfile.TemporaryDirectory(prefix="tessera-instbench-") as tmp:
        stitched, wall, peak = _measure(lambda: tessera_merge(windows, shape, chunk, Path(tmp)))
    tessera = _row(evaluate_instances(stitched, truth), wall, peak)
    del stitched
    out = {"size": shape[0], "chunk": chunk, "halo": halo, "n_true": n_true, "n_windows": len(plan),
           "n_tile_detections": len(dets),
           # the per-window inputs both sides are handed (held before either merge starts, never traced)
           "tessera_input_mib": sum(iw.ids.nbytes for _, iw in windows) / 2**20,
           "peer_input_mib": sum(d.mask.nbytes for d in dets) / 2**20,
           # arithmetic, not measured: SAHI's older full-image bool mask per shifted detection
           "full_image_masks_gib_computed": len(dets) * shape[0] * shape[1] / 2**30,
           "tessera": tessera}
    for name, post in (("nms", "NMS"), ("nmm", "GREEDYNMM")):
        kept, wall, peak = _measure(lambda post=post: sahi_merge(dets, post))
        out[name] = _row(score_detections(kept, truth), wall, peak)
    return out


def run_instance_bench(sizes: Sequence[int], *, chunk: int = 300, halo: int = 32, seed: int = 7,
                       out_dir: Path | None = None, on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every size in turn; the result (and ``bench-instances-<date>.json`` in `out_dir`, if given)."""
    if chunk < 1 or halo < 1:
        raise ValueError(f"instance bench: chunk and halo must be >= 1 px, got chunk={chunk}, halo={halo}")
    scenes = []
    for size in sizes:
        truth = truth_scene(int(size), seed)
        scenes.append(bench_scene(truth, chunk=chunk, halo=halo))
        if on_progress:
            on_progress(format_row(scenes[-1]))
    result = {"kind": "instances", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()},
              "seed": seed, "chunk": chunk, "halo": halo, "match_threshold": MATCH_THRESHOLD,
              "peers": {"nms": "NMS, box IOU >= 0.5", "nmm": "GREEDYNMM, box IOS >= 0.5 (SAHI's defaults)"},
              "scenes": scenes}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"bench-instances-{dt.date.today().isoformat()}.json"
        path.write_text(json.dumps(result, indent=2, default=_json_default))
        result["json_path"] = str(path)
    return result


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def format_row(scene: dict[str, Any]) -> str:
    """One line per side of a scene: split / duplicated / count error per 1,000, wall, peak."""
    lines = [f"{scene['size']} px, {scene['n_true']} true objects, {scene['n_windows']} windows, "
             f"{scene['n_tile_detections']} tile detections"]
    for name in ("tessera", "nms", "nmm"):
        r = scene[name]
        lines.append(f"  {name:8s} split {r['split_per_1000']:7.1f}  dup {r['duplicated_per_1000']:6.1f}  "
                     f"count err {r['count_error_per_1000']:+7.1f} /1000  wall {r['wall_s']:7.2f} s  "
                     f"peak {r['peak_mib']:8.1f} MiB")
    return "\n".join(lines)


def markdown_table(result: dict[str, Any]) -> str:
    """The docs table: one row per scene and side."""
    rows = ["| scene | true objects | merge | split /1k | duplicated /1k | merged preds /1k | count error /1k "
            "| recall | wall s | peak MiB |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    names = {"tessera": "tessera halo match", "nms": "SAHI-style NMS (IoU 0.5)", "nmm": "SAHI-style GREEDYNMM (IOS 0.5)"}
    for s in result["scenes"]:
        for name, label in names.items():
            r = s[name]
            rows.append(f"| {s['size']}² | {s['n_true']} | {label} | {r['split_per_1000']:.1f} | "
                        f"{r['duplicated_per_1000']:.1f} | {1000 * r['merged_predictions'] / s['n_true']:.1f} | "
                        f"{r['count_error_per_1000']:+.1f} | {r['recall']:.4f} | {r['wall_s']:.2f} | "
                        f"{r['peak_mib']:.1f} |")
    return "\n".join(rows)
