"""A scene's `regions` table from its chunks' partial statistics, in bounded memory.

The chunk partials are merged a row of chunks at a time (`pipelines.stats.merge.RowMerge`); each
region is spilled to a Parquet file in the scene's work folder as soon as it is complete.
DuckDB then sorts the spill into region_id order (spilling to disk itself beyond its memory
limit), and the table is written a batch at a time. The driver's memory holds one row of
chunk partials, the regions still open across it, and one batch: not the scene's regions.
The result equals `regions_table(scene, merge_regions(parts), ...)`, row for row.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.georef import regions_table
from pipelines.stats.merge import MergedRegions, RowMerge, merged_regions_of, region_order, region_stat_dtypes
from pipelines.stats.partials import ChunkRegions
from pipelines.writers.tables import write_table_batches
from schemas.errors import OutputError
from schemas.store import Grid, VolumeGrid
from schemas.tables import VOLUME_REGIONS_SCHEMA

#: Regions per sorted batch written to the table (and held at once).
BATCH_ROWS = 16384
#: DuckDB's memory for the sort; beyond it DuckDB spills to its temp folder in the work folder.
SORT_MEMORY = "256MB"



def _spill_schema(ndim: int) -> pa.Schema:
    return pa.schema([(name, pa.from_numpy_dtype(dt)) for name, dt in region_stat_dtypes(ndim).items()])


def regions_table_name(grid: Grid) -> str:
    """The table a scene's regions go to: `regions` (2D, georeferenced) or `volume_regions` (3D)."""
    return "volume_regions" if isinstance(grid, VolumeGrid) else "regions"


def volume_regions_table(scene: str, regions: MergedRegions, *, grid: VolumeGrid,
                         class_names: Sequence[str]) -> pa.Table:
    """The `volume_regions` table of one volume (schema VOLUME_REGIONS_SCHEMA).

    ``volume_mm3 = voxel_count * |det(A)|`` with ``A`` the 3x3 part of the voxel -> scanner affine
    (voxel ``(plane, row, col)`` of the (z, y, x) array, centre at the integer index);
    ``centroid_{r,a,s}_mm = A @ centroid + origin``; ``mean_intensity = sum_value / voxel_count``
    (the input's first channel; null where the partials had no values).
    """
    affine = np.asarray(grid.affine, dtype=np.float64)
    voxel_mm3 = grid.voxel_volume_mm3
    n = len(regions.region_id)
    centroid = np.stack([regions.centroid_plane, regions.centroid_row, regions.centroid_col]) if n else np.zeros((3, 0))
    ras = affine[:3, :3] @ centroid + affine[:3, 3:4]
    names = np.asarray(class_names, dtype=object)
    columns = {
        "scene": [scene] * n,
        "region_id": regions.region_id,
        "class_id": regions.class_id,
        "class_name": names[regions.class_id.astype(np.intp)] if n else np.empty(0, dtype=object),
        "voxel_count": regions.pixel_count,
        "volume_mm3": regions.pixel_count * voxel_mm3,
        **{f"{stat}_{axis}": getattr(regions, f"{stat}_{axis}")
           for stat in ("min", "max", "centroid") for axis in ("plane", "row", "col")},
        "centroid_r_mm": ras[0],
        "centroid_a_mm": ras[1],
        "centroid_s_mm": ras[2],
        "mean_intensity": pa.array(regions.sum_value / np.maximum(regions.pixel_count, 1), type=pa.float64(),
                                   from_pandas=True),  # NaN (no values) -> null
    }
    return pa.table({name: pa.array(columns[name], type=VOLUME_REGIONS_SCHEMA.field(name).type)
                     for name in VOLUME_REGIONS_SCHEMA.names}, schema=VOLUME_REGIONS_SCHEMA)


def _table_of(scene: str, regions: MergedRegions, grid: Grid, class_names: Sequence[str]) -> pa.Table:
    if isinstance(grid, VolumeGrid):
        return volume_regions_table(scene, regions, grid=grid, class_names=class_names)
    return regions_table(scene, regions, transform=grid.transform, crs_wkt=grid.crs_wkt, class_names=class_names)


@dataclass(frozen=True)
class RegionsSummary:
    """What the scenes table needs from the merge: the region count, and pixels and m² per class.

    ``class_area_m2[c]``: the sum of ``area_m2`` over the regions of class ``c`` (0.0 for a class
    without pixels), None where a region's area is unknown (no usable CRS).
    """

    n_regions: int
    class_pixels: tuple[int, ...]
    class_area_m2: tuple[float | None, ...]


