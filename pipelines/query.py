"""SQL over a job's result tables with DuckDB: one view per table of `schemas.tables` (`regions`,
`volume_regions`, `instances`, `scenes`, `chunks`)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from schemas.errors import OutputError
from schemas.tables import SCHEMAS


def connect(root: str | Path) -> duckdb.DuckDBPyConnection:
    """A read-only, sandboxed in-memory DuckDB connection with one view per table under
    `<root>/tables/`.

    The tables are pyarrow datasets of their Parquet files, scanned lazily (columns and filters
    pushed down), each with its table's schema: a file written before a column existed reads
    it as null, and a table with no files yet is an empty view with the right columns, so
    queries never fail just because, say, no scene has finished. DuckDB itself is then denied
    the file system (`enable_external_access = false`, configuration locked): a query can read
    these views and nothing else, and write no file anywhere (`COPY ... TO`, `ATTACH`,
    `read_csv('/etc/...')`, extension installs all fail), so the query API can be handed SQL
    it did not write.

    Raises:
        OutputError: `root` has no `tables/` folder (not a tessera output root).
    """
    import pyarrow.dataset as ds

    tables = Path(root) / "tables"
    if not tables.is_dir():
        raise OutputError(f"{root}: no tables/ folder here; is this a tessera output root?")
    con = duckdb.connect(":memory:")
    for name, schema in SCHEMAS.items():
        files = sorted(str(f) for f in (tables / name).glob("*.parquet"))
        source = ds.dataset(files, schema=schema, format="parquet") if files else schema.empty_table()
        con.register(f"_{name}_source", source)
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM _{name}_source")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def run_query(root: str | Path, sql: str) -> pa.Table:
    """Run one SQL statement against the views of `root` and return an Arrow table.

    Raises:
        OutputError: not an output root; duckdb.Error propagates for bad SQL (its message
            names the problem).
    """
    con = connect(root)
    try:
        relation = con.sql(sql)
        return relation.to_arrow_table() if relation is not None else pa.table({})
    finally:
        con.close()
