"""Partial region statistics of one chunk core: what a chunk computes from its labels (actor side).

A *region* is a maximal set of pixels (voxels) of the same class connected through all their
neighbours: 8 in 2D, 26 in 3D (``skimage.measure.label(classes, background=nodata,
connectivity=ndim)`` on the whole scene). The scene is never labelled whole. Each chunk core is
labelled alone (:func:`label_chunk`) with ids made disjoint across chunks by an integer offset
(:func:`region_id_offset`), and reduced to a small table of *partial* statistics plus the ids
on its ``2 * ndim`` faces (:func:`chunk_regions`, :class:`ChunkRegions`; persisted with
:meth:`ChunkRegions.to_npz`). The driver merges them (``pipelines.stats.merge``).

The faces are enough to find every pair of ids that touch across chunk faces, edges and
corners: the voxels along a chunk edge or at a chunk corner lie on (several of) its faces.

Coordinates are voxel indices in the scene, one per axis, inclusive bounds. Axes are named
``(row, col)`` in 2D and ``(plane, row, col)`` in 3D (:func:`axis_names`); per-axis arrays are
named ``<stat>_<axis>`` (``sum_row``, ``min_plane``, ...).

This module imports neither scipy nor Ray: the actors that compute partials start faster.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import cc3d
import numpy as np

from schemas.checks import as_int
from schemas.store import NODATA_CLASS

__all__ = [
    "NPZ_FORMAT_VERSION",
    "ChunkRegions",
    "axis_names",
    "chunk_regions",
    "face_names",
    "label_chunk",
    "region_array_dtypes",
    "region_id_offset",
]

#: Version of the ``.npz`` layout written by :meth:`ChunkRegions.to_npz` (2D and 3D alike).
NPZ_FORMAT_VERSION = 1

#: Dimensions supported by labelling (cc3d labels 2D and 3D arrays).
SUPPORTED_NDIM = (2, 3)

INT64_MAX = int(np.iinfo(np.int64).max)

#: Name of the per-region ellipsoidal area (m², float64, NaN where unknown). Added to the npz
#: layout without a version bump: files written before it read back with NaN areas.
AREA_M2 = "area_m2"
#: Name of the per-region sum of the input's first channel over the region's voxels (float64,
#: NaN where the chunk had no values: 2D scenes, old files). Divided by the voxel count it is the
#: region's mean input intensity (HU for CT). Added like AREA_M2, without a version bump.
VALUE_SUM = "sum_value"
#: Float sums that may be unknown (NaN) and that files written before them lack.
LATER_SUMS = (AREA_M2, VALUE_SUM)

_AXIS_NAMES = {2: ("row", "col"), 3: ("plane", "row", "col")}
# (lo, hi) face names per axis; the 2D names are those of the 2D-only format (same npz keys)
_FACE_NAMES = {
    2: (("edge_top", "edge_bottom"), ("edge_left", "edge_right")),
    3: (("face_plane_lo", "face_plane_hi"), ("face_row_lo", "face_row_hi"), ("face_col_lo", "face_col_hi")),
}
# cc3d's connectivity for full connectivity (every neighbour sharing a face, edge or corner)
_FULL_CONNECTIVITY = {2: 8, 3: 26}


def _check_ndim(ndim: object) -> int:
    if ndim not in SUPPORTED_NDIM or isinstance(ndim, bool):
        raise ValueError(f"ndim must be one of {SUPPORTED_NDIM}, got {ndim!r}")
    return int(ndim)  # type: ignore[arg-type]


def axis_names(ndim: int) -> tuple[str, ...]:
    """Names of the axes of an ``ndim``-D chunk: ``("row", "col")`` or ``("plane", "row", "col")``."""
    return _AXIS_NAMES[_check_ndim(ndim)]


def face_names(ndim: int) -> tuple[tuple[str, str], ...]:
    """``(lo, hi)`` names of the face arrays of :class:`ChunkRegions`, one pair per axis.

    2D: ``edge_top``/``edge_bottom`` (first/last row), ``edge_left``/``edge_right`` (first/last
    column). 3D: ``face_<axis>_lo``/``face_<axis>_hi``.
    """
    return _FACE_NAMES[_check_ndim(ndim)]


@functools.lru_cache(maxsize=None)
def region_array_dtypes(ndim: int) -> Mapping[str, np.dtype]:
    """name -> dtype of the per-region arrays of an ``ndim``-D :class:`ChunkRegions`, in field order.

    ``ids`` int64, ``class_id`` uint8, ``pixel_count`` int64, then per axis ``sum_<axis>`` float64,
    ``min_<axis>``, ``max_<axis>`` and ``first_<axis>`` int64, then ``area_m2`` float64. In 2D: ids,
    class_id, pixel_count, sum_row, sum_col, min_row, min_col, max_row, max_col, first_row,
    first_col, area_m2.
    """
    axes = axis_names(ndim)
    out = {"ids": np.dtype(np.int64), "class_id": np.dtype(np.uint8), "pixel_count": np.dtype(np.int64)}
    out |= {f"sum_{a}": np.dtype(np.float64) for a in axes}
    for stat in ("min", "max", "first"):
        out |= {f"{stat}_{a}": np.dtype(np.int64) for a in axes}
    out[AREA_M2] = np.dtype(np.float64)
    out[VALUE_SUM] = np.dtype(np.float64)
    return MappingProxyType(out)


def as_index_tuple(value: object, what: str, *, minimum: int, ndim: int | None = None) -> tuple[int, ...]:
    """``value`` as a tuple of 2 or 3 ints >= minimum (``ndim`` of them if given); ValueError otherwise."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence | np.ndarray):
        raise ValueError(f"{what} must be a tuple of integers, got {value!r}")
    out = tuple(as_int(v, f"{what} entry") for v in value)
    if len(out) not in SUPPORTED_NDIM or (ndim is not None and len(out) != ndim) or min(out) < minimum:
        need = f"{ndim}" if ndim is not None else " or ".join(map(str, SUPPORTED_NDIM))
        raise ValueError(f"{what} must be {need} integers >= {minimum}, got {value!r}")
    return out


