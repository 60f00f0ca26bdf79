"""SQL over a job's result tables with DuckDB: views `regions`, `scenes`, `chunks`."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from schemas.errors import OutputError
from schemas.tables import SCHEMAS


def connect(root: str | Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per table under `<root>/tables/`.

    A table with no files yet is an empty view with the right columns, so queries never fail
    just because, say, no scene has finished.

    Raises:
        OutputError: `root` has no `tables/` folder (not a tessera output root).
    """
    tables = Path(root) / "tables"
    if not tables.is_dir():
        raise OutputError(f"{root}: no tables/ folder here; is this a tessera output root?")
    con = duckdb.connect(":memory:")
    for name, schema in SCHEMAS.items():
        files = sorted((tables / name).glob("*.parquet"))
        if files:
            file_list = ", ".join("'" + str(f).replace("'", "''") + "'" for f in files)
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet([{file_list}], union_by_name = true)")
        else:
            con.register(f"_{name}_empty", schema.empty_table())
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM _{name}_empty")
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
