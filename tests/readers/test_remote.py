"""Remote inputs at the reader level: URIs named and checked, COGs read by byte ranges from a
loopback HTTP server, COGs and Zarr images read from a local S3 server (moto), identities from
HEAD / HeadObject, and the formats that are refused from object storage."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from pipelines.plan.chunks import plan_chunks
from pipelines.plan.scenes import assign_scene_names, expand_inputs, scene_name
from pipelines.readers import InputPolicy, close_readers, known_suffixes, open_scene, read_window, reader_for
from pipelines.readers.remote import gdal_options, remote_input_sha256, s3_settings, s3_store, worker_env
from schemas.errors import InputError, JobSpecError
from schemas.job import parse_job_spec
from schemas.uris import check_uri, inline_credentials, is_uri, redact_uri, uri_name
from tests.helpers import smooth_scene
from tests.readers.test_zarr_volume import smooth, write_ome
from tests.remote_servers import RangeServer, environ, moto_s3, s3_client, s3_env, upload_tree

COG_SIDE = 1024


def write_cog(path, data: np.ndarray, *, blocksize: int = 256):
    """A tiled, deflated COG (with its overviews: GDAL's COG driver adds them) of (C, H, W) data."""
    count, height, width = data.shape
    with rasterio.open(path, "w", driver="COG", width=width, height=height, count=count, dtype=data.dtype.name,
                       crs="EPSG:32633", transform=from_origin(500000.0, 5000000.0, 10.0, 10.0), nodata=0,
                       blocksize=blocksize, compress="deflate", overview_resampling="average") as ds:
        ds.write(data)
    return path


@pytest.fixture(scope="module")
def cog(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cogs")
    coarse = smooth_scene((COG_SIDE // 8, COG_SIDE // 8), seed=5)
    # 8 x 8 px plateaus plus a little noise: a realistic deflate ratio, made in milliseconds
    noise = np.random.default_rng(5).integers(0, 64, size=(4, COG_SIDE, COG_SIDE), dtype=np.uint16)
    data = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2) + noise
    return folder, write_cog(folder / "scene.tif", data), data


# --- URIs: names, suffixes, credentials ------------------------------------------------------------


def test_uris_are_told_from_paths_and_named_by_their_path():
    assert is_uri("s3://bucket/a/b.tif") and is_uri("https://h/x.tif") and not is_uri("/data/x.tif")
    assert not is_uri("scenes/*.tif") and not is_uri("C:\\data\\x.tif")
    assert uri_name("https://h.example/a/scene.tif?versionId=3") == "scene.tif"
    assert uri_name("s3://bucket/dir/image.zarr/") == "image.zarr"
    assert scene_name("https://h/a/T33UUP_B04.tif?v=1", suffixes=known_suffixes()) == "T33UUP_B04"
    assert assign_scene_names(["s3://b/a/x.tif", "https://h/c/x.tif"], suffixes=known_suffixes()) == ["x", "x-2"]
    assert reader_for("https://h/a/scene.tif?format=.zarr").name == "geotiff"
    assert reader_for("s3://bucket/img.zarr/").name == "zarr"
    assert reader_for("https://h/a/no-suffix").name == "geotiff"  # GDAL tells by content


def test_uris_pass_through_expand_inputs_unglobbed(tmp_path):
    (tmp_path / "a.tif").write_bytes(b"x")
    uris = ("s3://bucket/raw/*.tif", "https://h/x.tif?part=[1]")
    paths, unmatched = expand_inputs(("*.tif", *uris), base_dir=tmp_path)
    assert unmatched == []
    assert sorted(paths) == sorted([str(tmp_path / "a.tif"), *uris])  # as given, not normalised or globbed


@pytest.mark.parametrize("uri, secret", [
    ("https://user:hunter2@h.example/x.tif", "hunter2"),
    ("https://b.s3.amazonaws.com/x.tif?X-Amz-Credential=AKIAX&X-Amz-Signature=deadbeef42", "deadbeef42"),
    ("https://acct.blob.core.windows.net/c/x.tif?sv=2024&sig=s3cr3tSAS", "s3cr3tSAS"),
    ("https://h.example/x.tif?access_token=tok-9f8e", "tok-9f8e"),
])
def test_uris_with_inline_credentials_are_refused_and_never_echoed(uri, secret):
    assert inline_credentials(uri)
    shown = redact_uri(uri)
    assert secret not in shown and "REDACTED" in shown and "x.tif" in shown
    with pytest.raises(ValueError, match="carries credentials") as err:
        check_uri(uri)
    assert secret not in str(err.value)
    text = f"inputs: ['{uri}']\noutput: {{root: out}}\n"
    with pytest.raises(JobSpecError, match=r"inputs\[0\]: .*carries credentials") as err:
        parse_job_spec(text, source="job.yaml")
    assert secret not in str(err.value)


def test_readers_refuse_credentialed_uris_that_bypass_the_spec_and_stores_record_them_redacted():
    from pipelines.run.scenes import source_attribute

    for uri in ("https://user:hunter2@h.example/x.tif", "s3://bucket/img.zarr?X-Amz-Signature=hunter2"):
        with pytest.raises(InputError, match="carries credentials") as err:
            open_scene(uri)
        assert "hunter2" not in str(err.value)
        assert "hunter2" not in source_attribute(uri)
    assert source_attribute("/data/scenes/a.tif") == "a.tif"
    assert source_attribute("s3://bucket/raw/a.tif") == "s3://bucket/raw/a.tif"


def test_clean_uris_and_other_schemes():
    assert redact_uri("https://h/x.tif?versionId=7") == "https://h/x.tif?versionId=7"
    check_uri("s3://bucket/key.tif")
    with pytest.raises(ValueError, match="scheme 'gs' is not supported"):
        check_uri("gs://bucket/key.tif")
    with pytest.raises(JobSpecError, match="ftp"):
        parse_job_spec("inputs: ['ftp://h/x.tif']\noutput: {root: out}\n", source="job.yaml")


def test_s3_settings_come_from_the_standard_environment():
    gdal_style = {"AWS_S3_ENDPOINT": "127.0.0.1:9000", "AWS_HTTPS": "NO", "AWS_VIRTUAL_HOSTING": "FALSE",
                  "AWS_REGION": "eu-west-1", "AWS_SECRET_ACCESS_KEY": "never-forwarded"}
    with environ(gdal_style):
        assert s3_settings() == {"endpoint": "http://127.0.0.1:9000", "client_options": {"allow_http": True},
                                 "virtual_hosted_style_request": False, "region": "eu-west-1"}
        with environ({"AWS_ACCESS_KEY_ID": "an-id"}):  # what dask's tokenizing of an xarray over it does
            pickle.loads(pickle.dumps(s3_store("bkt")))
        forwarded = worker_env()
        assert forwarded["AWS_S3_ENDPOINT"] == "127.0.0.1:9000" and "AWS_SECRET_ACCESS_KEY" not in forwarded
        assert "never-forwarded" not in repr(forwarded)
        assert gdal_options("s3://b/k.tif")["CPL_VSIL_CURL_ALLOWED_EXTENSIONS"] == ".tif"
    sdk_style = {"AWS_ENDPOINT_URL_S3": "https://minio.internal:9443", "AWS_S3_ENDPOINT": ""}
    with environ(sdk_style):
        options = gdal_options("s3://b/k.tif")  # GDAL's own variables filled from the SDK's
        assert options["AWS_S3_ENDPOINT"] == "minio.internal:9443" and options["AWS_HTTPS"] == "YES"
        assert s3_settings()["endpoint"] == "https://minio.internal:9443"


@pytest.mark.parametrize("uri, fmt, fix", [
    ("https://h/img.zarr", "zarr", "copy the file"),
    ("https://h/series/", "dicom", "HTTP.S. cannot list a folder: copy the series to a local disk .* or put it in S3"),
    ("http://h/series/IM0001.dcm", "dicom", "copy the series to a local disk"),
])
def test_formats_not_read_remotely_are_refused_by_name(uri, fmt, fix):
    with pytest.raises(InputError, match=f"{fmt} inputs are not read from .*{fix}"):
        open_scene(uri)


# --- HTTP range reads --------------------------------------------------------------------------------


def test_a_window_of_an_http_cog_fetches_a_small_fraction_of_the_file(cog):
    folder, path, data = cog
    size = path.stat().st_size
    windows = plan_chunks((COG_SIDE, COG_SIDE), 64, 8)
    with RangeServer(folder) as server:
        uri = f"{server.url}/scene.tif"
        close_readers()
        info = open_scene(uri)
        assert info.path == uri and info.shape == (COG_SIDE, COG_SIDE) and info.count == 4
        assert info.crs == "EPSG:32633" and info.block_shape == (256, 256)
        # chunk (1, 1): an 80 x 80 px window (64 px core, 8 px halo) inside the first 256-px block
        window = next(w for w in windows if w.index == (1, 1))
        pixels, valid = read_window(info, window)
        close_readers()
        fetched = server.bytes_sent["/scene.tif"]
        ranged = [r for r in server.requests if r[0] == "GET"]
    local, _ = read_window(open_scene(str(path)), window)
    np.testing.assert_array_equal(pixels, local)
    assert valid.all()
    # the header and one of the 16 blocks of full resolution: about 1/16 of the file
    assert fetched < 0.1 * size, (fetched, size)
    assert all(header and header.startswith("bytes=") for _, _, header in ranged)  # never the whole file
    print(f"http window read: {fetched} of {size} bytes ({fetched / size:.1%}) in {len(ranged)} range requests")


def test_a_remote_quicklook_read_uses_overviews_and_never_fetches_a_file_without_them(cog, tmp_path):
    from tests.helpers import write_geotiff

    folder, path, data = cog
    plain = write_geotiff(folder / "plain.tif", data)  # tiled, no overviews
    reader = reader_for(str(path))
    with RangeServer(folder) as server:
        close_readers()
        pixels, valid = reader.read_decimated(open_scene(f"{server.url}/scene.tif"), (128, 128), bands=(1,))
        assert pixels.shape == (1, 128, 128) and valid.all()
        assert server.bytes_sent["/scene.tif"] < 0.1 * path.stat().st_size  # an overview, not the blocks
        close_readers()
        assert reader.read_decimated(open_scene(f"{server.url}/plain.tif"), (128, 128), bands=(1,)) is None
        assert server.bytes_sent["/plain.tif"] < 0.05 * plain.stat().st_size  # the header only
    close_readers()
    local, _ = reader.read_decimated(open_scene(str(plain)), (128, 128), bands=(1,))  # local files: decimated
    assert local.shape == (1, 128, 128)


def test_the_identity_of_an_http_input_follows_the_object(tmp_path):
    write_cog(tmp_path / "a.tif", smooth_scene((64, 64), seed=1))
    with RangeServer(tmp_path) as server:
        uri = f"{server.url}/a.tif"
        first = remote_input_sha256(uri)
        assert remote_input_sha256(uri) == first
        assert server.bytes_sent.get("/a.tif", 0) == 0  # HEAD only: nothing downloaded
        write_cog(tmp_path / "a.tif", smooth_scene((64, 64), seed=2))
        assert remote_input_sha256(uri) != first
        with pytest.raises(InputError, match="HTTP 404"):
            remote_input_sha256(f"{server.url}/missing.tif")


# --- S3 (moto) ----------------------------------------------------------------------------------------


def test_cogs_and_zarr_images_read_from_a_local_s3_server(tmp_path, cog):
    _, cog_path, _ = cog
    volume = smooth((1, 14, 30, 25), seed=2)[0]
    ome = write_ome(tmp_path / "ct.zarr", volume, scale=(2.0, 0.5, 0.5), translation=(1.0, 2.0, 3.0))
    with moto_s3() as endpoint, environ(s3_env(endpoint)):
        client = s3_client(endpoint)
        client.create_bucket(Bucket="scenes")
        cog_uri = upload_tree(client, "scenes", cog_path, "raw/scene.tif")
        zarr_uri = upload_tree(client, "scenes", ome, "vol/ct.zarr")
        close_readers()
        remote, local = open_scene(cog_uri), open_scene(str(cog_path))
        assert remote.shape == local.shape and remote.transform == local.transform
        window = plan_chunks(local.shape, 64, 8)[20]
        np.testing.assert_array_equal(read_window(remote, window)[0], read_window(local, window)[0])

        info = open_scene(zarr_uri)
        reference = open_scene(str(ome))
        assert info.data_path == f"{zarr_uri}/s0" and info.affine == reference.affine
        assert info.shape == reference.shape and info.block_shape == reference.block_shape
        for w in plan_chunks(info.shape, (6, 8, 8), 3)[::9]:  # a few windows, edges and interior
            np.testing.assert_array_equal(read_window(info, w)[0], read_window(reference, w)[0])

        identity = remote_input_sha256(zarr_uri, is_store=True)
        client.put_object(Bucket="scenes", Key="vol/ct.zarr/s0/c/0/0/0", Body=b"changed")
        assert remote_input_sha256(zarr_uri, is_store=True) != identity  # a changed chunk object
        assert remote_input_sha256(cog_uri) == remote_input_sha256(cog_uri)
        with pytest.raises(InputError, match="no such object"):
            remote_input_sha256("s3://scenes/raw/missing.tif")
        with pytest.raises(InputError, match="not a Zarr v3 array or group"):
            open_scene("s3://scenes/vol/missing.zarr")
        close_readers()


# --- NIfTI from HTTP and S3 ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nifti_volumes_over_http_and_s3_read_as_their_local_copies(tmp_path, suffix):
    from tests.readers.test_nifti import nifti_affine, volume, write_nifti

    path = write_nifti(tmp_path / f"ct{suffix}", volume((19, 23, 17), seed=4), nifti_affine("LPS"), "int16")
    policy = InputPolicy(cache_dir=str(tmp_path / "cache"))
    local = open_scene(str(path), policy=InputPolicy(cache_dir=str(tmp_path / "local-cache")))
    with RangeServer(tmp_path) as server:
        uri = f"{server.url}/{path.name}"
        close_readers()
        info = open_scene(uri, policy=policy)
        assert info.path == uri and info.shape == local.shape and info.affine == local.affine
        assert info.dtype == local.dtype and info.source_dtype == local.source_dtype
        assert server.bytes_sent[f"/{path.name}"] == path.stat().st_size  # downloaded once, whole
        assert not [p for p in (tmp_path / "cache").iterdir() if "download" in p.name]  # and deleted after
        for w in plan_chunks(info.shape, (8, 8, 8), 2)[::3]:
            np.testing.assert_array_equal(read_window(info, w)[0], read_window(local, w)[0])
        # another node (no cache entry): the read downloads and converts it there
        shutil.rmtree(info.data_path)
        close_readers()
        w = plan_chunks(info.shape, (8, 8, 8), 2)[-1]
        np.testing.assert_array_equal(read_window(info, w)[0], read_window(local, w)[0])
        # a re-open reuses the entry and its saved header: nothing more is fetched
        close_readers()
        server.reset()
        again = open_scene(uri, policy=policy)
        assert again.affine == local.affine and again.data_path == info.data_path
        assert sum(server.bytes_sent.values()) == 0
    with moto_s3() as endpoint, environ(s3_env(endpoint)):
        client = s3_client(endpoint)
        client.create_bucket(Bucket="ct-scans")
        s3_uri = upload_tree(client, "ct-scans", path, f"scans/{path.name}")
        close_readers()
        info = open_scene(s3_uri, policy=InputPolicy(cache_dir=str(tmp_path / "s3-cache")))
        assert info.shape == local.shape and info.affine == local.affine
        w = plan_chunks(info.shape, (8, 8, 8), 2)[5]
        np.testing.assert_array_equal(read_window(info, w)[0], read_window(local, w)[0])
        with pytest.raises(InputError, match="no such object"):
            open_scene("s3://ct-scans/scans/missing.nii.gz", policy=policy)
    close_readers()


def test_a_truncated_remote_nifti_is_refused_naming_the_uri_and_leaves_no_cache(tmp_path):
    from tests.readers.test_nifti import nifti_affine, volume, write_nifti

    path = write_nifti(tmp_path / "ct.nii.gz", volume((12, 12, 12), seed=1), nifti_affine("RAS"), "int16")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    cache = tmp_path / "cache"
    with RangeServer(tmp_path) as server:
        uri = f"{server.url}/ct.nii.gz"
        with pytest.raises(InputError, match=f"{uri}: truncated or corrupt"):
            open_scene(uri, policy=InputPolicy(cache_dir=str(cache)))
    assert not cache.exists() or not any(cache.iterdir())
