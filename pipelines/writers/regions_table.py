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

from pipelines.georef import Affine6, regions_table
from pipelines.stats.merge import RowMerge, merged_regions_of, region_order, region_stat_dtypes
from pipelines.stats.partials import ChunkRegions
from pipelines.writers.tables import write_table_batches
from schemas.errors import OutputError

#: Regions per sorted batch written to the table (and held at once).
BATCH_ROWS = 16384
#: DuckDB's memory for the sort; beyond it DuckDB spills to its temp folder in the work folder.
SORT_MEMORY = "256MB"

# the regions table is 2D (a raster scene)
_SPILL_SCHEMA = pa.schema([(name, pa.from_numpy_dtype(dt)) for name, dt in region_stat_dtypes(2).items()])


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
                  transform: Affine6, crs_wkt: str | None, class_names: Sequence[str]) -> RegionsSummary:
    """Merge the chunk partials row by row and write `<root>/tables/regions/<scene>.parquet`.

    Args:
        rows: the scene's chunk partials, one sequence per row of the chunk grid, top to bottom
            (chunks skipped as nodata are absent); read lazily, one row at a time.
        work_dir: the scene's work folder (inside the output root): the spill and DuckDB's
            temporary files go there and are removed.

    Raises:
        ValueError: from the merge (ids that repeat, chunks that do not line up).
        OutputError: DuckDB could not sort the spilled regions (e.g. no space for its
            temporary files).
    """
    spill = work_dir / "regions.spill.parquet"
    merger = RowMerge(ndim=2)
    class_pixels = np.zeros(len(class_names), dtype=np.int64)
    class_area_m2 = np.zeros(len(class_names), dtype=np.float64)
    n = 0
    def completed() -> Iterator[dict[str, np.ndarray]]:  # lazily: one batch of regions at a time
        for row in rows:
            yield merger.add_row(row)
        yield merger.finish()

    with pq.ParquetWriter(spill, _SPILL_SCHEMA) as writer:
        for closed in completed():
            k = len(closed["pixel_count"])
            if not k:
                continue
            n += k
            class_pixels += np.bincount(closed["class_id"], weights=closed["pixel_count"],
                                        minlength=len(class_names)).astype(np.int64)[:len(class_names)]
            class_area_m2 += np.bincount(closed["class_id"], weights=closed["area_m2"],
                                         minlength=len(class_names))[:len(class_names)]
            writer.write_table(pa.table({f.name: closed[f.name] for f in _SPILL_SCHEMA}, schema=_SPILL_SCHEMA))
    try:
        write_table_batches(root, "regions", scene, _sorted_tables(
            spill, n, scene=scene, work_dir=work_dir, transform=transform, crs_wkt=crs_wkt, class_names=class_names))
    finally:
        spill.unlink(missing_ok=True)
    return RegionsSummary(n_regions=n, class_pixels=tuple(int(c) for c in class_pixels),
                          class_area_m2=tuple(None if np.isnan(a) else float(a) for a in class_area_m2))


def _sorted_tables(spill: Path, n: int, *, scene: str, work_dir: Path, transform: Affine6, crs_wkt: str | None,
                   class_names: Sequence[str]) -> Iterator[pa.Table]:
    """The spilled regions in region_id order, as `regions` tables of at most BATCH_ROWS rows."""
    def table(stats: dict[str, np.ndarray], first_id: int) -> pa.Table:
        t = regions_table(scene, merged_regions_of(stats), transform=transform, crs_wkt=crs_wkt,
                          class_names=class_names)
        ids = np.arange(first_id, first_id + t.num_rows, dtype=np.int64)
        return t.set_column(t.schema.get_field_index("region_id"), "region_id", pa.array(ids))

    if n == 0:
        yield table({f.name: np.zeros(0, dtype=f.type.to_pandas_dtype()) for f in _SPILL_SCHEMA}, 1)
        return
    import duckdb

    tmp = work_dir / "duckdb.tmp"
    con = None
    try:
        con = duckdb.connect(config={"memory_limit": SORT_MEMORY, "threads": 1, "temp_directory": str(tmp)})
        done = 0
        for batch in con.read_parquet(str(spill)).order(", ".join(region_order(2))).to_arrow_reader(BATCH_ROWS):
            stats = {f.name: batch.column(f.name).to_numpy(zero_copy_only=False).astype(f.type.to_pandas_dtype())
                     for f in _SPILL_SCHEMA}
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
