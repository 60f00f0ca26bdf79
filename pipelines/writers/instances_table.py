"""A scene's instances on the driver: merge the chunks' instance files, relabel the store's
`instances` array where ids change, and write the `instances` table as GeoParquet 1.1.

Steps (:func:`write_instances`), all resumable:

1. :func:`~pipelines.stats.instances.merge_instance_ids` over the work folder's
   ``<key>.instances.npz`` files (provisional ids, never rewritten): the relabel table.
2. Each chunk whose core holds an id of the table is mapped and written back
   (:func:`relabel_chunk`); chunks whose ids are all roots are not rewritten. The table maps
   to roots only and roots map to themselves, so a chunk already relabelled by an interrupted
   run maps to itself and is not rewritten: a re-run converges to the same bytes.
3. The chunks' partials are added up through the table
   (:func:`~pipelines.stats.instances.merge_instance_stats`), and each instance's polygon is
   traced on the relabelled ids, chunk by chunk in the same pass (:class:`PolygonTracer`).
4. The table goes to ``<root>/tables/instances/<scene>.parquet`` with GeoParquet 1.1 metadata
   (:func:`geo_metadata`): WKB ``geometry`` in the scene CRS (PROJJSON), a ``bbox`` covering
   column, readable by GeoPandas, DuckDB and GDAL.

2D scenes only: volumes are refused for instance models before any chunk is computed
(``pipelines.run.scenes.prepare_scene``); the merge maths itself is n-D and tested in 3D.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import zarr

from pipelines.georef import pixel_to_crs, to_lonlat
from pipelines.stats.instances import (
    DEFAULT_IOU_THRESHOLD,
    InstanceChunk,
    InstanceIds,
    apply_relabel,
    merge_instance_ids,
    merge_instance_stats,
)
from pipelines.writers.outroot import Location, read_bytes, zarr_store
from pipelines.writers.tables import write_table_batches
from schemas.instances import INSTANCES, instances_file
from schemas.records import chunk_key
from schemas.store import GeoGrid
from schemas.tables import BBOX_TYPE, INSTANCES_SCHEMA

GEOPARQUET_VERSION = "1.1.0"
GEOMETRY_COLUMN = "geometry"
BBOX_COLUMN = "bbox"


@dataclass(frozen=True)
class InstancesSummary:
    """What the scenes table and the logs learn from a scene's instance merge.

    Attributes:
        n_instances: rows of the `instances` table (final instances).
        n_relabelled_ids: provisional ids that changed (the relabel table's size).
        n_chunks_relabelled: chunks whose core holds such an id (those the relabel reads).
        n_chunks_rewritten: of those, the chunks whose stored ids changed (0 on a re-run).
        n_matches: id pairs matched across chunk halos.
    """

    n_instances: int
    n_relabelled_ids: int
    n_chunks_relabelled: int
    n_chunks_rewritten: int
    n_matches: int


def instance_chunk_loader(work_dir: Location, *, ids_only: bool = False):
    """``index -> InstanceChunk | None``: a chunk's instance file in `work_dir` (local or S3: one
    GET into memory), None where the chunk has none (skipped as nodata); with `ids_only`, its
    :class:`InstanceIds` (what the matching reads)."""
    local = isinstance(work_dir, Path)

    def load(index: tuple[int, ...]) -> InstanceChunk | InstanceIds | None:
        path = work_dir / instances_file(chunk_key(index))
        if local and not path.is_file():
            return None
        source: Any = path
        if not local:
            try:
                source = _NamedBytes(read_bytes(path), str(path))
            except FileNotFoundError:
                return None
        return InstanceChunk.read_ids(source) if ids_only else InstanceChunk.from_npz(source)
    return load


class _NamedBytes(io.BytesIO):
    """An object's bytes as a file for ``np.load``, named by its URI (in error messages)."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name


