"""Jobs writing to object storage (``output.root: s3://bucket/prefix``) on a real local Ray and a
real local S3 server (moto on 127.0.0.1): a scene read from the bucket and written back to it has
the classes of the same job's on local disk, the tables answer ``tessera query --root s3://...``
and ``tessera.open``, no credential lands in any output, a partial store in the bucket is refused, and an interrupted job resumes computing only
the chunks without a marker.

The module runs its own local Ray, started after the server's environment is set, as
``tessera run`` starts one inheriting the driver's environment: the actors take the endpoint
from the job's runtime environment and the credentials from the environment they inherit
(credentials never go into a runtime environment, which Ray logs). The session's Ray is
restarted afterwards for the tests that follow.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import ray
import zarr
from typer.testing import CliRunner

from pipelines.query import run_query
from pipelines.results import open as open_results
from pipelines.run.job import run_job
from pipelines.writers.outroot import as_location, zarr_store
from schemas import store as layout
from schemas.errors import OutputError
from tests.helpers import job_spec, oracle_checkpoint, read_classes, smooth_scene, write_geotiff
from tests.remote_servers import environ, moto_s3, s3_client, s3_env, upload_tree

BUCKET = "tessera-out"
TEST_SECRET = s3_env("http://127.0.0.1:1")["AWS_SECRET_ACCESS_KEY"]  # must appear in no output


def all_objects(client, bucket: str, prefix: str = "") -> dict[str, bytes]:
    """Every object under `prefix` (key -> bytes), as the test's own S3 client sees them."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            out[item["Key"]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return out

# A Ray of its own and two to four jobs per test: over a minute on the busy 2-core VM.
pytestmark = pytest.mark.slow


def _start_ray() -> None:
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # as conftest's ray_local


@pytest.fixture(scope="module")
def s3():
    """(endpoint, boto3 client): a local S3 server with BUCKET, its environment set, and a local
    Ray started after it, whose workers inherit that environment (a Ray the session started
    before is stopped, and started again afterwards)."""
    import ray

    session_ray = ray.is_initialized()
    with moto_s3() as endpoint, environ(s3_env(endpoint)):
        client = s3_client(endpoint)
        client.create_bucket(Bucket=BUCKET)
        ray.shutdown()
        _start_ray()
        try:
            yield endpoint, client
        finally:
            ray.shutdown()
    if session_ray:
        _start_ray()


@pytest.fixture(scope="module")
def scene_and_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s3job")
    scene = write_geotiff(tmp / "tile.tif", smooth_scene((128, 192), seed=11, nodata_border=12))
    return tmp, scene, oracle_checkpoint(tmp / "model")


