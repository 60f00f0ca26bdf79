"""Process-level settings of predictor processes (torch-free: the driver imports it).

glibc's malloc serves every block above its mmap threshold (at most 32 MiB) with a fresh mmap and
returns it on free, so each forward pass over a large tile page-faults its activations in again,
4 KiB at a time, and the kernel zeroes every page: on the 2-core development VM a third of an
actor's CPU time was system time. Three glibc tunables stop that:

- ``glibc.malloc.mmap_max=0``: no block is served by its own mmap; all come from the heap.
- ``glibc.malloc.trim_threshold`` (1 TiB): the heap is never given back to the kernel, so the
  next pass reuses pages that are already mapped. The heap stays at the largest pass's
  footprint, which the process reached anyway (memory is bounded by the window, not the scene).
- ``glibc.malloc.hugetlb=1`` (glibc >= 2.35): what is mapped uses transparent huge pages.

Measured on the development VM (bundled U-Net, one 1088-px tile, batch 1, fp32, 1 thread):
670 ms a pass with hugetlb alone (252 ms of it system time), 497 ms with all three (8 ms
system), 892 ms with none. GLIBC_TUNABLES is read when a process starts, so it is set in the
environment of the processes Ray starts for the predictor actors (and of the benchmark's
measurement children). Other C libraries ignore it; kernels without THP ignore hugetlb.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

GLIBC_TUNABLES = "GLIBC_TUNABLES"
MALLOC_TUNABLES: tuple[tuple[str, str], ...] = (
    ("glibc.malloc.hugetlb", "1"),
    ("glibc.malloc.mmap_max", "0"),
    ("glibc.malloc.trim_threshold", str(2**40)),
)
"""(tunable, value) pairs that predictor processes start with (see the module docstring)."""


def with_malloc_tunables(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """{"GLIBC_TUNABLES": ...} with MALLOC_TUNABLES added to the tunables already set.

    A tunable already set in `environ` (default os.environ) keeps its value.
    """
    current = (os.environ if environ is None else environ).get(GLIBC_TUNABLES, "")
    parts = [p for p in current.split(":") if p]
    present = {p.split("=", 1)[0] for p in parts}
    parts += [f"{name}={value}" for name, value in MALLOC_TUNABLES if name not in present]
    return {GLIBC_TUNABLES: ":".join(parts)}


@contextlib.contextmanager
def process_env(env: Mapping[str, str]) -> Iterator[None]:
    """`env` set in os.environ inside the block (for the processes started there), then restored."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def actor_env(wanted: Mapping[str, str], inherited: Mapping[str, str] | None) -> dict[str, str]:
    """The environment variables an actor must be given so that `wanted` holds in its process.

    Args:
        wanted: variables the actor's process must start with.
        inherited: what every worker process of the connected Ray inherits, when this process
            started that Ray and knows it; None when unknown (another process's Ray, a cluster).

    Returns:
        {} when the workers inherit `wanted` already (the actor then needs no runtime
        environment of its own: such an actor started 0.3-0.5 s sooner, measured on the 2-core
        development VM), else `wanted`.
    """
    if inherited is not None and all(inherited.get(k, "") == v for k, v in wanted.items()):
        return {}
    return dict(wanted)
