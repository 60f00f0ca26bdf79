"""GeoTIFF reader: metadata, windowed reads with reflect padding, nodata, safe scene names."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.readers.geotiff import open_scene, read_window, scene_name
from pipelines.tiling import plan_chunks
from schemas.errors import InputError
from tests.helpers import smooth_scene, write_geotiff


def test_open_and_read_windows_match_the_padded_scene(tmp_path):
    data = smooth_scene((70, 90), bands=3, seed=0, nodata_border=5)
    path = write_geotiff(tmp_path / "s.tif", data)
    info = open_scene(path)
    assert info.shape == (70, 90) and info.count == 3 and info.dtype == "uint16"
    assert info.crs == "EPSG:32633" and info.nodata == 0 and info.pixel_area_crs2 == 100.0
    padded = np.pad(data, ((0, 0), (6, 6), (6, 6)), mode="reflect")
    for w in plan_chunks(info.shape, 32, 6):
        pixels, valid = read_window(info, w, bands=(3, 1))
        r0, c0 = w.core[0].start, w.core[1].start
        expected = padded[[2, 0], r0 : r0 + w.window_shape[0], c0 : c0 + w.window_shape[1]]
        np.testing.assert_array_equal(pixels, expected)
        np.testing.assert_array_equal(valid, ~(expected == 0).all(axis=0))


def test_unreadable_inputs_name_the_file(tmp_path):
    with pytest.raises(InputError, match="missing.tif: file not found"):
        open_scene(tmp_path / "missing.tif")
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"definitely not a raster")
    with pytest.raises(InputError, match="bad.tif: cannot open as a raster"):
        open_scene(bad)


@pytest.mark.parametrize(
    ("path", "name"),
    [("/data/S2A_T33.tif", "S2A_T33"), ("../../etc/passwd", "passwd"), ("a b/c d.TIF", "c_d"),
     ("..tif", "scene"), ("x/.hidden.tiff", "hidden"), ("/data/ünïcode scene.tif", "n_code_scene")],
)
def test_scene_names_are_safe(path, name):
    assert scene_name(path) == name
