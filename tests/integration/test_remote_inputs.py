"""Jobs over remote inputs on a real local Ray: a COG served over HTTP (range reads), COGs, a
Zarr volume and a DICOM series in a local S3 server (moto), each giving the same classes as the
same file (folder) read from the local disk; what the tables and stores record about them; and
(slow) a signed-S3 job through the CLI whose credentials end up nowhere on disk."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import zarr

from pipelines.readers.remote import remote_input_sha256
from pipelines.run.job import run_job
from schemas import store as layout
from schemas.job import JobSpec, StacSpec
from tests.helpers import job_spec, oracle_checkpoint, read_classes, smooth_scene, write_geotiff
from tests.readers.test_remote import write_cog
from tests.readers.test_stac import ASSETS, COARSE, stacked_reference, write_item_assets, write_items
from tests.readers.test_zarr_volume import smooth, write_ome
from tests.remote_servers import RangeServer, environ, moto_s3, s3_client, s3_env, upload_tree
from workers.hashing import input_sha256

pytestmark = pytest.mark.usefixtures("ray_local")


def scenes_table(root: Path) -> dict[str, dict]:
    return {row["scene"]: row for row in pq.read_table(root / "tables" / "scenes").to_pylist()}


def two_cogs(folder: Path) -> Path:
    """A 150 x 173 px, 4-band COG (64-px blocks, nodata border) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    return write_cog(folder / "scene.tif", smooth_scene((150, 173), seed=1, nodata_border=20), blocksize=64)


def test_an_http_cog_gives_the_classes_of_the_same_file_read_locally(tmp_path):
    """...and a missing object fails its scene alone."""
    path = two_cogs(tmp_path / "served")
    card = oracle_checkpoint(tmp_path / "model")
    with RangeServer(path.parent) as server:
        uri = f"{server.url}/scene.tif?v=1"  # a query string is kept, not part of the name or suffix
        root = tmp_path / "out"
        result = run_job(job_spec([path, uri, f"{server.url}/gone.tif"], root, card), base_dir=tmp_path)
        status = {s.name: (s.status, s.error) for s in result.scenes}
        assert status["scene"] == status["scene-2"] == ("complete", None)
        assert status["gone"][0] == "failed" and f"{server.url}/gone.tif: cannot open" in status["gone"][1]
        assert server.bytes_sent  # read over HTTP
        identity = remote_input_sha256(uri)
    local, remote = read_classes(root, "scene"), read_classes(root, "scene-2")
    np.testing.assert_array_equal(remote, local)
    assert set(np.unique(local)) > {layout.NODATA_CLASS}  # classes and the nodata border
    rows = scenes_table(root)
    assert rows["scene-2"]["source"] == uri and rows["scene"]["source"] == str(path)
    assert rows["scene-2"]["input_sha256"] == identity != input_sha256(path)
    assert rows["scene"]["input_sha256"] == input_sha256(path)
    store = zarr.open_group(str(root / "scene-2.zarr"), mode="r")
    assert store.attrs[layout.TESSERA_ATTR][layout.KEY_SOURCE] == uri


