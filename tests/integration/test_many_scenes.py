"""Jobs of many scenes: a manifest, progress lines, the failed count and exit code, the output
root's status, and a spec whose inputs match nothing failing before Ray or any output exists."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import zarr
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.run.progress import parse_progress
from pipelines.run.status import read_root_status
from schemas import store as layout
from tests.helpers import oracle_checkpoint, smooth_scene, write_geotiff

runner = CliRunner()


def test_inputs_matching_nothing_fail_before_ray_starts_or_the_root_exists(tmp_path):
    # its own process: the test session's Ray may be up already
    oracle_checkpoint(tmp_path / "models", name="oracle")
    (tmp_path / "job.yaml").write_text("inputs: ['scenes/*.tif', 'gone.tif']\nmodel: {card: models/oracle.json}\n"
                                       "output: {root: out/deep}\n")
    code = ("import sys, ray; from pathlib import Path\n"
            "from pipelines.run.job import run_job; from pipelines.spec import load_job_spec\n"
            "from schemas.errors import InputError\n"
            "d = Path(sys.argv[1])\n"
            "try:\n    run_job(load_job_spec(d / 'job.yaml'), base_dir=d)\n"
            "except InputError as exc:\n    print('error', exc)\n"
            "print('ray', ray.is_initialized())\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "error inputs match no file: scenes/*.tif, gone.tif" in out.stdout, out.stdout
    assert "ray False" in out.stdout
    assert not (tmp_path / "out").exists()


def test_a_manifest_job_reports_progress_failures_and_root_status(tmp_path, ray_local):
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    write_geotiff(scenes / "a.tif", smooth_scene((96, 80), seed=1))
    write_geotiff(scenes / "b.tif", smooth_scene((70, 130), seed=2))
    (scenes / "corrupt.tif").write_bytes(b"II*\x00 this is not a tiff")
    (tmp_path / "scenes.txt").write_text("# tonight's batch\nscenes/a.tif\nscenes/b.tif\nscenes/corrupt.tif\n")
    oracle_checkpoint(tmp_path / "models", name="oracle")
    (tmp_path / "job.yaml").write_text(
        "inputs: ['@scenes.txt']\nmodel: {card: models/oracle.json}\n"
        "tiling: {chunk_size: 64, halo: 4, tile_size: 32}\nresources: {actors: 1, torch_threads: 1}\n"
        "output: {root: out}\n")
    result = runner.invoke(app, ["run", str(tmp_path / "job.yaml")])
    assert result.exit_code == 1, result.output
    assert "1 of 3 scene(s) failed" in result.output
    # a (96x80): 2x2 chunks, b (70x130): 2x3 chunks; the corrupt file fails before planning
    last = parse_progress(result.output)
    assert last is not None, result.output
    assert (last["chunks_done"], last["chunks_total"]) == (10, 10)
    assert (last["scenes_complete"], last["scenes_failed"], last["scenes_total"]) == (2, 1, 3)

    root = tmp_path / "out"
    status = {s.name: s for s in read_root_status(root)}
    assert {n: (s.status, s.chunks_done, s.chunks_total) for n, s in status.items()} == {
        "a": ("complete", 4, 4), "b": ("complete", 6, 6), "corrupt": ("failed", 0, None)}
    assert "corrupt.tif" in status["corrupt"].error

    # an interrupted scene: its store partial, two chunk markers missing
    interrupted = tmp_path / "copy"
    shutil.copytree(root, interrupted)
    group = zarr.open_group(str(interrupted / "b.zarr"), mode="r+")
    attrs = dict(group.attrs[layout.TESSERA_ATTR])
    group.attrs[layout.TESSERA_ATTR] = attrs | {layout.KEY_STATUS: layout.STORE_STATUS_PARTIAL}
    markers = sorted((interrupted / "_work" / "b").glob("*/c*.json"))
    for m in markers[:2]:
        m.unlink()
    (interrupted / "tables" / "scenes" / "b.parquet").unlink()
    b = {s.name: s for s in read_root_status(interrupted)}["b"]
    assert (b.status, b.chunks_done, b.chunks_total) == ("partial", 4, 6)

    shown = runner.invoke(app, ["status", "--root", str(interrupted)])
    assert shown.exit_code == 0, shown.output
    assert "scenes: 1 complete, 1 failed, 1 partial (running or interrupted); chunks 8/10" in shown.output