def test_an_s3_job_writes_what_a_local_job_writes_and_reads_back(s3, scene_and_model, monkeypatch):
    _, client = s3
    tmp, scene, card = scene_and_model
    local = tmp / "local"
    run_job(job_spec([scene], local, card), base_dir=tmp)
    uri = f"s3://{BUCKET}/jobs/a"
    source = upload_tree(client, BUCKET, scene, "raw/tile.tif")  # read from the bucket, written back to it
    monkeypatch.chdir(tmp)  # a root mistaken for a relative path would show up here as ./s3:
    result = run_job(job_spec([source], uri, card), base_dir=tmp)
    assert [(s.status, s.error, s.n_todo) for s in result.scenes] == [("complete", None, 6)]
    assert str(result.root) == uri and not (tmp / "s3:").exists()

    objects = all_objects(client, BUCKET, "jobs/a/")
    assert {"jobs/a/job.resolved.json", "jobs/a/tile.zarr/zarr.json", "jobs/a/tables/scenes/tile.parquet",
            "jobs/a/tables/regions/tile.parquet", "jobs/a/tables/chunks/tile.parquet",
            "jobs/a/quicklooks/tile.png"} <= set(objects)
    markers = [k for k in objects if k.startswith("jobs/a/_work/tile/") and k.endswith(".json")]
    assert len(markers) == 6
    assert not any(TEST_SECRET.encode() in body for body in objects.values())  # tables, attrs, spec, markers
    assert json.loads(objects["jobs/a/job.resolved.json"])["output"]["root"] == uri
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and TEST_SECRET.encode() in p.read_bytes()]
    assert not leaked  # the actors' runtime environment carries the endpoint, never the credentials

    with open_results(uri) as r:
        assert r.scene_names() == ["tile"] and r.status("tile") == "complete"
        masks = r.masks("tile")
        np.testing.assert_array_equal(masks.values, read_classes(local, "tile"))
        assert masks.rio.crs is not None
        s3_rows = r.sql("SELECT region_id, class_id, area_m2 FROM regions ORDER BY region_id").fetchall()
    local_rows = run_query(local, "SELECT region_id, class_id, area_m2 FROM regions ORDER BY region_id").to_pylist()
    assert s3_rows == [tuple(row.values()) for row in local_rows] and len(s3_rows) > 1

    from pipelines.cli import app

    out = CliRunner().invoke(app, ["query", "--root", uri, "--format", "json",
                                   "SELECT scene, status, n_chunks FROM scenes"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output.strip()) == {"scene": "tile", "status": "complete", "n_chunks": 6}


def test_an_interrupted_s3_job_resumes_only_missing_chunks_and_partial_stores_are_refused(s3, scene_and_model):
    """...resumed through the split stages, whose write tasks write to the bucket too."""
    _, client = s3
    tmp, scene, card = scene_and_model
    uri = f"s3://{BUCKET}/jobs/resume"
    first = run_job(job_spec([scene], uri, card), base_dir=tmp)
    assert first.scenes[0].n_todo == 6
    store = as_location(uri) / "tile.zarr"
    before = zarr.open_array(zarr_store(store, read_only=True), path=layout.CLASSES, mode="r")[:]
    again = run_job(job_spec([scene], uri, card), base_dir=tmp)
    assert again.scenes[0].already_complete and again.scenes[0].n_todo == 0

    # an interrupted run: status partial, two chunks without markers and their pixels lost
    group = zarr.open_group(zarr_store(store), mode="r+")
    attrs = dict(group.attrs[layout.TESSERA_ATTR])
    attrs[layout.KEY_STATUS] = layout.STORE_STATUS_PARTIAL
    group.attrs[layout.TESSERA_ATTR] = attrs
    work = [k for k in all_objects(client, BUCKET, "jobs/resume/_work/tile/") if k.endswith("/c0_1.json")]
    assert len(work) == 1
    prefix = work[0].rsplit("/", 1)[0]
    for key in ("c0_1", "c1_2"):
        client.delete_object(Bucket=BUCKET, Key=f"{prefix}/{key}.json")
    classes = zarr.open_array(zarr_store(store), path=layout.CLASSES, mode="r+")
    classes[0:64, 64:128] = layout.NODATA_CLASS
    classes[64:128, 128:192] = layout.NODATA_CLASS

    with open_results(uri) as r:
        with pytest.raises(OutputError, match="partial"):
            r.masks("tile")
        assert (r.masks("tile", allow_partial=True).values[0:64, 64:128] == layout.NODATA_CLASS).all()

    # resumed with the split stages: read and write tasks beside the actor, the writes to S3
    spec = job_spec([scene], uri, card)
    spec = spec.model_copy(update={"resources": spec.resources.model_copy(update={"stages": "split"})})
    resumed = run_job(spec, base_dir=tmp)
    assert resumed.scenes[0].n_todo == 2 and resumed.scenes[0].status == "complete"
    after = zarr.open_array(zarr_store(store, read_only=True), path=layout.CLASSES, mode="r")[:]
    np.testing.assert_array_equal(after, before)
    rows = run_query(uri, "SELECT n_chunks_computed FROM scenes").to_pylist()
    assert rows == [{"n_chunks_computed": 2}]


def test_exports_and_the_report_of_an_s3_root_are_written_into_the_bucket(s3, scene_and_model, tmp_path):
    import io

    import geopandas
    import rasterio

    from pipelines.cli import app
    from pipelines.tools.report import write_report

    _, client = s3
    tmp, scene, card = scene_and_model
    uri = f"s3://{BUCKET}/jobs/exports"
    local = tmp_path / "local"
    run_job(job_spec([scene], uri, card), base_dir=tmp)
    run_job(job_spec([scene], local, card), base_dir=tmp)
    for fmt in ("cog", "geoparquet"):
        out = CliRunner().invoke(app, ["export", uri, "--format", fmt])
        assert out.exit_code == 0 and f"{uri}/exports/tile." in out.output, out.output
    skipped = CliRunner().invoke(app, ["export", uri, "--format", "nifti"])
    assert skipped.exit_code == 1 and "a 2D scene" in skipped.output
    page = write_report(uri)
    assert str(page) == f"{uri}/report.html"

    objects = all_objects(client, BUCKET, "jobs/exports/")
    cog = tmp_path / "tile.tif"
    cog.write_bytes(objects["jobs/exports/exports/tile.tif"])
    with rasterio.open(cog) as ds, rasterio.open(scene) as src:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.crs == src.crs and ds.transform == src.transform
        np.testing.assert_array_equal(ds.read(1), read_classes(local, "tile"))
    frame = geopandas.read_parquet(io.BytesIO(objects["jobs/exports/exports/tile.regions.parquet"]))
    regions = run_query(local, "SELECT region_id, pixel_count FROM regions ORDER BY region_id").to_pylist()
    assert frame.crs.to_epsg() == 32633
    assert list(zip(frame["region_id"], frame["pixel_count"])) == [(r["region_id"], r["pixel_count"]) for r in regions]
    html = objects["jobs/exports/report.html"].decode()
    assert "tile" in html and "data:image/png;base64," in html and "1 complete" in html
    assert TEST_SECRET not in html and not any(k.endswith(".tmp") for k in objects)


def test_an_instance_job_on_an_s3_root_writes_what_a_local_one_writes(s3, tmp_path):
    import io

    import geopandas
    import pyarrow.parquet as pq

    from schemas.instances import INSTANCES
    from tests.integration.test_instances_job import CHUNK, HALO, instance_oracle_card, instance_scene

    _, client = s3
    data = instance_scene()
    scene = write_geotiff(tmp_path / "objects.tif", data, nodata=None)
    card = instance_oracle_card(tmp_path / "model")
    local, uri = tmp_path / "local", f"s3://{BUCKET}/jobs/instances"
    tiling = {"chunk_size": CHUNK, "halo": HALO, "tile_size": CHUNK + 2 * HALO}
    run_job(job_spec([scene], local, card, **tiling), base_dir=tmp_path)
    result = run_job(job_spec([scene], uri, card, **tiling), base_dir=tmp_path)
    assert [(s.status, s.error) for s in result.scenes] == [("complete", None)]

    remote_ids = zarr.open_array(zarr_store(as_location(f"{uri}/objects.zarr"), read_only=True), path=INSTANCES,
                                 mode="r")[:]
    local_ids = zarr.open_array(str(local / "objects.zarr"), path=INSTANCES, mode="r")[:]
    np.testing.assert_array_equal(remote_ids, local_ids)  # the same merge and relabel, through the bucket
    objects = all_objects(client, BUCKET, "jobs/instances/")
    assert any(k.endswith(".instances.npz") for k in objects if "/_work/" in k)
    remote = pq.read_table(io.BytesIO(objects["jobs/instances/tables/instances/objects.parquet"]))
    mine = pq.read_table(local / "tables" / "instances" / "objects.parquet")
    assert remote.num_rows == mine.num_rows > 10
    assert remote.drop_columns(["geometry"]).equals(mine.drop_columns(["geometry"]))
    frame = geopandas.read_parquet(io.BytesIO(objects["jobs/instances/tables/instances/objects.parquet"]))
    assert frame.crs.to_epsg() == 32633
    assert not any(TEST_SECRET.encode() in body for body in objects.values())
