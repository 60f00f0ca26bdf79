"""Job spec: what to segment, with which model, how to tile it, where to write.

A job spec is YAML validated here. Defaults work for the bundled demo model; every field says
its unit. Errors name the file and the dotted field path. Relative paths in a spec file are
resolved against the spec file's folder (by `pipelines.spec.load_job_spec`).
"""

from __future__ import annotations

from typing import Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.errors import JobSpecError
from schemas.model_card import format_validation_errors
from schemas.uris import check_uri, is_uri

JOB_SPEC_VERSION = 1
BUILTIN_PREFIX = "builtin:"

# Test-time augmentations: exact dihedral transforms of the square (of the axial plane of a
# volume), the depth flip of volumes (3D only), and named sets of them.
D4_TRANSFORMS = ("identity", "hflip", "vflip", "rot90", "rot180", "rot270", "transpose", "antitranspose")
TTA_TRANSFORMS = (*D4_TRANSFORMS, "dflip")
TTA_PRESETS: dict[str, tuple[str, ...]] = {
    "none": ("identity",),
    "flips": ("identity", "hflip", "vflip"),
    "rot90": ("identity", "rot90", "rot180", "rot270"),
    "d4": D4_TRANSFORMS,
}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EnsembleMember(_Frozen):
    """A further checkpoint averaged with the main one."""

    card: str = Field(description="Model card JSON path or 'builtin:<name>'.")
    weight: float = Field(default=1.0, gt=0.0, description="Relative weight in the probability average.")


class ModelSpec(_Frozen):
    """Which checkpoint(s) to run."""

    card: str = Field(
        default="builtin:unet-demo",
        description="Model card JSON path (weights named inside it, beside the card), "
        "or 'builtin:<name>' for a model shipped with tessera.",
        examples=["builtin:unet-demo", "models/landcover.json"],
    )
    architecture: str | None = Field(
        default=None,
        description="Optional cross-check: must equal the card's architecture if given.",
        examples=["unet"],
    )
    weight: float = Field(default=1.0, gt=0.0, description="Weight of `card` when `ensemble` is set.")
    ensemble: tuple[EnsembleMember, ...] = Field(
        default=(),
        description="Further checkpoints whose probabilities are averaged with `card`'s "
        "(same classes and band count; each uses its own normalisation and stride).",
    )


class TilingSpec(_Frozen):
    """How a scene is cut into output chunks and model tiles."""

    chunk_size: int = Field(
        default=1024, ge=16, le=16384,
        description="Output chunk side in px; also the Zarr chunk side. The unit of work.",
    )
    volume_chunk_size: int = Field(
        default=128, ge=8, le=1024,
        description="Output chunk side in voxels for 3D volumes (CT, MR); also their Zarr chunk side. "
        "A volume's unit of work is a cube: 128^3 voxels hold as much as a 1448^2 image.",
    )
    halo: int | None = Field(
        default=None, ge=0, le=4096,
        description="Context read around each chunk, px per side. Default: the model card's halo.",
    )
    tile_size: int | None = Field(
        default=None, ge=8, le=16384,
        description="Model tile side in px; windows larger than this are cut into overlapping "
        "tiles and blended. Default: the model card's tile_size.",
    )
    tile_overlap: float = Field(
        default=0.25, ge=0.0, lt=1.0,
        description="Overlap between neighbouring model tiles, as a fraction of the tile side.",
    )
    blend: Literal["gaussian", "constant"] = Field(
        default="gaussian", description="Weighting of overlapping tiles before averaging."
    )


def default_batch_size(device_type: str) -> int:
    """Tiles per forward pass when the job spec does not say: 1 on CPU, 8 on GPU."""
    return 8 if device_type == "cuda" else 1


