"""The `tessera` CLI: run a job file, query tables, clear errors and exit codes."""

from __future__ import annotations

import csv
import io
import json

import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from tests.helpers import oracle_checkpoint, smooth_scene, write_geotiff

runner = CliRunner()


@pytest.fixture(scope="module")
def job_root(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("cli")
    write_geotiff(tmp / "a.tif", smooth_scene((96, 80), seed=11))
    oracle_checkpoint(tmp / "models", name="oracle")
    (tmp / "job.yaml").write_text(
        "inputs: ['*.tif']\n"            # relative to the spec's folder
        "model: {card: models/oracle.json}\n"
        "tiling: {chunk_size: 64, halo: 4, tile_size: 32}\n"
        "resources: {torch_threads: 1}\n"
        "output: {root: results}\n"
    )
    result = runner.invoke(app, ["run", str(tmp / "job.yaml")])
    assert result.exit_code == 0, result.output
    assert "complete" in result.output
    return tmp / "results"


def test_query_formats(job_root):
    sql = "SELECT class_name, count(*) AS n, sum(pixel_count) AS px FROM regions GROUP BY 1 ORDER BY 1"
    as_csv = runner.invoke(app, ["query", "--root", str(job_root), "--format", "csv", sql])
    assert as_csv.exit_code == 0, as_csv.output
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert sum(int(r["px"]) for r in rows) == 96 * 80
    as_json = runner.invoke(app, ["query", "--root", str(job_root), "--format", "json", sql])
    assert [json.loads(line)["n"] for line in as_json.stdout.splitlines()] == [int(r["n"]) for r in rows]
    as_table = runner.invoke(app, ["query", "--root", str(job_root), "SELECT scene, status FROM scenes"])
    assert as_table.exit_code == 0, as_table.output
    # rich's table: a header row of the column names, then one row per scene
    cells = [[c.strip() for c in line.strip("┃│").split(line[0])]
             for line in as_table.stdout.splitlines() if line[:1] in ("┃", "│")]
    assert cells == [["scene", "status"], ["a", "complete"]]


def test_query_errors(job_root, tmp_path):
    bad_sql = runner.invoke(app, ["query", "--root", str(job_root), "SELECT nope FROM regions"])
    assert bad_sql.exit_code == 2 and "nope" in bad_sql.output
    not_root = runner.invoke(app, ["query", "--root", str(tmp_path), "SELECT 1"])
    assert not_root.exit_code == 2 and "no tables/ folder" in not_root.output


def test_run_bad_spec_names_the_field(tmp_path):
    (tmp_path / "job.yaml").write_text("inputs: [x.tif]\noutput: {root: o}\ntiling: {halo: -1}\n")
    result = runner.invoke(app, ["run", str(tmp_path / "job.yaml")])
    assert result.exit_code == 2
    assert "job.yaml" in result.output and "tiling.halo" in result.output
