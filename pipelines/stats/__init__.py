"""Region statistics, n-dimensional: per-chunk partials (actor side, :mod:`pipelines.stats.partials`)
and the cross-chunk merge (driver side, :mod:`pipelines.stats.merge`).

Importing this package imports the merge module too, which itself imports scipy only when it
merges; actors that only compute partials may import :mod:`pipelines.stats.partials` directly.
"""

from pipelines.stats.merge import (
    MergedRegions,
    RowMerge,
    merge_regions,
    merged_array_dtypes,
    merged_regions_of,
    region_order,
    region_rank,
    region_stat_dtypes,
)
from pipelines.stats.partials import (
    NPZ_FORMAT_VERSION,
    ChunkRegions,
    axis_names,
    chunk_regions,
    face_names,
    label_chunk,
    region_array_dtypes,
    region_id_offset,
)

__all__ = [
    "NPZ_FORMAT_VERSION",
    "ChunkRegions",
    "MergedRegions",
    "RowMerge",
    "axis_names",
    "chunk_regions",
    "face_names",
    "label_chunk",
    "merge_regions",
    "merged_array_dtypes",
    "merged_regions_of",
    "region_array_dtypes",
    "region_id_offset",
    "region_order",
    "region_rank",
    "region_stat_dtypes",
]