class ResourcesSpec(_Frozen):
    """Ray resources of the predictor actors."""

    actors: int | None = Field(
        default=None, ge=1, le=1024,
        description="Number of predictor actors. Default: on a cluster with GPUs, one per GPU "
        "(num_gpus_per_actor each); on CPU, one per CPU of the cluster (cpus_per_actor each; "
        "measured fastest: one single-threaded actor per core), at most one per 1.5 GB of the "
        "cluster's memory.",
    )
    num_gpus_per_actor: float | None = Field(
        default=None, ge=0.0, le=8.0,
        description="GPUs per actor; 0 runs on CPU. Default: 1 when the Ray cluster has GPUs, else 0.",
    )
    cpus_per_actor: float = Field(default=1.0, gt=0.0, le=256.0, description="CPUs reserved per actor.")
    batch_size: int | None = Field(
        default=None, ge=1, le=1024,
        description="Model tiles per forward pass. Default: 1 on CPU (measured fastest: batch 2 "
        "was 2x slower on 512-px tiles without huge-page malloc, and no faster on 1088-px tiles "
        "with it), 8 on GPU.",
    )
    torch_threads: int | None = Field(
        default=None, ge=1, le=256,
        description="torch intra-op threads per actor on CPU. Default: the actor's CPU share, "
        "at least 1 (avoids oversubscribing cores shared with Ray tasks).",
    )
    stages: Literal["auto", "fused", "split"] = Field(
        default="auto",
        description="'split': windows are read and chunks written by Ray tasks, the actors only "
        "predict (reads and writes overlap an accelerator's work). 'fused': each actor reads, "
        "predicts and writes its chunks itself (no task pre-empts its torch threads; one actor per "
        "core with 1 thread each is fastest on CPU). 'auto': fused on CPU, split on GPU.",
    )
    read_tasks: int | None = Field(
        default=None, ge=1, le=4096,
        description="Concurrent window-read tasks of the split stages, and as many write tasks. "
        "Default: 1 per CPU actor; with GPU actors half of the CPUs they leave free, at least 2 "
        "per actor (a read costs far more time than a GPU forward pass).",
    )
    chunk_timeout_s: float | None = Field(
        default=900.0,
        gt=0.0,
        description="Seconds one chunk may take. Fused stages (the CPU default): in a predictor actor "
        "(read, predict, write; a call of n chunks gets n times this, counted from when the actor "
        "is ready and its previous call returned). Split stages (the GPU default): in each stage, "
        "a predictor actor call of n chunks n times this (counted likewise), a read or write task "
        "of n chunks n + 1 times this from its submission (one for its worker to start). Past it "
        "the chunk is hung (a read that stalls, a model that hangs): the actor is replaced (a "
        "split task cancelled), the chunks tried again one at a time, a chunk that hangs a second "
        "time alone failed with the reason while the job goes on. null: no limit.",
    )
    prefetch: bool | None = Field(
        default=None,
        description="A fused actor reads the next chunk's window in a background thread while it "
        "predicts the current one, so reads over a network (HTTP, S3) overlap compute. null: on "
        "for scenes given by URI, off for local files (whose reads are CPU work on the actor's "
        "own core). Outputs do not depend on it.",
    )
    malloc_tuning: bool = Field(
        default=True,
        validation_alias=AliasChoices("malloc_tuning", "malloc_hugepages"),
        description="Start predictor processes with glibc malloc tunables (workers.runtime): "
        "freed activations stay mapped (mmap_max=0, no heap trim) on transparent huge pages "
        "(hugetlb=1), instead of being page-faulted in and zeroed by the kernel on every forward "
        "pass. Measured on CPU, 1088-px tiles: 1.35x faster than huge pages alone, 1.8x faster "
        "than glibc's defaults. Ignored where glibc or THP lack them. (Formerly malloc_hugepages, "
        "still accepted.)",
    )


class InstanceSpec(_Frozen):
    """How an instance model's detections become objects (ignored for semantic models)."""

    score_threshold: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="Detections scoring below this are dropped (scores in [0, 1]).",
    )
    mask_threshold: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="A pixel belongs to a detection where its soft mask exceeds this.",
    )
    iou_threshold: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="Of two detections in a window whose masks overlap with an IoU above this (one object "
        "seen by two overlapping tiles), only the higher-scoring one is kept.",
    )
    min_pixels: int = Field(
        default=1, ge=1,
        description="Objects left with fewer pixels (px, voxels) in the window, after higher-scoring objects "
        "took the pixels they share, are dropped.",
    )


