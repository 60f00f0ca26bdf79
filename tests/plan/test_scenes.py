"""Input manifests (`@scenes.txt`) and their expansion with paths and globs."""

from __future__ import annotations

import pytest

from pipelines.plan.scenes import expand_inputs, read_manifest
from schemas.errors import InputError


def test_a_manifest_lists_paths_globs_and_uris_relative_to_itself(tmp_path):
    (tmp_path / "scenes").mkdir()
    for name in ("a.tif", "b.tif", "c.tif"):
        (tmp_path / "scenes" / name).write_bytes(b"x")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "batch.txt").write_text(
        "# batch 1\n"
        "../scenes/a.tif\n"
        "\n"
        f"   {tmp_path}/scenes/b.tif   # absolute, spaces around\n"
        "../scenes/c*.tif\n"
        "s3://bucket/d.tif\n"
        "../scenes/missing.tif\n")
    assert read_manifest(tmp_path / "lists" / "batch.txt") == [
        str(tmp_path / "lists" / "../scenes/a.tif"), f"{tmp_path}/scenes/b.tif",
        str(tmp_path / "lists" / "../scenes/c*.tif"), "s3://bucket/d.tif",
        str(tmp_path / "lists" / "../scenes/missing.tif")]
    paths, unmatched = expand_inputs(("@lists/batch.txt", "scenes/a.tif"), base_dir=tmp_path)
    # a.tif once; a URI passes through unglobbed (its reader fetches it)
    assert paths == sorted([*(str(tmp_path / "scenes" / n) for n in ("a.tif", "b.tif", "c.tif")), "s3://bucket/d.tif"])
    assert unmatched == [str(tmp_path / "lists" / "../scenes/missing.tif")]


def test_a_missing_or_nested_manifest_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="nope.txt: input manifest not found"):
        expand_inputs(("@nope.txt",), base_dir=tmp_path)
    (tmp_path / "outer.txt").write_text("@inner.txt\n")
    with pytest.raises(InputError, match="outer.txt: a manifest lists inputs, not other manifests"):
        expand_inputs(("@outer.txt",), base_dir=tmp_path)
