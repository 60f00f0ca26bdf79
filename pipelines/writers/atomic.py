"""Atomic file replacement: readers see the old file or the new one, never half of one.

The one helper every writer of small files uses (chunk markers, tables, the resolved spec).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed over `path` when the block ends
    without an exception, removed otherwise (the previous file, if any, stays in place).

    Example:
        >>> with atomic_path(Path(folder) / "t.parquet") as tmp:   # doctest: +SKIP
        ...     pq.write_table(table, tmp)
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
