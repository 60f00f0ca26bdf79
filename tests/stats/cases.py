"""Label images and volumes for the region-statistics tests, and the chunk-by-chunk driver.

The golden reference is skimage labelling the whole image or volume at once:
``measure.label(mask, background=255, connectivity=mask.ndim)`` and ``measure.regionprops``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import measure

from pipelines.plan.chunks import chunk_grid_shape, plan_chunks
from pipelines.stats import (
    ChunkRegions,
    MergedRegions,
    RowMerge,
    axis_names,
    chunk_regions,
    label_chunk,
    merged_regions_of,
    region_id_offset,
    region_rank,
)

NODATA = 255


def blobby_mask(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Smoothed noise in 5 classes, a nodata area, thin diagonal lines and 1-px specks."""
    rng = np.random.default_rng(seed)
    h, w = shape
    noise = ndimage.gaussian_filter(rng.random(shape), sigma=2.5)
    mask = np.digitize(noise, np.quantile(noise, [0.2, 0.4, 0.6, 0.8])).astype(np.uint8)
    mask[h // 3 : h // 2, w // 4 : w // 2] = NODATA
    mask[ndimage.gaussian_filter(rng.random(shape), 2) > 0.56] = NODATA
    # 1-px diagonal lines: the main diagonal crosses the corner of every square chunk grid, the
    # anti-diagonals k + c = 2s - 1 cross the corners of grids of size s (down-left neighbours).
    k = np.arange(min(h, w))
    mask[k, k] = 6
    for s in (5, 7, 8, 12, 16):
        rows = np.arange(h)
        cols = 2 * s - 1 - rows
        ok = (cols >= 0) & (cols < w)
        mask[rows[ok], cols[ok]] = 6
    # single-pixel specks, some touching each other or the lines
    mask.flat[rng.choice(h * w, size=h * w // 40, replace=False)] = 7
    return mask


def blobby_volume(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Smoothed 3-D noise in 4 classes, nodata blobs, 1-voxel space diagonals and specks."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.random(shape), sigma=1.5)
    mask = np.digitize(noise, np.quantile(noise, [0.25, 0.5, 0.75])).astype(np.uint8)
    mask[ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.53] = NODATA
    # space diagonals: regions that cross chunk grids only through corners and edges
    k = np.arange(min(shape))
    mask[k, k, k] = 6
    mask[k, k[::-1], k] = 6
    mask.flat[rng.choice(mask.size, size=mask.size // 30, replace=False)] = 7
    return mask


def golden(mask: np.ndarray) -> dict[str, np.ndarray]:
    """Region table of the whole image or volume from skimage, in MergedRegions' order."""
    axes = axis_names(mask.ndim)
    labels = measure.label(mask, background=NODATA, connectivity=mask.ndim)
    rows = []
    for p in measure.regionprops(labels):
        lo, hi = p.bbox[:mask.ndim], p.bbox[mask.ndim:]
        first = p.coords[0]  # coords come in raster order
        rows.append((*lo, int(mask[tuple(first)]), p.area, *first, *(h - 1 for h in hi), *p.centroid))
    rows.sort(key=lambda t: t[:2 * mask.ndim + 2])
    width = 4 * mask.ndim + 2
    table = np.array(rows, dtype=np.float64).reshape(-1, width)
    names = [*(f"min_{a}" for a in axes), "class_id", "pixel_count", *(f"first_{a}" for a in axes),
             *(f"max_{a}" for a in axes)]
    out = {name: table[:, i].astype(np.int64) for i, name in enumerate(names)}
    out |= {f"centroid_{a}": table[:, len(names) + k] for k, a in enumerate(axes)}
    return out


def chunk_parts(mask: np.ndarray, chunk: int | tuple[int, ...], *,
                skip_empty: bool = False, supply_labels: bool = True) -> tuple[list[ChunkRegions], np.ndarray]:
    """The ChunkRegions of ``mask`` cut into chunks (raster order), and the chunk-level id image."""
    grid = chunk_grid_shape(mask.shape, chunk)
    chunk_shape = (chunk,) * mask.ndim if isinstance(chunk, int) else chunk
    parts, ids = [], np.zeros(mask.shape, dtype=np.int64)
    for w in plan_chunks(mask.shape, chunk, 0):
        classes = mask[w.core]
        if skip_empty and (classes == NODATA).all():
            continue  # as the pipeline does for all-nodata chunks
        offset = region_id_offset(w.index, grid, chunk_shape)
        labels = label_chunk(classes, id_offset=offset)
        ids[w.core] = labels
        parts.append(chunk_regions(classes, chunk_index=w.index, origin=w.core_origin, id_offset=offset,
                                   labels=labels if supply_labels else None))
    return parts, ids


def row_merge(parts: list[ChunkRegions], ndim: int = 2) -> MergedRegions:
    """RowMerge over the parts slab by slab, its batches numbered like merge_regions does."""
    merger, batches = RowMerge(ndim=ndim), []
    for i in sorted({p.chunk_index[0] for p in parts}):
        batches.append(merger.add_row([p for p in parts if p.chunk_index[0] == i]))
    batches.append(merger.finish())
    stats = {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}
    rank = region_rank(stats)
    return merged_regions_of({name: v[rank] for name, v in stats.items()})


def assert_matches_golden(merged: MergedRegions, mask: np.ndarray, ids: np.ndarray | None = None) -> None:
    """Same regions as skimage on the whole mask: count, class, voxels, bbox, first voxel,
    centroid; and (with the chunk-level ids) a relabelling equal to skimage's up to numbering."""
    want = golden(mask)
    assert len(merged) == len(want["pixel_count"])
    np.testing.assert_array_equal(merged.region_id, np.arange(1, len(merged) + 1))
    for name, values in want.items():
        if name.startswith("centroid_"):
            np.testing.assert_allclose(getattr(merged, name), values, rtol=1e-12, atol=1e-9, err_msg=name)
        else:
            np.testing.assert_array_equal(getattr(merged, name), values, err_msg=name)
    if ids is None:
        return
    relabelled = merged.relabel(ids)
    reference = measure.label(mask, background=NODATA, connectivity=mask.ndim)
    assert ((relabelled == 0) == (reference == 0)).all()
    pairs = np.unique(np.stack([relabelled[reference > 0], reference[reference > 0]]), axis=1)
    assert pairs.shape[1] == len(merged) == reference.max()
    # and every region's first voxel carries its own id
    first = tuple(getattr(merged, f"first_{a}") for a in axis_names(mask.ndim))
    np.testing.assert_array_equal(relabelled[first], merged.region_id)
