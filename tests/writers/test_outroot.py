"""Output locations: the same small-object, Zarr and table operations on a local folder and on a
real local S3 server (moto), and the credential rule for roots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import zarr

from pipelines.writers import outroot
from pipelines.writers.outroot import S3Location, as_location
from pipelines.writers.tables import write_table
from pipelines.writers.zarr_masks import create_scene_store, mark_complete, read_store_state, write_chunk
from schemas import store as layout
from schemas.errors import OutputError
from tests.remote_servers import environ, moto_s3, s3_client, s3_env

UTM = 'PROJCS["WGS 84 / UTM zone 33N",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563]],' \
      'PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]],PROJECTION["Transverse_Mercator"],' \
      'PARAMETER["latitude_of_origin",0],PARAMETER["central_meridian",15],PARAMETER["scale_factor",0.9996],' \
      'PARAMETER["false_easting",500000],PARAMETER["false_northing",0],UNIT["metre",1]]'


@pytest.fixture(scope="module")
def bucket():
    """A local S3 server with bucket `outroot-test`, its environment set for the module."""
    with moto_s3() as endpoint, environ(s3_env(endpoint)):
        s3_client(endpoint).create_bucket(Bucket="outroot-test")
        yield endpoint


def test_locations_parse_and_join():
    root = as_location("s3://bkt/jobs/a/")
    assert root == S3Location("bkt", "jobs/a") and str(root) == "s3://bkt/jobs/a"
    assert str(root / "tables" / "scenes") == "s3://bkt/jobs/a/tables/scenes"
    assert (root / "x.zarr").name == "x.zarr" and root.parent == S3Location("bkt", "jobs")
    assert as_location("out/here") == Path("out/here")
    assert outroot.is_s3("s3://bkt") and not outroot.is_s3(Path("s3"))


@pytest.mark.parametrize("root", ["s3://AKIAEXAMPLE:wJalrXUtnFEMI@bkt/out", "s3://token@bkt/out"])
def test_a_root_with_credentials_is_refused_without_repeating_them(root):
    with pytest.raises(OutputError, match="credentials") as err:
        as_location(root)
    assert "wJalrXUtnFEMI" not in str(err.value) and "AKIAEXAMPLE" not in str(err.value)
    assert "token@" not in str(err.value) and "s3://REDACTED@bkt/out" in str(err.value)


def test_other_schemes_and_query_strings_are_refused():
    with pytest.raises(OutputError, match="local folders or s3://"):
        as_location("gs://bkt/out")
    with pytest.raises(OutputError, match="query string"):
        as_location("s3://bkt/out?versionId=1")


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_small_objects_round_trip(kind, tmp_path, request):
    if kind == "s3":
        request.getfixturevalue("bucket")
        root = as_location("s3://outroot-test/small")
    else:
        root = tmp_path / "small"
    work = root / "_work" / "scene" / "abc"
    work.mkdir(parents=True, exist_ok=True)
    assert outroot.list_names(work) == [] and not outroot.exists(work / "c0_0.json")
    outroot.write_text(work / "c0_0.json", '{"a": 1}')
    outroot.write_bytes(work / "c0_1.npz", b"\x00\x01")
    outroot.write_text(work / "c0_0.json", '{"a": 2}')  # replaced whole
    assert outroot.read_text(work / "c0_0.json") == '{"a": 2}'
    assert outroot.list_names(work) == ["c0_0.json", "c0_1.npz"]
    assert outroot.list_prefixes(root / "_work") == ["scene"]
    with pytest.raises(FileNotFoundError):
        outroot.read_bytes(work / "gone.json")
    with outroot.local_copy(work / "c0_1.npz") as local:
        assert local.read_bytes() == b"\x00\x01"
    with pytest.raises(RuntimeError), outroot.upload_from(work / "c0_0.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert outroot.read_text(work / "c0_0.json") == '{"a": 2}'  # the previous object stays
    outroot.remove_tree(root / "_work")
    assert outroot.list_names(work) == []


def test_store_and_tables_on_s3(bucket):
    """A store created, written and completed on S3 reads back as on disk; a table written there
    reads through pyarrow's S3 filesystem."""
    root = as_location("s3://outroot-test/job")
    path = root / "s.zarr"
    assert read_store_state(path) is None
    create_scene_store(path, shape=(20, 30), chunk_shape=(10, 10),
                       grid=layout.GeoGrid(transform=(10.0, 0.0, 500000.0, 0.0, -10.0, 6000000.0), crs_wkt=UTM),
                       class_names=("a", "b"), provenance={layout.KEY_FINGERPRINT: "f" * 64})
    assert read_store_state(path)[layout.KEY_STATUS] == layout.STORE_STATUS_PARTIAL
    labels = np.arange(100, dtype=np.uint8).reshape(10, 10) % 2
    write_chunk(path, (slice(10, 20), slice(20, 30)), labels)
    mark_complete(path)
    assert read_store_state(path)[layout.KEY_STATUS] == layout.STORE_STATUS_COMPLETE
    classes = zarr.open_array(outroot.zarr_store(path, read_only=True), path=layout.CLASSES, mode="r")[:]
    np.testing.assert_array_equal(classes[10:, 20:], labels)
    assert (classes[:10] == layout.NODATA_CLASS).all()

    written = write_table(root, "chunks", "s", [])
    assert str(written) == "s3://outroot-test/job/tables/chunks/s.parquet"
    fs, base = outroot.arrow_filesystem(root)
    assert isinstance(fs, pafs.S3FileSystem)
    table = ds.dataset(f"{base}/tables/chunks", filesystem=fs, format="parquet").to_table()
    assert table.num_rows == 0 and "status" in table.column_names


def test_local_tables_are_written_as_before(tmp_path):
    path = write_table(tmp_path, "chunks", "s", [])
    assert path == tmp_path / "tables" / "chunks" / "s.parquet"
    assert pq.read_table(path).num_rows == 0
    assert [p.name for p in path.parent.iterdir()] == ["s.parquet"]  # no temporary file left
