"""Reading job spec files (the I/O side of `schemas.job`)."""

from __future__ import annotations

from pathlib import Path

from schemas.errors import JobSpecError
from schemas.job import JobSpec, parse_job_spec


def load_job_spec(path: str | Path) -> JobSpec:
    """Read and validate a job spec YAML file (yaml.safe_load).

    Raises:
        JobSpecError: the file is missing or unreadable, or a field is wrong (named).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise JobSpecError(f"{path}: job spec not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobSpecError(f"{path}: cannot read job spec: {exc}") from None
    return parse_job_spec(text, source=str(path))
