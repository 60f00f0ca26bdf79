"""Small argument checks shared by the pure modules (no I/O, numpy only)."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np


def as_int(value: object, what: str) -> int:
    """`value` as a Python int, refusing bools, floats and strings (ValueError names `what`)."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def as_int_tuple(values: object, what: str, *, sequence_types: tuple[type, ...] = ()) -> tuple[int, ...]:
    """A sequence of integers as a tuple of Python ints (ValueError names `what`)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray, *sequence_types)):
        raise ValueError(f"{what} must be a sequence of integers, got {values!r}")
    return tuple(as_int(v, f"{what} entry") for v in values)
