"""Zarr volume reader: OME-Zarr 0.5 images (geometry from scale/translation or tessera's exact
affine), plain arrays, windows equal to the whole volume, tessera output stores refused."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from pipelines.plan.chunks import plan_chunks
from pipelines.readers import InputPolicy, open_scene, read_window
from pipelines.readers.zarr_volume import ZarrVolumeReader
from pipelines.writers.overviews import build_overviews
from pipelines.writers.zarr_masks import create_scene_store, scene_grid
from schemas import store as layout
from schemas.errors import InputError

SHAPE = (14, 30, 25)  # (z, y, x)
CHUNK, HALO = (6, 8, 8), 3


def ome_axes(channels: bool, unit: str | None = "millimeter") -> list[dict]:
    space = [{"name": n, "type": "space", **({"unit": unit} if unit else {})} for n in ("z", "y", "x")]
    return ([{"name": "c", "type": "channel"}] if channels else []) + space


def write_ome(path, data: np.ndarray, *, scale, translation, unit="millimeter", extra_attrs=None):
    """An OME-Zarr 0.5 image with two levels (the second at half resolution, other values)."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    channels = data.ndim == 4
    names = ("c", "z", "y", "x") if channels else ("z", "y", "x")
    full = group.create_array("s0", shape=data.shape, chunks=(1, 5, 8, 8)[-data.ndim:], dtype=data.dtype,
                              dimension_names=names)
    full[...] = data
    half = data[(slice(None),) * (data.ndim - 3) + (slice(None, None, 2),) * 3]
    low = group.create_array("s1", shape=half.shape, dtype=data.dtype, dimension_names=names)
    low[...] = half + 1
    lead = [1.0] if channels else []
    shift = {"type": "translation", "translation": [0.0] * len(lead) + list(translation)}
    datasets = [
        {"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": lead + list(scale)}, shift]},
        {"path": "s1", "coordinateTransformations": [{"type": "scale", "scale": lead + [2 * s for s in scale]}, shift]},
    ]
    group.attrs.update({"ome": {"version": "0.5", "multiscales": [
        {"name": "image", "axes": ome_axes(channels, unit), "datasets": datasets}]}, **(extra_attrs or {})})
    return path


def assert_windows_match(info, expected: np.ndarray, bands=None) -> None:
    padded = np.pad(expected, ((0, 0),) + ((HALO, HALO),) * 3, mode="reflect")
    windows = plan_chunks(info.shape, CHUNK, HALO)
    assert len(windows) > 8
    for w in windows:
        pixels, valid = read_window(info, w, bands=bands)
        start = [s.start for s in w.core]
        cut = padded[(slice(None), *(slice(a, a + n) for a, n in zip(start, w.window_shape, strict=True)))]
        assert pixels.dtype == np.dtype(info.dtype)
        np.testing.assert_array_equal(pixels, cut)
        np.testing.assert_array_equal(valid, ~np.isnan(cut).all(axis=0))


def smooth(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * 50 + 100).astype(np.float32)


def test_an_ome_zarr_image_reads_its_first_level_with_its_geometry(tmp_path):
    data = smooth((2, *SHAPE))
    data[1, 3:5, 4:9, 2:6] = np.nan  # NaN in one channel only: still valid
    data[:, 0:2, 0:3, 0:4] = np.nan  # NaN everywhere: invalid
    path = write_ome(tmp_path / "ct.ome.zarr", data, scale=(3.0, 0.8, 0.7), translation=(20.0, -50.0, -100.0))
    info = open_scene(path)
    assert info.format == "zarr" and info.shape == SHAPE and info.count == 2 and info.dtype == "float32"
    assert info.spacing == (3.0, 0.8, 0.7) and info.orientation == "SAR" and info.nodata is None
    assert info.block_shape == (5, 8, 8)
    affine = np.array(info.affine).reshape(4, 4)
    z, y, x = 4, 7, 11
    np.testing.assert_array_equal(affine @ [z, y, x, 1], [0.7 * x - 100.0, 0.8 * y - 50.0, 3.0 * z + 20.0, 1.0])
    # the store writer's OME metadata of this geometry is the input's own
    grid = scene_grid(info)
    assert grid.is_axis_aligned
    transforms = grid.ome_attributes("classes")["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert transforms == [{"type": "scale", "scale": [3.0, 0.8, 0.7]},
                          {"type": "translation", "translation": [20.0, -50.0, -100.0]}]
    assert_windows_match(info, data)
    assert_windows_match(info, data[[1]], bands=(2,))