def frozen_array(value: object, name: str, dtype: np.dtype, owner: str, shape: tuple[int, ...] | None = None
                 ) -> np.ndarray:
    """A read-only view of ``value``, which must already have ``dtype`` (no silent casts) and be
    1-D (or have ``shape`` when given)."""
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{owner}.{name} must be a numpy array, got {type(value).__name__}")
    if value.dtype != dtype or (value.ndim != 1 if shape is None else value.shape != shape):
        want = "1-D" if shape is None else f"of shape {shape}"
        raise ValueError(f"{owner}.{name} must be {want} {dtype}, got {value.shape} {value.dtype}")
    view = value.view()
    view.flags.writeable = False
    return view


class ArrayRecord:
    """Frozen record of named read-only arrays: ``record.<name>`` reads ``record.arrays[name]``.

    Subclasses are frozen dataclasses with an ``arrays`` field; equality compares every field,
    arrays by dtype and value.
    """

    arrays: Mapping[str, np.ndarray]

    def __getattr__(self, name: str) -> Any:
        arrays = self.__dict__.get("arrays")  # absent while unpickling: no recursion
        if arrays is not None and not name.startswith("_") and name in arrays:
            return arrays[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __eq__(self, other: object) -> bool:
        if type(self) is not type(other):
            return NotImplemented
        for key, x in self.__dict__.items():
            y = other.__dict__[key]
            if key == "arrays":
                if x.keys() != y.keys() or any(
                        x[k].dtype != y[k].dtype
                        or not np.array_equal(x[k], y[k], equal_nan=x[k].dtype.kind == "f") for k in x):
                    return False
            elif x != y:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple:
        fields = {k: v for k, v in self.__dict__.items() if k != "arrays"}
        return (_rebuild, (type(self), fields, dict(self.arrays)))


def _rebuild(cls: type, fields: dict[str, Any], arrays: dict[str, np.ndarray]) -> Any:
    return cls(**fields, arrays=arrays)


def save_npz_atomic(path: Path, payload: Mapping[str, np.ndarray], *, compressed: bool = False) -> None:
    """Write `payload` as `path` (.npz, no pickles, mode 0644), atomically and durably: a
    temporary file beside it, fsync, then rename; a reader sees the old file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            (np.savez_compressed if compressed else np.savez)(f, allow_pickle=False, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True, eq=False, kw_only=True)
class ChunkRegions(ArrayRecord):
    """Partial region statistics of one chunk core, and the region ids on its faces.

    Regions here are the connected components *within the chunk*; one scene region cut by chunk
    borders has one entry in each chunk it touches. All coordinates are scene voxel indices.
    The arrays (read as attributes: ``part.ids``, ``part.sum_row``, ``part.edge_top``) are
    read-only views and must already have the dtypes below.

    Attributes:
        chunk_index: ``(i, j)`` or ``(i, j, k)`` index of the chunk in the chunk grid.
        origin: scene index of the first voxel of the chunk core, one entry per axis.
        shape: ``(H, W)`` or ``(D, H, W)`` size of the chunk core.
        arrays: Per region (``N`` regions, see :func:`region_array_dtypes`):
            ``ids`` int64 region ids, > 0, unique across the scene (:func:`region_id_offset`);
            ``class_id`` uint8; ``pixel_count`` int64 voxels in this chunk, >= 1;
            ``sum_<axis>`` float64 sum of the scene indices along the axis of the region's
            voxels (exact integers below 2**53); ``min_<axis>``/``max_<axis>`` int64 bbox,
            inclusive; ``first_<axis>`` int64 the region's first voxel in raster (C) order
            (``first`` along axis 0 equals ``min`` there); ``area_m2`` float64 sum of the
            ellipsoidal areas of the region's pixels in m², >= 0, or NaN when unknown (no CRS,
            3D volumes).
            Per face (:func:`face_names`): int64 region id of each voxel of the core's first
            (``lo``) or last (``hi``) layer along the axis, 0 for nodata, of the core's shape
            without that axis (2D: ``edge_top``/``edge_bottom`` ``(W,)``, ``edge_left``/
            ``edge_right`` ``(H,)``).
    """

    chunk_index: tuple[int, ...]
    origin: tuple[int, ...]
    shape: tuple[int, ...]
    arrays: Mapping[str, np.ndarray]

    def __post_init__(self) -> None:
        owner = "ChunkRegions"
        shape = as_index_tuple(self.shape, f"{owner}.shape", minimum=1)
        ndim = len(shape)
        index = as_index_tuple(self.chunk_index, f"{owner}.chunk_index", minimum=0, ndim=ndim)
        origin = as_index_tuple(self.origin, f"{owner}.origin", minimum=0, ndim=ndim)
        object.__setattr__(self, "chunk_index", index)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "shape", shape)
        where = f"{owner} of chunk {index}"
        if not isinstance(self.arrays, Mapping):
            raise ValueError(f"{where}: arrays must be a mapping of names to arrays, got {type(self.arrays).__name__}")
        per_region = region_array_dtypes(ndim)
        faces = {name: shape[:k] + shape[k + 1:] for k, pair in enumerate(face_names(ndim)) for name in pair}
        expected = [*per_region, *faces]
        if sorted(self.arrays) != sorted(expected):
            raise ValueError(f"{where}: arrays must be {expected}, got {sorted(self.arrays)}")
        arrays = {name: frozen_array(self.arrays[name], name, dt, owner) for name, dt in per_region.items()}
        arrays |= {name: frozen_array(self.arrays[name], name, np.dtype(np.int64), owner, face_shape)
                   for name, face_shape in faces.items()}
        object.__setattr__(self, "arrays", MappingProxyType(arrays))
        ids, count = arrays["ids"], arrays["pixel_count"]
        n = len(ids)
        lengths = {name: len(arrays[name]) for name in per_region}
        if set(lengths.values()) != {n}:
            raise ValueError(f"{where}: per-region arrays differ in length: {lengths}")
        if n and ids.min() <= 0:
            raise ValueError(f"{where}: ids must be > 0, got {ids.min()}")
        if len(np.unique(ids)) != n:
            raise ValueError(f"{where}: ids are not unique")
        if n and count.min() < 1:
            raise ValueError(f"{where}: pixel_count must be >= 1, got {count.min()}")
        area = arrays[AREA_M2]
        if n and not (np.isnan(area) | (area >= 0)).all():
            raise ValueError(f"{where}: area_m2 must be >= 0 or NaN, got {area[~np.isnan(area)].min()}")
        inside = np.ones(n, dtype=bool)
        for k, (axis, o, size) in enumerate(zip(axis_names(ndim), origin, shape, strict=True)):
            lo, hi, first, total = (arrays[f"{s}_{axis}"] for s in ("min", "max", "first", "sum"))
            inside &= (o <= lo) & (lo <= hi) & (hi < o + size) & (total >= count * lo) & (total <= count * hi)
            inside &= (first == lo) if k == 0 else ((lo <= first) & (first <= hi))
        if not inside.all():
            k = int(np.flatnonzero(~inside)[0])
            detail = ", ".join(f"{name} {arrays[name][k]}" for name in per_region if name != "ids")
            raise ValueError(
                f"{where}: region {ids[k]} has inconsistent bounds or sums ({detail}) for a core at {origin} of {shape}"
            )
        edges = np.concatenate([arrays[name].ravel() for name in faces])
        stray = edges[(edges != 0) & ~np.isin(edges, ids)]
        if stray.size:
            raise ValueError(f"{where}: border ids {np.unique(stray)[:5].tolist()} are not among the region ids")

    @property
    def ndim(self) -> int:
        """Number of axes of the chunk (2 or 3)."""
        return len(self.shape)

    def __len__(self) -> int:
        """Number of regions in the chunk."""
        return len(self.arrays["ids"])

    def face(self, axis: int, hi: bool) -> np.ndarray:
        """The ids of the core's last (``hi``) or first layer along ``axis``: the chunk's shape
        without that axis, int64, 0 for nodata."""
        return self.arrays[face_names(self.ndim)[axis][int(hi)]]

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (the size of this chunk's contribution to the merge)."""
        return sum(a.nbytes for a in self.arrays.values())

    def to_npz(self, path: str | os.PathLike[str]) -> None:
        """Write to an uncompressed ``.npz`` file atomically (temp file in the same folder, then rename).

        Keys: the per-region arrays, the faces, ``format_version``, ``chunk_index``, ``origin``,
        ``shape`` (the 2D keys and arrays are those of the 2D-only format before 3D support, plus
        ``area_m2``).

        Args:
            path: Destination file; replaced if it exists. Its folder must exist.
        """
        path = Path(path)
        names = (*region_array_dtypes(self.ndim), *(n for pair in face_names(self.ndim) for n in pair))
        payload: dict[str, np.ndarray] = {name: self.arrays[name] for name in names}
        payload |= {
            "format_version": np.int64(NPZ_FORMAT_VERSION),
            "chunk_index": np.asarray(self.chunk_index, dtype=np.int64),
            "origin": np.asarray(self.origin, dtype=np.int64),
            "shape": np.asarray(self.shape, dtype=np.int64),
        }
        save_npz_atomic(path, payload)

    @classmethod
    def from_npz(cls, path: str | os.PathLike[str]) -> ChunkRegions:
        """Read a file written by :meth:`to_npz`; the result equals what was written.

        Raises:
            ValueError: If the file lacks fields, has another format version or fails validation
                (the message names the file).
        """
        with np.load(path, allow_pickle=False) as npz:
            meta_names = ("format_version", "chunk_index", "origin", "shape")
            missing = [name for name in meta_names if name not in npz.files]
            ndim = len(npz["shape"]) if "shape" in npz.files else None
            if ndim not in SUPPORTED_NDIM:
                if "shape" not in missing:
                    missing.append("shape")
                names: tuple[str, ...] = ()
            else:
                names = (*region_array_dtypes(ndim), *(n for pair in face_names(ndim) for n in pair))
            # area_m2 came later in the same format version: files without it have unknown areas
            missing += [name for name in names if name not in npz.files and name not in LATER_SUMS]
            if missing:
                raise ValueError(f"{os.fspath(path)}: not a ChunkRegions file, missing {missing}")
            version = int(npz["format_version"])
            if version != NPZ_FORMAT_VERSION:
                raise ValueError(
                    f"{os.fspath(path)}: ChunkRegions format version {version}, this tessera reads {NPZ_FORMAT_VERSION}"
                )
            arrays = {name: npz[name] for name in names if name in npz.files}
            for later in LATER_SUMS if names else ():
                if later not in npz.files:
                    arrays[later] = np.full(len(arrays["ids"]), np.nan)
            meta = {name: tuple(int(v) for v in npz[name]) for name in ("chunk_index", "origin", "shape")}
        try:
            return cls(**meta, arrays=arrays)  # type: ignore[arg-type]
        except ValueError as error:
            raise ValueError(f"{os.fspath(path)}: {error}") from error


