"""The synthetic building generator: determinism, window consistency, touching and large buildings."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio

from pipelines.tools.buildings import (
    BAND_NAMES,
    LARGE_MIN_SIDE_PX,
    BuildingSceneSpec,
    ensure_building_scene,
    render_building_window,
    write_building_scene,
)


def _extent_px(ids: np.ndarray) -> dict[int, int]:
    """Longest bounding-box side (px) of every instance."""
    from scipy import ndimage

    out = {}
    labels, inverse = np.unique(ids, return_inverse=True)
    for i, sl in enumerate(ndimage.find_objects(inverse.reshape(ids.shape) + 1)):
        if sl is not None and labels[i] > 0:
            out[int(labels[i])] = max(s.stop - s.start for s in sl)
    return out


def test_same_seed_same_bytes_other_seed_other_scene(tmp_path):
    spec = BuildingSceneSpec(320, 288, seed=5)
    paths = []
    for name in ("a", "b"):
        image, truth = tmp_path / f"{name}.tif", tmp_path / f"{name}.truth.tif"
        write_building_scene(spec, image, truth)
        paths.append((image, truth))
    assert paths[0][0].read_bytes() == paths[1][0].read_bytes()
    assert paths[0][1].read_bytes() == paths[1][1].read_bytes()
    with rasterio.open(paths[0][0]) as src, rasterio.open(paths[0][1]) as truth:
        assert (src.count, src.dtypes[0], src.descriptions) == (4, "uint16", BAND_NAMES)
        assert truth.dtypes[0] == "uint32" and truth.crs == src.crs == rasterio.crs.CRS.from_string(spec.crs)
        assert truth.transform == src.transform == spec.transform
        bands, ids = render_building_window(spec, 0, 0, spec.height, spec.width)
        np.testing.assert_array_equal(src.read(), bands)
        np.testing.assert_array_equal(truth.read(1), ids)
    other, _ = render_building_window(BuildingSceneSpec(320, 288, seed=6), 0, 0, 320, 288)
    assert not np.array_equal(other, bands)
    assert bands.min() > 0  # no pixel is nodata


def test_a_window_equals_the_slice_of_a_larger_one():
    spec = BuildingSceneSpec(600, 600, seed=2)
    bands, ids = render_building_window(spec, 0, 0, 600, 600)
    sub_bands, sub_ids = render_building_window(spec, 250, 131, 300, 257)
    np.testing.assert_array_equal(sub_bands, bands[:, 250:550, 131:388])
    np.testing.assert_array_equal(sub_ids, ids[250:550, 131:388])


def test_touching_buildings_are_distinct_instances():
    spec = BuildingSceneSpec(512, 512, seed=3, large_site_probability=0.0)
    _, ids = render_building_window(spec, 0, 0, 512, 512)
    left, right = ids[:, :-1], ids[:, 1:]
    up, down = ids[:-1], ids[1:]
    touching = np.concatenate([
        np.stack([left[(left != right) & (left > 0) & (right > 0)], right[(left != right) & (left > 0) & (right > 0)]]),
        np.stack([up[(up != down) & (up > 0) & (down > 0)], down[(up != down) & (up > 0) & (down > 0)]]),
    ], axis=1)
    pairs = {tuple(sorted(p)) for p in touching.T.tolist()}
    assert len(pairs) >= 50  # dense blocks: many houses share walls
    areas = dict(zip(*np.unique(ids, return_counts=True)))
    # touching houses are whole houses, not slivers
    assert np.median([min(areas[a], areas[b]) for a, b in pairs]) >= 100
    # every instance is one 8-connected piece (a house is never two separate blobs)
    from scipy import ndimage

    for i in list(areas)[1:40]:
        _, n = ndimage.label(ids == i, structure=np.ones((3, 3)))
        assert n == 1


def test_large_buildings_exceed_a_chunk_when_asked():
    spec = BuildingSceneSpec(768, 768, seed=4, large_site_probability=1.0)
    _, ids = render_building_window(spec, 0, 0, 768, 768)
    extents = _extent_px(ids)
    assert max(extents.values()) >= LARGE_MIN_SIDE_PX
    none = BuildingSceneSpec(768, 768, seed=4, large_site_probability=0.0)
    _, ids = render_building_window(none, 0, 0, 768, 768)
    assert max(_extent_px(ids).values()) < 256


def test_bad_specs_and_windows_name_the_problem():
    with pytest.raises(ValueError, match="large_site_probability"):
        BuildingSceneSpec(64, 64, seed=1, large_site_probability=1.5)
    with pytest.raises(ValueError, match="leaves the 64 x 64 scene"):
        render_building_window(BuildingSceneSpec(64, 64, seed=1), 32, 0, 64, 64)


def test_ensure_writes_once_and_rewrites_for_another_spec(tmp_path):
    spec = BuildingSceneSpec(96, 80, seed=9)
    image, truth = ensure_building_scene(tmp_path, spec)
    first = image.stat().st_mtime_ns
    assert ensure_building_scene(tmp_path, spec) == (image, truth) and image.stat().st_mtime_ns == first
    ensure_building_scene(tmp_path, BuildingSceneSpec(96, 80, seed=10))
    with rasterio.open(truth) as src:
        np.testing.assert_array_equal(src.read(1), render_building_window(BuildingSceneSpec(96, 80, 10), 0, 0, 96, 80)[1])