def relabel_chunk(zarr_path: Location, chunk: InstanceChunk, keys: np.ndarray, finals: np.ndarray, *,
                  array: Any = None) -> tuple[bool, bool, np.ndarray | None]:
    """Apply the relabel table (sorted ``keys`` -> ``finals``, uint64) to one chunk of the store's
    `instances` array. A chunk without objects in its core is not read.

    Returns:
        (needed, rewritten, ids): whether the chunk's core holds a key; whether its stored ids
        changed and were written (False when an earlier run relabelled it already); the core's
        final ids (None for a chunk without objects).
    """
    core_ids = chunk.core_local.astype(np.uint64) + np.uint64(chunk.id_offset)
    if not len(core_ids):
        return False, False, None
    if array is None:
        array = zarr.open_array(zarr_store(zarr_path), path=INSTANCES, mode="r+")
    core = tuple(slice(o, o + n) for o, n in zip(chunk.core_origin, chunk.core_shape, strict=True))
    stored = array[core]
    mine = np.isin(keys, core_ids)
    if not mine.any():
        return False, False, stored
    mapped = apply_relabel(stored, keys[mine], finals[mine])
    if np.array_equal(mapped, stored):
        return True, False, stored
    array[core] = mapped
    return True, True, mapped


def write_instances(root: Location, scene: str, *, zarr_path: Location, work_dir: Location, indices: Iterable[tuple[int, ...]],
                    grid_shape: Sequence[int], grid: GeoGrid, class_names: Sequence[str],
                    iou_threshold: float = DEFAULT_IOU_THRESHOLD) -> InstancesSummary:
    """Merge, relabel and tabulate a scene's instances (the steps in the module docstring).

    Each chunk's instance file is read by the merge (up to ``1 + (3**ndim - 1) / 2`` times, two
    at a time) and once more for the relabel; each chunk of the store holding objects is read
    once (relabelled and traced in the same pass) and written only where its ids change.

    Args:
        root: the job's output root (the table goes to `<root>/tables/instances/<scene>.parquet`).
        scene: the scene's name.
        zarr_path: the scene's store, holding `instances` with every chunk written.
        work_dir: the scene's work folder with the chunks' instance files.
        indices: grid indices of the scene's chunks.
        grid_shape: chunks per axis.
        grid: the scene's 2D geometry.
        class_names: the model's classes (index = class id).
        iou_threshold: see :func:`pipelines.stats.instances.match_chunks`.

    Raises:
        ValueError: a volume grid, an unreadable instance file (named), or a store without
            `instances`.
    """
    if not isinstance(grid, GeoGrid):
        raise ValueError(f"{zarr_path}: instance tables are written for 2D scenes only, got a {type(grid).__name__}")
    indices = sorted(tuple(i) for i in indices)
    load = instance_chunk_loader(work_dir)
    merge = merge_instance_ids(indices, instance_chunk_loader(work_dir, ids_only=True), grid_shape=grid_shape,
                               iou_threshold=iou_threshold)
    keys = np.fromiter(merge.relabel.keys(), dtype=np.uint64, count=len(merge.relabel))
    finals = np.fromiter(merge.relabel.values(), dtype=np.uint64, count=len(merge.relabel))
    counts = {"needed": 0, "rewritten": 0}
    tracer = PolygonTracer()
    try:
        array = zarr.open_array(zarr_store(zarr_path), path=INSTANCES, mode="r+")
    except FileNotFoundError:
        raise ValueError(f"{zarr_path}: no `{INSTANCES}` array; the store was created for a semantic model") from None

    def relabelled() -> Iterator[InstanceChunk]:  # one chunk at a time: relabel and trace its core, hand on its partials
        for index in indices:
            chunk = load(index)
            if chunk is None:
                continue
            needed, rewritten, ids = relabel_chunk(zarr_path, chunk, keys, finals, array=array)
            counts["needed"] += needed
            counts["rewritten"] += rewritten
            if ids is not None:
                tracer.add(ids, chunk.core_origin)
            yield chunk

    stats = merge_instance_stats(relabelled(), merge.relabel, n_classes=len(class_names))
    geometries = tracer.polygons(stats["instance_id"], transform=grid.transform)
    table = instances_table(scene, stats, geometries, grid=grid, class_names=class_names)
    write_table_batches(root, "instances", scene, [table], metadata=geo_metadata(table, crs_wkt=grid.crs_wkt))
    return InstancesSummary(n_instances=table.num_rows, n_relabelled_ids=len(keys),
                            n_chunks_relabelled=counts["needed"], n_chunks_rewritten=counts["rewritten"],
                            n_matches=merge.n_matches)