def region_id_offset(chunk_index: Sequence[int], grid_shape: Sequence[int], chunk_shape: Sequence[int]) -> int:
    """Offset that makes region ids disjoint across chunks.

    ``offset = linear_index * (prod(chunk_shape) + 1)``, with ``linear_index`` the C-order
    position of ``chunk_index`` in the grid. A chunk has at most ``prod(chunk_shape)`` regions,
    labelled 1.., so its ids ``offset + 1 .. offset + prod(chunk_shape)`` never meet another
    chunk's.

    Args:
        chunk_index: Index of the chunk in the grid, one entry per axis.
        grid_shape: Chunks per axis (``pipelines.plan.chunks.chunk_grid_shape``).
        chunk_shape: Regular chunk size in pixels per axis (edge chunks may be smaller).

    Returns:
        The offset, a Python int that fits int64 together with every id of the scene.

    Raises:
        ValueError: On mismatched axes, an index off the grid, or ids that would overflow int64.
    """
    index = tuple(as_int(v, "chunk_index entry") for v in chunk_index)
    grid = tuple(as_int(v, "grid_shape entry") for v in grid_shape)
    chunk = tuple(as_int(v, "chunk_shape entry") for v in chunk_shape)
    if not (len(index) == len(grid) == len(chunk)) or not index:
        raise ValueError(f"chunk_index {index}, grid_shape {grid} and chunk_shape {chunk} must have the same axes")
    if min(grid) < 1 or min(chunk) < 1:
        raise ValueError(f"grid_shape {grid} and chunk_shape {chunk} must be > 0")
    if any(not 0 <= i < g for i, g in zip(index, grid, strict=True)):
        raise ValueError(f"chunk_index {index} is off the grid {grid}")
    per_chunk = math.prod(chunk) + 1
    if math.prod(grid) * per_chunk > INT64_MAX:
        raise ValueError(f"region ids of a {grid} grid of {chunk} chunks overflow int64; use smaller scenes or chunks")
    linear = 0
    for i, g in zip(index, grid, strict=True):
        linear = linear * g + i
    return linear * per_chunk


