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


def input_sha256(path: str | Path) -> str:
    """SHA-256 of an input: a file's bytes, or for a directory (a DICOM series, a Zarr store) the
    SHA-256 of its sorted ``"<relative path>\\t<file SHA-256>\\n"`` lines over every file below it
    (hidden files included: a changed, added, removed or renamed file changes the checksum)."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{f.relative_to(path).as_posix()}\t{file_sha256(f)}\n".encode())
    return digest.hexdigest()