class InferenceSpec(_Frozen):
    """Numerics of the forward pass."""

    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="Autocast precision. GPU: 'auto' is bf16 where supported, else fp16. CPU: "
        "'auto' is fp32 (identical bytes on every CPU); 'bf16' autocasts to bfloat16, 1.8x "
        "faster on CPUs with AMX/AVX512-BF16 (measured: bundled U-Net, 99.98 % of labels "
        "unchanged) and slow elsewhere; 'fp16' is GPU-only.",
    )
    tta: tuple[str, ...] = Field(
        default=(),
        description="Test-time augmentations averaged in probability space: hflip, vflip, rot90, "
        "rot180, rot270, transpose, antitranspose, dflip (depth flip, 3D models only), or presets "
        "flips (each axis's flip: 2 in 2D, 3 in 3D), rot90, d4; the un-augmented view is always "
        "included. () = none.",
        examples=[["flips"], ["d4"], ["hflip", "rot90"]],
    )
    scales: tuple[float, ...] = Field(
        default=(1.0,), min_length=1,
        description="Multi-scale inference: input scale factors (e.g. [0.5, 1, 1.5]); "
        "probabilities are resampled back and averaged.",
    )
    channels_last: bool = Field(
        default=True,
        description="Run the model on channels-last (NHWC) tensors, on CPU as on GPU "
        "(measured 1.5x faster on CPU for the bundled U-Net; outputs differ from NCHW by float "
        "rounding only). Turn off for a model whose layers are slow in NHWC.",
    )
    fold_batchnorm: bool = Field(
        default=True,
        description="Fold each BatchNorm that directly follows a convolution into it before "
        "inference (measured 14 % faster on CPU for the bundled U-Net; outputs differ by float "
        "rounding only).",
    )
    instances: InstanceSpec = Field(
        default_factory=InstanceSpec,
        description="Thresholds of instance models (Mask R-CNN, registered instance models).",
    )

    @field_validator("tta")
    @classmethod
    def _known_tta(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [v for v in value if v not in TTA_TRANSFORMS and v not in TTA_PRESETS]
        if unknown:
            raise ValueError(f"unknown augmentations {unknown}; known: {list(TTA_TRANSFORMS)} "
                             f"or presets {list(TTA_PRESETS)}")
        return value

    @field_validator("scales")
    @classmethod
    def _positive_scales(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not (0.05 <= v <= 8.0) for v in value):
            raise ValueError(f"scales must be within [0.05, 8], got {list(value)}")
        return value


class OutputSpec(_Frozen):
    """Where results go."""

    root: str = Field(description="Output root folder: <root>/<scene>.zarr and <root>/tables/.",
                      examples=["out/landcover-2026"])
    write_probabilities: bool = Field(
        default=False,
        description="Also write a float16 `probabilities` array (class, y, x); K times the size of `classes`.",
    )
    export: tuple[Literal["nifti"], ...] = Field(
        default=(),
        description="Extra copies of the label arrays, written when a scene completes: `nifti` writes "
        "<root>/<scene>.nii.gz for every 3D volume, with the input's voxel-to-scanner affine exactly "
        "(sform and qform), so viewers overlay it on the input voxel for voxel. 2D scenes have no export.",
        examples=[["nifti"]],
    )
    overwrite: bool = Field(
        default=False,
        description="Replace outputs written under a different job fingerprint "
        "(otherwise such a scene fails with a clear error and nothing is touched).",
    )
    shared_filesystem: bool = Field(
        default=False,
        description="Declare `root` a filesystem every node of the Ray cluster mounts at the same path "
        "(NFS, EFS, Lustre, ...). On a cluster of more than one node a job refuses to start without "
        "it: each node would write its chunks to its own local disk, and the driver would find them missing.",
    )


class StacSpec(_Frozen):
    """Scenes from a STAC ItemCollection: one scene per item, its assets stacked as channels."""

    items: str = Field(
        description="STAC ItemCollection (GeoJSON FeatureCollection of items): a local path (relative to "
        "the spec's folder) or an http(s):// URL (no credentials in it).",
        examples=["items.json", "https://example.org/search/items.json"],
    )
    assets: tuple[str, ...] = Field(
        min_length=1,
        description="Asset keys stacked as the model's channels, in order; each asset gives all its bands. "
        "Assets coarser than the finest one are resampled (bilinear) to its grid.",
        examples=[["B04", "B03", "B02", "B08"]],
    )

    @field_validator("items")
    @classmethod
    def _clean_items_uri(cls, value: str) -> str:
        if is_uri(value):
            check_uri(value)
        return value


class JobSpec(_Frozen):
    """A whole tessera job."""

    # a refused input URI may hold a secret: errors name the field and the redacted URI only
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    version: int = Field(default=JOB_SPEC_VERSION, description="Job spec schema version.")
    name: str = Field(default="tessera-job", min_length=1, max_length=128, description="Job name for logs.")
    inputs: tuple[str, ...] = Field(
        default=(), description="Scene paths or glob patterns (GeoTIFF/COG, NIfTI, DICOM series, Zarr); "
        "URIs: https:// / http:// / s3:// COGs read by byte ranges, s3:// Zarr stores, http(s):// / s3:// "
        "NIfTI files, s3://bucket/prefix/ DICOM series (the objects directly under the prefix; the "
        "trailing '/' is required) (never globbed; no credentials in the URI: they come from the AWS "
        "environment); or '@<file>' naming a manifest: "
        "a text file with one path, glob or URI per line ('#' comments, blank lines ignored; relative "
        "entries are relative to the manifest's folder), for jobs of many scenes. At least one input, or `stac`.",
        examples=[["scenes/*.tif"], ["@scenes.txt"], ["s3://bucket/scenes/T33UUP.tif", "https://example.org/cog.tif"],
                  ["s3://bucket/ct/series1/"]],
    )
    bands: tuple[int, ...] | None = Field(
        default=None, min_length=1,
        description="1-based band indexes to feed the model, in model order. Default: all bands.",
        examples=[[1, 2, 3, 4]],
    )
    complex_bands: Literal["refuse", "magnitude", "db"] = Field(
        default="refuse",
        description="What to do with complex-valued bands (SAR SLC): refuse the scene (default: a model "
        "takes real values and a cast would drop the imaginary part), or feed a derived real band: "
        "magnitude |z|, or db = 10 log10 |z|^2 (floored at -100 dB).",
        examples=["db"],
    )
    stac: StacSpec | None = Field(
        default=None,
        description="Scenes from a STAC ItemCollection (one per item, named by item id), besides `inputs`.",
        examples=[{"items": "items.json", "assets": ["B04", "B03", "B02", "B08"]}],
    )
    model: ModelSpec = Field(default_factory=ModelSpec)
    tiling: TilingSpec = Field(default_factory=TilingSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    inference: InferenceSpec = Field(default_factory=InferenceSpec)
    output: OutputSpec

    @field_validator("version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value != JOB_SPEC_VERSION:
            raise ValueError(f"unsupported job spec version {value}; this tessera reads version {JOB_SPEC_VERSION}")
        return value

    @field_validator("inputs")
    @classmethod
    def _clean_uris(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        """URIs must be of a scheme tessera reads and carry no credentials (`schemas.uris.check_uri`:
        the spec is saved with the outputs); the error shows the URI redacted."""
        for i, item in enumerate(value):
            if is_uri(item):
                try:
                    check_uri(item)
                except ValueError as exc:
                    raise ValueError(f"inputs[{i}]: {exc}") from None
        return value

    @model_validator(mode="after")
    def _some_input(self) -> JobSpec:
        if not self.inputs and self.stac is None:
            raise ValueError("a job needs inputs (scene paths, globs or URIs) or stac (an ItemCollection)")
        return self

    @field_validator("bands")
    @classmethod
    def _positive_bands(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and any(b < 1 for b in value):
            raise ValueError(f"band indexes are 1-based (rasterio convention), got {list(value)}")
        return value


def parse_job_spec(text: str, *, source: str) -> JobSpec:
    """Validate the YAML text of a job spec.

    Args:
        text: YAML text (parsed with yaml.safe_load: no tags, no code).
        source: where it came from (a path), quoted in errors.

    Raises:
        JobSpecError: not YAML, not a mapping, or a field is wrong (dotted path in the message).
    """
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise JobSpecError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise JobSpecError(f"{source}: a job spec must be a YAML mapping, got {type(raw).__name__}")
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise JobSpecError(f"{source}: invalid job spec:\n{format_validation_errors(exc)}") from None
