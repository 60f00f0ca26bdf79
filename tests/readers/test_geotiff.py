"""GeoTIFF reader: metadata, windowed reads with reflect padding, nodata, safe scene names."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.plan.chunks import plan_chunks
from pipelines.plan.scenes import scene_name
from pipelines.readers import READERS, known_suffixes, open_scene, read_window
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


def test_decimated_read_takes_the_files_overview_when_it_has_one(tmp_path):
    import rasterio
    from rasterio.enums import Resampling

    data = smooth_scene((128, 96), bands=3, seed=4, nodata_border=8)
    path = write_geotiff(tmp_path / "s.tif", data)
    reader = READERS["geotiff"]
    pixels, valid = reader.read_decimated(open_scene(path), (64, 48), bands=(3, 1))
    assert pixels.shape == (2, 64, 48) and pixels.dtype == np.uint16
    assert set(np.unique(pixels)) <= set(np.unique(data[[2, 0]]))  # nearest: values of the file
    np.testing.assert_array_equal(valid, ~(pixels == 0).all(axis=0))
    assert not valid[:4].any() and valid[10:, :40].all()  # the nodata border, halved
    with rasterio.open(path, "r+") as ds:  # an overview GDAL must prefer: a constant one
        ds.build_overviews([2], Resampling.average)
    with rasterio.open(path, "r+", OVERVIEW_LEVEL=0) as ds:
        ds.write(np.full((3, 64, 48), 7, np.uint16))
    pixels, _ = reader.read_decimated(open_scene(path), (64, 48), bands=(1,))
    assert (pixels == 7).all()


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
    assert scene_name(path, suffixes=known_suffixes()) == name


def test_the_reader_is_chosen_by_suffix_and_remembered(tmp_path):
    from pipelines.readers import READERS, reader_for

    assert reader_for("a/b/S2.TIF").name == reader_for("x.vrt").name == "geotiff"
    assert reader_for("scene.img").name == "geotiff"  # GDAL's formats by content
    info = open_scene(write_geotiff(tmp_path / "s.tif", smooth_scene((20, 30), bands=2)))
    assert info.format == "geotiff" and info.format in READERS and info.ndim == 2
    assert info.source_dtype == "uint16" and info.derive is None and info.affine is None


def _complex_scene(tmp_path, nodata=None):
    rng = np.random.default_rng(3)
    z = (rng.normal(size=(2, 40, 50)) + 1j * rng.normal(size=(2, 40, 50))).astype(np.complex64)
    z[:, 0, 0] = 0  # a zero sample: -100 dB, not -inf
    return z, write_geotiff(tmp_path / "slc.tif", z, nodata=nodata)


def test_complex_bands_are_refused_unless_the_job_derives_a_real_band(tmp_path):
    from pipelines.readers import InputPolicy

    z, path = _complex_scene(tmp_path)
    with pytest.raises(InputError, match=r"slc.tif: complex-valued bands \(complex64.*complex_bands: magnitude"):
        open_scene(path)
    window = plan_chunks((40, 50), 64, 0)[0]
    for derive, expected in (("magnitude", np.abs(z.astype(np.complex128))),
                             ("db", 10 * np.log10(np.maximum(np.abs(z.astype(np.complex128)) ** 2, 1e-10)))):
        info = open_scene(path, policy=InputPolicy(complex_bands=derive))
        assert info.dtype == "float32" and info.source_dtype == "complex64" and info.derive == derive
        pixels, valid = read_window(info, window)
        assert pixels.dtype == np.float32 and valid.all()
        np.testing.assert_allclose(pixels, expected.astype(np.float32), rtol=1e-6)
    assert pixels[0, 0, 0] == -100.0


@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint32", "int32", "float32", "float64"])
def test_integer_and_float_bands_are_read_as_they_are(tmp_path, dtype):
    data = (smooth_scene((24, 24), bands=2) // 7).astype(dtype)
    info = open_scene(write_geotiff(tmp_path / "s.tif", data, nodata=None))
    pixels, _ = read_window(info, plan_chunks((24, 24), 24, 0)[0])
    assert info.dtype == dtype and pixels.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(pixels, data)


def test_an_unsupported_band_type_is_refused_with_the_file(tmp_path):
    from pipelines.readers.base import InputPolicy, check_dtype

    with pytest.raises(InputError, match=r"x.tif: bands of type float16 are not supported"):
        check_dtype("x.tif", ("float16",), InputPolicy())
    with pytest.raises(InputError, match=r"x.tif: mixes complex and real bands"):
        check_dtype("x.tif", ("complex64", "float32"), InputPolicy(complex_bands="db"))
    assert check_dtype("x.tif", ("uint8", "uint16"), InputPolicy()) == ("uint16", None)
    with pytest.raises(ValueError, match="complex_bands must be"):
        InputPolicy(complex_bands="phase")
