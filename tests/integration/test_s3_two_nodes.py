"""A job writing to object storage on a real two-node loopback Ray cluster (token auth, as in
`test_two_nodes.py`) with a local S3 server (moto on 127.0.0.1), and no shared disk assumed:
the output root is ``s3://bucket/prefix`` without ``output.shared_filesystem``.

Each node's `ray start` has the endpoint and its own test credentials in its environment, and the
driver has a third pair; the job ships no credentials, so every request the server receives names,
by the access key id of its signature, which node's processes (or the driver) made it. That is
how the test knows where chunks were computed: each chunk's marker and partial statistics are
PUT by the process that computed it, and the driver reads the partials back to merge them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
import zarr

from pipelines.writers.outroot import as_location, zarr_store
from schemas import store as layout
from tests.helpers import (
    CHUNK_TIMINGS,
    job_spec,
    oracle_checkpoint,
    read_classes,
    smooth_scene,
    store_digest,
    write_geotiff,
)
from tests.integration.test_s3_outputs import all_objects
from tests.integration.test_two_nodes import _actors_on, two_node_cluster
from tests.remote_servers import environ, moto_s3, s3_client, s3_env

pytestmark = pytest.mark.slow

BUCKET = "tessera-nodes"
PREFIX = "jobs/two-nodes"
SCENE = "big"

# run_job in a process of its own; without an address a local Ray with room for both 2-CPU actors
_DRIVER = """
import sys
from pathlib import Path
import ray
from pipelines.run.job import run_job
from pipelines.spec import load_job_spec
spec_path = Path(sys.argv[1])
address = sys.argv[2] or None
if address is None:
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
result = run_job(load_job_spec(spec_path), base_dir=spec_path.parent, ray_address=address,
                 on_chunk=lambda d, t: print("chunk", d, t, flush=True))
print("scenes", *[s.status for s in result.scenes], flush=True)
"""

# columns of tables/scenes that differ between two runs of one spec (times)
_SCENE_TIMINGS = ("started_at", "finished_at", "wall_s", "read_s", "predict_s", "write_s", "stats_s", "merge_s")


def _credentials(who: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": f"testing-key-{who}", "AWS_SECRET_ACCESS_KEY": f"testing-secret-{who}-do-not-log"}


def _table(objects: dict[str, bytes], key: str):
    return pq.read_table(io.BytesIO(objects[key]))


def _local_leftovers(folder: Path) -> list[str]:
    """Anything of a job's outputs under a local folder: a work folder, a store, a table, a marker,
    partial statistics, or a folder an s3:// root mistaken for a path would make."""
    found = []
    for p in folder.rglob("*"):
        parts = p.relative_to(folder).parts
        if any(x in ("_work", "tables", "s3:") or x.endswith(".zarr") for x in parts) or \
                (p.name.startswith("c") and p.suffix in (".json", ".npz")) or p.name == "job.resolved.json":
            found.append(str(p))
    return found


