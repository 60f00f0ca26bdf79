"""`import tessera; tessera.open(root)` and `tessera export` over real job outputs (real local Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import tessera
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.run.job import run_job
from schemas.errors import OutputError
from schemas.job import JobSpec
from tests.helpers import oracle_checkpoint, read_classes

pytestmark = pytest.mark.usefixtures("ray_local")


def test_open_gives_masks_with_crs_tables_and_status(oracle_run):
    data, scene, root, result = oracle_run
    with tessera.open(root) as r:
        assert r.scene_names() == ["scene_one"]
        assert r.status("scene_one") == "complete" and r.error("scene_one") is None
        masks = r.masks("scene_one")
        assert masks.dims == ("y", "x") and masks.shape == data.shape[1:]
        np.testing.assert_array_equal(masks.values, read_classes(root, "scene_one"))
        with rasterio.open(scene) as src:
            assert masks.rio.crs == src.crs
            assert masks.rio.transform() == src.transform
            # pixel-centre coordinates in the CRS
            assert masks.x.values[0] == pytest.approx(src.transform.c + src.transform.a / 2)
        scenes = r.scenes
        assert list(scenes["scene"]) == ["scene_one"] and scenes["status"][0] == "complete"
        per_class = r.sql("SELECT class_id, sum(pixel_count) AS n FROM regions GROUP BY 1 ORDER BY 1").df()
        counts = np.bincount(masks.values[masks.values != 255].ravel())
        assert list(per_class["n"]) == [c for c in counts if c]
        assert r.class_names("scene_one")
        with pytest.raises(OutputError, match="no table"):
            r.table("nope")
        with pytest.raises(OutputError, match="not a scene name"):
            r.masks("../etc")


def test_a_partial_store_is_not_taken_for_a_result(oracle_run, tmp_path):
    import shutil

    import zarr

    from schemas import store as layout

    _, _, root, _ = oracle_run
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    group = zarr.open_group(str(copy / "scene_one.zarr"), mode="r+")
    group.attrs[layout.TESSERA_ATTR] = dict(group.attrs[layout.TESSERA_ATTR]) | {layout.KEY_STATUS: "partial"}
    shutil.rmtree(copy / "tables")
    (copy / "tables").mkdir()
    with tessera.open(copy) as r:
        assert r.status("scene_one") == "partial"
        with pytest.raises(OutputError, match="partial"):
            r.masks("scene_one")
        assert r.masks("scene_one", allow_partial=True).shape == read_classes(root, "scene_one").shape
    out = CliRunner().invoke(app, ["export", str(copy), "--format", "cog"])
    assert out.exit_code == 1 and "skipped (store is partial, not complete)" in out.output


def test_export_cog_from_the_cli_has_the_input_georeferencing(oracle_run):
    _, scene, root, _ = oracle_run
    out = CliRunner().invoke(app, ["export", str(root), "--format", "cog"])
    assert out.exit_code == 0, out.output
    with rasterio.open(root / "exports" / "scene_one.tif") as cog, rasterio.open(scene) as src:
        assert cog.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert cog.crs == src.crs and cog.transform == src.transform
        np.testing.assert_array_equal(cog.read(1), read_classes(root, "scene_one"))
    skipped = CliRunner().invoke(app, ["export", str(root), "--format", "nifti"])
    assert skipped.exit_code == 1 and "a 2D scene" in skipped.output


def test_export_geoparquet_gives_the_regions_table_as_polygons_in_the_input_crs(oracle_run):
    import duckdb
    import geopandas as gpd
    import rasterio.features
    from skimage.measure import label

    _, scene, root, _ = oracle_run
    out = CliRunner().invoke(app, ["export", str(root), "--format", "geoparquet"])
    assert out.exit_code == 0, out.output
    path = root / "exports" / "scene_one.regions.parquet"
    frame = gpd.read_parquet(path)
    regions = duckdb.sql(f"SELECT region_id, class_id, pixel_count FROM '{root}/tables/regions/scene_one.parquet' "
                         "ORDER BY region_id").df()
    assert list(frame["region_id"]) == list(regions["region_id"])
    assert list(frame["pixel_count"]) == list(regions["pixel_count"])
    classes = read_classes(root, "scene_one")
    with rasterio.open(scene) as src:
        assert frame.crs == src.crs
        back = rasterio.features.rasterize(zip(frame.geometry, frame["region_id"]), out_shape=classes.shape,
                                           transform=src.transform, fill=0, dtype="int64")
        np.testing.assert_allclose(frame.geometry.area, frame["pixel_count"] * abs(src.transform.a * src.transform.e))
    truth = label(classes, background=255, connectivity=2)
    pairs = np.unique(np.stack([back[truth > 0], truth[truth > 0]]), axis=1)
    assert np.array_equal(back > 0, truth > 0) and pairs.shape[1] == truth.max() == len(frame)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]
    # DuckDB joins it to the regions table as README shows
    joined = duckdb.sql(f"SELECT count(*), count(area_m2) FROM '{path}' JOIN "
                        f"'{root}/tables/regions/scene_one.parquet' USING (scene, region_id)").fetchall()[0]
    assert joined == (len(frame), len(frame))


def test_open_and_export_a_volume(tmp_path):
    nib = pytest.importorskip("nibabel")
    data = np.random.default_rng(2).normal(0, 400, size=(11, 13, 9)).astype(np.int16)  # (i, j, k)
    affine = np.diag([-0.8, -0.9, 2.5, 1.0])
    affine[:3, 3] = (10.0, 20.0, -30.0)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "ct.nii")
    card = oracle_checkpoint(tmp_path / "model", bands=1, mean=0.0, std=500.0, tile_size=8, halo=2)
    root = tmp_path / "out"
    spec = JobSpec.model_validate({
        "inputs": ["ct.nii"], "model": {"card": str(card)},
        "tiling": {"volume_chunk_size": 8, "halo": 2, "tile_size": 8},
        "resources": {"actors": 1, "torch_threads": 1}, "output": {"root": str(root)},
    })
    assert run_job(spec, base_dir=tmp_path).failed == ()
    with tessera.open(root) as r:
        masks = r.masks("ct")
        assert masks.dims == ("z", "y", "x") and masks.shape == (9, 13, 11)
        np.testing.assert_allclose(masks.attrs["spacing_mm"], [2.5, 0.9, 0.8], rtol=1e-6)  # NIfTI float32
        # LPS-like axes: x runs along R with -0.8 mm steps from 10.0 mm, z along S
        assert masks.x.attrs["scanner_axis"] == "R" and masks.z.attrs["scanner_axis"] == "S"
        np.testing.assert_allclose(masks.x.values[:3], [10.0, 9.2, 8.4])
        np.testing.assert_allclose(masks.z.values[:2], [-30.0, -27.5])
    out = CliRunner().invoke(app, ["export", str(root), "--format", "nifti"])
    assert out.exit_code == 0, out.output
    img = nib.load(root / "exports" / "ct.nii.gz")
    assert np.allclose(img.affine, affine) and img.shape == data.shape
    np.testing.assert_array_equal(np.asarray(img.dataobj), read_classes(root, "ct").transpose(2, 1, 0))
    polygons = CliRunner().invoke(app, ["export", str(root), "--format", "geoparquet"])
    assert polygons.exit_code == 1 and "region polygons are 2D" in polygons.output


def test_the_report_is_one_self_contained_page_naming_every_scene(oracle_run, tmp_path):
    from html.parser import HTMLParser

    from PIL import Image

    _, _, root, _ = oracle_run
    (root / "quicklooks").mkdir(exist_ok=True)
    Image.new("RGB", (40, 30), (10, 200, 30)).save(root / "quicklooks" / "scene_one.png")
    out = CliRunner().invoke(app, ["report", str(root), "--out", str(tmp_path / "r.html")])
    assert out.exit_code == 0, out.output
    page = (tmp_path / "r.html").read_text()

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.images, self.links, self.ids = [], [], set()

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            self.ids.add(a.get("id"))
            if tag == "img":
                self.images.append(a["src"])
            for key in ("href", "src"):
                if a.get(key) and not a[key].startswith(("#", "data:")):
                    self.links.append(a[key])

    parsed = Collect()
    parsed.feed(page)
    assert parsed.links == []  # nothing fetched at view time
    assert len(parsed.images) == 1 and parsed.images[0].startswith("data:image/png;base64,")
    assert "scene-scene_one" in parsed.ids and "1 complete" in page and "0 failed" in page
    assert "<svg" in page and "Where the time went" in page
    import pipelines.query as q

    for name in q.run_query(root, "SELECT unnest(class_areas).class_name AS n FROM scenes").column("n").to_pylist():
        assert f"<td>{name}</td>" in page
