"""DICOM series in object storage (a local S3 server, moto): a series named by its folder URI
(``s3://bucket/prefix/``) is downloaded once into a local cache folder and reads as the same series
on a local disk; a node without the cache entry downloads it again, unless the objects changed;
a bad series is refused naming its URI and objects; HTTP(S) series and single objects are refused.

Every series is written with pydicom (`tests.readers.test_dicom.write_series`) and uploaded with
boto3; the server records every request, so the tests count the GETs of each object."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest

from pipelines.plan.chunks import plan_chunks
from pipelines.plan.scenes import assign_scene_names, expand_inputs, scene_name
from pipelines.readers import InputPolicy, close_readers, known_suffixes, open_scene, read_window, reader_for
from pipelines.readers import dicom as dicom_reader
from pipelines.readers.remote import list_folder, listing_identity, remote_input_sha256
from pipelines.run.stages import open_and_hash
from schemas.errors import InputError
from schemas.uris import is_folder_uri, uri_name
from tests.readers.test_dicom import ORIENTATIONS, _stored_volume, write_series
from tests.remote_servers import environ, moto_s3, s3_client, s3_env, upload_tree

BUCKET = "dicom-scans"
SHAPE = (12, 20, 24)


@pytest.fixture(autouse=True)
def _fresh_caches():
    close_readers()
    yield
    close_readers()


@pytest.fixture
def s3(tmp_path):
    """A moto S3 server with one bucket, the environment pointing at it; yields (client,
    requests): requests is every (method, path, key id) the server answered."""
    requests: list[tuple[str, str, str]] = []
    with moto_s3(requests) as endpoint, environ(s3_env(endpoint)):
        client = s3_client(endpoint)
        client.create_bucket(Bucket=BUCKET)
        yield client, requests


def object_gets(requests, prefix: str) -> dict[str, int]:
    """GETs of each object under `prefix` (``/<bucket>/<key prefix>/``), by object name; listings
    (GET of the bucket itself) are not among them."""
    counts: dict[str, int] = {}
    for method, path, _ in requests:
        if method == "GET" and path.startswith(prefix) and len(path) > len(prefix):
            name = path[len(prefix):]
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_folder_uris_are_dicom_series_named_by_their_last_folder(tmp_path):
    uri = "s3://bucket/ct/series1/"
    assert is_folder_uri(uri) and not is_folder_uri("s3://bucket/ct/series1") and not is_folder_uri("/data/ct/")
    assert reader_for(uri).name == "dicom" and reader_for("https://h/ct/series1/").name == "dicom"
    assert reader_for("s3://bucket/img.zarr/").name == "zarr"  # a suffix still wins
    assert reader_for("s3://bucket/ct/series1").name == "geotiff"  # no '/': one object
    assert uri_name(uri) == "series1" and scene_name(uri, suffixes=known_suffixes()) == "series1"
    assert assign_scene_names([uri, "s3://other/series1/"], suffixes=known_suffixes()) == ["series1", "series1-2"]
    paths, unmatched = expand_inputs((uri,), base_dir=tmp_path)  # one input, passed through as given
    assert paths == [uri] and unmatched == []


def test_a_series_in_s3_reads_as_its_local_folder_and_downloads_each_object_once(tmp_path, s3):
    client, requests = s3
    stored = _stored_volume(SHAPE, seed=11)
    slopes = [1.0] * SHAPE[0]
    slopes[5] = 2.0  # a per-slice rescale: float32 values
    local = tmp_path / "series1"
    write_series(local, stored, orientation="oblique", slopes=slopes)
    (local / "README.txt").write_text("exported by the scanner")  # ignored, as locally
    uri = upload_tree(client, BUCKET, local, "ct/series1") + "/"
    client.put_object(Bucket=BUCKET, Key="ct/series1/", Body=b"")  # a folder marker: no object of it
    client.put_object(Bucket=BUCKET, Key="ct/series1/sub/other.dcm", Body=b"not read")  # a sub-folder: not listed
    cache = tmp_path / "cache"
    policy = InputPolicy(cache_dir=str(cache))
    prefix = f"/{BUCKET}/ct/series1/"

    reference = open_scene(local)
    info = open_scene(uri, policy=policy)
    assert info.path == uri and info.format == "dicom" and info.data_path is not None
    assert os.path.dirname(info.data_path) == str(cache) and os.path.basename(info.data_path).startswith("series1-")
    for field in ("shape", "affine", "spacing", "orientation", "dtype", "source_dtype", "block_shape", "count"):
        assert getattr(info, field) == getattr(reference, field), field
    assert info.dtype == "float32"
    names = sorted(p.name for p in local.iterdir())
    assert sorted(os.listdir(info.data_path)) == names  # the direct objects only, nothing partial
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]

    windows = plan_chunks(info.shape, (5, 8, 9), (1, 2, 2))
    for window in windows:
        remote_pixels, remote_valid = read_window(info, window)
        local_pixels, local_valid = read_window(reference, window)
        assert np.array_equal(remote_pixels, local_pixels) and np.array_equal(remote_valid, local_valid)
    close_readers()  # a fresh process on the same node: the entry is reused
    inode = os.stat(info.data_path).st_ino
    assert np.array_equal(read_window(info, windows[-1])[0], read_window(reference, windows[-1])[0])
    again = open_scene(uri, policy=policy)  # a re-open lists the prefix, downloads nothing
    assert again == info and os.stat(info.data_path).st_ino == inode
    assert object_gets(requests, prefix) == {name: 1 for name in names}

    # the scene's identity (fingerprint, tables/scenes) is that of the listing the entry is keyed by
    identity = remote_input_sha256(uri, is_store=True, recursive=False)
    assert identity == listing_identity(uri, list_folder(uri))
    assert os.path.basename(info.data_path).endswith(f"-{identity[:12]}.dicom")
    assert [r["key"].rsplit("/", 1)[-1] for r in list_folder(uri)] == names
    _, sha, error = open_and_hash(uri, policy)
    assert error is None and sha == identity
    assert remote_input_sha256(uri, is_store=True) != identity  # the recursive listing has the sub-folder

    # another node (no cache entry): the read downloads the series there, windows unchanged
    shutil.rmtree(info.data_path)
    close_readers()
    for window in windows[::4]:
        assert np.array_equal(read_window(info, window)[0], read_window(reference, window)[0])
    assert object_gets(requests, prefix) == {name: 2 for name in names}
    assert sorted(os.listdir(info.data_path)) == names


def test_a_series_with_a_missing_slice_in_s3_is_refused_naming_its_uri_and_objects(tmp_path, s3):
    client, _ = s3
    local = tmp_path / "gap"
    ipps = write_series(local, _stored_volume((8, 10, 10), seed=2), orientation="axial")
    index = dicom_reader.scan_series(str(local))
    (local / index.files[3]).unlink()
    uri = upload_tree(client, BUCKET, local, "ct/gap") + "/"
    cache = tmp_path / "cache"
    normal = np.cross(*ORIENTATIONS["axial"])
    with pytest.raises(InputError, match=(
            rf"^s3://{BUCKET}/ct/gap: 1 slice\(s\) missing between {ipps[2] @ normal:.4f} mm "
            rf"\({re.escape(index.files[2])}\) and {ipps[4] @ normal:.4f} mm \({re.escape(index.files[4])}\)")) as err:
        open_scene(uri, policy=InputPolicy(cache_dir=str(cache)))
    assert str(cache) not in str(err.value)  # the URI, never the local copy
    assert not any(cache.iterdir())  # a refused series keeps no cache entry

    # a file of the series is named by its object's URI
    client.put_object(Bucket=BUCKET, Key="ct/gap/broken.dcm", Body=b"no preamble")
    with pytest.raises(InputError, match=rf"^s3://{BUCKET}/ct/gap/broken\.dcm: no DICOM preamble"):
        open_scene(uri, policy=InputPolicy(cache_dir=str(cache)))


def test_uris_that_name_no_series_folder_in_s3_are_refused_with_what_to_do(tmp_path, s3):
    client, _ = s3
    local = tmp_path / "s"
    write_series(local, _stored_volume((3, 8, 8)), names=["a.dcm", "b.dcm", "c.dcm"])
    upload_tree(client, BUCKET, local, "study/s")
    policy = InputPolicy(cache_dir=str(tmp_path / "cache"))
    with pytest.raises(InputError, match=r"^https://host/series/: dicom inputs are not read from https:// .*"
                                         r"HTTP\(S\) cannot list a folder: copy the series to a local disk and give "
                                         r"its folder, or put it in S3 and give s3://bucket/prefix/"):
        open_scene("https://host/series/", policy=policy)
    with pytest.raises(InputError, match=rf"^s3://{BUCKET}/study/s/a\.dcm: names one object, not a series folder; "
                                         rf".*give its folder with the trailing '/' \(s3://{BUCKET}/study/s/\)"):
        open_scene(f"s3://{BUCKET}/study/s/a.dcm", policy=policy)
    with pytest.raises(InputError, match=rf"^s3://{BUCKET}/study/: no objects directly under this prefix, only the "
                                         r"folders s/; give the folder of one series"):
        open_scene(f"s3://{BUCKET}/study/", policy=policy)
    with pytest.raises(InputError, match=rf"^s3://{BUCKET}/nothing/: no objects directly under this prefix$"):
        open_scene(f"s3://{BUCKET}/nothing/", policy=policy)
    with pytest.raises(InputError, match=rf"\(if s3://{BUCKET}/study/s is a folder of DICOM slices, end the URI "
                                         r"with '/' to name the series\)$"):
        open_scene(f"s3://{BUCKET}/study/s", policy=policy)  # the folder without its slash: one (missing) object


def test_objects_changed_after_open_are_refused_at_a_read_that_must_download_again(tmp_path, s3):
    client, _ = s3
    stored = _stored_volume((6, 10, 12), seed=4)
    local = tmp_path / "series2"
    write_series(local, stored, orientation="axial")
    uri = upload_tree(client, BUCKET, local, "ct/series2") + "/"
    info = open_scene(uri, policy=InputPolicy(cache_dir=str(tmp_path / "cache")))
    (window,) = plan_chunks(info.shape, 16, 0)
    assert np.array_equal(read_window(info, window)[0], read_window(open_scene(local), window)[0])

    # one slice re-uploaded with other values (another ETag), then a node without the entry reads
    index = dicom_reader.scan_series(str(local))
    changed = local / index.files[2]
    ds = dicom_reader.pydicom.dcmread(changed)
    ds.PixelData = (stored[2] + 1).astype("<i2").tobytes()
    ds.save_as(changed, enforce_file_format=True)
    client.upload_file(str(changed), BUCKET, f"ct/series2/{changed.name}")
    shutil.rmtree(info.data_path)
    close_readers()
    with pytest.raises(InputError, match=rf"^{re.escape(uri)}: the objects under this prefix changed after the "
                                         r"series was opened \(an object added, removed or replaced\); "
                                         r"run the job again"):
        read_window(info, window)
    assert not os.path.exists(info.data_path)  # nothing downloaded under the old identity's name
    now = remote_input_sha256(uri, is_store=True, recursive=False)
    assert not os.path.basename(info.data_path).endswith(f"-{now[:12]}.dicom")
    # a re-run opens the new objects: the changed slice reads with its new values
    fresh = open_scene(uri, policy=InputPolicy(cache_dir=str(tmp_path / "cache")))
    assert fresh.data_path != info.data_path and os.path.basename(fresh.data_path).endswith(f"-{now[:12]}.dicom")
    assert np.array_equal(read_window(fresh, window)[0], read_window(open_scene(local), window)[0])


def test_a_download_keeps_to_the_listed_objects_and_racing_processes_share_one_entry(tmp_path, s3):
    client, _ = s3
    local = tmp_path / "series3"
    write_series(local, _stored_volume((5, 8, 8), seed=6), orientation="axial")
    uri = upload_tree(client, BUCKET, local, "ct/series3") + "/"
    rows = list_folder(uri)
    entry = dicom_reader.remote_series_entry(uri, listing_identity(uri, rows), str(tmp_path / "cache"))

    # several downloads of one entry at once (actors of one node): one rename wins, the others keep it
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: dicom_reader._download_series(uri, rows, entry), range(4)))
    assert sorted(os.listdir(entry)) == sorted(p.name for p in local.iterdir())
    assert os.listdir(entry.parent) == [entry.name]  # no partial folder left
    inode = os.stat(entry).st_ino
    dicom_reader._download_series(uri, rows, entry)  # a loser that finds the entry complete
    assert os.stat(entry).st_ino == inode and os.listdir(entry.parent) == [entry.name]
    for name in os.listdir(entry):
        assert (entry / name).read_bytes() == (local / name).read_bytes()

    # an object replaced after the listing: its GET (If-Match the listed ETag) fails, no entry is made
    name = rows[0]["key"].rsplit("/", 1)[-1]
    client.put_object(Bucket=BUCKET, Key=rows[0]["key"], Body=(local / name).read_bytes() + b"\0")
    shutil.rmtree(entry)
    with pytest.raises(InputError, match=rf"^s3://{BUCKET}/ct/series3/{re.escape(name)}: the object was replaced "
                                         r"after the folder was listed"):
        dicom_reader._download_series(uri, rows, entry)
    assert not entry.exists() and os.listdir(entry.parent) == []