def _check_classes(classes: object, nodata: object) -> tuple[np.ndarray, int]:
    if (not isinstance(classes, np.ndarray) or classes.dtype != np.uint8 or classes.ndim not in SUPPORTED_NDIM
            or classes.size == 0):
        if isinstance(classes, np.ndarray):
            desc = f"{classes.ndim}-D {classes.dtype} {classes.shape}"
        else:
            desc = type(classes).__name__
        raise ValueError(f"classes must be a non-empty 2-D (H, W) or 3-D (D, H, W) uint8 array, got {desc}")
    value = as_int(nodata, "nodata")
    if not 0 <= value <= 255:
        raise ValueError(f"nodata must be a uint8 value 0..255, got {nodata!r}")
    return classes, value


def label_chunk(classes: np.ndarray, *, id_offset: int, nodata: int = NODATA_CLASS) -> np.ndarray:
    """Label the connected regions of each class in one chunk core, with scene-unique ids.

    The regions of ``skimage.measure.label(classes, background=nodata, connectivity=ndim)``
    (full connectivity: 8 neighbours in 2D, 26 in 3D), with local labels 1..N in raster order
    of the regions' first voxels (in 2D exactly skimage's labels; its 3D numbering differs),
    plus ``id_offset`` where the label is > 0, and 0 on nodata.

    Args:
        classes: ``(H, W)`` or ``(D, H, W)`` uint8 class of each voxel of the core.
        id_offset: From :func:`region_id_offset`; >= 0.
        nodata: Class value that belongs to no region.

    Returns:
        int64 region ids of the shape of ``classes``, 0 on nodata.

    Raises:
        ValueError: On a bad array, nodata value or offset.
    """
    classes, nodata = _check_classes(classes, nodata)
    offset = as_int(id_offset, "id_offset")
    if offset < 0 or offset + classes.size > INT64_MAX:
        raise ValueError(f"id_offset must be >= 0 and leave room for {classes.size} ids in int64, got {id_offset!r}")
    local = _label_local(classes, nodata).astype(np.int64)
    if offset:
        local[local > 0] += offset
    return local


