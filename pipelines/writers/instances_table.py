"""A scene's instances on the driver: merge the chunks' instance files, relabel the store's
`instances` array where ids change, and write the `instances` table as GeoParquet 1.1.

Steps (:func:`write_instances`), all resumable:

1. :func:`~pipelines.stats.instances.merge_instance_ids` over the work folder's
   ``<key>.instances.npz`` files (provisional ids, never rewritten): the relabel table.
2. Each chunk whose core holds an id of the table is read from the store, mapped and written
   back (:func:`relabel_chunk`); chunks whose ids are all roots are not touched. The table maps
   to roots only and roots map to themselves, so a chunk already relabelled by an interrupted
   run maps to itself and is not rewritten: a re-run converges to the same bytes.
3. The chunks' partials are added up through the table
   (:func:`~pipelines.stats.instances.merge_instance_stats`), and each instance's polygon is
   traced on the relabelled store (:func:`instance_polygons`).
4. The table goes to ``<root>/tables/instances/<scene>.parquet`` with GeoParquet 1.1 metadata
   (:func:`geo_metadata`): WKB ``geometry`` in the scene CRS (PROJJSON), a ``bbox`` covering
   column, readable by GeoPandas, DuckDB and GDAL.

2D scenes only: volumes are refused for instance models before any chunk is computed
(``pipelines.run.scenes.prepare_scene``); the merge maths itself is n-D and tested in 3D.
"""

from __future__ import annotations

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
    apply_relabel,
    merge_instance_ids,
    merge_instance_stats,
)
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


def instance_chunk_loader(work_dir: Path):
    """``index -> InstanceChunk | None``: a chunk's instance file in `work_dir`, None where the
    chunk has none (skipped as nodata)."""
    def load(index: tuple[int, ...]) -> InstanceChunk | None:
        path = work_dir / instances_file(chunk_key(index))
        return InstanceChunk.from_npz(path) if path.is_file() else None
    return load


def relabel_chunk(zarr_path: Path, chunk: InstanceChunk, keys: np.ndarray, finals: np.ndarray) -> tuple[bool, bool]:
    """Apply the relabel table (sorted ``keys`` -> ``finals``, uint64) to one chunk of the store's
    `instances` array, reading it only when its core holds a key.

    Returns:
        (needed, rewritten): whether the chunk's core holds a key, and whether its stored ids
        changed and were written (False when an earlier run relabelled it already).
    """
    core_ids = chunk.core_local.astype(np.uint64) + np.uint64(chunk.id_offset)
    mine = np.isin(keys, core_ids)
    if not mine.any():
        return False, False
    array = zarr.open_array(str(zarr_path), path=INSTANCES, mode="r+")
    core = tuple(slice(o, o + n) for o, n in zip(chunk.core_origin, chunk.core_shape, strict=True))
    stored = array[core]
    mapped = apply_relabel(stored, keys[mine], finals[mine])
    if np.array_equal(mapped, stored):
        return True, False
    array[core] = mapped
    return True, True