class PolygonTracer:
    """The (Multi)Polygon of each instance, traced chunk by chunk on the relabelled ids.

    :meth:`add` traces one chunk core (``rasterio.features.shapes``, 4-connected parts) in pixel
    coordinates (x = column, y = row, pixel edges): integers, so the parts of an object traced in
    neighbouring chunks share their edges exactly. :meth:`polygons` dissolves each instance's
    parts (``shapely.union_all``: shared edges vanish, holes stay, parts touching at a corner or
    apart make a MultiPolygon) and maps them through the scene's affine. Each chunk is read once,
    whatever the size of its objects; the parts are held until the end (the scene's polygons,
    as the table holds them).
    """

    def __init__(self) -> None:
        self._parts: dict[int, list[Any]] = {}

    def add(self, ids: np.ndarray, origin: Sequence[int]) -> None:
        """Trace a chunk core's ids (2-D, 0 = none) whose first pixel is the scene's ``origin``
        (row, col)."""
        import rasterio.features
        import shapely
        from affine import Affine

        mask = ids > 0
        if not mask.any():
            return
        present = np.unique(ids[mask])
        compact = np.zeros(ids.shape, dtype=np.int32)  # rasterio traces int32, not uint32/64
        compact[mask] = np.searchsorted(present, ids[mask]) + 1
        at = Affine.translation(int(origin[1]), int(origin[0]))
        for geom, value in rasterio.features.shapes(compact, mask=mask, connectivity=4, transform=at):
            rings = [np.asarray(ring, dtype=np.float64) for ring in geom["coordinates"]]
            polygon = shapely.Polygon(rings[0], rings[1:])
            self._parts.setdefault(int(present[int(value) - 1]), []).append(polygon)

    def polygons(self, instance_ids: np.ndarray, *, transform: Sequence[float]) -> list[Any]:
        """The dissolved geometry of each of `instance_ids`, in CRS coordinates.

        Raises:
            ValueError: ids traced and ids given differ (a store relabelled with another table).
        """
        import shapely
        from shapely.affinity import affine_transform

        wanted = set(map(int, instance_ids))
        if wanted != set(self._parts):
            odd = sorted(wanted ^ set(self._parts))[:5]
            raise ValueError(f"instances {odd} are in the statistics or in the store but not in both: "
                             "was the store relabelled with another table?")
        a, b, c, d, e, f = transform
        out = []
        for iid in map(int, instance_ids):
            parts = self._parts[iid]
            geom = parts[0] if len(parts) == 1 else shapely.union_all(parts)
            out.append(affine_transform(geom, [a, b, d, e, c, f]))
        return out