def _label_local(classes: np.ndarray, nodata: int) -> np.ndarray:
    """Local labels 1..N of the fully connected same-class regions of a checked 2-D or 3-D
    uint8 array, numbered in raster order of their first voxel, 0 on nodata: the regions of
    ``skimage.measure.label(classes, background=nodata, connectivity=classes.ndim)``, and in 2D
    exactly its labels (tested against both).

    cc3d (connected-components-3d) labels all classes in one pass: 1.6 ms for a 1024² chunk
    against skimage's 15 ms (measured on the 2-core development VM). It takes 0 as background,
    so classes are shifted by one with nodata moved to 0 (uint8 wraps 255 to 0 for free).
    Returns uint32 (uint64 past 2**32 - 1 pixels).
    """
    if nodata == 255:
        shifted = classes + np.uint8(1)
    else:
        shifted = classes.astype(np.uint16) + np.uint16(1)
        shifted[classes == nodata] = 0
    out_dtype = np.uint32 if classes.size < 2**32 else np.uint64
    return cc3d.connected_components(shifted, connectivity=_FULL_CONNECTIVITY[classes.ndim], out_dtype=out_dtype)


def chunk_regions(
    classes: np.ndarray,
    *,
    chunk_index: tuple[int, ...],
    origin: tuple[int, ...],
    id_offset: int,
    nodata: int = NODATA_CLASS,
    labels: np.ndarray | None = None,
    pixel_area_m2_by_row: np.ndarray | None = None,
    values: np.ndarray | None = None,
) -> ChunkRegions:
    """Partial statistics of the regions of one chunk core.

    Per local region ``k`` (voxels ``P_k``): ``pixel_count = |P_k|``, per axis ``a``
    ``sum_a = sum(origin[a] + p[a] for p in P_k)``, bbox and first voxel in scene indices,
    ``area_m2 = sum(pixel_area_m2_by_row[p[0]] for p in P_k)``; plus the ids on the
    ``2 * ndim`` faces of the core. Counts, sums and boxes of its own labelling come from one
    ``cc3d.statistics`` pass; caller-supplied labels take bincounts and a sort (tested equal).
    The area is a weighted bincount over the runs of one label along the rows (weight: run
    length times the row's pixel area), 1-3 ms of a 1024² chunk.

    Args:
        classes: ``(H, W)`` or ``(D, H, W)`` uint8 classes of the chunk core (no halo).
        chunk_index: Index of the chunk in the grid, one entry per axis.
        origin: Scene index of the core's first voxel, one entry per axis.
        id_offset: From :func:`region_id_offset`.
        nodata: Class value that belongs to no region.
        labels: int64 ids of the shape of ``classes`` from ``label_chunk(classes,
            id_offset=id_offset, nodata=nodata)`` if the caller already has them (e.g. to write an
            instance mask); labelled here otherwise.
        pixel_area_m2_by_row: 2D only: ``(H,)`` float64 area in m² of one pixel in each row of
            the core, finite and >= 0 (``pipelines.georef.scene_row_areas_m2``). None: every
            region's ``area_m2`` is NaN (a scene without a usable CRS, or a 3D volume: volumes
            have no m² here).
        values: float32 or float64 of the shape of ``classes``: one input value per voxel (the
            first channel of the chunk's input, e.g. HU), summed per region into ``sum_value``;
            None: NaN.

    Returns:
        The chunk's :class:`ChunkRegions`, regions in order of their ids.

    Raises:
        ValueError: On bad arguments, or ``labels`` that do not fit ``classes`` and ``id_offset``.
    """
    classes, nodata = _check_classes(classes, nodata)
    offset = as_int(id_offset, "id_offset")
    shape = classes.shape
    ndim = classes.ndim
    origin = as_index_tuple(origin, "origin", minimum=0, ndim=ndim)
    row_areas = _check_row_areas(pixel_area_m2_by_row, shape)
    if labels is None and not (classes != nodata).any():  # e.g. a chunk skipped as wholly nodata
        return _no_regions(chunk_index, origin, shape)
    if labels is None:
        if offset < 0 or offset + classes.size > INT64_MAX:
            raise ValueError(f"id_offset must be >= 0 and leave room for {classes.size} ids in int64, got {id_offset!r}")
        local = _label_local(classes, nodata)  # 1..N in raster order, uint32
    else:
        local = _local_labels(classes, labels, offset, nodata)
    flat = local.ravel()
    n = int(flat.max()) if flat.size else 0
    if labels is None and 0 < n < flat.size and max(shape) < 2**16 - 1:
        present, count, sums, boxes = _moments_cc3d(local, n)
    else:
        present, count, sums, boxes = _moments(local, n)
    first = _first_positions(flat, present)
    class_id = classes.ravel()[first]
    if labels is not None:
        cls_of = np.zeros(n + 1, dtype=np.uint8)
        cls_of[present] = class_id
        valid = flat > 0
        if not np.array_equal(cls_of[flat][valid], classes.ravel()[valid]):
            raise ValueError("labels must not join pixels of different classes")

    def edge(values: np.ndarray) -> np.ndarray:
        return np.where(values > 0, values.astype(np.int64) + offset, 0)

    axes = axis_names(ndim)
    first_index = np.unravel_index(first, shape)
    arrays: dict[str, np.ndarray] = {"ids": present.astype(np.int64) + offset, "class_id": class_id,
                                     "pixel_count": count}
    arrays |= {f"sum_{a}": sums[:, k] + count * float(origin[k]) for k, a in enumerate(axes)}
    arrays |= {f"min_{a}": boxes[:, 2 * k] + origin[k] for k, a in enumerate(axes)}
    arrays |= {f"max_{a}": boxes[:, 2 * k + 1] + origin[k] for k, a in enumerate(axes)}
    arrays |= {f"first_{a}": first_index[k].astype(np.int64) + origin[k] for k, a in enumerate(axes)}
    arrays[AREA_M2] = _areas_m2(flat, n, present, row_areas, shape)
    arrays[VALUE_SUM] = _value_sums(flat, n, present, values, shape)
    for k, (lo, hi) in enumerate(face_names(ndim)):
        arrays[lo] = edge(np.take(local, 0, axis=k))
        arrays[hi] = edge(np.take(local, -1, axis=k))
    return ChunkRegions(chunk_index=chunk_index, origin=origin, shape=shape, arrays=arrays)


