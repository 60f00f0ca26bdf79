"""The instance oracle of the merge tests: per-window labellings cut from a known global label
image, as a perfect instance model would give them, and the stitching that checks the merge."""

from __future__ import annotations

import numpy as np

from pipelines.plan.chunks import chunk_grid_shape, pad_window, plan_chunks
from pipelines.stats.instances import InstanceChunk, apply_relabel, instance_chunk
from pipelines.stats.partials import region_id_offset
from schemas.instances import InstanceWindow
from schemas.window import ChunkWindow


def oracle_window(truth: np.ndarray, window: ChunkWindow, n_bands: int = 0) -> InstanceWindow:
    """The objects of `truth` (global ids, 0 = none) in one halo window: every global id in the
    window is one local id (even in parts), those with core pixels first (the contract's
    numbering), each group in order of global id; the padding beyond the scene mirrors the scene
    (as the readers pad). Class ``1 + g % 3``, score ``(g % 7 + 1) / 8`` per global id ``g``;
    band sums of the bands ``g`` and ``2 g`` when asked."""
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
    band_sums = None
    if n_bands:
        band_sums = np.stack([core_pixels * present * (b + 1.0) for b in range(n_bands)], axis=1).astype(np.float64)
    return InstanceWindow(ids=ids, class_id=(1 + present % 3).astype(np.uint8),
                          score=((present % 7 + 1) / 8).astype(np.float32), core_pixels=core_pixels,
                          band_sums=band_sums)


def oracle_chunks(truth: np.ndarray, chunk: int, halo: int, n_bands: int = 0) -> dict[tuple[int, ...], InstanceChunk]:
    """Every chunk's :class:`InstanceChunk` of `truth` cut into `chunk`-sized cores with `halo`."""
    grid = chunk_grid_shape(truth.shape, chunk)
    out = {}
    for w in plan_chunks(truth.shape, chunk, halo):
        out[w.index] = instance_chunk(oracle_window(truth, w, n_bands), chunk_index=w.index,
                                      window_origin=w.window_origin, core_origin=w.core_origin,
                                      core_shape=w.core_shape, chunk_shape=(chunk,) * truth.ndim,
                                      id_offset=region_id_offset(w.index, grid, (chunk,) * truth.ndim))
    return out


def stitch(chunks: dict[tuple[int, ...], InstanceChunk], shape: tuple[int, ...], relabel) -> np.ndarray:
    """The scene's instances array: each chunk's provisional core ids through the relabel table."""
    keys = np.fromiter(relabel.keys(), dtype=np.uint64, count=len(relabel))
    finals = np.fromiter(relabel.values(), dtype=np.uint64, count=len(relabel))
    out = np.zeros(shape, dtype=np.uint64)
    for c in chunks.values():
        core = tuple(slice(o, o + n) for o, n in zip(c.core_origin, c.core_shape))
        out[core] = apply_relabel(c.provisional_core(), keys, finals)
    return out


def splits_and_duplicates(stitched: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    """(split, duplicate) counts of `stitched` against `truth` on the same pixels: a truth object
    covered by more than one stitched id is split; a stitched id covering more than one truth
    object is a duplicate merge. Both 0 and equal backgrounds: equal up to renumbering."""
    if not np.array_equal(stitched > 0, truth > 0):
        raise AssertionError("stitched and truth differ in background")
    fg = truth > 0
    pairs = np.unique(np.stack([truth[fg].astype(np.uint64), stitched[fg].astype(np.uint64)]), axis=1)
    truths, per_truth = np.unique(pairs[0], return_counts=True)
    stitched_ids, per_id = np.unique(pairs[1], return_counts=True)
    return int((per_truth > 1).sum()), int((per_id > 1).sum())
