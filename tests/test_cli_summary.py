"""Class areas in the printed job summary: km² or m², never degree²."""

from __future__ import annotations

from pipelines.cli import _class_area_text


def test_class_areas_print_in_metric_units() -> None:
    area = {"class_name": "road", "pixel_count": 1234, "area_crs2": 1.2e-4}
    assert _class_area_text(area | {"area_m2": 2_345_678.0}, "degree") == "2.35 km²"
    assert _class_area_text(area | {"area_m2": 999_999.4}, "degree") == "999,999 m²"
    # no m² (no usable CRS): the CRS figure only where it is m², else the pixel count
    assert _class_area_text({"area_crs2": 5e6, "pixel_count": 5, "area_m2": None}, "metre") == "5.00 km²"
    assert _class_area_text(area | {"area_m2": None}, "degree") == "1,234 px"
    assert _class_area_text(area | {"area_m2": None}, None) == "1,234 px"
