"""Tests of the synthetic scene generator (pipelines.tools.synthetic)."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS

from pipelines.tools.synthetic import (
    BAND_NAMES,
    CLASS_NAMES,
    NODATA_CLASS,
    NODATA_VALUE,
    SceneSpec,
    render_window,
    scene_transform,
    write_scene,
)


@pytest.fixture(scope="module")
def scene_1024() -> tuple[SceneSpec, np.ndarray, np.ndarray]:
    spec = SceneSpec(1024, 1024, seed=3)
    bands, labels = render_window(spec, 0, 0, 1024, 1024)
    return spec, bands, labels


@pytest.mark.parametrize(
    ("window_a", "window_b"),
    [
        ((100, 200, 300, 257), (333, 390, 211, 300)),  # overlapping, odd sizes
        ((0, 0, 512, 512), (512, 512, 512, 512)),  # block neighbours at the scene corner
        ((700, 5, 1, 900), (640, 640, 384, 1)),  # 1-px strips
    ],
)
def test_windows_match_slices_of_their_union(window_a: tuple, window_b: tuple) -> None:
    spec = SceneSpec(1024, 1100, seed=5)
    r0 = min(window_a[0], window_b[0])
    c0 = min(window_a[1], window_b[1])
    r1 = max(window_a[0] + window_a[2], window_b[0] + window_b[2])
    c1 = max(window_a[1] + window_a[3], window_b[1] + window_b[3])
    union_bands, union_labels = render_window(spec, r0, c0, r1 - r0, c1 - c0)
    for row0, col0, h, w in (window_a, window_b):
        bands, labels = render_window(spec, row0, col0, h, w)
        rows = slice(row0 - r0, row0 - r0 + h)
        cols = slice(col0 - c0, col0 - c0 + w)
        np.testing.assert_array_equal(bands, union_bands[:, rows, cols])
        np.testing.assert_array_equal(labels, union_labels[rows, cols])


@pytest.mark.parametrize("seed", [2, 16])
def test_random_windows_match_an_urban_region(seed: int) -> None:
    spec = SceneSpec(4096, 4096, seed=seed)
    r0, c0, size = 1700, 1700, 640
    region_bands, region_labels = render_window(spec, r0, c0, size, size)
    assert (region_labels == CLASS_NAMES.index("building")).mean() > 0.005
    rng = np.random.default_rng(seed)
    for _ in range(12):
        h, w = (int(v) for v in rng.integers(1, 200, size=2))
        row0 = r0 + int(rng.integers(0, size - h + 1))
        col0 = c0 + int(rng.integers(0, size - w + 1))
        bands, labels = render_window(spec, row0, col0, h, w)
        rows, cols = slice(row0 - r0, row0 - r0 + h), slice(col0 - c0, col0 - c0 + w)
        np.testing.assert_array_equal(bands, region_bands[:, rows, cols])
        np.testing.assert_array_equal(labels, region_labels[rows, cols])


def test_block_grid_matches_one_render() -> None:
    spec = SceneSpec(600, 700, seed=11)
    bands, labels = render_window(spec, 0, 0, 600, 700)
    tiled_bands = np.zeros_like(bands)
    tiled_labels = np.zeros_like(labels)
    for r in range(0, 600, 128):
        for c in range(0, 700, 160):
            h, w = min(128, 600 - r), min(160, 700 - c)
            tiled_bands[:, r : r + h, c : c + w], tiled_labels[r : r + h, c : c + w] = render_window(spec, r, c, h, w)
    np.testing.assert_array_equal(tiled_bands, bands)
    np.testing.assert_array_equal(tiled_labels, labels)


def test_same_seed_same_pixels_and_other_seed_differs() -> None:
    first = render_window(SceneSpec(512, 512, seed=7), 0, 0, 512, 512)
    again = render_window(SceneSpec(512, 512, seed=7), 0, 0, 512, 512)
    other = render_window(SceneSpec(512, 512, seed=8), 0, 0, 512, 512)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    both_valid = (first[1] != NODATA_CLASS) & (other[1] != NODATA_CLASS)
    assert (first[1][both_valid] != other[1][both_valid]).mean() > 0.2
    assert (first[0][:, both_valid] != other[0][:, both_valid]).mean() > 0.9


def test_shapes_and_dtypes(scene_1024: tuple) -> None:
    _, bands, labels = scene_1024
    assert bands.shape == (len(BAND_NAMES), 1024, 1024)
    assert bands.dtype == np.uint16
    assert labels.shape == (1024, 1024)
    assert labels.dtype == np.uint8
    assert set(np.unique(labels)) <= set(range(len(CLASS_NAMES))) | {NODATA_CLASS}


def test_all_classes_present_on_a_1024_scene(scene_1024: tuple) -> None:
    _, _, labels = scene_1024
    counts = np.bincount(labels[labels != NODATA_CLASS], minlength=len(CLASS_NAMES))
    shares = counts / counts.sum()
    assert (shares > 0.003).all(), dict(zip(CLASS_NAMES, shares.round(4)))


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_all_classes_present_for_several_seeds(seed: int) -> None:
    spec = SceneSpec(1024, 1024, seed=seed)
    _, labels = render_window(spec, 0, 0, 1024, 1024)
    assert set(np.unique(labels[labels != NODATA_CLASS])) == set(range(len(CLASS_NAMES)))


def test_nodata_exactly_outside_footprint(scene_1024: tuple) -> None:
    _, bands, labels = scene_1024
    nodata = labels == NODATA_CLASS
    assert 0.05 < nodata.mean() < 0.5  # an inset, tilted footprint
    assert (bands[:, nodata] == NODATA_VALUE).all()
    assert (bands[:, ~nodata] != NODATA_VALUE).all()
    # The corners are outside, the centre inside.
    assert nodata[0, 0] and nodata[0, -1] and nodata[-1, 0] and nodata[-1, -1]
    assert not nodata[512, 512]


def test_footprint_is_tilted_by_8_to_12_degrees() -> None:
    for seed in range(6):
        *_, angle = SceneSpec(2048, 2048, seed=seed).footprint_geometry()
        assert 8.0 <= abs(np.degrees(angle)) <= 12.0


def test_footprint_can_be_disabled() -> None:
    bands, labels = render_window(SceneSpec(256, 256, seed=1, footprint=False), 0, 0, 256, 256)
    assert (labels != NODATA_CLASS).all()
    assert (bands != NODATA_VALUE).all()


def test_elongated_scene_still_has_a_footprint() -> None:
    spec = SceneSpec(64, 2000, seed=2)
    _, labels = render_window(spec, 0, 0, 64, 2000)
    valid = labels != NODATA_CLASS
    assert 0.3 < valid.mean() < 1.0


def test_spectra_are_plausible(scene_1024: tuple) -> None:
    _, bands, labels = scene_1024
    blue, green, red, nir = (bands[i].astype(np.float64) for i in range(4))
    ndvi = (nir - red) / np.maximum(nir + red, 1.0)

    def median(values: np.ndarray, name: str) -> float:
        return float(np.median(values[labels == CLASS_NAMES.index(name)]))

    assert median(nir, "water") < 400  # water is dark in NIR
    assert median(ndvi, "vegetation") > 0.5
    assert median(ndvi, "bare") < 0.35
    assert median(ndvi, "road") < 0.2
    # Not separable by one band alone: the classes' NIR ranges overlap.
    road_nir = nir[labels == CLASS_NAMES.index("road")]
    bare_nir = nir[labels == CLASS_NAMES.index("bare")]
    assert np.percentile(road_nir, 95) > np.percentile(bare_nir, 5)


@pytest.mark.parametrize(
    ("window", "match"),
    [((-1, 0, 10, 10), "leaves"), ((0, 0, 0, 10), "positive"), ((100, 100, 30, 10), "leaves")],
)
def test_bad_windows_are_rejected(window: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        render_window(SceneSpec(120, 120, seed=0), *window)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"height": 0, "width": 10, "seed": 0}, "size"),
        ({"height": 10, "width": 10, "seed": -1}, "seed"),
        ({"height": 10, "width": 10, "seed": 0, "pixel_size_m": 0.0}, "pixel_size_m"),
        ({"height": 10, "width": 10, "seed": 0, "footprint_inset": 0.5}, "footprint_inset"),
    ],
)
def test_bad_specs_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SceneSpec(**kwargs)


def test_transform_is_north_up_from_the_origin() -> None:
    spec = SceneSpec(100, 200, seed=0, pixel_size_m=20.0, origin_x=300000.0, origin_y=4000000.0)
    assert spec.transform == Affine(20.0, 0.0, 300000.0, 0.0, -20.0, 4000000.0)
    assert scene_transform(spec) == spec.transform
    assert spec.transform @ (200, 100) == (304000.0, 3998000.0)


def test_write_scene_geotiff(tmp_path) -> None:
    spec = SceneSpec(700, 600, seed=4, crs="EPSG:32632", origin_x=400000.0, origin_y=5200000.0)
    image_path, truth_path = tmp_path / "scene.tif", tmp_path / "truth.tif"
    write_scene(spec, image_path, truth_path, block=512)
    bands, labels = render_window(spec, 0, 0, 700, 600)
    with rasterio.open(image_path) as src:
        assert (src.count, src.height, src.width) == (4, 700, 600)
        assert src.dtypes == ("uint16",) * 4
        assert src.nodata == NODATA_VALUE
        assert src.crs == CRS.from_epsg(32632)
        assert src.transform == Affine(10.0, 0.0, 400000.0, 0.0, -10.0, 5200000.0)
        assert src.descriptions == BAND_NAMES
        assert src.block_shapes == [(512, 512)] * 4
        np.testing.assert_array_equal(src.read(), bands)
        np.testing.assert_array_equal(src.read(window=((300, 420), (100, 170))), bands[:, 300:420, 100:170])
    with rasterio.open(truth_path) as src:
        assert (src.count, src.height, src.width) == (1, 700, 600)
        assert src.dtypes == ("uint8",)
        assert src.nodata == NODATA_CLASS
        assert src.crs == CRS.from_epsg(32632)
        assert src.transform == spec.transform
        np.testing.assert_array_equal(src.read(1), labels)


def test_write_scene_rejects_unaligned_block(tmp_path) -> None:
    with pytest.raises(ValueError, match="block"):
        write_scene(SceneSpec(64, 64, seed=0), tmp_path / "x.tif", block=300)
