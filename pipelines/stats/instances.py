"""Instances across chunks: each chunk's instance file, the halo matching, the union-find per
scene, the relabel table and the merged per-instance statistics. n-D (2D and 3D); no Ray, torch,
zarr or rasterio (the store and the table live in ``pipelines.writers.instances_table``).

The contract is :mod:`schemas.instances`. In short:

* A chunk's writer keeps the window's local ids and the partial statistics of the objects in its
  core as an :class:`InstanceChunk` (``<key>.instances.npz`` in the work folder,
  :meth:`InstanceChunk.to_npz`). Provisional scene id of local id ``k``: ``id_offset + k``.
* :func:`match_chunks` compares two neighbouring chunks A, B on ``R = A.window ∩ B.core``, the
  pixels both labelled: by A's halo view and by B's core view.
* :func:`merge_instance_ids` runs it over every pair of neighbouring chunks (faces, edges and
  corners) in grid order, both ways, feeding a :class:`UnionFind` over provisional ids; the
  result is the relabel table (provisional -> smallest provisional id of its set, only the ids
  that change).
* :func:`merge_instance_stats` adds up the chunks' partials through the relabel table.

The match rule (:func:`match_chunks`): on R, A's ids are restricted to those with pixels in
A's own core (an object A sees only in its halo belongs to other chunks); every pair ``(a, b)``
of ids that share pixels of R gets ``overlap`` (shared pixels), and
``IoU = overlap / (|a ∩ R| + |b ∩ R| - overlap)``, both areas counted on R only. ``a`` and ``b``
are one instance when each is the other's largest overlap (ties: the smaller id) and
``IoU >= iou_threshold`` (:data:`DEFAULT_IOU_THRESHOLD`, 0.5). Two models of one object agree
on most of R; 0.5 is the usual "same object" bar of detection matching (COCO, PASCAL), and a
mutual best over 0.5 is unique, so no id is ever joined to two objects of the other view by
one pair. Objects that touch but are distinct share no pixel of R: they stay distinct.

A merge needs a halo of at least one pixel (with none, R is empty: objects cut by chunk borders
stay split). An object larger than a chunk, or than the halo, is joined pair by pair along the
chunks it crosses (its ids form a chain of matches). An object in two parts is one instance
where the window of a chunk that holds pixels of one part in its core sees the other part as
the same object; parts no such window sees together (farther apart than the halo) cannot be
joined by any per-window model and stay two instances.

Memory: the merge holds two chunks' files at a time and the union-find (one entry per matched
provisional id). :func:`merge_instance_stats` holds one row per (chunk, instance) pair of the
scene (about 100 bytes plus 8 per band): the scene's instance count, not its pixels (a spill
through DuckDB, as the regions table does, is the follow-up for scenes of many millions of
instances).
"""

from __future__ import annotations

import itertools
import math
import os
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO

import numpy as np

from pipelines.stats.partials import _areas_m2, _moments, save_npz_atomic
from schemas.instances import InstanceWindow

__all__ = [
    "DEFAULT_IOU_THRESHOLD",
    "INSTANCE_NPZ_FORMAT_VERSION",
    "InstanceChunk",
    "InstanceIds",
    "InstanceMerge",
    "UnionFind",
    "apply_relabel",
    "instance_chunk",
    "match_chunks",
    "merge_instance_ids",
    "merge_instance_stats",
    "neighbour_offsets",
]

#: Version of the ``<key>.instances.npz`` layout (:meth:`InstanceChunk.to_npz`).
INSTANCE_NPZ_FORMAT_VERSION = 1
#: Mask IoU over the shared pixels R from which two mutually best-matching ids are one instance.
DEFAULT_IOU_THRESHOLD = 0.5

_PARTIAL_DTYPES = {"class_id": np.uint8, "score": np.float32, "core_pixels": np.int64, "area_m2": np.float64}


@dataclass(frozen=True, eq=False, kw_only=True)
class InstanceIds:
    """What the halo matching needs of a chunk: its window's ids and which objects own core pixels
    (:meth:`InstanceChunk.read_ids` reads only these from a chunk's file; the merge reads each
    file several times, the partial statistics once).

    Attributes: as :class:`InstanceChunk`'s namesakes.
    """

    chunk_index: tuple[int, ...]
    id_offset: int
    window_origin: tuple[int, ...]
    core_origin: tuple[int, ...]
    core_shape: tuple[int, ...]
    ids: np.ndarray
    core_pixels: np.ndarray

    @property
    def count(self) -> int:
        """Objects of the window (local ids 1..count), core or halo."""
        return len(self.core_pixels)