def test_s3_cogs_and_a_zarr_volume_give_the_classes_of_their_local_copies(tmp_path):
    """Unsigned requests (AWS_NO_SIGN_REQUEST, a public bucket): the session's Ray workers were
    started before this server, so everything they need reaches them through the job's runtime
    environment (endpoint, region, addressing), and no credential is needed."""
    cog = two_cogs(tmp_path / "cog")
    volume = (smooth((1, 14, 30, 25), seed=3)[0] * 40).astype(np.float32)
    ome = write_ome(tmp_path / "ct.zarr", volume, scale=(2.0, 0.5, 0.5), translation=(1.0, 2.0, 3.0))
    card2d = oracle_checkpoint(tmp_path / "model2d")
    card3d = oracle_checkpoint(tmp_path / "model3d", bands=1, mean=4000.0, std=2000.0, tile_size=8, halo=2)
    with moto_s3() as endpoint:
        client = s3_client(endpoint)
        client.create_bucket(Bucket="public-scenes", ACL="public-read")
        cog_uri = upload_tree(client, "public-scenes", cog, "raw/tile.tif", public=True)
        zarr_uri = upload_tree(client, "public-scenes", ome, "vol/ct.zarr", public=True)
        env = {k: v for k, v in s3_env(endpoint).items() if not k.endswith(("KEY_ID", "ACCESS_KEY"))}
        with environ({**env, "AWS_NO_SIGN_REQUEST": "YES"}):
            flat = run_job(job_spec([cog, cog_uri], tmp_path / "out2d", card2d), base_dir=tmp_path)
            vol = run_job(JobSpec.model_validate({
                "inputs": [str(ome), zarr_uri + "/"], "model": {"card": str(card3d)},
                "tiling": {"volume_chunk_size": 8, "halo": 2, "tile_size": 8, "tile_overlap": 0.5},
                "resources": {"actors": 1, "torch_threads": 1},
                "output": {"root": str(tmp_path / "out3d")},
            }), base_dir=tmp_path)
    assert [(s.name, s.status, s.error) for s in flat.scenes] == [
        ("scene", "complete", None), ("tile", "complete", None)]
    np.testing.assert_array_equal(read_classes(tmp_path / "out2d", "tile"), read_classes(tmp_path / "out2d", "scene"))
    assert [(s.name, s.status, s.error) for s in vol.scenes] == [("ct", "complete", None), ("ct-2", "complete", None)]
    local, remote = read_classes(tmp_path / "out3d", "ct"), read_classes(tmp_path / "out3d", "ct-2")
    assert remote.shape == (14, 30, 25) and len(np.unique(local)) > 1
    np.testing.assert_array_equal(remote, local)
    rows = scenes_table(tmp_path / "out3d")
    assert rows["ct-2"]["source"] == zarr_uri + "/" and rows["ct-2"]["class_volumes"] == rows["ct"]["class_volumes"]


def test_a_dicom_series_in_s3_gives_the_classes_of_its_local_folder(tmp_path):
    """A series named by its folder URI (``s3://bucket/ct/series1/``, public bucket, unsigned
    requests as above) beside the same series in a local folder: downloaded once into the job's
    input cache, the same classes; the scene is named after the folder and recorded by its URI
    with the listing's identity; a series with a missing slice in S3 fails alone, naming its URI."""
    from tests.integration.test_volumes import _ct
    from tests.readers.test_dicom import write_series

    local = tmp_path / "local-series"
    write_series(local, _ct(), orientation="oblique")
    broken = tmp_path / "broken"
    write_series(broken, _ct(seed=4), orientation="axial")
    sorted(broken.iterdir())[5].unlink()
    card = oracle_checkpoint(tmp_path / "model", bands=1, mean=0.0, std=500.0, tile_size=8, halo=2)
    root = tmp_path / "out"
    with moto_s3() as endpoint:
        client = s3_client(endpoint)
        client.create_bucket(Bucket="public-ct", ACL="public-read")
        uri = upload_tree(client, "public-ct", local, "ct/series1", public=True) + "/"
        broken_uri = upload_tree(client, "public-ct", broken, "ct/broken", public=True) + "/"
        env = {k: v for k, v in s3_env(endpoint).items() if not k.endswith(("KEY_ID", "ACCESS_KEY"))}
        with environ({**env, "AWS_NO_SIGN_REQUEST": "YES"}):
            result = run_job(JobSpec.model_validate({
                "inputs": [str(local), uri, broken_uri], "model": {"card": str(card)},
                "tiling": {"volume_chunk_size": 8, "halo": 2, "tile_size": 8, "tile_overlap": 0.5},
                "resources": {"actors": 1, "torch_threads": 1},
                "output": {"root": str(root)},
            }), base_dir=tmp_path)
            identity = remote_input_sha256(uri, is_store=True, recursive=False)
    status = {s.name: (s.status, s.error) for s in result.scenes}
    assert status["local-series"] == status["series1"] == ("complete", None)
    assert status["broken"][0] == "failed" and status["broken"][1].startswith(f"{broken_uri[:-1]}: 1 slice(s) missing")
    local_classes, remote_classes = read_classes(root, "local-series"), read_classes(root, "series1")
    assert remote_classes.shape == (14, 20, 22) and len(np.unique(local_classes)) > 1
    np.testing.assert_array_equal(remote_classes, local_classes)
    rows = scenes_table(root)
    assert rows["series1"]["source"] == uri and rows["series1"]["input_sha256"] == identity
    assert rows["series1"]["class_volumes"] == rows["local-series"]["class_volumes"]
    cached = [p.name for p in (root / "_work" / "inputs").iterdir()]
    assert cached == [f"series1-{hashlib.sha256(uri.encode()).hexdigest()[:12]}-{identity[:12]}.dicom"]