def test_units_convert_to_mm_and_tessera_affines_win(tmp_path):
    data = smooth(SHAPE).astype(np.int16)
    micro = open_scene(write_ome(tmp_path / "um.zarr", data, scale=(2000.0, 500.0, 250.0),
                                 translation=(1000.0, 0.0, -3000.0), unit="micrometer"))
    assert micro.spacing == (2.0, 0.5, 0.25) and micro.dtype == "int16" and micro.count == 1
    np.testing.assert_array_equal(np.array(micro.affine).reshape(4, 4)[:3, 3], [-3.0, 0.0, 1.0])
    assert_windows_match(micro, data[None])

    oblique = [[0.0, -0.3, 0.75, -90.0], [0.2, 0.75, 0.3, 10.5], [2.9, 0.0, -0.05, 33.0], [0.0, 0.0, 0.0, 1.0]]
    exact = open_scene(write_ome(tmp_path / "ob.zarr", data, scale=(3.0, 0.8, 0.8), translation=(0, 0, 0),
                                 extra_attrs={layout.TESSERA_ATTR: {layout.KEY_AFFINE: oblique}}))
    assert exact.affine == tuple(v for row in oblique for v in row)


def test_plain_arrays_get_unit_geometry(tmp_path):
    data = smooth(SHAPE, seed=2).astype(np.float64)
    zarr.create_array(str(tmp_path / "plain.zarr"), data=data, chunks=(7, 10, 10))
    info = open_scene(tmp_path / "plain.zarr")
    assert info.shape == SHAPE and info.count == 1 and info.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(np.array(info.affine).reshape(4, 4)[:3, :3], np.eye(3)[::-1])
    assert info.orientation == "SAR" and info.dtype == "float64"
    assert_windows_match(info, data[None])

    chans = zarr.create_array(str(tmp_path / "c.zarr"), shape=(3, *SHAPE), dtype="uint16", chunks=(1, 7, 10, 10),
                              dimension_names=("c", "z", "y", "x"))
    values = (smooth((3, *SHAPE)) * 10).astype(np.uint16)
    chans[...] = values
    with pytest.raises(InputError, match=r"c.zarr: has 3 channel\(s\), job asks for bands \[4\]"):
        open_scene(tmp_path / "c.zarr", policy=InputPolicy(bands=(4,)))
    assert_windows_match(open_scene(tmp_path / "c.zarr"), values[[2, 0]], bands=(3, 1))

    zarr.create_array(str(tmp_path / "anon4.zarr"), shape=(3, *SHAPE), dtype="uint8")
    with pytest.raises(InputError, match=r"anon4.zarr: a plain Zarr array of shape \[3, 14, 30, 25\].*dimension_names"):
        open_scene(tmp_path / "anon4.zarr")


def test_unsupported_layouts_are_refused(tmp_path):
    group = zarr.open_group(str(tmp_path / "t.zarr"), mode="w", zarr_format=3)
    group.create_array("0", shape=(2, *SHAPE), dtype="float32")
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": [{"name": "t", "type": "time"},
                                                                      *ome_axes(False)], "datasets": [{"path": "0"}]}]}
    with pytest.raises(InputError, match=r"t.zarr: OME axes \['t', 'z', 'y', 'x'\].*no time axis"):
        open_scene(tmp_path / "t.zarr")
    zarr.open_group(str(tmp_path / "bare.zarr"), mode="w", zarr_format=3)
    with pytest.raises(InputError, match="bare.zarr: a Zarr group without OME-Zarr multiscales"):
        open_scene(tmp_path / "bare.zarr")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(InputError, match="empty.zarr: not a Zarr v3 array or group"):
        open_scene(tmp_path / "empty.zarr")
    with pytest.raises(InputError, match="gone.zarr: not found"):
        open_scene(tmp_path / "gone.zarr")


def test_a_tessera_output_store_is_refused(tmp_path):
    grid = layout.VolumeGrid(affine=[[0, 0, 0.8, -100], [0, 0.8, 0, 50], [3.0, 0, 0, 20], [0, 0, 0, 1]])
    store = tmp_path / "scan.zarr"
    create_scene_store(store, shape=SHAPE, chunk_shape=(8, 8, 8), grid=grid, class_names=("bg", "organ"),
                       provenance={"fingerprint": "f" * 64}, image=(1, "float32"))
    with pytest.raises(InputError, match=r"scan.zarr: is a tessera output store .*status 'partial'"):
        open_scene(store)
    with pytest.raises(InputError, match="is a tessera output store"):  # nor an array inside one
        ZarrVolumeReader().open(str(store / layout.classes_path(3)))
    with pytest.raises(InputError, match="is a tessera output store"):  # nor its image, nor its label image
        ZarrVolumeReader().open(str(store / layout.image_path(0)))
    with pytest.raises(InputError, match="is a tessera output store"):
        ZarrVolumeReader().open(str(store / layout.LABEL_IMAGE))
    build_overviews(store)
    with pytest.raises(InputError, match="is a tessera output store"):  # nor one of its overview levels
        ZarrVolumeReader().open(str(store / layout.classes_path(3, 1)))
    with pytest.raises(InputError, match="is a tessera output store"):
        ZarrVolumeReader().open(str(store / layout.image_path(1)))
