"""area_m2 end to end: a geographic scene near 60°N, a UTM scene and one without a CRS, in one job."""

from __future__ import annotations

import numpy as np
import pytest
from pyproj import Geod
from rasterio.transform import from_origin
from skimage.measure import label

from pipelines.query import run_query
from pipelines.run.job import run_job
from tests.helpers import job_spec, oracle_checkpoint, read_classes, smooth_scene, write_geotiff

pytestmark = pytest.mark.usefixtures("ray_local")

LON0, LAT0, STEP = 10.0, 60.1, 0.001  # north-west corner and pixel size in degrees
SHAPE = (150, 190)  # 3 x 3 chunks of 64 px


@pytest.fixture(scope="module")
def area_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("areas")
    data = smooth_scene(SHAPE, seed=4)
    scenes = [
        write_geotiff(tmp / "geo.tif", data, crs="EPSG:4326", transform=from_origin(LON0, LAT0, STEP, STEP)),
        write_geotiff(tmp / "utm.tif", data),  # UTM 33N, 10 m pixels, on the central meridian at 45°N
        write_geotiff(tmp / "nocrs.tif", data, crs=None, transform=from_origin(100.0, 900.0, 2.0, 2.0)),
    ]
    root = tmp / "out"
    result = run_job(job_spec(scenes, root, oracle_checkpoint(tmp / "model")), base_dir=tmp)
    assert [s.status for s in result.scenes] == ["complete"] * 3
    return root


def _regions(root, scene):
    return run_query(root, f"SELECT * FROM regions WHERE scene = '{scene}' ORDER BY region_id").to_pylist()


def _class_areas(root, scene):
    return run_query(root, f"SELECT class_areas FROM scenes WHERE scene = '{scene}'").to_pylist()[0]["class_areas"]


def test_geographic_areas_equal_geodesic_pixel_sums(area_run):
    root = area_run
    geod = Geod(ellps="WGS84")
    # independent per-row pixel areas: the geodesic area of each row's 0.001° cell
    row_area = np.array([abs(geod.polygon_area_perimeter(
        [LON0, LON0 + STEP, LON0 + STEP, LON0],
        [LAT0 - r * STEP, LAT0 - r * STEP, LAT0 - (r + 1) * STEP, LAT0 - (r + 1) * STEP])[0])
        for r in range(SHAPE[0])])
    assert 6.2e3 < row_area.mean() < 6.3e3  # 111 m x 55.6 m at 60°N
    classes = read_classes(root, "geo")
    labels = label(classes, background=255, connectivity=2)
    rows = _regions(root, "geo")
    assert len(rows) == labels.max() > 3
    assert any(r["min_row"] < 64 <= r["max_row"] and r["min_col"] < 64 <= r["max_col"] for r in rows)
    for r in rows:
        pixels = labels == _label_at_first_pixel(labels, r)
        assert int(pixels.sum()) == r["pixel_count"]
        want = float(pixels.sum(axis=1) @ row_area)
        assert r["area_m2"] == pytest.approx(want, rel=1e-9, abs=0)
    per_class = {}
    for r in rows:
        per_class[r["class_id"]] = per_class.get(r["class_id"], 0.0) + r["area_m2"]
    for c in _class_areas(root, "geo"):
        assert c["area_m2"] == pytest.approx(per_class.get(c["class_id"], 0.0), rel=1e-12, abs=0)
        assert c["area_m2"] == pytest.approx(float(((classes == c["class_id"]).sum(axis=1)) @ row_area), rel=1e-9)


def _label_at_first_pixel(labels: np.ndarray, region: dict) -> int:
    """The whole-scene label of a region of the table: the label at its first pixel in raster
    order, which lies on its top row (min_row)."""
    candidates = np.unique(labels[region["min_row"], region["min_col"]:region["max_col"] + 1])
    for k in candidates[candidates > 0]:
        rows, cols = np.nonzero(labels == k)
        if (rows.min(), rows.max(), cols.min(), cols.max(), rows.size) == (
                region["min_row"], region["max_row"], region["min_col"], region["max_col"], region["pixel_count"]):
            return int(k)
    raise AssertionError(f"no scene label matches region {region['region_id']}")


def test_utm_areas_are_close_to_grid_areas(area_run):
    rows = _regions(area_run, "utm")
    assert rows
    for r in rows:
        # on the central meridian the grid shrinks distances by k0 = 0.9996: area_m2 = area_crs2 / k0²
        assert r["area_m2"] == pytest.approx(r["area_crs2"], rel=1e-3)
        assert r["area_m2"] > r["area_crs2"]
    for c in _class_areas(area_run, "utm"):
        assert c["area_m2"] == pytest.approx(c["area_crs2"], rel=1e-3)


def test_no_crs_gives_null_areas(area_run):
    rows = _regions(area_run, "nocrs")
    assert rows and all(r["area_m2"] is None for r in rows)
    assert all(c["area_m2"] is None for c in _class_areas(area_run, "nocrs") if c["pixel_count"])