def write_instances(root: Path, scene: str, *, zarr_path: Path, work_dir: Path, indices: Iterable[tuple[int, ...]],
                    grid_shape: Sequence[int], grid: GeoGrid, class_names: Sequence[str],
                    iou_threshold: float = DEFAULT_IOU_THRESHOLD) -> InstancesSummary:
    """Merge, relabel and tabulate a scene's instances (the steps in the module docstring).

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
    merge = merge_instance_ids(indices, load, grid_shape=grid_shape, iou_threshold=iou_threshold)
    keys = np.fromiter(merge.relabel.keys(), dtype=np.uint64, count=len(merge.relabel))
    finals = np.fromiter(merge.relabel.values(), dtype=np.uint64, count=len(merge.relabel))
    counts = {"needed": 0, "rewritten": 0}

    def relabelled() -> Iterator[InstanceChunk]:  # one chunk at a time: relabel its core, hand on its partials
        for index in indices:
            chunk = load(index)
            if chunk is None:
                continue
            needed, rewritten = relabel_chunk(zarr_path, chunk, keys, finals)
            counts["needed"] += needed
            counts["rewritten"] += rewritten
            yield chunk

    stats = merge_instance_stats(relabelled(), merge.relabel, n_classes=len(class_names))
    array = zarr.open_array(str(zarr_path), path=INSTANCES, mode="r")
    geometries = instance_polygons(array, stats, transform=grid.transform)
    table = instances_table(scene, stats, geometries, grid=grid, class_names=class_names)
    write_table_batches(root, "instances", scene, [table], metadata=geo_metadata(table, crs_wkt=grid.crs_wkt))
    return InstancesSummary(n_instances=table.num_rows, n_relabelled_ids=len(keys),
                            n_chunks_relabelled=counts["needed"], n_chunks_rewritten=counts["rewritten"],
                            n_matches=merge.n_matches)


def instance_polygons(array: Any, stats: dict[str, Any], *, transform: Sequence[float]) -> list[Any]:
    """The shapely (Multi)Polygon of each instance (in `stats` order), traced on the relabelled
    `instances` array in CRS coordinates: pixel edges through the scene's affine, holes kept,
    the parts of one object dissolved into one geometry. Its area is ``pixel_count`` times the
    pixel area.

    Instances whose bbox lies in one chunk are traced a chunk at a time (one read per chunk);
    an instance spanning chunks is traced on a read of its own bbox: the memory of that read is
    bounded by the object's size, not by the chunk's (a scene-sized object reads the scene).
    """
    import rasterio.features
    import shapely
    from affine import Affine

    n = len(stats["instance_id"])
    out: list[Any] = [None] * n
    chunks = np.asarray(array.chunks, dtype=np.int64)
    lo, hi = stats["bbox_min"], stats["bbox_max"]
    first, last = lo // chunks, hi // chunks
    one_chunk = (first == last).all(axis=1)
    scene_affine = Affine(*transform)

    def trace(origin: np.ndarray, window: np.ndarray, members: np.ndarray) -> None:
        wanted = stats["instance_id"][members]
        mask = np.isin(window, wanted)
        compact = np.zeros(window.shape, dtype=np.int32)
        compact[mask] = np.searchsorted(wanted, window[mask]) + 1  # wanted is sorted (stats order)
        parts: dict[int, list[Any]] = {}
        at = scene_affine * Affine.translation(int(origin[1]), int(origin[0]))
        for geom, value in rasterio.features.shapes(compact, mask=mask, connectivity=4, transform=at):
            parts.setdefault(int(value), []).append(shapely.geometry.shape(geom))
        for value, polys in parts.items():
            out[int(members[value - 1])] = polys[0] if len(polys) == 1 else shapely.union_all(polys)

    single = np.flatnonzero(one_chunk)
    if len(single):
        keys = first[single]
        order = np.lexsort(keys.T[::-1])
        keys, single = keys[order], single[order]
        breaks = np.flatnonzero((keys[1:] != keys[:-1]).any(axis=1)) + 1
        for group in np.split(np.arange(len(single)), breaks):
            origin = keys[group[0]] * chunks
            stop = np.minimum(origin + chunks, array.shape)
            window = array[tuple(slice(int(a), int(b)) for a, b in zip(origin, stop, strict=True))]
            trace(origin, window, np.sort(single[group]))
    for k in np.flatnonzero(~one_chunk):
        window = array[tuple(slice(int(a), int(b) + 1) for a, b in zip(lo[k], hi[k], strict=True))]
        trace(lo[k], window, np.array([k]))
    missing = [int(stats["instance_id"][k]) for k in range(n) if out[k] is None]
    if missing:
        raise ValueError(f"instances {missing[:5]} have statistics but no pixels in the store: "
                         "was the store relabelled with another table?")
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
