"""The remote-read benchmark's pieces: the COG both sides read, and the server's added latency."""

from __future__ import annotations

import time
import urllib.request

import numpy as np
import rasterio

from pipelines.tools.bench.remote import ensure_cog
from pipelines.tools.rangeserver import RangeServer
from tests.helpers import smooth_scene, write_geotiff


def test_the_bench_cog_has_overviews_the_same_pixels_and_is_written_once(tmp_path):
    data = smooth_scene((1100, 900), seed=3)
    scene = write_geotiff(tmp_path / "bench.tif", data)
    cog = ensure_cog(scene)
    with rasterio.open(cog) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG" and ds.overviews(1)
        assert ds.block_shapes[0] == (512, 512)
        np.testing.assert_array_equal(ds.read(), data)
    stamp = cog.stat().st_mtime_ns
    assert ensure_cog(scene) == cog and cog.stat().st_mtime_ns == stamp


def test_the_range_server_waits_its_latency_before_each_answer(tmp_path):
    (tmp_path / "f.bin").write_bytes(bytes(range(256)) * 4)
    with RangeServer(tmp_path, latency_s=0.05) as server:
        request = urllib.request.Request(f"{server.url}/f.bin", headers={"Range": "bytes=10-19"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(request) as response:
            body = response.read()
        elapsed = time.perf_counter() - t0
    assert body == bytes(range(10, 20)) and elapsed >= 0.05
    assert server.bytes_sent == {"/f.bin": 10} and server.requests == [("GET", "/f.bin", "bytes=10-19")]
