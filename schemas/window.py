"""The chunk window: one output chunk (its core) and the halo window of context around it.

A frozen value that checks itself (as rasterio's ``Window``), handed from the planner
(:func:`pipelines.plan.chunks.plan_chunks`) to readers, predictors and writers. Pure: numpy only.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

from schemas.checks import as_int_tuple


def _check_slice(s: object, what: str) -> slice:
    if not isinstance(s, slice):
        raise ValueError(f"{what} must be a slice, got {s!r}")
    if s.step not in (None, 1):
        raise ValueError(f"{what} must have step None, got {s!r}")
    if isinstance(s.start, bool) or isinstance(s.stop, bool):
        raise ValueError(f"{what} must have integer bounds, got {s!r}")
    try:
        start, stop = operator.index(s.start), operator.index(s.stop)
    except TypeError:
        raise ValueError(f"{what} must have integer start and stop, got {s!r}") from None
    if start < 0 or stop <= start:
        raise ValueError(f"{what} must satisfy 0 <= start < stop, got {s!r}")
    return slice(start, stop)


@dataclass(frozen=True)
class ChunkWindow:
    """One output chunk (the *core*) and the window of context around it.

    All coordinates are voxel indices in the scene, axis order as the scene (``(row, col)`` in
    2D, ``(z, row, col)`` in 3D). The halo ``h`` is the same on both sides of an axis:
    ``read.start - pad_before == core.start - h`` and ``read.stop + pad_after == core.stop + h``.

    Attributes:
        index: Chunk grid index, one entry per axis.
        core: Output chunk in scene coordinates, ``0 <= start < stop``, step None.
        read: ``core`` grown by the halo and clipped to the scene; contains ``core``.
        pad: ``(before, after)`` voxels of padding per axis that complete ``read`` to the full
            window; ``before > 0`` only where ``read.start == 0``.
    """

    index: tuple[int, ...]
    core: tuple[slice, ...]
    read: tuple[slice, ...]
    pad: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        index = as_int_tuple(self.index, "ChunkWindow.index")
        if not isinstance(self.core, Sequence) or not isinstance(self.read, Sequence):
            raise ValueError(f"ChunkWindow core and read must be tuples of slices, got {self.core!r}, {self.read!r}")
        if not isinstance(self.pad, Sequence):
            raise ValueError(f"ChunkWindow.pad must be a tuple of (before, after) pairs, got {self.pad!r}")
        ndim = len(index)
        if ndim == 0:
            raise ValueError("ChunkWindow needs at least one axis, got index ()")
        if not (len(self.core) == len(self.read) == len(self.pad) == ndim):
            raise ValueError(
                f"ChunkWindow axes disagree: index {index} ({ndim}), core {self.core!r} ({len(self.core)}), "
                f"read {self.read!r} ({len(self.read)}), pad {self.pad!r} ({len(self.pad)})"
            )
        core = tuple(_check_slice(s, f"ChunkWindow.core[{a}]") for a, s in enumerate(self.core))
        read = tuple(_check_slice(s, f"ChunkWindow.read[{a}]") for a, s in enumerate(self.read))
        pad = []
        for a, p in enumerate(self.pad):
            pair = as_int_tuple(p, f"ChunkWindow.pad[{a}]")
            if len(pair) != 2 or min(pair) < 0:
                raise ValueError(f"ChunkWindow.pad[{a}] must be a (before, after) pair >= 0, got {p!r}")
            pad.append(pair)
        for a in range(ndim):
            if index[a] < 0:
                raise ValueError(f"ChunkWindow.index must be >= 0, got {index}")
            c, r, (before, after) = core[a], read[a], pad[a]
            if r.start > c.start or r.stop < c.stop:
                raise ValueError(f"ChunkWindow.read[{a}] {r!r} does not contain core[{a}] {c!r}")
            halo_before, halo_after = c.start - r.start + before, r.stop + after - c.stop
            if halo_before != halo_after:
                raise ValueError(
                    f"ChunkWindow axis {a}: halo before ({c.start} - {r.start} + {before}) != halo after "
                    f"({r.stop} + {after} - {c.stop}); core {c!r}, read {r!r}, pad {(before, after)}"
                )
            if before > 0 and r.start != 0:
                raise ValueError(
                    f"ChunkWindow axis {a}: padding before ({before}) but read {r!r} does not start at the scene edge"
                )
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "core", core)
        object.__setattr__(self, "read", read)
        object.__setattr__(self, "pad", tuple(pad))

    def __hash__(self) -> int:
        # slices are unhashable before Python 3.12; hash their bounds instead.
        return hash((self.index, self._bounds(self.core), self._bounds(self.read), self.pad))

    @staticmethod
    def _bounds(slices: tuple[slice, ...]) -> tuple[tuple[int, int], ...]:
        return tuple((s.start, s.stop) for s in slices)

    @property
    def ndim(self) -> int:
        """Number of spatial axes."""
        return len(self.index)

    @property
    def halo(self) -> tuple[int, ...]:
        """Halo per axis in voxels (the same on both sides)."""
        return tuple(c.start - r.start + p[0] for c, r, p in zip(self.core, self.read, self.pad, strict=True))

    @property
    def core_origin(self) -> tuple[int, ...]:
        """First voxel of the core in scene coordinates."""
        return tuple(s.start for s in self.core)

    @property
    def core_shape(self) -> tuple[int, ...]:
        """Size of the core per axis."""
        return tuple(s.stop - s.start for s in self.core)

    @property
    def read_origin(self) -> tuple[int, ...]:
        """First voxel of the read region in scene coordinates."""
        return tuple(s.start for s in self.read)

    @property
    def read_shape(self) -> tuple[int, ...]:
        """Size of the read region per axis (the array a reader returns)."""
        return tuple(s.stop - s.start for s in self.read)

    @property
    def window_origin(self) -> tuple[int, ...]:
        """First voxel of the padded window in scene coordinates, ``core.start - halo`` (may be < 0)."""
        return tuple(c.start - h for c, h in zip(self.core, self.halo, strict=True))

    @property
    def window_shape(self) -> tuple[int, ...]:
        """Size of the padded window per axis: ``core_shape + 2 * halo == read_shape + before + after``."""
        return tuple(n + b + a for n, (b, a) in zip(self.read_shape, self.pad, strict=True))

    @property
    def core_in_window(self) -> tuple[slice, ...]:
        """Slices locating the core inside the padded window: ``[halo, halo + core_shape)``."""
        return tuple(slice(h, h + n) for h, n in zip(self.halo, self.core_shape, strict=True))

    @property
    def core_in_read(self) -> tuple[slice, ...]:
        """Slices locating the core inside the (unpadded) read region."""
        return tuple(slice(c.start - r.start, c.stop - r.start) for c, r in zip(self.core, self.read, strict=True))

    @property
    def read_in_window(self) -> tuple[slice, ...]:
        """Slices locating the read region inside the padded window: ``[before, before + read_shape)``."""
        return tuple(slice(b, b + n) for (b, _), n in zip(self.pad, self.read_shape, strict=True))
