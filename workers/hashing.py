"""File checksums (no torch import: used by light Ray task workers too)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path, *, block: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes, streamed in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while data := fh.read(block):
            digest.update(data)
    return digest.hexdigest()
