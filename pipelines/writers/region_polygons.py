"""Semantic regions as polygons: one (Multi)Polygon per region of a 2D store, as GeoParquet 1.1.

A region is what the `regions` table counts: a fully connected (8-neighbour) set of pixels of
one class. The store holds classes, not region ids, so the ids are rebuilt from the stored
classes the way the job built them, chunk by chunk (:func:`~pipelines.stats.partials.chunk_regions`
per chunk of the store, :func:`~pipelines.stats.merge.merge_regions` across chunk borders):
region ids are numbered in :func:`~pipelines.stats.merge.region_order`, which does not depend on
the chunking, so they are the `regions` table's ids; when that table is present, each region's
class and pixel count are checked against it, and a store that disagrees is an error, never a
silently different table.

Each chunk is then relabelled to region ids and traced in pixel coordinates
(:class:`~pipelines.writers.instances_table.PolygonTracer`: 4-connected parts with integer
vertices, dissolved per region with their shared edges removed and holes kept; parts that touch
only at a corner, as 8-connectivity allows, make a MultiPolygon) and mapped through the scene's
affine. Classes are read twice, one chunk at a time; held in memory are the chunks' partial
statistics and face ids (for the merge) and the polygons (the output's size).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.plan.chunks import chunk_grid_shape
from pipelines.stats.merge import MergedRegions, merge_regions
from pipelines.stats.partials import chunk_regions, label_chunk, region_id_offset
from pipelines.writers.atomic import atomic_path
from pipelines.writers.instances_table import BBOX_COLUMN, GEOMETRY_COLUMN, PolygonTracer, geo_metadata
from pipelines.writers.outroot import Location, exists, local_copy
from pipelines.writers.zarr_masks import open_classes
from schemas import store as layout
from schemas.errors import OutputError
from schemas.store import GeoGrid
from schemas.tables import REGION_POLYGONS_SCHEMA


def _cores(shape: Sequence[int], chunks: Sequence[int]):
    """(chunk index, core slices) of every chunk of a 2D array, in raster order."""
    grid = chunk_grid_shape(tuple(shape), tuple(chunks))
    for i in range(grid[0]):
        for j in range(grid[1]):
            yield (i, j), (slice(i * chunks[0], min((i + 1) * chunks[0], shape[0])),
                           slice(j * chunks[1], min((j + 1) * chunks[1], shape[1])))


def trace_regions(store: Location | str) -> tuple[MergedRegions, list]:
    """The regions of a 2D store's `classes` and their polygons in pixel coordinates (x = column,
    y = row, pixel edges), in region_id order.

    Raises:
        ValueError: the store's `classes` is not 2-D.
    """
    classes = open_classes(store)
    if classes.ndim != 2:
        raise ValueError(f"{store}: region polygons need a (y, x) scene, `classes` is {classes.ndim}-D")
    shape, chunks = tuple(classes.shape), tuple(classes.chunks)
    grid = chunk_grid_shape(shape, chunks)
    parts = []
    for index, core in _cores(shape, chunks):
        parts.append(chunk_regions(np.asarray(classes[core]), chunk_index=index,
                                   origin=(core[0].start, core[1].start),
                                   id_offset=region_id_offset(index, grid, chunks), nodata=layout.NODATA_CLASS))
    merged = merge_regions(parts, ndim=2)
    del parts
    tracer = PolygonTracer()
    for index, core in _cores(shape, chunks):
        block = np.asarray(classes[core])
        if not (block != layout.NODATA_CLASS).any():
            continue
        ids = merged.relabel(label_chunk(block, id_offset=region_id_offset(index, grid, chunks),
                                         nodata=layout.NODATA_CLASS))
        tracer.add(ids, (core[0].start, core[1].start))
    return merged, tracer.polygons(merged.region_id, transform=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0))


def _check_against_table(merged: MergedRegions, table: Location) -> None:
    """The rebuilt regions must be the `regions` table's: same ids, classes and pixel counts."""
    with local_copy(table) as path:
        t = pq.read_table(path, columns=["region_id", "class_id", "pixel_count"])
    ids, cls, count = (t.column(c).to_numpy() for c in ("region_id", "class_id", "pixel_count"))
    order = np.argsort(ids, kind="stable")
    if not (len(ids) == len(merged) and np.array_equal(ids[order], merged.region_id)
            and np.array_equal(cls[order], merged.class_id) and np.array_equal(count[order], merged.pixel_count)):
        raise OutputError(f"{table}: the store's classes give {len(merged)} regions that differ from this table's "
                          f"{len(ids)}; was the store or the table changed after the job?")


def region_polygons_table(scene: str, merged: MergedRegions, polygons: Sequence, *, grid: GeoGrid,
                          class_names: Sequence[str]) -> pa.Table:
    """One row per region (schema REGION_POLYGONS_SCHEMA): id, class, pixel count, area in CRS
    units, the bbox covering and the WKB (Multi)Polygon in the scene CRS."""
    import shapely
    from shapely.affinity import affine_transform

    a, b, c, d, e, f = grid.transform
    geoms = np.asarray([affine_transform(g, [a, b, d, e, c, f]) for g in polygons], dtype=object)
    n = len(geoms)
    bounds = shapely.bounds(geoms) if n else np.zeros((0, 4))
    names = list(class_names)
    class_name = [names[c] if c < len(names) else None for c in merged.class_id.tolist()]
    columns = {
        "scene": pa.array([scene] * n, pa.string()),
        "region_id": pa.array(merged.region_id, pa.int64()),
        "class_id": pa.array(merged.class_id, pa.uint8()),
        "class_name": pa.array(class_name, pa.string()),
        "pixel_count": pa.array(merged.pixel_count, pa.int64()),
        "area_crs2": pa.array(merged.pixel_count * grid.pixel_area_crs2, pa.float64()),
        BBOX_COLUMN: pa.StructArray.from_arrays([pa.array(bounds[:, k], pa.float64()) for k in range(4)],
                                                fields=list(REGION_POLYGONS_SCHEMA.field(BBOX_COLUMN).type)),
        GEOMETRY_COLUMN: pa.array(shapely.to_wkb(geoms) if n else [], pa.binary()),
    }
    return pa.table(columns, schema=REGION_POLYGONS_SCHEMA)


def export_region_polygons(store: Location, out: Path, *, scene: str, grid: GeoGrid, class_names: Sequence[str],
                           regions_table: Location | None = None) -> Path:
    """Write a 2D store's regions as GeoParquet 1.1 polygons to `out` (atomically).

    Args:
        regions_table: the job's `tables/regions/<scene>.parquet`; when given and present, the
            rebuilt regions are checked against it (ids, classes, pixel counts).

    Raises:
        ValueError: not a 2D store.
        OutputError: the store's regions differ from `regions_table`.
    """
    if not isinstance(grid, GeoGrid):
        raise ValueError(f"{store}: region polygons are written for 2D scenes, got a {type(grid).__name__}")
    merged, polygons = trace_regions(store)
    if regions_table is not None and exists(regions_table):
        _check_against_table(merged, regions_table)
    table = region_polygons_table(scene, merged, polygons, grid=grid, class_names=class_names)
    with atomic_path(out) as tmp:
        pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}),
                                                      **geo_metadata(table, crs_wkt=grid.crs_wkt)}), tmp,
                       compression="zstd")
    return out