def instances_table(scene: str, stats: dict[str, Any], geometries: Sequence[Any], *, grid: GeoGrid,
                    class_names: Sequence[str]) -> pa.Table:
    """The `instances` table of one 2D scene (schema INSTANCES_SCHEMA), rows in instance_id order.

    ``area_crs2 = pixel_count * pixel area``; centroid = mean pixel centre through the affine;
    ``bbox`` = the polygon's bounds (pixel edges); ``band_means = band_sums / pixel_count``.
    """
    import shapely

    n = len(stats["instance_id"])
    centroid = stats["centroid"]
    cx, cy = pixel_to_crs(grid.transform, centroid[:, 0] + 0.5, centroid[:, 1] + 0.5)
    lon, lat = to_lonlat(grid.crs_wkt, cx, cy)
    bounds = shapely.bounds(np.asarray(geometries, dtype=object)) if n else np.zeros((0, 4))
    names = np.asarray(class_names, dtype=object)
    bands = stats["band_means"]
    columns = {
        "scene": pa.array([scene] * n, pa.string()),
        "instance_id": pa.array(stats["instance_id"], pa.uint64()),
        "class_id": pa.array(stats["class_id"], pa.uint8()),
        "class_name": pa.array(names[stats["class_id"].astype(np.intp)] if n else [], pa.string()),
        "score": pa.array(stats["score"], pa.float64()),
        "pixel_count": pa.array(stats["pixel_count"], pa.int64()),
        "area_crs2": pa.array(stats["pixel_count"] * grid.pixel_area_crs2, pa.float64()),
        "area_m2": pa.array(stats["area_m2"], pa.float64(), from_pandas=True),  # NaN -> null
        "min_row": pa.array(stats["bbox_min"][:, 0], pa.int64()),
        "min_col": pa.array(stats["bbox_min"][:, 1], pa.int64()),
        "max_row": pa.array(stats["bbox_max"][:, 0], pa.int64()),
        "max_col": pa.array(stats["bbox_max"][:, 1], pa.int64()),
        "centroid_row": pa.array(centroid[:, 0], pa.float64()),
        "centroid_col": pa.array(centroid[:, 1], pa.float64()),
        "centroid_x_crs": pa.array(cx, pa.float64()),
        "centroid_y_crs": pa.array(cy, pa.float64()),
        "centroid_lon": pa.nulls(n, pa.float64()) if lon is None else pa.array(lon, pa.float64()),
        "centroid_lat": pa.nulls(n, pa.float64()) if lat is None else pa.array(lat, pa.float64()),
        "band_means": pa.nulls(n, pa.list_(pa.float64())) if bands is None else pa.array(list(bands),
                                                                                          pa.list_(pa.float64())),
        BBOX_COLUMN: pa.StructArray.from_arrays([pa.array(bounds[:, k], pa.float64()) for k in range(4)],
                                                fields=list(BBOX_TYPE)),
        GEOMETRY_COLUMN: pa.array(shapely.to_wkb(np.asarray(geometries, dtype=object)) if n else [], pa.binary()),
    }
    return pa.table(columns, schema=INSTANCES_SCHEMA)


def geo_metadata(table: pa.Table, *, crs_wkt: str | None) -> dict[bytes, bytes]:
    """The GeoParquet 1.1 ``geo`` file metadata of an instances table: WKB ``geometry``, its
    geometry types, the CRS as PROJJSON (null when the scene has none: "unknown", not the
    GeoParquet default OGC:CRS84), the file's bbox, and the ``bbox`` column as covering."""
    import shapely

    geometries = shapely.from_wkb(table.column(GEOMETRY_COLUMN).to_numpy(zero_copy_only=False))
    types = sorted(set(shapely.get_type_id(geometries).tolist()))
    names = {3: "Polygon", 6: "MultiPolygon"}
    column: dict[str, Any] = {
        "encoding": "WKB",
        "geometry_types": [names.get(t, shapely.GeometryType(t).name.title()) for t in types],
        "crs": _projjson(crs_wkt),
        "covering": {BBOX_COLUMN: {k: [BBOX_COLUMN, k] for k in ("xmin", "ymin", "xmax", "ymax")}},
    }
    if table.num_rows:
        box = table.column(BBOX_COLUMN).combine_chunks()
        column["bbox"] = [float(box.field(k).to_numpy().min()) for k in ("xmin", "ymin")] + [
            float(box.field(k).to_numpy().max()) for k in ("xmax", "ymax")]
    geo = {"version": GEOPARQUET_VERSION, "primary_column": GEOMETRY_COLUMN, "columns": {GEOMETRY_COLUMN: column}}
    return {b"geo": json.dumps(geo).encode()}


def _projjson(crs_wkt: str | None) -> dict[str, Any] | None:
    if not crs_wkt:
        return None
    from pyproj import CRS

    return CRS.from_wkt(crs_wkt).to_json_dict()


def scene_max_instance_id(grid_shape: Sequence[int], chunk_shape: Sequence[int]) -> int:
    """The largest provisional id of a scene's chunk grid (for the store dtype):
    ``prod(grid) * (prod(chunk) + 1) - 1``, the last id of the last chunk
    (``region_id_offset(last) + prod(chunk)``)."""
    return math.prod(grid_shape) * (math.prod(chunk_shape) + 1) - 1
