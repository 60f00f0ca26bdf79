"""The cross-chunk merge of partial region statistics (driver side), in 2D and 3D.

:func:`merge_regions` pairs the face ids of neighbouring chunks that touch (full connectivity:
across faces, edges and corners of the chunks; equal class), solves connected components on that
small id graph, adds up the partials (counts, coordinate sums and m² areas add, bbox mins and maxes
reduce)
and numbers the final regions 1..N in raster order of their first voxel. The result
(:class:`MergedRegions`) also holds the relabel table from chunk ids to region ids
(:meth:`MergedRegions.relabel`). :class:`RowMerge` gives the same regions one slab of chunks
(one index along axis 0 of the chunk grid: a row of chunks in 2D) at a time, in memory bounded
by a slab.

Only the driver imports scipy (lazily, in :func:`_components`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from pipelines.stats.partials import (
    AREA_M2,
    INT64_MAX,
    VALUE_SUM,
    ArrayRecord,
    ChunkRegions,
    axis_names,
    frozen_array,
    region_array_dtypes,
)

__all__ = [
    "MergedRegions",
    "RowMerge",
    "merge_regions",
    "merged_array_dtypes",
    "merged_regions_of",
    "region_order",
    "region_rank",
    "region_stat_dtypes",
]


@functools.lru_cache(maxsize=None)
def region_stat_dtypes(ndim: int) -> Mapping[str, np.dtype]:
    """name -> dtype of the per-region statistics that merge algebraically (:class:`RowMerge`'s
    batches): those of :func:`~pipelines.stats.partials.region_array_dtypes` without ``ids``."""
    return MappingProxyType({name: dt for name, dt in region_array_dtypes(ndim).items() if name != "ids"})


@functools.lru_cache(maxsize=None)
def region_order(ndim: int) -> tuple[str, ...]:
    """Columns of the merged per-region statistics that sort regions into region_id order:
    ``(min_<axis>..., class_id, pixel_count, first_<axis>...)``; in 2D ``(min_row, min_col,
    class_id, pixel_count, first_row, first_col)``. A total order: the first voxel is unique."""
    axes = axis_names(ndim)
    return (*(f"min_{a}" for a in axes), "class_id", "pixel_count", *(f"first_{a}" for a in axes))


@functools.lru_cache(maxsize=None)
def merged_array_dtypes(ndim: int) -> Mapping[str, np.dtype]:
    """name -> dtype of the per-region arrays of an ``ndim``-D :class:`MergedRegions`:
    region_id, class_id, pixel_count, ``centroid_<axis>`` float64, ``min_<axis>``,
    ``max_<axis>``, ``first_<axis>`` int64, ``area_m2`` float64."""
    axes = axis_names(ndim)
    out = {"region_id": np.dtype(np.int64), "class_id": np.dtype(np.uint8), "pixel_count": np.dtype(np.int64)}
    out |= {f"centroid_{a}": np.dtype(np.float64) for a in axes}
    for stat in ("min", "max", "first"):
        out |= {f"{stat}_{a}": np.dtype(np.int64) for a in axes}
    out[AREA_M2] = np.dtype(np.float64)
    out[VALUE_SUM] = np.dtype(np.float64)
    return MappingProxyType(out)


_TABLE_DTYPES = {"source_id": np.dtype(np.int64), "source_region_id": np.dtype(np.int64)}


@dataclass(frozen=True, eq=False, kw_only=True)
class MergedRegions(ArrayRecord):
    """The regions of a whole scene, merged from chunk partials, and the chunk-id relabel table.

    Rows are sorted by :func:`region_order` (bbox minimum, class, count, first voxel); the first
    voxel is unique per region, so the order is total and does not depend on the chunking.
    ``region_id`` is 1..N in that order. Arrays (read as attributes: ``merged.centroid_row``)
    are read-only views.

    Attributes:
        ndim: 2 or 3.
        arrays: Per region (``N``, see :func:`merged_array_dtypes`): ``region_id`` int64 1..N;
            ``class_id`` uint8; ``pixel_count`` int64 voxels; ``centroid_<axis>`` float64 mean
            index (voxel ``p`` is at ``p``, not at its corner); ``min_<axis>``/``max_<axis>``
            int64 bbox, inclusive scene indices; ``first_<axis>`` int64 the region's first
            voxel in raster order (an anchor surely inside the region, unlike the centroid);
            ``area_m2`` float64 sum of its chunk partials' ellipsoidal areas in m², NaN when
            any is unknown.
            And the relabel table: ``source_id`` ``(M,)`` int64 every chunk-level id of the
            input, strictly increasing; ``source_region_id`` ``(M,)`` int64 the ``region_id``
            each ``source_id`` was merged into.
    """

    ndim: int
    arrays: Mapping[str, np.ndarray]

    def __post_init__(self) -> None:
        owner = "MergedRegions"
        if self.ndim not in (2, 3) or isinstance(self.ndim, bool):
            raise ValueError(f"{owner}.ndim must be 2 or 3, got {self.ndim!r}")
        per_region = merged_array_dtypes(self.ndim)
        expected = [*per_region, *_TABLE_DTYPES]
        if not isinstance(self.arrays, Mapping) or sorted(self.arrays) != sorted(expected):
            got = sorted(self.arrays) if isinstance(self.arrays, Mapping) else type(self.arrays).__name__
            raise ValueError(f"{owner}: arrays must be {expected}, got {got}")
        arrays = {name: frozen_array(self.arrays[name], name, dt, owner)
                  for name, dt in (per_region | _TABLE_DTYPES).items()}
        object.__setattr__(self, "arrays", MappingProxyType(arrays))
        lengths = {name: len(arrays[name]) for name in per_region}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{owner}: per-region arrays differ in length: {lengths}")
        n = len(arrays["region_id"])
        if not np.array_equal(arrays["region_id"], np.arange(1, n + 1)):
            raise ValueError(f"{owner}: region_id must be 1..{n} in order")
        source_id, source_region_id = arrays["source_id"], arrays["source_region_id"]
        if len(source_id) != len(source_region_id):
            raise ValueError(
                f"{owner}: source_id ({len(source_id)}) and source_region_id ({len(source_region_id)}) differ in length"
            )
        if np.any(np.diff(source_id) <= 0):
            raise ValueError(f"{owner}: source_id must be strictly increasing")
        if len(source_region_id) and not (1 <= source_region_id.min() and source_region_id.max() <= n):
            raise ValueError(f"{owner}: source_region_id must lie in 1..{n}")

    def __len__(self) -> int:
        """Number of regions."""
        return len(self.arrays["region_id"])

    def relabel(self, ids: np.ndarray) -> np.ndarray:
        """Map chunk-level ids (from :func:`~pipelines.stats.partials.label_chunk`) to merged region ids.

        Args:
            ids: Array of any shape of int64 chunk-level ids; 0 (nodata) stays 0.

        Returns:
            int64 array of the same shape with ``region_id`` values.

        Raises:
            ValueError: If an id is not in the relabel table.
        """
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise ValueError(f"ids must be integers, got {ids.dtype}")
        table = self.arrays["source_id"]
        if table.size == 0:
            found = np.zeros(ids.shape, dtype=bool)
            pos = np.zeros(ids.shape, dtype=np.intp)
        else:
            pos = np.minimum(np.searchsorted(table, ids), table.size - 1)
            found = table[pos] == ids
        unknown = ~found & (ids != 0)
        if unknown.any():
            raise ValueError(
                f"ids {np.unique(ids[unknown])[:5].tolist()} are not in the relabel table of these regions"
            )
        if table.size == 0:
            return np.zeros(ids.shape, dtype=np.int64)
        return np.where(found, self.arrays["source_region_id"][pos], 0).astype(np.int64, copy=False)


# --- pairs of ids that touch across chunk borders -------------------------------------------------

@functools.lru_cache(maxsize=None)
def _forward_offsets(ndim: int) -> tuple[tuple[int, ...], ...]:
    """Grid offsets ``d`` in {-1, 0, 1}^ndim whose first non-zero entry is +1: each pair of
    touching chunks once (2D: right, down-left, down, down-right; 3D: 13 of the 26)."""
    return tuple(d for d in itertools.product((-1, 0, 1), repeat=ndim)
                 if any(d) and d[next(k for k, v in enumerate(d) if v)] == 1)


def _boundary(part: ChunkRegions, offset: Sequence[int], *, towards: bool) -> np.ndarray:
    """The ids of the voxels of ``part`` that touch the chunk at grid ``offset`` from it
    (``towards``) or, for the chunk at ``offset``, those that touch ``part`` (not ``towards``).

    Along each axis with a non-zero offset that is one layer (the last towards +1); along the
    others the whole extent. The voxels lie on a face, so they are read from one face array:
    an array over the axes where ``offset`` is 0, in axis order.
    """
    hi = [(d > 0) == towards for d in offset]
    k0 = next(k for k, d in enumerate(offset) if d)
    face = part.face(k0, hi[k0])
    index = tuple((-1 if hi[k] else 0) if d else slice(None) for k, d in enumerate(offset) if k != k0)
    return face[index]


def _check_lined_up(a: ChunkRegions, b: ChunkRegions, offset: Sequence[int]) -> None:
    """ValueError unless ``b`` sits at grid ``offset`` from ``a``: abutting along the offset
    axes, with the same origin and extent along the others."""
    for k, d in enumerate(offset):
        (ao, an), (bo, bn) = (a.origin[k], a.shape[k]), (b.origin[k], b.shape[k])
        ok = bo == ao + an if d > 0 else bo + bn == ao if d < 0 else (bo, bn) == (ao, an)
        if not ok:
            raise ValueError(
                f"chunk {b.chunk_index} at {b.origin} of {b.shape} does not line up with chunk {a.chunk_index} "
                f"at {a.origin} of {a.shape} (it should be its neighbour at grid offset {tuple(offset)})"
            )


def _touching_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct id pairs between two facing layers of voxels, nodata (0) dropped.

    ``a`` and ``b`` are the voxels of two chunks that touch, over the axes the chunks share (a
    ``(n,)`` face in 2D, ``(h, w)`` faces and ``(n,)`` edges in 3D, scalars at corners): voxel
    ``p`` of ``a`` touches voxels ``p + s`` of ``b`` for every shift ``s`` in {-1, 0, 1}^m.

    A face of n pixels gives about 3^m n touching pairs but only a few distinct region pairs;
    keeping the distinct ones keeps the merge's graph (and its memory) proportional to the
    regions, not to the area of the chunk borders (at 32768² with 1024² chunks: 6.3 million
    pixel pairs).
    """
    srcs, dsts = [], []
    for shift in itertools.product((-1, 0, 1), repeat=a.ndim):
        sa = tuple(slice(None, -1) if s > 0 else slice(1, None) if s < 0 else slice(None) for s in shift)
        sb = tuple(slice(1, None) if s > 0 else slice(None, -1) if s < 0 else slice(None) for s in shift)
        srcs.append(a[sa].ravel())
        dsts.append(b[sb].ravel())
    src, dst = np.concatenate(srcs), np.concatenate(dsts)
    keep = (src != 0) & (dst != 0)
    if not keep.any():
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    src, dst = src[keep], dst[keep]
    step = np.r_[True, (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])]  # runs of one pair along the face
    pairs = np.unique(np.stack([src[step], dst[step]], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def _pairs_from(a: ChunkRegions, parts: Mapping[tuple[int, ...], ChunkRegions],
                offsets: Iterable[tuple[int, ...]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Id pairs from chunk ``a`` to its neighbours at the grid ``offsets`` that are in ``parts``
    (unfiltered by class), checking that the neighbours line up with ``a``."""
    srcs: list[np.ndarray] = []
    dsts: list[np.ndarray] = []
    for offset in offsets:
        b = parts.get(tuple(i + d for i, d in zip(a.chunk_index, offset, strict=True)))
        if b is None:
            continue
        _check_lined_up(a, b, offset)
        s, d = _touching_pairs(_boundary(a, offset, towards=True), _boundary(b, offset, towards=False))
        srcs.append(s)
        dsts.append(d)
    return srcs, dsts


def _concat_pairs(srcs: list[np.ndarray], dsts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if not srcs:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    src, dst = np.concatenate(srcs), np.concatenate(dsts)
    keep = (src != 0) & (dst != 0)
    return src[keep], dst[keep]


def _neighbour_pairs(parts: Mapping[tuple[int, ...], ChunkRegions], ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """All id pairs that touch across chunk faces, edges and corners (unfiltered by class;
    nodata dropped)."""
    srcs: list[np.ndarray] = []
    dsts: list[np.ndarray] = []
    for a in parts.values():
        s, d = _pairs_from(a, parts, _forward_offsets(ndim))
        srcs += s
        dsts += d
    return _concat_pairs(srcs, dsts)


# --- merging the statistics ----------------------------------------------------------------------

def _stats_of(parts: Sequence[ChunkRegions], ndim: int) -> dict[str, np.ndarray]:
    """The parts' per-region arrays (ids included), concatenated in the order of `parts`."""
    return {name: (np.concatenate([p.arrays[name] for p in parts]) if parts else np.zeros(0, dtype=dt))
            for name, dt in region_array_dtypes(ndim).items()}


def _empty_stats(ndim: int) -> dict[str, np.ndarray]:
    return {name: np.zeros(0, dtype=dt) for name, dt in region_stat_dtypes(ndim).items()}


def _concat_stats(a: dict[str, np.ndarray], b: dict[str, np.ndarray], ndim: int) -> dict[str, np.ndarray]:
    return {name: np.concatenate([a[name], b[name]]) for name in region_stat_dtypes(ndim)}


def _components(class_id: np.ndarray, src: np.ndarray, dst: np.ndarray) -> tuple[int, np.ndarray]:
    """Connected components of nodes 0..m-1 joined by the (src, dst) index pairs of equal class."""
    # imported here: only the driver merges; the actors that compute chunk partials start
    # about 0.1 s sooner without scipy.sparse.csgraph (and the scipy.linalg it pulls in)
    from scipy import sparse
    from scipy.sparse import csgraph

    m = len(class_id)
    same = class_id[src] == class_id[dst]
    graph = sparse.coo_matrix(
        (np.ones(int(same.sum()), dtype=np.int8), (src[same], dst[same])), shape=(m, m)
    ).tocsr()
    n, comp = csgraph.connected_components(graph, directed=False)
    return n, comp.astype(np.int64, copy=False)


def _reduce_stats(stats: dict[str, np.ndarray], comp: np.ndarray, n: int, ndim: int) -> dict[str, np.ndarray]:
    """Per component: counts, coordinate sums and m² areas add, bbox mins and maxes reduce, the
    class is shared, the first voxel is the smallest in raster order. Exact in any grouping or
    order (the float64 sums hold integers below 2**53), but for ``area_m2``: a float64 sum of
    real numbers, equal across groupings to rounding (about 1e-16 relative per addition); NaN
    (unknown) in any partial makes the region's area NaN."""
    axes = axis_names(ndim)
    m = len(comp)
    count = np.zeros(n, dtype=np.int64)
    np.add.at(count, comp, stats["pixel_count"])
    out = {"pixel_count": count}
    out |= {f"sum_{a}": np.bincount(comp, weights=stats[f"sum_{a}"], minlength=n) for a in axes}
    # float64 (bincount of nothing gives int64); NaN (unknown) in a partial stays NaN
    out[AREA_M2] = np.bincount(comp, weights=stats[AREA_M2], minlength=n).astype(np.float64, copy=False)
    out[VALUE_SUM] = np.bincount(comp, weights=stats[VALUE_SUM], minlength=n).astype(np.float64, copy=False)
    for a in axes:
        out[f"min_{a}"] = np.full(n, INT64_MAX, dtype=np.int64)
        np.minimum.at(out[f"min_{a}"], comp, stats[f"min_{a}"])
    for a in axes:
        out[f"max_{a}"] = np.full(n, -1, dtype=np.int64)
        np.maximum.at(out[f"max_{a}"], comp, stats[f"max_{a}"])
    class_id = np.zeros(n, dtype=np.uint8)
    class_id[comp] = stats["class_id"]  # equal within a component: only equal classes were joined
    out["class_id"] = class_id
    by_first = np.lexsort((*(stats[f"first_{a}"] for a in reversed(axes)), comp))
    starts = np.flatnonzero(np.r_[True, comp[by_first][1:] != comp[by_first][:-1]]) if m else np.zeros(0, np.int64)
    for a in axes:
        out[f"first_{a}"] = stats[f"first_{a}"][by_first[starts]]
    return out


def _ndim_of(stats: Mapping[str, np.ndarray]) -> int:
    return 3 if "min_plane" in stats else 2


def region_rank(stats: Mapping[str, np.ndarray]) -> np.ndarray:
    """Indices that sort regions into region_id order: by :func:`region_order`, a total order
    (the first voxel is unique). The DuckDB sort of the spilled regions uses the same key."""
    return np.lexsort(tuple(stats[name] for name in reversed(region_order(_ndim_of(stats)))))


def merged_regions_of(stats: Mapping[str, np.ndarray]) -> MergedRegions:
    """MergedRegions (region ids 1..n, no relabel table) of merged per-region statistics that
    are already in region_id order (see :func:`region_rank`); 3D when they have ``min_plane``."""
    ndim = _ndim_of(stats)
    n = len(stats["pixel_count"])
    count = stats["pixel_count"]
    arrays = {"region_id": np.arange(1, n + 1, dtype=np.int64), "class_id": stats["class_id"], "pixel_count": count}
    axes = axis_names(ndim)
    arrays |= {f"centroid_{a}": stats[f"sum_{a}"] / count if n else np.zeros(0) for a in axes}
    for stat in ("min", "max", "first"):
        arrays |= {f"{stat}_{a}": stats[f"{stat}_{a}"] for a in axes}
    arrays[AREA_M2] = stats[AREA_M2]
    arrays[VALUE_SUM] = stats[VALUE_SUM]
    arrays |= {name: np.zeros(0, dtype=dt) for name, dt in _TABLE_DTYPES.items()}
    return MergedRegions(ndim=ndim, arrays=arrays)


def _check_parts(parts: Iterable[ChunkRegions], ndim: int, who: str,
                 seen: set[tuple[int, ...]] = frozenset()) -> dict[tuple[int, ...], ChunkRegions]:  # type: ignore[assignment]
    by_index: dict[tuple[int, ...], ChunkRegions] = {}
    for part in parts:
        if not isinstance(part, ChunkRegions):
            raise ValueError(f"{who} takes ChunkRegions, got {type(part).__name__}")
        if part.ndim != ndim:
            raise ValueError(f"{who} merges {ndim}-D chunks, got chunk {part.chunk_index} of shape {part.shape} "
                             f"(pass ndim={part.ndim})")
        if part.chunk_index in by_index or part.chunk_index in seen:
            raise ValueError(f"chunk {part.chunk_index} is given twice")
        by_index[part.chunk_index] = part
    return by_index


def merge_regions(parts: Iterable[ChunkRegions], *, ndim: int = 2) -> MergedRegions:
    """Merge per-chunk partial statistics into the regions of the whole scene, exactly.

    Two chunk regions belong to one scene region when voxels of theirs touch across a chunk
    face, edge or corner (full connectivity: 8 in 2D, 26 in 3D) and have the same class. Those
    pairs form a small graph on the chunk ids, solved with
    ``scipy.sparse.csgraph.connected_components``; partials then merge algebraically:
    ``pixel_count``, coordinate sums and ``area_m2`` add, bbox mins and maxes reduce,
    ``centroid = sum / pixel_count``. Chunks may be missing (e.g. skipped as all nodata); they
    join nothing. The result equals labelling the whole scene with
    ``skimage.measure.label(classes, background=nodata, connectivity=ndim)``.

    Holds every part at once; :class:`RowMerge` gives the same regions a slab of chunks at a
    time, in memory that does not grow with the scene.

    Args:
        parts: One :class:`ChunkRegions` per chunk of one scene and one chunk grid, any order.
        ndim: Axes of the chunks (2 or 3); every part must have them.

    Returns:
        The merged :class:`MergedRegions` (deterministic order, see there).

    Raises:
        ValueError: If a chunk index repeats, a part has other axes, ids collide across chunks,
            or neighbouring chunks do not line up.
    """
    by_index = _check_parts(parts, ndim, "merge_regions")
    chunks = [by_index[k] for k in sorted(by_index)]
    data = _stats_of(chunks, ndim)
    order, sorted_ids = _sorted_ids(data["ids"], chunks)
    src, dst = _neighbour_pairs(by_index, ndim)
    n, comp = _components(data["class_id"], order[np.searchsorted(sorted_ids, src)],
                          order[np.searchsorted(sorted_ids, dst)])
    merged = _reduce_stats(data, comp, n, ndim)
    rank = region_rank(merged) if n else np.zeros(0, dtype=np.intp)
    region_of_comp = np.empty(n, dtype=np.int64)
    region_of_comp[rank] = np.arange(1, n + 1, dtype=np.int64)
    result = merged_regions_of({name: merged[name][rank] for name in merged})
    table = {"source_id": sorted_ids, "source_region_id": region_of_comp[comp[order]]}
    return dataclasses.replace(result, arrays=dict(result.arrays) | table)


def _sorted_ids(ids: np.ndarray, chunks: Sequence[ChunkRegions]) -> tuple[np.ndarray, np.ndarray]:
    """(argsort, sorted ids) of the chunks' concatenated ids; ValueError if an id repeats."""
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    dup = np.flatnonzero(np.diff(sorted_ids) == 0)
    if dup.size:
        bad = int(sorted_ids[dup[0]])
        owners = [p.chunk_index for p in chunks if np.isin(bad, p.ids)]
        raise ValueError(f"region id {bad} appears in chunks {owners}; use region_id_offset for disjoint ids")
    return order, sorted_ids


class RowMerge:
    """:func:`merge_regions` one slab of chunks at a time, in memory bounded by a slab.

    A *slab* is the chunks of one index along axis 0 of the chunk grid (a row of chunks in 2D,
    a layer of chunks in 3D); slabs come in increasing order. A region can only grow onwards
    through the ids on the last face along axis 0 of the last slab added; every other region is
    complete. :meth:`add_row` merges a slab's regions with the regions still open from the slab
    before and returns those that are now complete; :meth:`finish` returns the rest. Held
    between calls: the last slab's parts and the open regions' merged statistics. The union of
    all returned regions equals :func:`merge_regions` of all parts (same statistics, exactly);
    they come in no particular order (sort by :func:`region_order`, :func:`region_rank`, to
    number them).

    Each returned batch is a dict of arrays named by :func:`region_stat_dtypes` (as in
    :class:`~pipelines.stats.partials.ChunkRegions`, without ``ids``).

    Args:
        ndim: Axes of the chunks (2 or 3).
    """

    def __init__(self, *, ndim: int = 2) -> None:
        self._ndim = ndim
        self._stat_names = tuple(region_stat_dtypes(ndim))  # also checks ndim
        self._row_index: int | None = None
        self._row: dict[tuple[int, ...], ChunkRegions] = {}
        self._open = _empty_stats(ndim)
        self._open_ids = np.zeros(0, dtype=np.int64)  # sorted ids on the last slab's far faces
        self._open_of = np.zeros(0, dtype=np.int64)  # their open region (index into self._open)
        self._seen: set[tuple[int, ...]] = set()
        offsets = _forward_offsets(ndim)
        self._within = tuple(d for d in offsets if d[0] == 0)  # neighbours inside a slab
        self._onwards = tuple(d for d in offsets if d[0] == 1)  # neighbours in the next slab

    def add_row(self, parts: Iterable[ChunkRegions]) -> dict[str, np.ndarray]:
        """Merge one slab of chunks (chunks may be missing; slabs must come in increasing order).

        Returns:
            The statistics of the regions completed by this slab.

        Raises:
            ValueError: parts of several slabs or other axes, a slab out of order or given twice,
                ids that repeat, or neighbouring chunks that do not line up.
        """
        ndim = self._ndim
        row = _check_parts(parts, ndim, "RowMerge", self._seen)
        if not row:
            return self._close_all()
        rows = {index[0] for index in row}
        if len(rows) != 1:
            raise ValueError(f"add_row takes the chunks of one slab (one index along axis 0), got {sorted(rows)}")
        (i,) = rows
        if self._row_index is not None and i <= self._row_index:
            raise ValueError(f"slabs must come in increasing order: slab {i} after slab {self._row_index}")
        closed = self._close_all() if self._row_index is not None and i != self._row_index + 1 else _empty_stats(ndim)
        self._seen.update(row)
        chunks = [row[k] for k in sorted(row)]
        data = _stats_of(chunks, ndim)
        order, sorted_ids = _sorted_ids(data["ids"], chunks)
        k = len(self._open["pixel_count"])

        def node(ids: np.ndarray) -> np.ndarray:  # ids of this slab -> nodes k.. (open regions are 0..k-1)
            return k + order[np.searchsorted(sorted_ids, ids)]

        srcs, dsts = [], []
        for a in chunks:  # faces, edges and corners inside the slab
            s, d = _pairs_from(a, row, self._within)
            srcs += s
            dsts += d
        src, dst = _concat_pairs(srcs, dsts)
        src, dst = node(src), node(dst)
        srcs, dsts = [], []
        for a in self._row.values():  # faces, edges and corners between the slab before and this one
            s, d = _pairs_from(a, row, self._onwards)
            srcs += s
            dsts += d
        up, down = _concat_pairs(srcs, dsts)
        if up.size:
            src = np.concatenate([src, self._open_of[np.searchsorted(self._open_ids, up)]])
            dst = np.concatenate([dst, node(down)])
        nodes = _concat_stats(self._open, data, ndim)
        n, comp = _components(nodes["class_id"], src, dst)
        merged = _reduce_stats(nodes, comp, n, ndim)
        far = np.concatenate([p.face(0, True).ravel() for p in chunks])
        far_ids = np.unique(far[far != 0])
        is_open = np.zeros(n, dtype=bool)
        is_open[comp[node(far_ids)]] = True
        new_index = np.cumsum(is_open) - 1
        self._open = {name: v[is_open] for name, v in merged.items()}
        self._open_ids, self._open_of = far_ids, new_index[comp[node(far_ids)]]
        self._row_index, self._row = i, row
        return _concat_stats(closed, {name: v[~is_open] for name, v in merged.items()}, ndim)

    def finish(self) -> dict[str, np.ndarray]:
        """The regions still open (touching the last slab's far faces): all are complete now."""
        return self._close_all()

    def _close_all(self) -> dict[str, np.ndarray]:
        closed = self._open
        self._open = _empty_stats(self._ndim)
        self._open_ids = self._open_of = np.zeros(0, dtype=np.int64)
        self._row = {}  # the next slab is not after this one: nothing to pair with
        return closed
