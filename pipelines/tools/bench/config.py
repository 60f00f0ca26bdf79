"""What `tessera bench` measures: :class:`BenchConfig` and the parsing of its CLI sizes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """What to benchmark (all keyword, all with working defaults).

    Attributes:
        sizes: scene sides in px; each scene is square, sizes x sizes.
        model: model card reference ('builtin:<name>' or a card path).
        chunk_size: output chunk side in px.
        halo: px of context per side (None: the card's).
        tile_size: model tile side in px (None: the card's).
        tile_overlap: tile overlap as a fraction of the tile side, in [0, 1).
        batch_size: model tiles per forward pass (None: the job's default for the device).
        actors: predictor actors (None: one per CPU core on CPU, one per GPU: the job's default).
        torch_threads: torch threads per actor on CPU (None: all cores / actors, at least 1).
        device: "auto" (cuda when available), "cpu" or "cuda".
        precision: autocast precision: "auto", "fp32", "bf16", "fp16" (as the job's
            inference.precision: on CPU auto is fp32, bf16 autocasts, fp16 is refused).
        monai: run the MONAI whole-scene peer.
        monai_max_side: skip the peer above this scene side (it holds the scene in memory).
        monai_equal_redundancy: also run the peer at the overlap whose model px per output px
            equal tessera's plan without nodata skipping (:func:`monai_overlap_for_redundancy`).
        seed: synthetic scene seed.
        out_dir: folder for scenes (inputs/), job outputs (runs/) and result JSON files.
        raw_batches: distinct input batches put on the device for the raw measurement.
        raw_warmup: untimed passes over those batches.
        raw_iterations: timed passes (the median pass is reported).
        malloc_tuning: the job's resources.malloc_tuning; the bare-model and peer children
            get the same allocator setting.
        channels_last: the job's inference.channels_last; the bare model and the peer run the
            model in the same memory format.
        fold_batchnorm: the job's inference.fold_batchnorm; the bare model and the peer run the
            same (folded or not) model.
        warmup_job: first run an untimed job on a one-chunk scene, so that one-time costs of a
            fresh Ray (worker processes importing torch, rasterio, zarr) are not charged to the
            first size; its wall time is reported as "warmup_job_s".
    """

    sizes: tuple[int, ...] = (4096,)
    model: str = "builtin:unet-demo"
    chunk_size: int = 1024
    halo: int | None = None
    tile_size: int | None = None
    tile_overlap: float = 0.25
    batch_size: int | None = None
    actors: int | None = None
    torch_threads: int | None = None
    device: str = "auto"
    precision: str = "auto"
    monai: bool = True
    monai_max_side: int = 16384
    monai_equal_redundancy: bool = True
    seed: int = 7
    out_dir: Path = Path("tessera-bench")
    raw_batches: int = 2
    raw_warmup: int = 1
    raw_iterations: int = 5
    warmup_job: bool = True
    malloc_tuning: bool = True
    channels_last: bool = True
    fold_batchnorm: bool = True

    def __post_init__(self) -> None:
        sizes = tuple(self.sizes)
        if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"BenchConfig.sizes must be scene sides in px (ints >= 1), got {self.sizes!r}")
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"BenchConfig.batch_size must be >= 1, got {self.batch_size!r}")
        for name in ("chunk_size", "actors", "monai_max_side", "raw_batches", "raw_iterations"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"BenchConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("halo", "raw_warmup", "seed"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"BenchConfig.{name} must be >= 0, got {value!r}")
        if self.tile_size is not None and self.tile_size < 1:
            raise ValueError(f"BenchConfig.tile_size must be >= 1 px, got {self.tile_size!r}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"BenchConfig.torch_threads must be >= 1, got {self.torch_threads!r}")
        if not 0 <= self.tile_overlap < 1:
            raise ValueError(f"BenchConfig.tile_overlap must be in [0, 1), got {self.tile_overlap!r}")
        if self.device not in DEVICES:
            raise ValueError(f"BenchConfig.device must be one of {DEVICES}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"BenchConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(self).items()}


def parse_sizes(values: Iterable[str]) -> tuple[int, ...]:
    """Scene sides from CLI strings: repeated and/or comma separated, 'k' = 1024.

    >>> parse_sizes(["4096,8k", "16k"])
    (4096, 8192, 16384)

    Raises:
        ValueError: naming the string that is not a positive size.
    """
    sizes = []
    for value in values:
        for part in str(value).split(","):
            text = part.strip().lower()
            if not text:
                continue
            scale = 1024 if text.endswith("k") else 1
            digits = text[:-1] if scale > 1 else text
            if not digits.isdigit() or int(digits) * scale < 1:
                raise ValueError(f"--size {part.strip()!r} is not a scene side in px (e.g. 4096 or 4k)")
            sizes.append(int(digits) * scale)
    if not sizes:
        raise ValueError("no scene size given (e.g. --size 4096)")
    return tuple(sizes)


