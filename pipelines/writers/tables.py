"""Parquet tables under `<root>/tables/<table>/<scene>.parquet`, written atomically.

The root is a local folder (temp file + rename) or an ``s3://`` prefix (the file is written to
a local temporary file, then PUT as one object: readers see the old table or the new one).
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.writers.outroot import Location, upload_from
from schemas.tables import SCHEMAS


def table_path(root: Location, table: str, scene: str) -> Location:
    """Where a scene's rows of a table live."""
    if table not in SCHEMAS:
        raise ValueError(f"unknown table {table!r}; tables: {', '.join(SCHEMAS)}")
    return root / "tables" / table / f"{scene}.parquet"


def write_table(root: Location, table: str, scene: str, rows: pa.Table | list[dict]) -> Location:
    """Replace a scene's rows of a table (temp file + rename: readers never see half a file).

    Rows are checked against the schema constant: a missing column or a wrong type raises.
    """
    schema = SCHEMAS[table]
    data = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=schema)
    return write_table_batches(root, table, scene, [data])


def write_table_batches(root: Location, table: str, scene: str, parts: Iterable[pa.Table], *,
                        metadata: dict[bytes, bytes] | None = None) -> Location:
    """`write_table` from a stream of tables (row groups), holding one at a time: a scene's
    rows of a table too large to hold at once. Atomic like `write_table`; an exception from
    `parts` leaves the previous file (if any) in place. `metadata`: keys added to the schema's
    metadata of this file (e.g. GeoParquet's `geo`, which holds the scene's CRS)."""
    schema = SCHEMAS[table]
    if metadata:
        schema = schema.with_metadata({**(schema.metadata or {}), **metadata})
    path = table_path(root, table, scene)
    with upload_from(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for part in parts:
            writer.write_table(part.select(schema.names).cast(schema))
    return path