@dataclass(frozen=True, eq=False, kw_only=True)
class InstanceChunk:
    """One chunk's instances as its writer keeps them for the merge (scene coordinates).

    Attributes:
        chunk_index: the chunk's index in the grid, one entry per axis.
        id_offset: provisional id of local id ``k`` is ``id_offset + k``
            (``pipelines.stats.partials.region_id_offset``).
        window_origin: scene index of ``ids[0, 0(, 0)]``: the window's start, ``core.start -
            halo`` (negative in the padding beyond the scene's first row/column).
        core_origin, core_shape: the chunk's core in scene indices.
        ids: window-shaped uint32 local ids (0 = none), as the predictor labelled the window.
        class_id, score, core_pixels: ``(n,)`` uint8, float32, int64 per local id ``k = i + 1``
            (:class:`schemas.instances.InstanceWindow`); ``core_pixels`` counted here on the core.
        sums: ``(n, ndim)`` float64 sums of the scene indices of each object's core pixels
            (exact below 2**53), per axis.
        bbox_min, bbox_max: ``(n, ndim)`` int64 inclusive bbox of each object's core pixels in
            scene indices (``bbox_min > bbox_max`` where it has no core pixel).
        area_m2: ``(n,)`` float64 ellipsoidal m² of each object's core pixels; NaN unknown.
        band_sums: ``(n, C)`` float64 input sums over the core pixels, or None.
    """

    chunk_index: tuple[int, ...]
    id_offset: int
    window_origin: tuple[int, ...]
    core_origin: tuple[int, ...]
    core_shape: tuple[int, ...]
    ids: np.ndarray
    class_id: np.ndarray
    score: np.ndarray
    core_pixels: np.ndarray
    sums: np.ndarray
    bbox_min: np.ndarray
    bbox_max: np.ndarray
    area_m2: np.ndarray
    band_sums: np.ndarray | None = None

    def __post_init__(self) -> None:
        where = f"InstanceChunk of chunk {tuple(self.chunk_index)}"
        ndim = len(self.core_shape)
        if not (len(self.chunk_index) == len(self.window_origin) == len(self.core_origin) == ndim) or ndim not in (2, 3):
            raise ValueError(f"{where}: chunk_index, window_origin, core_origin and core_shape must have 2 or 3 "
                             f"equal axes, got {self.chunk_index}, {self.window_origin}, {self.core_origin}, "
                             f"{self.core_shape}")
        for name in ("chunk_index", "window_origin", "core_origin", "core_shape"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        object.__setattr__(self, "id_offset", int(self.id_offset))
        if not isinstance(self.ids, np.ndarray) or self.ids.dtype != np.uint32 or self.ids.ndim != ndim:
            raise ValueError(f"{where}: ids must be a {ndim}-D uint32 array")
        n = len(self.class_id)
        for name, dtype in _PARTIAL_DTYPES.items():
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or value.dtype != dtype or value.shape != (n,):
                raise ValueError(f"{where}: {name} must be a ({n},) {np.dtype(dtype).name} array")
        for name, dtype in (("sums", np.float64), ("bbox_min", np.int64), ("bbox_max", np.int64)):
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or value.dtype != dtype or value.shape != (n, ndim):
                raise ValueError(f"{where}: {name} must be a ({n}, {ndim}) {np.dtype(dtype).name} array")
        if self.band_sums is not None and (self.band_sums.dtype != np.float64 or self.band_sums.ndim != 2
                                           or self.band_sums.shape[0] != n):
            raise ValueError(f"{where}: band_sums must be a ({n}, C) float64 array or None")
        inside = self.core_in_window
        if any(s.start < 0 or s.stop > size for s, size in zip(inside, self.ids.shape, strict=True)):
            raise ValueError(f"{where}: the core {self.core_origin}+{self.core_shape} is not inside the window "
                             f"{self.window_origin}+{self.ids.shape}")
        if self.ids.size and int(self.ids.max()) > n:
            raise ValueError(f"{where}: ids go up to {int(self.ids.max())} but only {n} objects are described")

    @property
    def ndim(self) -> int:
        """Number of axes (2 or 3)."""
        return len(self.core_shape)

    @property
    def count(self) -> int:
        """Objects of the window (local ids 1..count), core or halo."""
        return len(self.class_id)

    @property
    def core_in_window(self) -> tuple[slice, ...]:
        """Slices of the core inside ``ids``."""
        return tuple(slice(c - w, c - w + n) for c, w, n in zip(self.core_origin, self.window_origin, self.core_shape,
                                                                 strict=True))

    @property
    def core_local(self) -> np.ndarray:
        """Local ids (1-based) of the objects with pixels in the core, ascending."""
        return np.flatnonzero(self.core_pixels > 0).astype(np.int64) + 1

    def provisional_core(self) -> np.ndarray:
        """The core's provisional scene ids, ``id_offset + local`` (0 stays 0), uint64."""
        core = self.ids[self.core_in_window].astype(np.uint64)
        return np.where(core > 0, core + np.uint64(self.id_offset), np.uint64(0))

    def to_npz(self, path: str | os.PathLike[str]) -> None:
        """Write to a compressed ``.npz`` atomically (temp file beside it, then rename); the ids
        of a window compress to a few percent of their size.

        Keys: ``format_version``; ``placement`` int64 ``[id_offset, *chunk_index,
        *window_origin, *core_origin, *core_shape]`` (``4 * ndim + 1`` entries); ``ids``; the
        per-object arrays (``class_id``, ``score``, ``core_pixels``, ``area_m2``, ``sums``,
        ``bbox_min``, ``bbox_max``, ``band_sums`` when known)."""
        path = Path(path)
        payload = {
            "format_version": np.int64(INSTANCE_NPZ_FORMAT_VERSION),
            # one small array for the placement: each array costs a header parse on every read
            "placement": np.asarray([self.id_offset, *self.chunk_index, *self.window_origin, *self.core_origin,
                                     *self.core_shape], dtype=np.int64),
            "ids": self.ids,
            **{name: getattr(self, name) for name in (*_PARTIAL_DTYPES, "sums", "bbox_min", "bbox_max")},
        }
        if self.band_sums is not None:
            payload["band_sums"] = self.band_sums
        save_npz_atomic(path, payload, compressed=True)

    @staticmethod
    def read_ids(path: str | os.PathLike[str] | BinaryIO) -> InstanceIds:
        """The :class:`InstanceIds` of a file written by :meth:`to_npz` (the ids and the objects'
        core pixels, not the partial statistics).

        Raises:
            ValueError: an unreadable file or missing field (the message names the file).
        """
        try:
            with np.load(path, allow_pickle=False) as npz:
                if int(npz["format_version"]) != INSTANCE_NPZ_FORMAT_VERSION:
                    raise ValueError(f"instance file format version {int(npz['format_version'])}, this tessera "
                                     f"reads {INSTANCE_NPZ_FORMAT_VERSION}")
                ids, core_pixels = npz["ids"], npz["core_pixels"]
                if ids.dtype != np.uint32 or core_pixels.dtype != np.int64 or (ids.size and ids.max() > len(core_pixels)):
                    raise ValueError("ids must be uint32 and within the objects described")
                return InstanceIds(**_placement(npz["placement"], ids.ndim), ids=ids, core_pixels=core_pixels)
        except (KeyError, ValueError, zipfile.BadZipFile, EOFError) as error:
            raise ValueError(f"{_file_name(path)}: not a readable instance file: {error}") from error

    @classmethod
    def from_npz(cls, path: str | os.PathLike[str] | BinaryIO) -> InstanceChunk:
        """Read a file written by :meth:`to_npz`.

        Raises:
            ValueError: a missing field, another format version or an inconsistent record (the
                message names the file).
        """
        try:
            with np.load(path, allow_pickle=False) as npz:
                version = int(npz["format_version"])
                if version != INSTANCE_NPZ_FORMAT_VERSION:
                    raise ValueError(f"instance file format version {version}, this tessera reads "
                                     f"{INSTANCE_NPZ_FORMAT_VERSION}")
                fields = {name: npz[name] for name in ("ids", *_PARTIAL_DTYPES, "sums", "bbox_min", "bbox_max")}
                return cls(**_placement(npz["placement"], fields["ids"].ndim),
                           band_sums=npz["band_sums"] if "band_sums" in npz.files else None, **fields)
        except (KeyError, ValueError, zipfile.BadZipFile, EOFError) as error:
            raise ValueError(f"{_file_name(path)}: not a readable instance file: {error}") from error


def _file_name(path: object) -> str:
    """A path's text, or a file object's ``name`` (an object's bytes read from object storage)."""
    name = getattr(path, "name", None)
    return str(name) if isinstance(name, str) and not isinstance(path, os.PathLike) else os.fspath(path)


def _placement(values: np.ndarray, ndim: int) -> dict[str, object]:
    """The ``placement`` array of an instance file as InstanceChunk/InstanceIds fields."""
    if values.dtype != np.int64 or values.shape != (4 * ndim + 1,):
        raise ValueError(f"placement must be {4 * ndim + 1} int64 values for {ndim}-D ids, got {values.shape}")
    v = [int(x) for x in values]
    return {"id_offset": v[0], "chunk_index": tuple(v[1:1 + ndim]), "window_origin": tuple(v[1 + ndim:1 + 2 * ndim]),
            "core_origin": tuple(v[1 + 2 * ndim:1 + 3 * ndim]), "core_shape": tuple(v[1 + 3 * ndim:])}


def instance_chunk(window: InstanceWindow, *, chunk_index: Sequence[int], window_origin: Sequence[int],
                   core_origin: Sequence[int], core_shape: Sequence[int], chunk_shape: Sequence[int], id_offset: int,
                   pixel_area_m2_by_row: np.ndarray | None = None) -> InstanceChunk:
    """A chunk's :class:`InstanceChunk` from the predictor's :class:`InstanceWindow`: the window's
    ids plus the partial statistics of each object's core pixels (count, coordinate sums, bbox,
    m² by row), all in scene indices.

    Args:
        window: the predictor's objects of the chunk's halo window.
        chunk_index: the chunk's grid index.
        window_origin: scene index of the window's first pixel (``ChunkWindow.window_origin``).
        core_origin, core_shape: the chunk's core (smaller than ``chunk_shape`` at the scene's edge).
        chunk_shape: the grid's regular chunk shape: the chunk owns the provisional ids
            ``id_offset + 1 .. id_offset + prod(chunk_shape)``.
        id_offset: ``region_id_offset(chunk_index, grid_shape, chunk_shape)``.
        pixel_area_m2_by_row: ``(H,)`` m² of one pixel per core row (2D with a CRS), or None.

    Raises:
        ValueError: the window does not hold the core, its ``core_pixels`` disagree with its ids
            on the core, or a core object's local id is above ``prod(chunk_shape)`` (its
            provisional id would be another chunk's).

    The contract (``schemas.instances``) gives a chunk ``prod(chunk_shape)`` provisional ids,
    while a window may hold more objects than that (its halo adds pixels): the predictor must
    number the objects with core pixels first (local ids ``1..k``, halo-only objects after), which
    always fits since a core of ``N`` pixels holds at most ``N`` objects. A numbering that does
    not is refused here, never written over another chunk's ids.
    """
    ndim = window.ids.ndim
    core_shape = tuple(int(n) for n in core_shape)
    inside = tuple(slice(c - w, c - w + n) for c, w, n in zip(core_origin, window_origin, core_shape, strict=True))
    core = window.ids[inside]
    if core.shape != core_shape:
        raise ValueError(f"chunk {tuple(chunk_index)}: the window {window.ids.shape} at {tuple(window_origin)} "
                         f"does not hold the core {core_shape} at {tuple(core_origin)}")
    n = window.count
    present, count, sums, boxes = _moments(core, n)
    counts = np.zeros(n + 1, dtype=np.int64)
    counts[present] = count
    if not np.array_equal(counts[1:], window.core_pixels):
        bad = int(np.flatnonzero(counts[1:] != window.core_pixels)[0]) + 1
        raise ValueError(f"chunk {tuple(chunk_index)}: object {bad} has {counts[bad]} core pixels, the predictor "
                         f"says {int(window.core_pixels[bad - 1])}")
    per_chunk = math.prod(int(n) for n in chunk_shape)
    if len(present) and int(present[-1]) > per_chunk:
        raise ValueError(f"chunk {tuple(chunk_index)}: core object {int(present[-1])} is beyond the chunk's "
                         f"{per_chunk} provisional ids; number the objects with core pixels first")
    origin = np.asarray(core_origin, dtype=np.int64)
    full_sums = np.zeros((n, ndim))
    bbox_min = np.full((n, ndim), np.iinfo(np.int64).max, dtype=np.int64)
    bbox_max = np.full((n, ndim), -1, dtype=np.int64)
    idx = present - 1
    full_sums[idx] = sums + count[:, None] * origin.astype(np.float64)
    bbox_min[idx] = boxes[:, 0::2] + origin
    bbox_max[idx] = boxes[:, 1::2] + origin
    area = np.full(n, np.nan)
    if pixel_area_m2_by_row is not None and len(present):
        area[idx] = _areas_m2(core.ravel(), n, present, pixel_area_m2_by_row, core_shape)
    return InstanceChunk(chunk_index=tuple(chunk_index), id_offset=id_offset, window_origin=tuple(window_origin),
                         core_origin=tuple(core_origin), core_shape=core_shape, ids=window.ids,
                         class_id=window.class_id, score=window.score, core_pixels=counts[1:].copy(),
                         sums=full_sums, bbox_min=bbox_min, bbox_max=bbox_max, area_m2=area,
                         band_sums=window.band_sums)


def match_chunks(a: InstanceChunk | InstanceIds, b: InstanceChunk | InstanceIds, *, iou_threshold: float = DEFAULT_IOU_THRESHOLD
                 ) -> list[tuple[int, int]]:
    """The provisional id pairs ``(a_id, b_id)`` that are one instance, seen on
    ``R = a.window ∩ b.core`` (the match rule in the module docstring). Empty when R is.

    Only ``a``'s ids with core pixels in ``a`` take part; on ``b``'s side every id on R lies in
    ``b``'s core.
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold!r}")
    lo = [max(w, c) for w, c in zip(a.window_origin, b.core_origin, strict=True)]
    hi = [min(w + n, c + m) for w, n, c, m in zip(a.window_origin, a.ids.shape, b.core_origin, b.core_shape,
                                                   strict=True)]
    if any(h <= low for low, h in zip(lo, hi)):
        return []
    av = a.ids[tuple(slice(low - w, h - w) for low, h, w in zip(lo, hi, a.window_origin))].ravel()
    bv = b.ids[tuple(slice(low - w, h - w) for low, h, w in zip(lo, hi, b.window_origin))].ravel()
    owned = np.zeros(a.count + 1, dtype=bool)
    owned[1:] = a.core_pixels > 0
    av = np.where(owned[av], av, 0).astype(np.int64)
    bv = bv.astype(np.int64)
    both = (av > 0) & (bv > 0)
    if not both.any():
        return []
    a_area = np.bincount(av, minlength=a.count + 1)
    b_area = np.bincount(bv, minlength=b.count + 1)
    pair, overlap = np.unique(av[both] * (b.count + 1) + bv[both], return_counts=True)
    ia, ib = np.divmod(pair, b.count + 1)
    iou = overlap / (a_area[ia] + b_area[ib] - overlap)
    best_of_a = _best(ia, ib, overlap)
    best_of_b = _best(ib, ia, overlap)
    keep = (best_of_a[ia] == ib) & (best_of_b[ib] == ia) & (iou >= iou_threshold)
    return [(a.id_offset + int(x), b.id_offset + int(y)) for x, y in zip(ia[keep], ib[keep], strict=True)]


def _best(key: np.ndarray, other: np.ndarray, overlap: np.ndarray) -> np.ndarray:
    """Per value of ``key``: the ``other`` of its largest overlap (ties: the smallest ``other``),
    as an array indexed by key (-1 where a key has no pair)."""
    order = np.lexsort((other, -overlap, key))  # by key, then overlap descending, then other
    first = np.ones(len(order), dtype=bool)
    first[1:] = key[order][1:] != key[order][:-1]
    best = np.full(int(key.max()) + 1, -1, dtype=np.int64)
    best[key[order][first]] = other[order][first]
    return best


class UnionFind:
    """Disjoint sets of provisional ids (Python ints: uint64 ranges never overflow), each set's
    root its smallest id; path compression (halving) on every find."""

    def __init__(self) -> None:
        self._parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        """The root (smallest id) of ``x``'s set; ``x`` itself when never joined."""
        parent = self._parent
        while parent.get(x, x) != x:
            up = parent[x]
            grand = parent.get(up, up)
            parent[x] = grand
            x = grand
        return x

    def union(self, x: int, y: int) -> None:
        """Join the sets of ``x`` and ``y``; the smaller root becomes the root of both."""
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            lo, hi = (rx, ry) if rx < ry else (ry, rx)
            self._parent[hi] = lo
            self._parent.setdefault(lo, lo)

    def relabel_table(self) -> dict[int, int]:
        """``{provisional: final}`` for every id whose final id differs from itself, ascending."""
        return {x: r for x in sorted(self._parent) if (r := self.find(x)) != x}


def neighbour_offsets(ndim: int) -> tuple[tuple[int, ...], ...]:
    """The grid offsets to the chunks after a chunk among its ``3**ndim - 1`` neighbours (faces,
    edges, corners), in C order: each unordered pair of neighbours is met once."""
    return tuple(d for d in itertools.product((-1, 0, 1), repeat=ndim) if d > (0,) * ndim)


@dataclass(frozen=True)
class InstanceMerge:
    """The union-find's outcome for one scene.

    Attributes:
        relabel: ``{provisional id: final id}`` of the ids that change, ascending, read-only.
        n_pairs: neighbouring chunk pairs compared (both ways count once).
        n_matches: id pairs matched (each feeds one union).
    """

    relabel: Mapping[int, int]
    n_pairs: int
    n_matches: int


def merge_instance_ids(indices: Iterable[tuple[int, ...]],
                       load: Callable[[tuple[int, ...]], InstanceChunk | InstanceIds | None],
                       *, grid_shape: Sequence[int], iou_threshold: float = DEFAULT_IOU_THRESHOLD) -> InstanceMerge:
    """Match every pair of neighbouring chunks both ways and solve the scene's union-find.

    Chunks are visited in C order of their grid index; each chunk is compared with its neighbours
    after it (:func:`neighbour_offsets`), so at most two chunks' files are loaded at a time (the
    chunk, then each neighbour in turn; the last neighbour loaded is the next chunk, kept).

    Args:
        indices: the grid indices of the scene's chunks (any order; sorted here).
        load: a chunk's :class:`InstanceIds` (or :class:`InstanceChunk`), or None for a chunk
            without instances (skipped as nodata).
        grid_shape: chunks per axis.
        iou_threshold: see :func:`match_chunks`.
    """
    present = set(map(tuple, indices))
    grid = tuple(int(g) for g in grid_shape)
    uf = UnionFind()
    n_pairs = n_matches = 0
    last: tuple[tuple[int, ...] | None, object] = (None, None)  # the chunk loaded last (the next one, usually)
    for index in sorted(present):
        # the neighbour after this chunk along the last axis comes last: it is the next chunk
        offsets = [tuple(i + d for i, d in zip(index, off, strict=True)) for off in neighbour_offsets(len(grid))[::-1]]
        neighbours = [n for n in offsets if n in present and all(0 <= i < g for i, g in zip(n, grid, strict=True))]
        if not neighbours:
            continue
        a = last[1] if last[0] == index else load(index)
        if a is None:
            continue
        for n in neighbours:
            b = load(n)
            last = (n, b)
            if b is None:
                continue
            n_pairs += 1
            for x, y in (*match_chunks(a, b, iou_threshold=iou_threshold),
                         *((x, y) for y, x in match_chunks(b, a, iou_threshold=iou_threshold))):
                uf.union(x, y)
                n_matches += 1
    return InstanceMerge(relabel=MappingProxyType(uf.relabel_table()), n_pairs=n_pairs, n_matches=n_matches)


def apply_relabel(ids: np.ndarray, keys: np.ndarray, finals: np.ndarray) -> np.ndarray:
    """``ids`` with each value found in sorted ``keys`` replaced by its ``finals`` entry; other
    values (roots, 0) unchanged. Same dtype. Idempotent when no final id is a key (a relabel
    table maps to roots only)."""
    if not len(keys) or not ids.size:
        return ids.copy()
    keys = keys.astype(ids.dtype)
    pos = np.searchsorted(keys, ids).clip(max=len(keys) - 1)
    hit = keys[pos] == ids
    return np.where(hit, finals.astype(ids.dtype)[pos], ids)


def merge_instance_stats(chunks: Iterable[InstanceChunk], relabel: Mapping[int, int], *,
                         n_classes: int) -> dict[str, np.ndarray]:
    """Per final instance, the chunks' partials added up through the relabel table.

    Returns arrays sorted by ``instance_id``: ``instance_id`` uint64; ``class_id`` uint8 by
    pixel-majority vote over the chunks' core pixels (ties: the smaller class id);
    ``score`` float64, the core-pixel-weighted mean of the chunks' scores of the object
    (``sum(score_c * pixels_c) / sum(pixels_c)``); ``pixel_count`` int64; ``centroid`` (n,
    ndim) float64 mean scene index; ``bbox_min``/``bbox_max`` (n, ndim) int64 inclusive;
    ``area_m2`` float64 (NaN when unknown); ``band_means`` (n, C) float64 or None when the
    chunks had no band sums.
    """
    rows: dict[str, list[np.ndarray]] = {k: [] for k in ("id", "class_id", "score", "count", "sums", "lo", "hi",
                                                         "area", "bands")}
    has_bands = True
    ndim = None
    for chunk in chunks:
        local = chunk.core_local
        if not len(local):
            continue
        ndim = chunk.ndim
        i = local - 1
        rows["id"].append(local.astype(np.uint64) + np.uint64(chunk.id_offset))
        rows["class_id"].append(chunk.class_id[i])
        rows["score"].append(chunk.score[i].astype(np.float64))
        rows["count"].append(chunk.core_pixels[i])
        rows["sums"].append(chunk.sums[i])
        rows["lo"].append(chunk.bbox_min[i])
        rows["hi"].append(chunk.bbox_max[i])
        rows["area"].append(chunk.area_m2[i])
        if chunk.band_sums is None:
            has_bands = False
        else:
            rows["bands"].append(chunk.band_sums[i])
    if ndim is None:
        return _no_instances()
    provisional = np.concatenate(rows["id"])
    keys = np.fromiter(relabel.keys(), dtype=np.uint64, count=len(relabel))
    finals = np.fromiter(relabel.values(), dtype=np.uint64, count=len(relabel))
    final = apply_relabel(provisional, keys, finals)
    instance_id, inv = np.unique(final, return_inverse=True)
    n = len(instance_id)
    count = np.concatenate(rows["count"])
    class_id = np.concatenate(rows["class_id"])
    score = np.concatenate(rows["score"])
    pixels = np.bincount(inv, weights=count, minlength=n).astype(np.int64)
    votes = np.zeros((n, max(n_classes, int(class_id.max()) + 1)), dtype=np.int64)
    np.add.at(votes, (inv, class_id.astype(np.intp)), count)
    sums = np.concatenate(rows["sums"])
    lo = np.full((n, ndim), np.iinfo(np.int64).max, dtype=np.int64)
    hi = np.full((n, ndim), -1, dtype=np.int64)
    np.minimum.at(lo, inv, np.concatenate(rows["lo"]))
    np.maximum.at(hi, inv, np.concatenate(rows["hi"]))
    area = np.concatenate(rows["area"])
    out = {
        "instance_id": instance_id,
        "class_id": votes.argmax(axis=1).astype(np.uint8),
        "score": np.bincount(inv, weights=score * count, minlength=n) / pixels,
        "pixel_count": pixels,
        "centroid": np.stack([np.bincount(inv, weights=sums[:, k], minlength=n) for k in range(ndim)], axis=1)
        / pixels[:, None],
        "bbox_min": lo,
        "bbox_max": hi,
        "area_m2": np.bincount(inv, weights=area, minlength=n),  # NaN anywhere in a set stays NaN
        "band_means": None,
    }
    if has_bands and rows["bands"]:
        bands = np.concatenate(rows["bands"])
        out["band_means"] = np.stack([np.bincount(inv, weights=bands[:, c], minlength=n)
                                      for c in range(bands.shape[1])], axis=1) / pixels[:, None]
    return out


def _no_instances() -> dict[str, np.ndarray | None]:
    return {"instance_id": np.zeros(0, np.uint64), "class_id": np.zeros(0, np.uint8), "score": np.zeros(0),
            "pixel_count": np.zeros(0, np.int64), "centroid": np.zeros((0, 2)), "bbox_min": np.zeros((0, 2), np.int64),
            "bbox_max": np.zeros((0, 2), np.int64), "area_m2": np.zeros(0), "band_means": None}