def write_regions(root: Path, scene: str, rows: Iterable[Sequence[ChunkRegions]], *, work_dir: Path,
                  grid: Grid, class_names: Sequence[str]) -> RegionsSummary:
    """Merge the chunk partials row by row and write the scene's regions table:
    `<root>/tables/regions/<scene>.parquet` for a 2D scene (`GeoGrid`: CRS coordinates and
    areas), `<root>/tables/volume_regions/<scene>.parquet` for a volume (`VolumeGrid`: mm³ and
    scanner mm).

    Args:
        rows: the scene's chunk partials, one sequence per row (in 3D: slab) of the chunk grid,
            in order along its first axis (chunks skipped as nodata are absent); read lazily, one
            row at a time.
        grid: the scene's geometry (`pipelines.writers.zarr_masks.scene_grid`).
        work_dir: the scene's work folder (inside the output root): the spill and DuckDB's
            temporary files go there and are removed.

    Raises:
        ValueError: from the merge (ids that repeat, chunks that do not line up).
        OutputError: DuckDB could not sort the spilled regions (e.g. no space for its
            temporary files).
    """
    ndim = 3 if isinstance(grid, VolumeGrid) else 2
    spill_schema = _spill_schema(ndim)
    spill = work_dir / "regions.spill.parquet"
    merger = RowMerge(ndim=ndim)
    class_pixels = np.zeros(len(class_names), dtype=np.int64)
    class_area_m2 = np.zeros(len(class_names), dtype=np.float64)
    n = 0
    def completed() -> Iterator[dict[str, np.ndarray]]:  # lazily: one batch of regions at a time
        for row in rows:
            yield merger.add_row(row)
        yield merger.finish()

    with pq.ParquetWriter(spill, spill_schema) as writer:
        for closed in completed():
            k = len(closed["pixel_count"])
            if not k:
                continue
            n += k
            class_pixels += np.bincount(closed["class_id"], weights=closed["pixel_count"],
                                        minlength=len(class_names)).astype(np.int64)[:len(class_names)]
            class_area_m2 += np.bincount(closed["class_id"], weights=closed["area_m2"],
                                         minlength=len(class_names))[:len(class_names)]
            writer.write_table(pa.table({f.name: closed[f.name] for f in spill_schema}, schema=spill_schema))
    try:
        write_table_batches(root, regions_table_name(grid), scene, _sorted_tables(
            spill, n, scene=scene, work_dir=work_dir, grid=grid, class_names=class_names))
    finally:
        spill.unlink(missing_ok=True)
    return RegionsSummary(n_regions=n, class_pixels=tuple(int(c) for c in class_pixels),
                          class_area_m2=tuple(None if np.isnan(a) else float(a) for a in class_area_m2))


def _sorted_tables(spill: Path, n: int, *, scene: str, work_dir: Path, grid: Grid,
                   class_names: Sequence[str]) -> Iterator[pa.Table]:
    """The spilled regions in region_id order, as region tables of at most BATCH_ROWS rows."""
    ndim = 3 if isinstance(grid, VolumeGrid) else 2
    spill_schema = _spill_schema(ndim)

    def table(stats: dict[str, np.ndarray], first_id: int) -> pa.Table:
        t = _table_of(scene, merged_regions_of(stats), grid, class_names)
        ids = np.arange(first_id, first_id + t.num_rows, dtype=np.int64)
        return t.set_column(t.schema.get_field_index("region_id"), "region_id", pa.array(ids))

    if n == 0:
        yield table({f.name: np.zeros(0, dtype=f.type.to_pandas_dtype()) for f in spill_schema}, 1)
        return
    import duckdb

    tmp = work_dir / "duckdb.tmp"
    con = None
    try:
        con = duckdb.connect(config={"memory_limit": SORT_MEMORY, "threads": 1, "temp_directory": str(tmp)})
        done = 0
        for batch in con.read_parquet(str(spill)).order(", ".join(region_order(ndim))).to_arrow_reader(BATCH_ROWS):
            stats = {f.name: batch.column(f.name).to_numpy(zero_copy_only=False).astype(f.type.to_pandas_dtype())
                     for f in spill_schema}
            yield table(stats, done + 1)
            done += batch.num_rows
        if done != n:
            raise OutputError(f"{spill}: the sorted regions are {done}, {n} were spilled")
    except duckdb.Error as exc:  # e.g. no space for its temporary files: this scene fails, the job goes on
        raise OutputError(f"{spill}: sorting the scene's regions failed: {exc}") from exc
    finally:
        if con is not None:
            con.close()
        shutil.rmtree(tmp, ignore_errors=True)
