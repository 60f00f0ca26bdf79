"""STAC items as scenes: an ItemCollection served over HTTP whose items' assets (COGs, one at
twice the pixel size) are stacked on the finest grid, window by window, with the coarse band
resampled bilinearly, as a whole-scene resampled read gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.transform import from_origin
from rasterio.windows import Window

from pipelines.plan.chunks import plan_chunks
from pipelines.plan.scenes import assign_scene_names
from pipelines.readers import InputPolicy, close_readers, known_suffixes, open_scene, read_window, reader_for
from pipelines.readers.stac import stac_input_sha256, stac_scene_paths
from schemas.errors import InputError, JobSpecError
from schemas.job import parse_job_spec
from tests.helpers import smooth_scene
from tests.remote_servers import RangeServer

SHAPE = (150, 173)  # fine grid (rows, cols), 10 m
FINE, COARSE = ("B04", "B03", "B02"), "B08"  # B08 at 20 m
ASSETS = (*FINE, COARSE)


def _write(path: Path, band: np.ndarray, *, pixel_m: float) -> None:
    height, width = band.shape
    with rasterio.open(path, "w", driver="COG", width=width, height=height, count=1, dtype=band.dtype.name,
                       crs="EPSG:32633", transform=from_origin(500000.0, 5000000.0, pixel_m, pixel_m), nodata=0,
                       blocksize=64) as ds:
        ds.write(band[None])


def write_item_assets(folder: Path, *, seed: int = 3) -> dict[str, np.ndarray]:
    """Three 10 m bands and a 20 m band (covering the 10 m extent) as COGs in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    fine = smooth_scene(SHAPE, bands=3, seed=seed)
    coarse = smooth_scene((SHAPE[0] // 2, -(-SHAPE[1] // 2)), bands=1, seed=seed + 1)[0]
    for key, band in zip(FINE, fine, strict=True):
        _write(folder / f"{key}.tif", band, pixel_m=10.0)
    _write(folder / f"{COARSE}.tif", coarse, pixel_m=20.0)
    return {**dict(zip(FINE, fine, strict=True)), COARSE: coarse}


def write_items(path: Path, items: dict[str, dict[str, str]]) -> Path:
    """A STAC ItemCollection (GeoJSON FeatureCollection) with one item per id: {id: {asset key: href}}."""
    features = [{
        "type": "Feature", "stac_version": "1.0.0", "id": item_id,
        "geometry": {"type": "Polygon", "coordinates": [[[15.0, 45.0], [15.1, 45.0], [15.1, 45.1], [15.0, 45.0]]]},
        "bbox": [15.0, 45.0, 15.1, 45.1], "properties": {"datetime": "2025-06-01T10:00:00Z"}, "links": [],
        "assets": {k: {"href": href, "type": "image/tiff; application=geotiff; profile=cloud-optimized"}
                   for k, href in assets.items()},
    } for item_id, assets in items.items()]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def stacked_reference(folder: Path) -> np.ndarray:
    """(4, H, W) uint16: the fine bands and the coarse band resampled (bilinear) over the whole
    fine extent in one read, as the reader must give window by window."""
    bands = []
    for key in FINE:
        with rasterio.open(folder / f"{key}.tif") as ds:
            bands.append(ds.read(1))
    with rasterio.open(folder / f"{COARSE}.tif") as ds:
        bands.append(ds.read(1, window=Window(0, 0, SHAPE[1] / 2, SHAPE[0] / 2), out_shape=SHAPE,
                             resampling=Resampling.bilinear))
    return np.stack(bands)


@pytest.fixture(scope="module")
def served_items(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stac")
    write_item_assets(folder / "assets")
    hrefs = {k: f"assets/{k}.tif" for k in ASSETS}  # relative: resolved against the collection's URL
    write_items(folder / "items.json", {"S2B_33UUP_20250601": hrefs,
                                        "S2B_33UUP_20250611": {k: v for k, v in hrefs.items() if k != COARSE}})
    with RangeServer(folder) as server:
        yield folder, server


def test_items_become_scenes_named_by_item_id(served_items):
    folder, server = served_items
    paths = stac_scene_paths(f"{server.url}/items.json", base_dir=folder)
    assert paths == [f"{server.url}/items.json#S2B_33UUP_20250601", f"{server.url}/items.json#S2B_33UUP_20250611"]
    assert assign_scene_names(paths, suffixes=known_suffixes()) == ["S2B_33UUP_20250601", "S2B_33UUP_20250611"]
    assert {reader_for(p).name for p in paths} == {"stac"}
    assert stac_scene_paths("items.json", base_dir=folder)[0] == f"{folder / 'items.json'}#S2B_33UUP_20250601"


def test_a_coarser_asset_is_resampled_to_the_finest_grid_window_by_window(served_items):
    folder, server = served_items
    path = f"{server.url}/items.json#S2B_33UUP_20250601"
    close_readers()
    info = open_scene(path, policy=InputPolicy(assets=ASSETS))
    assert (info.format, info.shape, info.count, info.dtype, info.crs) == ("stac", SHAPE, 4, "uint16", "EPSG:32633")
    assert info.transform == (10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0)
    expected = stacked_reference(folder / "assets")
    padded = np.pad(expected, ((0, 0), (8, 8), (8, 8)), mode="reflect")
    for w in plan_chunks(SHAPE, 64, 8):
        pixels, _ = read_window(info, w)
        r0, c0 = (s.start for s in w.core)
        cut = padded[:, r0:r0 + w.window_shape[0], c0:c0 + w.window_shape[1]]
        np.testing.assert_array_equal(pixels[:3], cut[:3])  # the 10 m bands: exact
        # the 20 m band: the same bilinear samples as a whole-scene resampled read, exactly in the
        # core; within 1 DN in the halo (edge windows reflect the scene, the reference its padding)
        core = (slice(None), *w.core_in_window)
        np.testing.assert_array_equal(pixels[3:][core], cut[3:][core])
        assert np.abs(pixels[3].astype(int) - cut[3].astype(int)).max() <= 1
    b08 = read_window(info, plan_chunks(SHAPE, 64, 8)[4], bands=(4,))[0]
    assert b08.shape[0] == 1
    identity = stac_input_sha256(path, ASSETS)
    assert identity == stac_input_sha256(path, ASSETS) != stac_input_sha256(path, ASSETS[:3])
    close_readers()


def test_items_without_the_assets_or_keys_are_refused_by_name(served_items, tmp_path):
    folder, server = served_items
    with pytest.raises(InputError, match=r"S2B_33UUP_20250611: item has no assets \['B08'\]"):
        open_scene(f"{server.url}/items.json#S2B_33UUP_20250611", policy=InputPolicy(assets=ASSETS))
    with pytest.raises(InputError, match="needs asset keys"):
        open_scene(f"{server.url}/items.json#S2B_33UUP_20250601")
    with pytest.raises(InputError, match="'nope' is not in"):
        open_scene(f"{server.url}/items.json#nope", policy=InputPolicy(assets=ASSETS))
    elsewhere = tmp_path / "utm34"
    elsewhere.mkdir()
    with rasterio.open(folder / "assets" / "B04.tif") as src:
        profile, band = src.profile, src.read()
    with rasterio.open(elsewhere / "B04.tif", "w", **(profile | {"crs": "EPSG:32634"})) as dst:
        dst.write(band)
    items = write_items(tmp_path / "items.json", {"mixed": {"B04": str(elsewhere / "B04.tif"),
                                                            "B03": str(folder / "assets" / "B03.tif")}})
    with pytest.raises(InputError, match="must share a CRS"):
        open_scene(f"{items}#mixed", policy=InputPolicy(assets=("B04", "B03")))


def test_the_job_spec_takes_stac_and_refuses_a_credentialed_collection():
    spec = parse_job_spec("stac: {items: items.json, assets: [B04, B03, B02, B08]}\noutput: {root: out}\n",
                          source="job.yaml")
    assert spec.inputs == () and spec.stac.assets == ASSETS
    with pytest.raises(JobSpecError, match="needs inputs"):
        parse_job_spec("output: {root: out}\n", source="job.yaml")
    with pytest.raises(JobSpecError, match="carries credentials") as err:
        parse_job_spec("stac: {items: 'https://h/items.json?token=abc123', assets: [B04]}\noutput: {root: out}\n",
                       source="job.yaml")
    assert "abc123" not in str(err.value)
