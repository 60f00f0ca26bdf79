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




@dataclass(frozen=True, kw_only=True)
class VolumeBenchConfig:
    """What `tessera bench --volume` measures (all keyword, all with working defaults).

    Every (volume, class count) pair is one row: the tessera job and MONAI's
    ``sliding_window_inference`` on the same synthetic CT-like volume with the same model (the
    registry's ``unet3d``, random weights seeded by `seed`, `num_classes` from `classes`), ROI
    (`tile_size`), overlap and Gaussian blending.

    Attributes:
        volumes: (z, y, x) voxel shapes of the synthetic volumes (see :func:`parse_volume_sizes`).
        classes: class counts of the model (one model per count).
        base_channels: the U-Net's first-level width (small: the figures are about the pipeline).
        depth: the U-Net's levels (stride 2**depth).
        chunk_size: tessera's output chunk side in voxels (the job's tiling.volume_chunk_size).
        halo: voxels of context per side.
        tile_size: the model tile (MONAI's roi) side in voxels.
        tile_overlap: tile overlap as a fraction of the tile side, in [0, 1), on both sides.
        batch_size: tiles per forward pass, tessera's batch and MONAI's sw_batch_size (None:
            the job's default for the device).
        actors, torch_threads, device, precision, malloc_tuning, channels_last, fold_batchnorm:
            as :class:`BenchConfig`.
        monai: run the MONAI peer.
        monai_equal_redundancy: also run the peer at the overlap whose model voxels per output
            voxel equal tessera's plan.
        memory_budget_gib: the most memory either side may hold (None: 80 % of the memory
            available when the bench starts). MONAI's child runs under an address-space limit of
            this much above its start-up (on CPU) and both sides' process trees are watched: a
            side over budget is stopped and its row says OOM.
        seed: synthetic volume and model weight seed.
        out_dir: folder for volumes (inputs/), models (models/), job outputs (runs/) and JSON files.
    """

    volumes: tuple[tuple[int, int, int], ...] = ((256, 256, 256),)
    classes: tuple[int, ...] = (8,)
    base_channels: int = 8
    depth: int = 2
    chunk_size: int = 128
    halo: int = 8
    tile_size: int = 64
    tile_overlap: float = 0.25
    batch_size: int | None = None
    actors: int | None = None
    torch_threads: int | None = None
    device: str = "auto"
    precision: str = "auto"
    monai: bool = True
    monai_equal_redundancy: bool = True
    memory_budget_gib: float | None = None
    seed: int = 7
    out_dir: Path = Path("tessera-bench")
    malloc_tuning: bool = True
    channels_last: bool = True
    fold_batchnorm: bool = True

    def __post_init__(self) -> None:
        volumes = tuple(tuple(v) for v in self.volumes)
        if not volumes or any(len(v) != 3 or any(isinstance(n, bool) or not isinstance(n, int) or n < 8 for n in v)
                              for v in volumes):
            raise ValueError(f"VolumeBenchConfig.volumes must be (z, y, x) shapes of ints >= 8, got {self.volumes!r}")
        object.__setattr__(self, "volumes", volumes)
        classes = tuple(self.classes)
        if not classes or any(isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= 255 for k in classes):
            raise ValueError(f"VolumeBenchConfig.classes must be class counts in [2, 255], got {self.classes!r}")
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        for name in ("base_channels", "depth", "chunk_size", "tile_size", "batch_size", "actors", "torch_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"VolumeBenchConfig.{name} must be >= 1, got {value!r}")
        if self.halo < 0 or self.seed < 0:
            raise ValueError(f"VolumeBenchConfig.halo and seed must be >= 0, got {self.halo!r}, {self.seed!r}")
        if self.tile_size % 2**self.depth:
            raise ValueError(f"VolumeBenchConfig.tile_size {self.tile_size} is not a multiple of the U-Net's "
                             f"stride 2**depth = {2**self.depth}")
        if not 0 <= self.tile_overlap < 1:
            raise ValueError(f"VolumeBenchConfig.tile_overlap must be in [0, 1), got {self.tile_overlap!r}")
        if self.memory_budget_gib is not None and not self.memory_budget_gib > 0:
            raise ValueError(f"VolumeBenchConfig.memory_budget_gib must be > 0, got {self.memory_budget_gib!r}")
        if self.device not in DEVICES:
            raise ValueError(f"VolumeBenchConfig.device must be one of {DEVICES}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"VolumeBenchConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")

    def to_json(self) -> dict[str, Any]:
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        out["volumes"] = [list(v) for v in self.volumes]
        out["classes"] = list(self.classes)
        return out


def parse_volume_sizes(values: Iterable[str]) -> tuple[tuple[int, int, int], ...]:
    """Volume shapes from CLI strings, repeated and/or comma separated.

    A single number ``N`` is a cube N^3; ``XxYxZ`` is given as NIfTI and CT scanners say it,
    in-plane first and slices last (512x512x1024: 1024 slices of 512 x 512), and returned in
    tessera's (z, y, x) array order.

    >>> parse_volume_sizes(["256,512x512x1024"])
    ((256, 256, 256), (1024, 512, 512))

    Raises:
        ValueError: naming the string that is not a volume size.
    """
    shapes = []
    for value in values:
        for part in str(value).split(","):
            text = part.strip().lower()
            if not text:
                continue
            sides = text.split("x")
            if len(sides) not in (1, 3) or not all(s.isdigit() and int(s) >= 8 for s in sides):
                raise ValueError(f"--volume-sizes {part.strip()!r} is not a volume size "
                                 "(N for N^3, or XxYxZ with slices last; sides >= 8)")
            if len(sides) == 1:
                shapes.append((int(sides[0]),) * 3)
            else:
                x, y, z = (int(s) for s in sides)
                shapes.append((z, y, x))
    if not shapes:
        raise ValueError("no volume size given (e.g. --volume-sizes 256,512x512x1024)")
    return tuple(shapes)


def parse_classes(values: Iterable[str]) -> tuple[int, ...]:
    """Class counts from CLI strings, repeated and/or comma separated (``8,117``).

    Raises:
        ValueError: naming the string that is not a class count in [2, 255].
    """
    counts = []
    for value in values:
        for part in str(value).split(","):
            text = part.strip()
            if not text:
                continue
            if not text.isdigit() or not 2 <= int(text) <= 255:
                raise ValueError(f"--classes {text!r} is not a class count in [2, 255]")
            counts.append(int(text))
    if not counts:
        raise ValueError("no class count given (e.g. --classes 8,117)")
    return tuple(counts)