def _value_sums(flat: np.ndarray, n: int, present: np.ndarray, values: np.ndarray | None,
                shape: tuple[int, ...]) -> np.ndarray:
    """Per label in ``present``: the sum of ``values`` over its voxels (float64), NaN without values."""
    if values is None:
        return np.full(len(present), np.nan)
    if not isinstance(values, np.ndarray) or values.shape != shape or values.dtype.kind != "f":
        desc = f"{values.dtype} {values.shape}" if isinstance(values, np.ndarray) else type(values).__name__
        raise ValueError(f"values must be a float array of the chunk's shape {shape}, got {desc}")
    return np.bincount(flat, weights=values.ravel().astype(np.float64, copy=False), minlength=n + 1)[present]


def _check_row_areas(value: object, shape: tuple[int, ...]) -> np.ndarray | None:
    """``pixel_area_m2_by_row`` checked against a chunk core of ``shape``: None, or (H,) float64
    finite >= 0 of a 2D core; ValueError otherwise."""
    if value is None:
        return None
    if len(shape) != 2:
        raise ValueError(f"pixel_area_m2_by_row is for 2D chunks only, got a chunk of shape {shape} "
                         "(pass None: volumes have no m² areas)")
    if not isinstance(value, np.ndarray) or value.dtype != np.float64 or value.shape != shape[:1]:
        desc = f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
        raise ValueError(f"pixel_area_m2_by_row must be float64 of shape {shape[:1]} (one per row), got {desc}")
    if not (np.isfinite(value).all() and (value >= 0).all()):
        raise ValueError(f"pixel_area_m2_by_row must be finite and >= 0, got min {value.min()} max {value.max()}")
    return value


