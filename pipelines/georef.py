"""Pixel <-> CRS maths for region tables, converted in one place.

Pixel indices are (row, col); an affine (a, b, c, d, e, f) maps the pixel *corner* (col, row)
to CRS (x, y) = (a*col + b*row + c, d*col + e*row + f). Pixel centres are at +0.5.
"""

from __future__ import annotations

import functools
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


def pixel_row_areas_m2(transform: Affine6, crs_wkt: str | None, *, row0: int, n_rows: int, col0: int,
                       n_cols: int) -> np.ndarray | None:
    """Ellipsoidal area in m² of one pixel per row of a chunk, on the CRS's own ellipsoid.

    For each row ``r`` of ``row0 .. row0 + n_rows - 1``, the pixel at the chunk's centre column
    ``c = col0 + n_cols // 2``: its four corners ``(r, c), (r, c + 1), (r + 1, c + 1), (r + 1, c)``
    go through the affine to the CRS, then to lon/lat on the CRS's geodetic CRS, and
    ``pyproj.Geod.polygon_area_perimeter`` (the CRS's ellipsoid) gives the area of that
    geodesic quadrilateral.

    Exactness: on a north-up grid in a geographic CRS every pixel of a row is the same lat/lon
    cell, so the value is exact for the whole row (Geod's error, ~1e-15 relative). In a projected
    CRS it is the centre column's pixel; other pixels of the row differ by the change of the
    projection's areal scale across half the chunk width: for UTM about ``2 x dx / R²`` relative
    (x: distance from the central meridian, dx: half the chunk width), 1.3e-4 at the zone edge
    (x = 330 km) for a 20 km wide chunk, far below for ordinary chunks. Rotated or sheared
    grids take the same per-pixel corner computation.

    Args:
        transform: ``(a, b, c, d, e, f)`` affine of the scene (pixel corner -> CRS).
        crs_wkt: The scene's CRS; None or unusable -> None (no m²).
        row0, n_rows: First scene row of the chunk and its number of rows.
        col0, n_cols: First scene column of the chunk and its number of columns.

    Returns:
        ``(n_rows,)`` float64 m² per pixel of each row, or None without a usable CRS.
    """
    if not crs_wkt:
        return None
    try:
        crs = CRS.from_wkt(crs_wkt)
        geodetic = crs.geodetic_crs
        if geodetic is None:
            return None
        geod = crs.get_geod()
        rows = np.arange(row0, row0 + n_rows, dtype=np.float64)
        c = float(col0 + n_cols // 2)
        corner_rows = np.stack([rows, rows, rows + 1, rows + 1], axis=1)
        corner_cols = np.broadcast_to(np.array([c, c + 1, c + 1, c]), corner_rows.shape)
        x, y = pixel_to_crs(transform, corner_rows, corner_cols)
        transformer = Transformer.from_crs(crs, geodetic, always_xy=True)
        lon, lat = transformer.transform(x.ravel(), y.ravel())
    except (CRSError, ProjError):
        return None
    lon, lat = np.asarray(lon).reshape(-1, 4), np.asarray(lat).reshape(-1, 4)
    if geod is None or not (np.isfinite(lon).all() and np.isfinite(lat).all()):
        return None
    return np.array([abs(geod.polygon_area_perimeter(lo, la)[0]) for lo, la in zip(lon, lat)], dtype=np.float64)


@functools.lru_cache(maxsize=64)
def scene_row_areas_m2(transform: Affine6, crs_wkt: str | None, *, row0: int, n_rows: int,
                       width: int) -> np.ndarray | None:
    """m² of one pixel per row of one row of chunks of a scene, computed once and cached.

    :func:`pixel_row_areas_m2` at the *scene's* centre column ``width // 2`` for rows
    ``row0 .. row0 + n_rows - 1``: every chunk of a chunk row shares one vector (one
    computation, 18-23 ms per 1024 rows, per process). The cache is keyed by the whole
    argument tuple (64 entries: a worker meets the chunks of a few chunk rows at a time).

    Exactness: on north-up grids (``b == d == 0``) in a geographic CRS every pixel of a row is
    the same lat/lon cell, so the vector is exact for every column. In a projected CRS (or on a
    rotated grid) the pixels of a row differ from the centre column's by the change of the
    projection's areal scale across half the *scene* width ``dx``: for UTM about
    ``2 x dx / R²`` relative (x: distance from the central meridian), e.g. 1.3e-3 for a scene
    164 km wide at the zone edge (x = 330 km), 1.3e-4 for one 16 km wide there, 7e-5 for a
    30 km wide scene within 100 km of the central meridian.

    Args:
        transform: ``(a, b, c, d, e, f)`` affine of the scene (pixel corner -> CRS), a tuple.
        crs_wkt: The scene's CRS; None or unusable -> None.
        row0, n_rows: First scene row of the chunk row and its number of rows.
        width: The scene's width in pixels.

    Returns:
        ``(n_rows,)`` float64 m², read-only (shared by the cache), or None without a usable CRS.
    """
    areas = pixel_row_areas_m2(tuple(float(v) for v in transform), crs_wkt, row0=row0, n_rows=n_rows,
                               col0=0, n_cols=width)
    if areas is not None:
        areas.flags.writeable = False
    return areas


def regions_table(
    scene: str,
    regions: MergedRegions,
    *,
    transform: Affine6,
    crs_wkt: str | None,
    class_names: Sequence[str],
) -> pa.Table:
    """The `regions` table of one scene (schema REGIONS_SCHEMA).

    area_crs2 = pixel_count * |det(A)|; area_m2 = the merged ellipsoidal area (null where NaN:
    unknown); centroid = mean pixel centre mapped through the affine;
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
        "area_m2": pa.array(regions.area_m2, type=pa.float64(), from_pandas=True),  # NaN -> null
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
