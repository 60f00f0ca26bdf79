"""Tests of pipelines.query: SQL over a job's result tables, read-only."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.query import run_query
from schemas.errors import OutputError
from schemas.tables import SCHEMAS


def _chunk_row(scene: str, i: int) -> dict:
    return {"scene": scene, "chunk_index": [0, i], "origin": [0, 64 * i], "shape": [64, 64], "status": "written",
            "valid_pixels": 4096 - i, "n_regions_partial": i, "read_s": 0.1, "predict_s": 0.2, "write_s": 0.01,
            "stats_s": 0.02, "fingerprint": "f" * 64}


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    chunks = tmp_path / "tables" / "chunks"
    chunks.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([_chunk_row("a", i) for i in range(3)], schema=SCHEMAS["chunks"]),
                   chunks / "a.parquet")
    # a file written before the last column existed: it reads as null there
    old = SCHEMAS["chunks"].remove(SCHEMAS["chunks"].get_field_index("fingerprint"))
    pq.write_table(pa.Table.from_pylist([_chunk_row("b", 7)], schema=old), chunks / "b.parquet")
    (tmp_path / "tables" / "regions").mkdir()  # no files yet; scenes: no folder at all
    return tmp_path


def test_views_read_every_file_with_the_table_schema(root: Path) -> None:
    rows = run_query(root, "SELECT scene, count(*) AS n, sum(valid_pixels) AS px, count(fingerprint) AS fp "
                           "FROM chunks GROUP BY scene ORDER BY scene").to_pylist()
    assert rows == [{"scene": "a", "n": 3, "px": 3 * 4096 - 3, "fp": 3}, {"scene": "b", "n": 1, "px": 4089, "fp": 0}]
    for empty in ("regions", "scenes"):  # tables without files are empty views with their columns
        table = run_query(root, f"SELECT * FROM {empty}")
        assert table.num_rows == 0 and table.column_names == SCHEMAS[empty].names


@pytest.mark.parametrize("sql", [
    "COPY (SELECT 1 AS x) TO '{root}/tables/chunks/evil.parquet'",
    "COPY (SELECT 1 AS x) TO '{outside}/evil.csv'",
    "EXPORT DATABASE '{outside}/export'",
    "ATTACH '{outside}/evil.duckdb' AS evil",
])
def test_queries_write_no_file_anywhere(root: Path, tmp_path_factory: pytest.TempPathFactory, sql: str) -> None:
    outside = tmp_path_factory.mktemp("outside")
    before = sorted(p for p in root.rglob("*"))
    with pytest.raises(duckdb.Error, match="Permission|disabled"):
        run_query(root, sql.format(root=root, outside=outside))
    assert sorted(p for p in root.rglob("*")) == before
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize(("sql", "error", "message"), [
    ("SELECT * FROM read_csv('{secret}')", duckdb.PermissionException,
     r'Cannot access file ".*secret\.csv" - file system operations are disabled by configuration'),
    # even the tables' own files: use the views
    ("SELECT * FROM read_parquet('{root}/tables/chunks/a.parquet')", duckdb.PermissionException,
     r'Cannot access file ".*/tables/chunks/a\.parquet" - file system operations are disabled by configuration'),
    ("SET enable_external_access = true", duckdb.InvalidInputException,
     r'Cannot change configuration option "enable_external_access" - the configuration has been locked'),
])
def test_queries_read_nothing_but_the_views(root: Path, tmp_path: Path, sql: str, error: type, message: str) -> None:
    secret = tmp_path / "secret.csv"
    secret.write_text("token\nhunter2\n")
    with pytest.raises(error, match=message):
        run_query(root, sql.format(root=root, secret=secret))


def test_not_an_output_root(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="no tables/ folder"):
        run_query(tmp_path, "SELECT 1")