def _areas_m2(flat: np.ndarray, n: int, present: np.ndarray, row_areas: np.ndarray | None,
              shape: tuple[int, ...]) -> np.ndarray:
    """Per label in ``present``: the sum of the pixel areas of its pixels (float64 m²), NaN
    without ``row_areas``. ``flat``: the 2D core's local labels 0..n in raster order.

    Summed over runs of one label along a row (``run length * row area``, one weighted
    bincount over the runs) rather than pixel by pixel: a bincount with per-pixel weights
    spends 8-9 ms of a 1024² chunk of large regions (long chains of adds to one bin), the runs
    about 1 ms; 5 ms on a fragmented 45k-region chunk, where a per-pixel bincount takes 3
    (measured on the 2-core development VM).
    """
    if row_areas is None:
        return np.full(len(present), np.nan)
    width = shape[1]
    starts = np.empty(flat.size, dtype=bool)
    starts[0] = True
    np.not_equal(flat[1:], flat[:-1], out=starts[1:])
    starts[::width] = True  # a run ends with its row
    first = np.flatnonzero(starts)
    lengths = np.diff(first, append=flat.size)
    return np.bincount(flat[first], weights=lengths * row_areas[first // width], minlength=n + 1)[present]


def _moments_cc3d(local: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """`_moments` of consecutive labels 1..n (our own labelling: every label is present) in one
    C++ pass (`cc3d.statistics`): 5.9 ms for a 1024² chunk against 19 ms for bincounts and
    find_objects (measured on the 2-core development VM).

    cc3d returns centroids (sum / count in float64); the sums of integer coordinates are below
    2**53, so rint(centroid * count) gives them back exactly (tested against `_moments`).
    Labels must be < the voxel count and sides < 65535 (cc3d's uint16 boxes): the caller checks.
    """
    stats = cc3d.statistics(local, no_slice_conversion=True)
    count = stats["voxel_counts"][1:n + 1].astype(np.int64)
    sums = np.rint(stats["centroids"][1:n + 1].reshape(n, local.ndim) * count[:, None])
    # (min, max) inclusive per axis, in axis order
    boxes = stats["bounding_boxes"][1:n + 1].astype(np.int64).reshape(n, 2 * local.ndim)
    return np.arange(1, n + 1, dtype=np.int64), count, sums, boxes


def _moments(local: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """(present, count, sums, boxes) of the labels 1..n present in `local` (any labels).

    present: the labels in use (sorted); count: their voxel counts (int64); sums: ``(N, ndim)``
    float64 sums of chunk-local indices per axis (exact); boxes: ``(N, 2 * ndim)`` int64
    ``(min_0, max_0, min_1, max_1, ...)`` inclusive.
    """
    flat = local.ravel().astype(np.intp, copy=False)  # once: bincount would convert on each call
    counts = np.bincount(flat, minlength=n + 1)
    present = np.flatnonzero(counts[1:]) + 1
    count = counts[present].astype(np.int64)
    coords = _grid_indices(local.shape)
    # float64 weights (cached: bincount would convert int64 weights on every call); exact below 2**53
    sums = np.stack([np.bincount(flat, weights=c, minlength=n + 1)[present] for c in coords], axis=1)
    # bounding boxes: sort the voxels by label, then min/max per run of one label
    order = np.argsort(flat, kind="stable")
    starts = np.searchsorted(flat[order], present)
    boxes = np.empty((len(present), 2 * local.ndim), dtype=np.int64)
    for k, c in enumerate(coords):
        by_label = c[order]
        boxes[:, 2 * k] = np.minimum.reduceat(by_label, starts) if len(present) else []
        boxes[:, 2 * k + 1] = np.maximum.reduceat(by_label, starts) if len(present) else []
    return present.astype(np.int64), count, sums.reshape(-1, local.ndim), boxes


def _no_regions(chunk_index: tuple[int, ...], origin: tuple[int, ...], shape: tuple[int, ...]) -> ChunkRegions:
    """The partials of a wholly nodata chunk core: no regions, zero ids on every face. The
    general path takes about 20 ms of a 1024² chunk to find that out (52 of the 256 chunks of
    the 16384² bench scene)."""
    ndim = len(shape)
    arrays = {name: np.zeros(0, dtype=dt) for name, dt in region_array_dtypes(ndim).items()}
    for k, pair in enumerate(face_names(ndim)):
        arrays |= {name: np.zeros(shape[:k] + shape[k + 1:], dtype=np.int64) for name in pair}
    return ChunkRegions(chunk_index=chunk_index, origin=origin, shape=shape, arrays=arrays)


def _local_labels(classes: np.ndarray, labels: object, offset: int, nodata: int) -> np.ndarray:
    """Caller-supplied scene ids -> local labels 1..size (0 on nodata), checked against classes."""
    size = classes.size
    if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.shape != classes.shape:
        desc = f"{labels.dtype} {labels.shape}" if isinstance(labels, np.ndarray) else type(labels).__name__
        raise ValueError(f"labels must be int64 of the classes' shape {classes.shape}, got {desc}")
    valid = labels > 0
    if not np.array_equal(valid, classes != nodata):
        raise ValueError(f"labels must be > 0 exactly where classes != nodata ({nodata})")
    local = np.where(valid, labels - offset, 0)
    if valid.any() and not (1 <= local[valid].min() and local.max() <= size):
        raise ValueError(f"labels must lie in id_offset + 1 .. id_offset + {size} = {offset + 1} .. {offset + size}")
    return local


def _first_positions(flat: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Raster position of the first voxel of each label in `present` (sorted, > 0).

    Labels are numbered in the raster order of their first voxel (`_label_local`), so the first
    voxels are where the running maximum of the labels steps up (one pass); checked, and found
    with np.minimum.at otherwise (e.g. for caller-supplied labels).
    """
    if flat.size:
        running = np.maximum.accumulate(flat)
        steps = np.flatnonzero(running[1:] != running[:-1]) + 1
        if flat[0] > 0:
            steps = np.concatenate(([0], steps))
        if len(steps) == len(present) and np.array_equal(flat[steps], present):
            return steps.astype(np.int64)
    first = np.full(int(present[-1]) + 1 if len(present) else 1, flat.size, dtype=np.int64)
    np.minimum.at(first, flat, np.arange(flat.size, dtype=np.int64))
    return first[present]


@functools.lru_cache(maxsize=4)
def _grid_indices(shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Per axis, the index along it of every voxel of a chunk of ``shape`` in raster order,
    float64 (exact below 2**53), read-only. Cached: every chunk of a job has one of a few shapes."""
    out = []
    for k in range(len(shape)):
        view = np.arange(shape[k], dtype=np.float64).reshape([-1 if j == k else 1 for j in range(len(shape))])
        c = np.broadcast_to(view, shape).ravel().copy()
        c.flags.writeable = False
        out.append(c)
    return tuple(out)
