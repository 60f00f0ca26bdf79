"""Ellipsoidal pixel areas in m² per chunk row (pipelines.georef.pixel_row_areas_m2)."""

from __future__ import annotations

import numpy as np
import pytest
from pyproj import CRS, Geod, Transformer

from pipelines.georef import pixel_row_areas_m2

WGS84 = CRS.from_epsg(4326).to_wkt()


def geod_cell_areas(transform, crs_wkt, rows, cols) -> np.ndarray:
    """(rows, cols) m² of every pixel cell, each its own Geod polygon (independent of the row rule)."""
    crs = CRS.from_wkt(crs_wkt)
    geod = Geod(ellps="WGS84") if crs.to_epsg() in (4326, 32633) else crs.get_geod()
    to_ll = Transformer.from_crs(crs, crs.geodetic_crs, always_xy=True)
    a, b, c, d, e, f = transform
    out = np.zeros((len(rows), len(cols)))
    for i, r in enumerate(rows):
        for j, col in enumerate(cols):
            rr = np.array([r, r, r + 1, r + 1], float)
            cc = np.array([col, col + 1, col + 1, col], float)
            lon, lat = to_ll.transform(a * cc + b * rr + c, d * cc + e * rr + f)
            out[i, j] = abs(geod.polygon_area_perimeter(lon, lat)[0])
    return out


@pytest.mark.parametrize("lat0", [0.05, 60.0], ids=["equator", "60N"])
def test_geographic_rows_equal_the_geod_area_of_every_cell_of_the_row(lat0):
    transform = (0.001, 0.0, 10.0, 0.0, -0.001, lat0)  # north-up, 0.001° pixels
    areas = pixel_row_areas_m2(transform, WGS84, row0=40, n_rows=30, col0=64, n_cols=17)
    cells = geod_cell_areas(transform, WGS84, range(40, 70), range(64, 81))
    assert areas.shape == (30,) and areas.dtype == np.float64
    np.testing.assert_allclose(cells, np.broadcast_to(areas[:, None], cells.shape), rtol=1e-9, atol=0)
    # a 0.001° cell: about 111.3 m x 110.6 m at the equator, about half as wide at 60°N (rough sanity check)
    expected = 111_319.49 * 0.001 * 110_574.0 * 0.001 * np.cos(np.radians(lat0))
    assert areas[0] == pytest.approx(expected, rel=2e-2)


def test_projected_rows_are_within_a_tenth_of_a_percent_of_the_planar_area():
    utm = CRS.from_epsg(32633).to_wkt()
    transform = (10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0)
    areas = pixel_row_areas_m2(transform, utm, row0=0, n_rows=64, col0=0, n_cols=64)
    np.testing.assert_allclose(areas, 100.0, rtol=1e-3)
    cells = geod_cell_areas(transform, utm, [0, 63], [0, 32, 63])
    np.testing.assert_allclose(cells, np.broadcast_to(areas[[0, 63], None], cells.shape), rtol=1e-6)


def test_rotated_grid_does_not_crash_and_keeps_the_pixel_area():
    utm = CRS.from_epsg(32633).to_wkt()
    angle = np.radians(30)
    transform = (10 * np.cos(angle), -10 * np.sin(angle), 500000.0, -10 * np.sin(angle), -10 * np.cos(angle), 5e6)
    areas = pixel_row_areas_m2(transform, utm, row0=5, n_rows=3, col0=0, n_cols=8)
    np.testing.assert_allclose(areas, 100.0, rtol=1e-3)


@pytest.mark.parametrize("crs_wkt", [None, "", "not a crs"])
def test_no_usable_crs_gives_no_area(crs_wkt):
    assert pixel_row_areas_m2((1.0, 0, 0, 0, -1.0, 0), crs_wkt, row0=0, n_rows=4, col0=0, n_cols=4) is None


def test_cost_per_1024_chunk_row_vector_is_small():
    import time

    t0 = time.perf_counter()
    areas = pixel_row_areas_m2((0.0001, 0.0, 10.0, 0.0, -0.0001, 45.0), WGS84, row0=0, n_rows=1024, col0=0,
                               n_cols=1024)
    elapsed = time.perf_counter() - t0
    assert areas.shape == (1024,) and np.all(np.diff(areas) > 0)  # cells grow towards the equator
    assert elapsed < 2.0  # generous on a loaded 2-core machine; measured figure in the commit notes