def test_workers_on_both_nodes_write_chunks_to_the_bucket_and_the_driver_merges_them(tmp_path):
    scene = write_geotiff(tmp_path / f"{SCENE}.tif", smooth_scene((512, 512), seed=4))  # 64 chunks of 64 px
    card = oracle_checkpoint(tmp_path / "m")
    uri = f"s3://{BUCKET}/{PREFIX}"

    def spec_file(root: str, name: str) -> Path:
        spec = job_spec([scene], root, card).model_dump(mode="json", exclude_none=True)
        # two actors of 2 CPUs on two nodes of 2 CPUs: one actor per node
        spec["resources"] |= {"actors": 2, "cpus_per_actor": 2, "batch_size": 2}
        assert "shared_filesystem" not in spec["output"] or not spec["output"]["shared_filesystem"]
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path

    requests: list[tuple[str, str, str]] = []
    with moto_s3(requests) as endpoint:
        client = s3_client(endpoint)
        client.create_bucket(Bucket=BUCKET)
        base = s3_env(endpoint)
        node_env = {who: base | _credentials(who) for who in ("head", "node2", "driver")}
        secrets = [env["AWS_SECRET_ACCESS_KEY"] for env in node_env.values()]
        key_ids = {env["AWS_ACCESS_KEY_ID"]: who for who, env in node_env.items()}

        clean = tmp_path / "clean"  # the same spec on a local single-node Ray, to a local root
        local_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS", "RAY_ADDRESS"))}
        done = subprocess.run([sys.executable, "-c", _DRIVER, str(spec_file(str(clean), "clean")), ""],
                              capture_output=True, text=True, timeout=300,
                              env=local_env | {"RAY_ADDRESS": ""})
        assert done.returncode == 0 and "scenes complete" in done.stdout.splitlines(), done.stdout[-3000:] + \
            done.stderr[-3000:]

        with two_node_cluster(head_env=node_env["head"], node_env=node_env["node2"]) as cluster:
            cwd = tmp_path / "cwd"  # the driver's working folder: nothing may land in it
            cwd.mkdir()
            first_request = len(requests)
            proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(spec_file(uri, "s3")), cluster.address],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                                    env=cluster.env | node_env["driver"])
            watchdog = threading.Timer(300, proc.kill)  # a hung job fails the test instead of blocking it
            watchdog.start()
            lines: list[str] = []
            actors = Counter()
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("chunk "):  # predictor actor processes under each node's `ray start`
                    actors["head"] = max(actors["head"], _actors_on(cluster.head))
                    actors["node2"] = max(actors["node2"], _actors_on(cluster.node))
            proc.wait(timeout=60)
            watchdog.cancel()
            output = "".join(lines)
            assert proc.returncode == 0, output[-6000:]
            assert "scenes complete" in output.splitlines(), output[-3000:]  # Ray's own log lines interleave
            leftovers = [x for folder in (cluster.temp_head, cluster.temp_node, cwd) for x in _local_leftovers(folder)]
            assert not leftovers, leftovers[:10]
            logs = [p for t in (cluster.temp_head, cluster.temp_node) for p in t.rglob("*")
                    if p.is_file() and "logs" in p.parts]
            leaked = [p.name for p in logs if any(s.encode() in p.read_bytes() for s in secrets)]
            assert logs and not leaked, leaked  # the credentials stay in the nodes' environments
        job_requests = requests[first_request:]
        objects = all_objects(client, BUCKET, f"{PREFIX}/")
        with environ(node_env["driver"]):
            classes = zarr.open_array(zarr_store(as_location(uri) / f"{SCENE}.zarr", read_only=True),
                                      path=layout.CLASSES, mode="r")[:]

    assert actors["head"] >= 1 and actors["node2"] >= 1, actors  # predictor actors ran on both nodes (psutil)

    work = f"{PREFIX}/_work/{SCENE}/"
    markers = sorted(k for k in objects if k.startswith(work) and k.rsplit("/", 1)[1].startswith("c")
                     and k.endswith(".json"))
    partials = sorted(k for k in objects if k.startswith(work) and k.endswith(".npz"))
    n_chunks = 64
    assert len(markers) == len(partials) == n_chunks, (len(markers), len(partials))
    assert {k[:-len(".json")] for k in markers} == {k[:-len(".npz")] for k in partials}
    planned = sorted(r["chunk_index"] for r in _table(objects, f"{PREFIX}/tables/chunks/{SCENE}.parquet").to_pylist())
    assert sorted(json.loads(objects[k])["chunk_index"] for k in markers) == planned  # one marker per chunk

    # who PUT each marker and partial (the access key id of the request's signature): the node
    # whose actor computed the chunk; the driver GETs every partial to merge them
    def by_whom(method: str, keys: list[str]) -> Counter:
        paths = {f"/{BUCKET}/{k}" for k in keys}
        return Counter(key_ids.get(key_id, key_id) for m, path, key_id in job_requests if m == method and path in paths)

    put_markers, put_partials, got_partials = by_whom("PUT", markers), by_whom("PUT", partials), by_whom("GET", partials)
    assert set(put_markers) == set(put_partials) == {"head", "node2"}, (put_markers, put_partials)
    assert put_markers == put_partials and sum(put_markers.values()) == n_chunks, (put_markers, put_partials)
    assert put_markers["head"] > 0 and put_markers["node2"] > 0
    assert got_partials["driver"] >= n_chunks, got_partials
    chunk_puts = by_whom("PUT", [k for k in objects if k.startswith(f"{PREFIX}/{SCENE}.zarr/classes/c/")])
    assert set(chunk_puts) == {"head", "node2"}, chunk_puts  # the store's chunks too, from both nodes
    print(f"\nchunks per node (marker PUTs): {dict(put_markers)}; store chunk PUTs: {dict(chunk_puts)}; "
          f"objects: {len(objects)}; requests: {len(job_requests)}")

    # the outputs are a clean local run's: every store chunk byte for byte, the classes, the tables
    clean_store = store_digest(clean)
    bucket_store = {k[len(PREFIX) + 1:]: hashlib.sha256(v).hexdigest() for k, v in objects.items()
                    if k.startswith(f"{PREFIX}/{SCENE}.zarr/") and not k.endswith("zarr.json")}
    assert bucket_store == clean_store and len(clean_store) >= n_chunks
    expected = read_classes(clean, SCENE)
    assert classes.tobytes() == expected.tobytes() and classes.dtype == expected.dtype
    for table in ("regions", "scenes", "chunks"):
        got = _table(objects, f"{PREFIX}/tables/{table}/{SCENE}.parquet")
        want = pq.read_table(clean / "tables" / table / f"{SCENE}.parquet")
        drop = {"scenes": _SCENE_TIMINGS, "chunks": CHUNK_TIMINGS}.get(table, ())
        assert got.drop_columns(list(drop)).equals(want.drop_columns(list(drop))), f"tables/{table} differs"
    scenes = _table(objects, f"{PREFIX}/tables/scenes/{SCENE}.parquet").to_pylist()
    assert [(r["status"], r["n_chunks"], r["zarr_path"]) for r in scenes] == [("complete", n_chunks, f"{SCENE}.zarr")]
    assert json.loads(objects[f"{PREFIX}/job.resolved.json"])["output"].get("shared_filesystem") in (None, False)

    for secret in [*secrets, *key_ids]:  # no credential in any object
        assert not [k for k, body in objects.items() if secret.encode() in body], secret
