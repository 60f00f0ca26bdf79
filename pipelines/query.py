"""SQL over a job's result tables with DuckDB: one view per table of `schemas.tables` (`regions`,
`volume_regions`, `instances`, `scenes`, `chunks`).

The root may be a local folder or an ``s3://bucket/prefix``: pyarrow reads the Parquet files
(its S3 filesystem, configured from the AWS environment, `pipelines.writers.outroot`) and hands
DuckDB the datasets, so DuckDB needs no httpfs extension (nothing is downloaded) and keeps its
own file access off."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from pipelines.writers.outroot import S3Location, arrow_filesystem, as_location, list_names, list_prefixes
from schemas.errors import OutputError
from schemas.tables import SCHEMAS


def connect(root: str | Path | S3Location) -> duckdb.DuckDBPyConnection:
    """A read-only, sandboxed in-memory DuckDB connection with one view per table under
    `<root>/tables/` (a local folder or ``s3://bucket/prefix``).

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

    location = as_location(root)
    tables = location / "tables"
    if isinstance(location, Path):
        if not tables.is_dir():
            raise OutputError(f"{root}: no tables/ folder here; is this a tessera output root?")
        filesystem = None
        listing = {name: sorted(str(f) for f in (tables / name).glob("*.parquet")) for name in SCHEMAS}
    else:
        names = list_prefixes(tables)
        if not names:
            raise OutputError(f"{root}: no tables/ under this prefix; is this a tessera output root?")
        filesystem, _ = arrow_filesystem(location)
        listing = {name: [f"{tables.bucket}/{tables.key}/{name}/{f}" for f in list_names(tables / name)
                          if f.endswith(".parquet")] if name in names else [] for name in SCHEMAS}
    con = duckdb.connect(":memory:")
    for name, schema in SCHEMAS.items():
        files = listing[name]
        source = (ds.dataset(files, schema=schema, format="parquet", filesystem=filesystem) if files
                  else schema.empty_table())
        con.register(f"_{name}_source", source)
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM _{name}_source")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def run_query(root: str | Path | S3Location, sql: str) -> pa.Table:
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
