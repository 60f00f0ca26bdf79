"""Pixel <-> CRS maths for region tables, converted in one place.

Pixel indices are (row, col); an affine (a, b, c, d, e, f) maps the pixel *corner* (col, row)
to CRS (x, y) = (a*col + b*row + c, d*col + e*row + f). Pixel centres are at +0.5.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from pyproj import CRS, Transformer
from pyproj.exceptions import CRSError, ProjError

from pipelines.stats.merge import MergedRegions
from schemas.tables import REGIONS_SCHEMA

Affine6 = tuple[float, float, float, float, float, float]


def pixel_to_crs(transform: Affine6, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CRS (x, y) of fractional pixel positions (row, col measured from the top-left corner)."""
    a, b, c, d, e, f = transform
    return a * cols + b * rows + c, d * cols + e * rows + f


def crs_linear_unit(crs_wkt: str | None) -> str | None:
    """Name of the CRS's first axis unit ('metre', 'degree', ...), or None."""
    if not crs_wkt:
        return None
    try:
        axes = CRS.from_wkt(crs_wkt).axis_info
    except CRSError:
        return None
    return axes[0].unit_name if axes else None


def to_lonlat(crs_wkt: str | None, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """WGS84 (lon, lat) in degrees of CRS points, or (None, None) without a usable CRS."""
    if not crs_wkt or len(x) == 0:
        return (None, None) if not crs_wkt else (np.empty(0), np.empty(0))
    try:
        transformer = Transformer.from_crs(CRS.from_wkt(crs_wkt), CRS.from_epsg(4326), always_xy=True)
        lon, lat = transformer.transform(x, y)
    except (CRSError, ProjError):
        return None, None
    return np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)


def regions_table(
    scene: str,
    regions: MergedRegions,
    *,
    transform: Affine6,
    crs_wkt: str | None,
    class_names: Sequence[str],
) -> pa.Table:
    """The `regions` table of one scene (schema REGIONS_SCHEMA).

    area_crs2 = pixel_count * |det(A)|; centroid = mean pixel centre mapped through the affine;
    bbox = min/max over the four corners of the pixel bbox mapped through the affine.
    """
    a, b, _, d, e, _ = transform
    pixel_area = abs(a * e - b * d)
    cx, cy = pixel_to_crs(transform, regions.centroid_row + 0.5, regions.centroid_col + 0.5)
    corner_rows = (regions.min_row, regions.min_row, regions.max_row + 1, regions.max_row + 1)
    corner_cols = (regions.min_col, regions.max_col + 1, regions.min_col, regions.max_col + 1)
    xs, ys = zip(*(pixel_to_crs(transform, r.astype(np.float64), c.astype(np.float64))
                   for r, c in zip(corner_rows, corner_cols)))
    lon, lat = to_lonlat(crs_wkt, cx, cy)
    names = np.asarray(class_names, dtype=object)
    n = len(regions.region_id)
    columns = {
        "scene": pa.array([scene] * n, pa.string()),
        "region_id": regions.region_id,
        "class_id": regions.class_id,
        "class_name": names[regions.class_id.astype(np.intp)] if n else np.empty(0, dtype=object),
        "pixel_count": regions.pixel_count,
        "area_crs2": regions.pixel_count * pixel_area,
        "min_row": regions.min_row,
        "min_col": regions.min_col,
        "max_row": regions.max_row,
        "max_col": regions.max_col,
        "bbox_xmin_crs": np.min(xs, axis=0) if n else np.empty(0),
        "bbox_ymin_crs": np.min(ys, axis=0) if n else np.empty(0),
        "bbox_xmax_crs": np.max(xs, axis=0) if n else np.empty(0),
        "bbox_ymax_crs": np.max(ys, axis=0) if n else np.empty(0),
        "centroid_row": regions.centroid_row,
        "centroid_col": regions.centroid_col,
        "centroid_x_crs": cx,
        "centroid_y_crs": cy,
        "centroid_lon": pa.nulls(n, pa.float64()) if lon is None else lon,
        "centroid_lat": pa.nulls(n, pa.float64()) if lat is None else lat,
    }
    return pa.table(
        {name: pa.array(columns[name], type=REGIONS_SCHEMA.field(name).type) if not isinstance(columns[name], pa.Array)
         else columns[name] for name in REGIONS_SCHEMA.names},
        schema=REGIONS_SCHEMA,
    )