def test_a_stac_item_over_http_gives_the_classes_of_its_bands_stacked_locally(tmp_path):
    """Four assets (one at 20 m) of an item served over HTTP, stacked by the reader, against the
    same bands stacked into one local GeoTIFF beforehand (the 20 m band resampled in one read);
    an item lacking an asset fails alone."""
    write_item_assets(tmp_path / "assets")
    hrefs = {k: f"assets/{k}.tif" for k in ASSETS}
    write_items(tmp_path / "items.json", {"S2B_33UUP_20250601": hrefs,
                                          "S2B_33UUP_20250611": {k: v for k, v in hrefs.items() if k != COARSE}})
    reference = tmp_path / "stacked.tif"
    with rasterio.open(tmp_path / "assets" / "B04.tif") as ds:
        transform = ds.transform
    write_geotiff(reference, stacked_reference(tmp_path / "assets"), transform=transform)
    card = oracle_checkpoint(tmp_path / "model")
    root = tmp_path / "out"
    with RangeServer(tmp_path) as server:
        items = f"{server.url}/items.json"
        spec = job_spec([reference], root, card).model_copy(update={"stac": StacSpec(items=items, assets=ASSETS)})
        result = run_job(spec, base_dir=tmp_path)
    status = {s.name: (s.status, s.error) for s in result.scenes}
    assert status["stacked"] == status["S2B_33UUP_20250601"] == ("complete", None)
    assert status["S2B_33UUP_20250611"][0] == "failed" and "has no assets ['B08']" in status["S2B_33UUP_20250611"][1]
    np.testing.assert_array_equal(read_classes(root, "S2B_33UUP_20250601"), read_classes(root, "stacked"))
    rows = scenes_table(root)
    assert rows["S2B_33UUP_20250601"]["source"] == f"{items}#S2B_33UUP_20250601"
    assert rows["S2B_33UUP_20250601"]["crs"] == "EPSG:32633" and rows["S2B_33UUP_20250601"]["shape"] == [150, 173]


@pytest.mark.slow
def test_a_signed_s3_job_through_the_cli_leaves_its_credentials_nowhere(tmp_path):
    """`tessera run` in a fresh process with the credentials in its environment only: the local Ray
    it starts inherits them (they are never sent through Ray's runtime environment, which Ray logs),
    the job reads signed requests, and the secret is in no output file and no Ray log."""
    cog = two_cogs(tmp_path / "cog")
    card = oracle_checkpoint(tmp_path / "model")
    ray_tmp = Path(f"/tmp/tsr{os.getpid()}")  # short: Ray's socket paths must fit in 107 bytes
    with moto_s3() as endpoint:
        client = s3_client(endpoint)
        client.create_bucket(Bucket="private-scenes")
        uri = upload_tree(client, "private-scenes", cog, "raw/tile.tif")
        (tmp_path / "job.yaml").write_text(
            f"inputs: ['{uri}']\nmodel: {{card: '{card}'}}\n"
            "tiling: {chunk_size: 64, halo: 8, tile_size: 32}\n"
            "resources: {actors: 1, batch_size: 3, torch_threads: 1}\noutput: {root: out}\n")
        env = {**os.environ, **s3_env(endpoint), "RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": "",
               "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        secret = env["AWS_SECRET_ACCESS_KEY"]
        done = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(tmp_path / "job.yaml")],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    try:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        rows = scenes_table(tmp_path / "out")
        assert rows["tile"]["status"] == "complete" and rows["tile"]["source"] == uri
        leaks = [p for folder in (tmp_path / "out", ray_tmp) for p in folder.rglob("*")
                 if p.is_file() and secret.encode() in p.read_bytes()]
        assert leaks == []
        assert secret not in done.stdout + done.stderr
        assert any(ray_tmp.rglob("runtime_env_agent.log")) or any(ray_tmp.rglob("raylet.out"))  # logs were there
    finally:
        subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)
