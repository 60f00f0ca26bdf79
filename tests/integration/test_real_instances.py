"""Instance jobs on real annotations (`../shared/data`, skipped cleanly when absent): the 2018 Data
Science Bowl nuclei (512², 125 touching nuclei, some larger than the halo) and SpaceNet Atlanta
building footprints (900² at 0.5 m in EPSG:32616). The `instance_oracle` with ``given_labels``
returns each window's annotation renumbered per window, as a perfect model would predict it
window by window; the job must stitch the windows back to the annotation exactly (0 split,
0 duplicate), with statistics equal to skimage's regionprops, and for the buildings polygons that
lie on the real footprints in the real CRS."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr

from pipelines.run.job import run_job
from schemas.instances import INSTANCES
from tests.conftest import SHARED_DATA
from tests.helpers import _save_oracle, job_spec, write_geotiff
from tests.stats.instance_cases import splits_and_duplicates
from workers.registry import build_model

pytestmark = pytest.mark.usefixtures("ray_local")

NUCLEI = SHARED_DATA / "microscopy" / "dsb2018_nuclei"
BUILDINGS = SHARED_DATA / "geo" / "spacenet_atlanta_buildings"


def _labels_card(out_dir: Path, *, bands: int, tile: int, halo: int) -> Path:
    args = {"given_labels": True}
    model = build_model("instance_oracle", in_channels=bands, num_classes=2, arch_args=args)
    return _save_oracle(model, "instance_oracle", args, bands=bands, num_classes=2, mean=0.0, std=1.0,
                        tile_size=tile, halo=halo, out_dir=out_dir, name="given-labels")


def _run(tmp_path: Path, scene: Path, *, chunk: int, halo: int) -> Path:
    card = _labels_card(tmp_path / "model", bands=2, tile=chunk + 2 * halo, halo=halo)
    root = tmp_path / "out"
    result = run_job(job_spec([scene], root, card, chunk_size=chunk, halo=halo, tile_size=chunk + 2 * halo),
                     base_dir=tmp_path)
    assert [s.status for s in result.scenes] == ["complete"], [s.error for s in result.scenes]
    return root


@pytest.mark.skipif(not (NUCLEI / "mask2d.tif").is_file(), reason=f"no real nuclei data at {NUCLEI}")
def test_real_nuclei_stitch_back_to_their_annotation_with_regionprops_statistics(tmp_path):
    import geopandas
    from skimage.measure import regionprops

    with rasterio.open(NUCLEI / "mask2d.tif") as m, rasterio.open(NUCLEI / "img2d.tif") as i:
        truth, image = m.read(1), i.read(1)
    scene = write_geotiff(tmp_path / "nuclei.tif", np.stack([truth, image]).astype(np.uint16), nodata=None)
    chunk, halo = 64, 16  # 64 chunks; the largest nucleus (39 px) is larger than the halo
    root = _run(tmp_path, scene, chunk=chunk, halo=halo)
    stitched = zarr.open_array(str(root / "nuclei.zarr"), path=INSTANCES, mode="r")[:]
    crossing = sum(1 for p in regionprops(truth.astype(np.int64))
                   if p.bbox[0] // chunk != (p.bbox[2] - 1) // chunk or p.bbox[1] // chunk != (p.bbox[3] - 1) // chunk)
    assert crossing >= 20  # the check means something: many nuclei cross chunk borders
    assert splits_and_duplicates(stitched, truth) == (0, 0)
    assert len(np.unique(stitched[stitched > 0])) == len(np.unique(truth[truth > 0])) == 125

    frame = geopandas.read_parquet(root / "tables" / "instances" / "nuclei.parquet").set_index("instance_id")
    props = regionprops(stitched.astype(np.int64), intensity_image=image.astype(np.float64))
    assert sorted(frame.index) == sorted(p.label for p in props)
    for p in props:
        row = frame.loc[p.label]
        assert row["pixel_count"] == p.area
        assert (row["min_row"], row["min_col"], row["max_row"] + 1, row["max_col"] + 1) == p.bbox
        np.testing.assert_allclose((row["centroid_row"], row["centroid_col"]), p.centroid, rtol=0, atol=1e-9)
        np.testing.assert_allclose(row["band_means"][1], p.intensity_mean, rtol=1e-12)
        assert row.geometry.area == pytest.approx(p.area * 100.0)  # 10 m pixels of the test grid


@pytest.mark.skipif(not (BUILDINGS / "geotiff_labels.geojson").is_file(), reason=f"no real buildings at {BUILDINGS}")
def test_real_building_footprints_come_back_as_polygons_on_the_footprints_in_their_crs(tmp_path):
    import geopandas
    import rasterio.features
    import shapely

    with rasterio.open(BUILDINGS / "sample_geotiff.tif") as src:
        pan, transform, crs = src.read(1), src.transform, src.crs
    footprints = geopandas.read_file(BUILDINGS / "geotiff_labels.geojson")
    assert footprints.crs.to_epsg() == crs.to_epsg() == 32616
    ids = rasterio.features.rasterize(((g, k + 1) for k, g in enumerate(footprints.geometry)),
                                      out_shape=pan.shape, transform=transform, fill=0, dtype="uint16")
    scene = write_geotiff(tmp_path / "atlanta.tif", np.stack([ids, pan]), nodata=None, crs=crs.to_wkt(),
                          transform=transform)
    root = _run(tmp_path, scene, chunk=128, halo=32)  # 49 chunks of 64 m: many buildings cross them
    stitched = zarr.open_array(str(root / "atlanta.zarr"), path=INSTANCES, mode="r")[:]
    assert splits_and_duplicates(stitched, ids) == (0, 0)

    frame = geopandas.read_parquet(root / "tables" / "instances" / "atlanta.parquet")
    assert frame.crs.to_epsg() == 32616 and len(frame) == len(np.unique(ids[ids > 0]))
    # each polygon is its building's pixels exactly (0.25 m² each) ...
    np.testing.assert_allclose(frame.geometry.area, frame["pixel_count"] * 0.25)
    np.testing.assert_allclose(frame["area_crs2"], frame["pixel_count"] * 0.25)
    # ... and lies on the real footprint it was rasterised from: same place, same shape up to pixels
    ious, shifts = [], []
    for geom in frame.geometry:
        source = footprints.geometry.iloc[int(np.argmax(footprints.geometry.intersection(geom).area))]
        ious.append(shapely.intersection(geom, source).area / shapely.union(geom, source).area)
        shifts.append(geom.centroid.distance(source.centroid))
    assert min(ious) > 0.75 and np.median(ious) > 0.9, ious
    assert max(shifts) < 0.5, shifts  # under one 0.5 m pixel: the georeferencing is exact
    # lon/lat of the centroids: Atlanta
    assert frame["centroid_lon"].between(-84.6, -84.2).all() and frame["centroid_lat"].between(33.6, 33.9).all()
    json.dumps(frame.drop(columns="geometry").iloc[0].to_dict(), default=str)  # plain values, no objects
