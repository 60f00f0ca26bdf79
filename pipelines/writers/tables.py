"""Parquet tables under `<root>/tables/<table>/<scene>.parquet`, written atomically."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.writers.atomic import atomic_path
from schemas.tables import SCHEMAS


def table_path(root: Path, table: str, scene: str) -> Path:
    """Where a scene's rows of a table live."""
    if table not in SCHEMAS:
        raise ValueError(f"unknown table {table!r}; tables: {', '.join(SCHEMAS)}")
    return root / "tables" / table / f"{scene}.parquet"


def write_table(root: Path, table: str, scene: str, rows: pa.Table | list[dict]) -> Path:
    """Replace a scene's rows of a table (temp file + rename: readers never see half a file).

    Rows are checked against the schema constant: a missing column or a wrong type raises.
    """
    schema = SCHEMAS[table]
    data = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=schema)
    return write_table_batches(root, table, scene, [data])


def write_table_batches(root: Path, table: str, scene: str, parts: Iterable[pa.Table], *,
                        metadata: dict[bytes, bytes] | None = None) -> Path:
    """`write_table` from a stream of tables (row groups), holding one at a time: a scene's
    rows of a table too large to hold at once. Atomic like `write_table`; an exception from
    `parts` leaves the previous file (if any) in place. `metadata`: keys added to the schema's
    metadata of this file (e.g. GeoParquet's `geo`, which holds the scene's CRS)."""
    schema = SCHEMAS[table]
    if metadata:
        schema = schema.with_metadata({**(schema.metadata or {}), **metadata})
    path = table_path(root, table, scene)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for part in parts:
            writer.write_table(part.select(schema.names).cast(schema))
    return path
