"""Zarr layout of one scene's output, `<root>/<scene>.zarr` (Zarr v3).

Layout (2D):
  classes       (y, x) uint8, fill 255 = nodata / not predicted; chunks = job chunk_size.
  probabilities (class, y, x) float16, optional (output.write_probabilities); NaN fill.
  x, y          1-D float64 pixel-centre coordinates in the scene CRS.
  spatial_ref   0-d int32 CF grid-mapping variable: crs_wkt, spatial_ref, GeoTransform.

`classes` carries CF/GeoZarr-style attributes (`grid_mapping`, `flag_values`, `flag_meanings`)
that xarray + rioxarray understand, and the tessera provenance under the TESSERA_ATTR key.
"""

from __future__ import annotations

CLASSES = "classes"
PROBABILITIES = "probabilities"  # optional (class, y, x) float16, NaN = nodata / not predicted
PROBABILITIES_DTYPE = "float16"
CLASS_DIM = "class"
X = "x"
Y = "y"
SPATIAL_REF = "spatial_ref"
DIMENSIONS_2D = (Y, X)

CLASSES_DTYPE = "uint8"
NODATA_CLASS = 255

# Group attribute (a dict) with the provenance and completion state.
TESSERA_ATTR = "tessera"
# Keys inside it.
KEY_STATUS = "status"  # "partial" until every chunk is written and tables are in, then "complete"
KEY_FINGERPRINT = "fingerprint"
KEY_MODEL = "model"  # {"name", "architecture", "sha256"}
KEY_CLASS_NAMES = "class_names"
KEY_CHUNK_SHAPE = "chunk_shape"
KEY_HALO = "halo"
KEY_SOURCE = "source"
KEY_INPUT_SHA256 = "input_sha256"
KEY_CRS_WKT = "crs_wkt"
KEY_TRANSFORM = "transform"  # affine (a, b, c, d, e, f) as rasterio/affine orders it

STORE_STATUS_PARTIAL = "partial"
STORE_STATUS_COMPLETE = "complete"
