"""Arrow schemas of the result tables under `<root>/tables/`, defined once.

Each table is a folder of Parquet files, one file per scene (`<table>/<scene>.parquet`),
rewritten atomically, so re-running a scene replaces its rows and never duplicates them.
DuckDB views of the same names read them (`pipelines.query`).
"""

from __future__ import annotations

import pyarrow as pa

TABLE_NAMES = ("regions", "volume_regions", "instances", "scenes", "chunks")

# Scene statuses: a scene is complete only when every chunk is written and its tables are in.
STATUS_COMPLETE = "complete"
STATUS_FAILED = "failed"
# Chunk statuses in the manifest.
CHUNK_WRITTEN = "written"
CHUNK_SKIPPED_NODATA = "skipped_nodata"

REGIONS_SCHEMA = pa.schema(
    [
        pa.field("scene", pa.string(), nullable=False),
        pa.field("region_id", pa.int64(), nullable=False),
        pa.field("class_id", pa.uint8(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("pixel_count", pa.int64(), nullable=False),
        pa.field("area_crs2", pa.float64(), nullable=False),
        pa.field("area_m2", pa.float64(), nullable=True),
        pa.field("min_row", pa.int64(), nullable=False),
        pa.field("min_col", pa.int64(), nullable=False),
        pa.field("max_row", pa.int64(), nullable=False),
        pa.field("max_col", pa.int64(), nullable=False),
        pa.field("bbox_xmin_crs", pa.float64(), nullable=False),
        pa.field("bbox_ymin_crs", pa.float64(), nullable=False),
        pa.field("bbox_xmax_crs", pa.float64(), nullable=False),
        pa.field("bbox_ymax_crs", pa.float64(), nullable=False),
        pa.field("centroid_row", pa.float64(), nullable=False),
        pa.field("centroid_col", pa.float64(), nullable=False),
        pa.field("centroid_x_crs", pa.float64(), nullable=False),
        pa.field("centroid_y_crs", pa.float64(), nullable=False),
        pa.field("centroid_lon", pa.float64(), nullable=True),
        pa.field("centroid_lat", pa.float64(), nullable=True),
    ],
    metadata={
        b"description": b"One row per connected region (8-connectivity) of one class in one scene.",
        b"units": b"rows/cols: pixel indices (inclusive bbox); *_crs: scene CRS units; "
        b"area_crs2: squared CRS linear units (m2 for UTM); area_m2: m2 on the CRS's ellipsoid, "
        b"sum of the pixels' geodesic areas (null without a usable CRS); lon/lat: degrees WGS84 "
        b"(null when the CRS cannot be transformed)",
    },
)

VOLUME_REGIONS_SCHEMA = pa.schema(
    [
        pa.field("scene", pa.string(), nullable=False),
        pa.field("region_id", pa.int64(), nullable=False),
        pa.field("class_id", pa.uint8(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("voxel_count", pa.int64(), nullable=False),
        pa.field("volume_mm3", pa.float64(), nullable=False),
        pa.field("min_plane", pa.int64(), nullable=False),
        pa.field("min_row", pa.int64(), nullable=False),
        pa.field("min_col", pa.int64(), nullable=False),
        pa.field("max_plane", pa.int64(), nullable=False),
        pa.field("max_row", pa.int64(), nullable=False),
        pa.field("max_col", pa.int64(), nullable=False),
        pa.field("centroid_plane", pa.float64(), nullable=False),
        pa.field("centroid_row", pa.float64(), nullable=False),
        pa.field("centroid_col", pa.float64(), nullable=False),
        pa.field("centroid_r_mm", pa.float64(), nullable=False),
        pa.field("centroid_a_mm", pa.float64(), nullable=False),
        pa.field("centroid_s_mm", pa.float64(), nullable=False),
        pa.field("mean_intensity", pa.float64(), nullable=True),
    ],
    metadata={
        b"description": b"One row per connected region (26-connectivity) of one class in one volume.",
        b"units": b"plane/row/col: voxel indices of the volume's (z, y, x) array axes (inclusive bbox); "
        b"volume_mm3: voxel_count x |det| of the voxel-to-scanner affine; centroid_{r,a,s}_mm: the mean "
        b"voxel centre in scanner coordinates, mm, RAS (right, anterior, superior)",
    },
)

#: The GeoParquet 1.1 bbox covering column of the `instances` table (CRS units).
BBOX_TYPE = pa.struct([pa.field(name, pa.float64(), nullable=False) for name in ("xmin", "ymin", "xmax", "ymax")])

INSTANCES_SCHEMA = pa.schema(
    [
        pa.field("scene", pa.string(), nullable=False),
        pa.field("instance_id", pa.uint64(), nullable=False),
        pa.field("class_id", pa.uint8(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("pixel_count", pa.int64(), nullable=False),
        pa.field("area_crs2", pa.float64(), nullable=False),
        pa.field("area_m2", pa.float64(), nullable=True),
        pa.field("min_row", pa.int64(), nullable=False),
        pa.field("min_col", pa.int64(), nullable=False),
        pa.field("max_row", pa.int64(), nullable=False),
        pa.field("max_col", pa.int64(), nullable=False),
        pa.field("centroid_row", pa.float64(), nullable=False),
        pa.field("centroid_col", pa.float64(), nullable=False),
        pa.field("centroid_x_crs", pa.float64(), nullable=False),
        pa.field("centroid_y_crs", pa.float64(), nullable=False),
        pa.field("centroid_lon", pa.float64(), nullable=True),
        pa.field("centroid_lat", pa.float64(), nullable=True),
        pa.field("band_means", pa.list_(pa.float64()), nullable=True),
        pa.field("bbox", BBOX_TYPE, nullable=False),
        pa.field("geometry", pa.binary(), nullable=False),
    ],
    metadata={
        b"description": b"One row per object of an instance model in one 2D scene, merged across chunks; "
        b"GeoParquet 1.1 (the file's `geo` metadata: WKB `geometry`, PROJJSON CRS, `bbox` covering).",
        b"units": b"instance_id: the object's id in the store's `instances` array; rows/cols: pixel indices "
        b"(inclusive bbox); score: mean of the predictor's per-object scores weighted by the pixels each chunk "
        b"owns; class_id: the class of the majority of the object's pixels; area_crs2: pixel_count x pixel area "
        b"(squared CRS units); area_m2: m2 on the CRS's ellipsoid (null without a usable CRS); *_crs, bbox, "
        b"geometry: scene CRS (pixel edges: the polygon's area is area_crs2); lon/lat: degrees WGS84; "
        b"band_means: mean input value per band over the object's pixels (null when the predictor gave none)",
    },
)

CLASS_VOLUME_TYPE = pa.struct(
    [
        pa.field("class_id", pa.uint8(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("voxel_count", pa.int64(), nullable=False),
        pa.field("volume_mm3", pa.float64(), nullable=False),
    ]
)

CLASS_AREA_TYPE = pa.struct(
    [
        pa.field("class_id", pa.uint8(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("pixel_count", pa.int64(), nullable=False),
        pa.field("area_crs2", pa.float64(), nullable=False),
        pa.field("area_m2", pa.float64(), nullable=True),
    ]
)

SCENES_SCHEMA = pa.schema(
    [
        pa.field("scene", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string(), nullable=True),
        pa.field("fingerprint", pa.string(), nullable=True),
        pa.field("input_sha256", pa.string(), nullable=True),
        pa.field("model_name", pa.string(), nullable=True),
        pa.field("model_sha256", pa.string(), nullable=True),
        pa.field("shape", pa.list_(pa.int64()), nullable=True),
        pa.field("crs", pa.string(), nullable=True),
        pa.field("crs_linear_unit", pa.string(), nullable=True),
        pa.field("pixel_area_crs2", pa.float64(), nullable=True),
        pa.field("n_chunks", pa.int64(), nullable=True),
        pa.field("n_chunks_computed", pa.int64(), nullable=True),
        pa.field("n_chunks_skipped_nodata", pa.int64(), nullable=True),
        pa.field("n_regions", pa.int64(), nullable=True),
        pa.field("valid_pixels", pa.int64(), nullable=True),
        pa.field("class_areas", pa.list_(CLASS_AREA_TYPE), nullable=True),
        pa.field("class_volumes", pa.list_(CLASS_VOLUME_TYPE), nullable=True),
        pa.field("zarr_path", pa.string(), nullable=True),
        pa.field("started_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("finished_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("wall_s", pa.float64(), nullable=False),
        pa.field("read_s", pa.float64(), nullable=True),
        pa.field("predict_s", pa.float64(), nullable=True),
        pa.field("write_s", pa.float64(), nullable=True),
        pa.field("stats_s", pa.float64(), nullable=True),
        pa.field("merge_s", pa.float64(), nullable=True),
        pa.field("n_instances", pa.int64(), nullable=True),
    ],
    metadata={
        b"description": b"One row per scene of the last run that touched it: status, error, "
        b"class areas, timings (wall_s: scene wall time; *_s: summed over chunks), provenance; "
        b"n_instances: objects of an instance model (null for semantic models and older files).",
    },
)

CHUNKS_SCHEMA = pa.schema(
    [
        pa.field("scene", pa.string(), nullable=False),
        pa.field("chunk_index", pa.list_(pa.int32()), nullable=False),
        pa.field("origin", pa.list_(pa.int64()), nullable=False),
        pa.field("shape", pa.list_(pa.int64()), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("valid_pixels", pa.int64(), nullable=False),
        pa.field("n_regions_partial", pa.int64(), nullable=False),
        pa.field("read_s", pa.float64(), nullable=False),
        pa.field("predict_s", pa.float64(), nullable=False),
        pa.field("write_s", pa.float64(), nullable=False),
        pa.field("stats_s", pa.float64(), nullable=False),
        pa.field("fingerprint", pa.string(), nullable=False),
    ],
    metadata={
        b"description": b"The chunk manifest: one row per output chunk (index, pixel origin and "
        b"shape in the scene, status, per-stage seconds).",
    },
)

#: `tessera export --format geoparquet`: one row per region of a 2D scene with its polygon; an
#: export file (`<root>/exports/<scene>.regions.parquet`), not one of the job's tables.
REGION_POLYGONS_SCHEMA = pa.schema(
    [
        pa.field("scene", pa.string(), nullable=False),
        pa.field("region_id", pa.int64(), nullable=False),
        pa.field("class_id", pa.uint8(), nullable=False),
        pa.field("class_name", pa.string(), nullable=True),
        pa.field("pixel_count", pa.int64(), nullable=False),
        pa.field("area_crs2", pa.float64(), nullable=False),
        pa.field("bbox", BBOX_TYPE, nullable=False),
        pa.field("geometry", pa.binary(), nullable=False),
    ],
    metadata={
        b"description": b"One row per region (8-connected pixels of one class) of one 2D scene, dissolved across "
        b"chunks with holes kept; region_id is the `regions` table's. GeoParquet 1.1 (the file's `geo` metadata: "
        b"WKB `geometry`, PROJJSON CRS, `bbox` covering).",
        b"units": b"area_crs2: pixel_count x pixel area (squared CRS units; the polygon's area); bbox, geometry: "
        b"scene CRS, pixel edges",
    },
)

SCHEMAS: dict[str, pa.Schema] = {
    "regions": REGIONS_SCHEMA,
    "volume_regions": VOLUME_REGIONS_SCHEMA,
    "instances": INSTANCES_SCHEMA,
    "scenes": SCENES_SCHEMA,
    "chunks": CHUNKS_SCHEMA,
}
