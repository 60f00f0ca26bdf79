"""The pieces of `tessera submit` that need no cluster: token discovery (never shown), the job
package (paths rewritten, models copied, Ray's upload limit), and the multi-node output guard."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.run.cluster import shared_output_problem
from pipelines.run.submit import (
    AuthToken,
    find_auth_token,
    package_limit_bytes,
    stage_job_package,
)
from schemas.errors import ClusterError, InputError, JobSpecError
from schemas.job import parse_job_spec
from tests.helpers import oracle_checkpoint

SECRET = "tok-3f9c1e0d-not-for-printing"


def test_token_sources_in_rays_order(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(f"  {SECRET}-default\n")
    token_file = tmp_path / "token"
    token_file.write_text(f"{SECRET}-file\n")

    from_env = find_auth_token({"RAY_AUTH_TOKEN": SECRET, "RAY_AUTH_TOKEN_PATH": str(token_file)}, home)
    assert from_env.value == SECRET and from_env.source == "RAY_AUTH_TOKEN"
    from_path = find_auth_token({"RAY_AUTH_TOKEN_PATH": str(token_file)}, home)
    assert from_path.value == f"{SECRET}-file" and str(token_file) in from_path.source
    from_default = find_auth_token({}, home)
    assert from_default.value == f"{SECRET}-default"  # whitespace stripped, as Ray does
    assert find_auth_token({}, tmp_path / "nobody") is None
    assert from_env.headers() == {"Authorization": f"Bearer {SECRET}"}


def test_a_token_is_never_in_its_text_forms():
    token = AuthToken(SECRET, "RAY_AUTH_TOKEN")
    for text in (str(token), repr(token), f"{token}", f"{token!r}"):
        assert SECRET not in text
    assert "RAY_AUTH_TOKEN" in str(token)


def test_an_unreadable_token_path_is_an_error_naming_the_variable(tmp_path):
    with pytest.raises(ClusterError, match="RAY_AUTH_TOKEN_PATH"):
        find_auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, tmp_path)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ClusterError, match="empty"):
        find_auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "empty")}, tmp_path)


def _spec_folder(tmp_path: Path, *, root: str, card: str = "models/oracle.json") -> Path:
    oracle_checkpoint(tmp_path / "models", name="oracle")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "more.txt").write_text("# two more scenes\n../b.tif\n\n/data/shared/c.tif  # absolute\n")
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "name: pack\n"
        "inputs: ['a/*.tif', '@lists/more.txt', '/mnt/shared/d.tif']\n"
        f"model: {{card: {card}}}\n"
        "tiling: {chunk_size: 64}\n"
        f"output: {{root: {root}}}\n")
    return spec


def test_the_package_holds_the_spec_manifest_and_model_with_paths_for_the_cluster(tmp_path):
    spec = _spec_folder(tmp_path, root="/shared/out")
    out = tmp_path / "pkg"
    out.mkdir()
    package = stage_job_package(spec, out)

    staged = parse_job_spec((out / "job.yaml").read_text(), source="staged")
    assert staged.inputs == (str(tmp_path / "a/*.tif"), "@inputs/0-more.txt", "/mnt/shared/d.tif")
    assert (out / "inputs/0-more.txt").read_text().splitlines() == [str(tmp_path / "b.tif"), "/data/shared/c.tif"]
    assert staged.model.card == "models/0/oracle.json"
    assert staged.output.root == "/shared/out" and staged.tiling.chunk_size == 64 and staged.name == "pack"
    card = (out / "models/0/oracle.json").read_text()
    weights = yaml.safe_load(card)["weights"]
    assert (out / "models/0" / weights).read_bytes() == (tmp_path / "models" / weights).read_bytes()
    # only what the user set is written (defaults stay the cluster's tessera's)
    assert set(yaml.safe_load((out / "job.yaml").read_text())) == {"name", "inputs", "model", "tiling", "output"}
    files = {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*") if p.is_file()}
    assert dict(package.files) == files and package.size_bytes == sum(files.values())
    assert package.output_root == "/shared/out" and package.job_name == "pack"


def test_builtin_cards_and_no_upload_keep_references(tmp_path):
    spec = _spec_folder(tmp_path, root="/shared/out", card="builtin:unet-demo")
    out = tmp_path / "pkg"
    out.mkdir()
    stage_job_package(spec, out)
    assert parse_job_spec((out / "job.yaml").read_text(), source="s").model.card == "builtin:unet-demo"
    assert not (out / "models").exists()

    spec2 = tmp_path / "job2.yaml"
    spec2.write_text("inputs: [a.tif]\nmodel: {card: models/oracle.json}\noutput: {root: /shared/out}\n")
    out2 = tmp_path / "pkg2"
    out2.mkdir()
    stage_job_package(spec2, out2, upload_models=False)
    assert parse_job_spec((out2 / "job.yaml").read_text(), source="s").model.card == str(
        (tmp_path / "models/oracle.json").resolve())
    assert not (out2 / "models").exists()


def test_a_relative_output_root_is_refused(tmp_path):
    spec = _spec_folder(tmp_path, root="out")
    with pytest.raises(JobSpecError, match="output.root 'out' is relative"):
        stage_job_package(spec, tmp_path)


def test_an_s3_output_root_is_packaged_as_it_is(tmp_path):
    spec = _spec_folder(tmp_path, root="s3://bucket/jobs/out")
    out = tmp_path / "pkg"
    out.mkdir()
    package = stage_job_package(spec, out)
    assert parse_job_spec((out / "job.yaml").read_text(), source="s").output.root == "s3://bucket/jobs/out"
    assert package.output_root == "s3://bucket/jobs/out"


def test_a_missing_relative_manifest_is_refused(tmp_path):
    (tmp_path / "job.yaml").write_text("inputs: ['@nope.txt']\noutput: {root: /shared/out}\n")
    with pytest.raises(InputError, match="nope.txt: input manifest not found"):
        stage_job_package(tmp_path / "job.yaml", tmp_path)


def test_a_package_past_rays_upload_limit_is_refused_before_copying(tmp_path):
    spec = _spec_folder(tmp_path, root="/shared/out")
    out = tmp_path / "pkg"
    out.mkdir()
    with pytest.raises(ClusterError, match="--no-upload-models") as err:
        stage_job_package(spec, out, limit_bytes=1000)
    assert "models/0/" in str(err.value) and "shared path" in str(err.value)
    assert list(out.iterdir()) == []
    assert package_limit_bytes({}) == 512 * 2**20
    assert package_limit_bytes({"RAY_max_grpc_message_size": "1024"}) == 1024


NODE_A = {"Alive": True, "NodeManagerAddress": "10.0.0.1"}
NODE_B = {"Alive": True, "NodeManagerAddress": "10.0.0.2"}
DEAD = {"Alive": False, "NodeManagerAddress": "10.0.0.9"}


def test_a_local_root_on_a_multi_node_cluster_is_refused_unless_declared_shared():
    root = Path("/data/out")
    assert shared_output_problem([NODE_A], root=root, shared_filesystem=False) is None
    assert shared_output_problem([NODE_A, DEAD], root=root, shared_filesystem=False) is None  # dead nodes write nothing
    problem = shared_output_problem([NODE_A, NODE_B], root=root, shared_filesystem=False)
    assert "/data/out" in problem and "2 alive nodes" in problem and "10.0.0.2" in problem
    assert "output.shared_filesystem: true" in problem
    assert shared_output_problem([NODE_A, NODE_B], root=root, shared_filesystem=True) is None
    # one node now, but the job waits for an autoscaler to add the nodes it asks for
    growing = shared_output_problem([NODE_A], root=root, shared_filesystem=False, cluster_may_grow=True)
    assert growing is not None and "add nodes" in growing
    assert shared_output_problem([NODE_A], root=root, shared_filesystem=True, cluster_may_grow=True) is None
