"""A job spec resolved: the model card loaded and checked, defaults filled in, the job placed on
the cluster (actors, GPUs), and the checks a scene must pass before any of its chunks is planned.
Fails before any actor starts."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipelines.readers import InputPolicy, SceneInfo
from pipelines.writers.outroot import Location, S3Location, as_location, is_s3
from schemas.errors import InputError, ModelCardError
from schemas.job import JobSpec, default_batch_size
from schemas.model_card import ModelCard, slice_array_axis
from workers.checkpoints import Checkpoint, load_checkpoint, resolve_card_path
from workers.options import InstanceOptions, PredictorOptions
from workers.registry import check_plugin_allowed, model_kind, model_spatial_dims, takes_spatial_dims
from workers.spacing import model_spacing

log = logging.getLogger("tessera")


# Bump when the meaning of output bytes changes for the same inputs and parameters.
OUTPUT_FORMAT_VERSION = 1
#: The layout of a volume store (schemas.store, 3D): "ome-labels" = the input image at the root, the
#: classes under labels/classes. In volumes' fingerprints only, so a store of the earlier layout
#: (classes at the root) is another job's output, not one to resume; 2D fingerprints stay as they were.
VOLUME_STORE_LAYOUT = "ome-labels"
WORK_DIR = "_work"  # <root>/_work/: per-scene resume state, the readers' input cache
INPUT_CACHE_DIR = "inputs"


@dataclass(frozen=True)
class ResolvedJob:
    """A job spec with its model loaded and every default filled in."""

    spec: JobSpec
    root: Location  # a local folder (Path) or an s3://bucket/prefix (S3Location)
    checkpoint: Checkpoint
    ensemble: tuple[tuple[Checkpoint, float], ...]
    chunk_size: int
    halo: int
    predictor_options: PredictorOptions
    num_gpus_per_actor: float = 0.0
    actors: int = 1  # resources.actors, or the cluster's default (place_on_cluster)

    @property
    def card(self) -> ModelCard:
        return self.checkpoint.card

    def _band_windows(self) -> dict[str, list]:
        """``{"band_windows": [...]}``, the clip window of every band of the card and of each
        ensemble member in order, when any band has one; ``{}`` otherwise."""
        cards = (self.card, *(c.card for c, _ in self.ensemble))
        windows = [list(b.window) if b.window is not None else None for card in cards for b in card.bands]
        return {"band_windows": windows} if any(w is not None for w in windows) else {}

    def chunk_size_for(self, ndim: int) -> int:
        """The output chunk side of a scene with `ndim` spatial axes: `tiling.chunk_size` for 2D
        scenes, `tiling.volume_chunk_size` for 3D volumes."""
        return self.spec.tiling.volume_chunk_size if ndim == 3 else self.chunk_size

    def parameters(self, ndim: int = 2) -> dict[str, Any]:
        """Everything that changes output bytes of a scene with `ndim` spatial axes, except the
        input itself."""
        o = self.predictor_options
        return {
            "format": OUTPUT_FORMAT_VERSION,
            "model_sha256": self.card.weights_sha256,
            "model_name": self.card.name,
            "model_weight": self.spec.model.weight,
            "ensemble": [[c.card.weights_sha256, w] for c, w in self.ensemble],
            "tta": list(o.tta),
            "scales": list(o.scales),
            "write_probabilities": self.spec.output.write_probabilities,
            "bands": list(self.spec.bands) if self.spec.bands else None,
            # only when set: jobs without complex inputs keep the fingerprints they had
            **({"complex_bands": self.spec.complex_bands} if self.spec.complex_bands != "refuse" else {}),
            # clip windows change output bytes; only cards that set one carry them (the others'
            # fingerprints stay as they were)
            **self._band_windows(),
            # slice-wise cards only (the others' fingerprints stay as they were): the same weights
            # run slice by slice, or across another axis, give other labels
            **({"slices": self.card.slices.model_dump()} if self.card.slices is not None else {}),
            # volumes are resampled to the card's spacing where theirs differs (workers.spacing)
            **({"spacing_mm": list(self.card.spacing_mm)} if self.card.spacing_mm is not None and ndim == 3 else {}),
            **({"volume_store_layout": VOLUME_STORE_LAYOUT} if ndim == 3 else {}),
            "chunk_size": self.chunk_size_for(ndim),
            "halo": self.halo,
            "tile_size": o.tile_size,
            "tile_overlap": o.tile_overlap,
            "blend": o.blend,
            "precision": o.precision,
            "channels_last": o.channels_last,
            "fold_batchnorm": o.fold_batchnorm,
            # GPU autocast changes output bytes: CPU and GPU results never share a fingerprint.
            "device_type": "cuda" if o.device.startswith("cuda") else "cpu",
            # only for instance models: semantic jobs keep the fingerprints they had
            **({"instances": dataclasses.asdict(o.instances)} if model_kind(self.card.architecture) == "instance"
               else {}),
        }


def resolve_job(spec: JobSpec, *, base_dir: Path) -> ResolvedJob:
    """Load and check the model, fill defaults from its card. Fails before any actor starts.

    Raises:
        ModelCardError: missing or invalid card/weights, or a job setting the card rejects.
    """
    card_path = resolve_card_path(spec.model.card, base_dir=base_dir)
    checkpoint = load_checkpoint(card_path)
    card = checkpoint.card
    check_plugin_allowed(card.architecture, where=str(card_path))
    if model_kind(card.architecture) == "instance":
        check_instance_job(spec, card, where=str(card_path))
    if spec.model.architecture is not None and spec.model.architecture != card.architecture:
        raise ModelCardError(
            f"{card_path}: job asks for architecture {spec.model.architecture!r} "
            f"but the card is {card.architecture!r}"
        )
    if spec.bands is not None and len(spec.bands) != card.in_channels:
        raise ModelCardError(
            f"job bands {list(spec.bands)} give {len(spec.bands)} channels, model {card.name!r} "
            f"({card_path}) expects {card.in_channels}"
        )
    halo = spec.tiling.halo if spec.tiling.halo is not None else card.halo
    check_slice_mode(card, where=str(card_path), halo=halo,
                     tile_size=spec.tiling.tile_size if spec.tiling.tile_size is not None else card.tile_size)
    ensemble = []
    for member in spec.model.ensemble:
        extra = load_checkpoint(resolve_card_path(member.card, base_dir=base_dir))
        check_plugin_allowed(extra.card.architecture, where=str(extra.card_path))
        if extra.card.class_names != card.class_names or extra.card.in_channels != card.in_channels:
            raise ModelCardError(
                f"{extra.card_path}: ensemble member has classes {list(extra.card.class_names)} and "
                f"{extra.card.in_channels} bands; {card_path} has {list(card.class_names)} and "
                f"{card.in_channels} (ensemble members must agree)"
            )
        if extra.card.slices != card.slices:
            raise ModelCardError(
                f"{extra.card_path}: ensemble member has slices {_slices_text(extra.card)}, {card_path} has "
                f"{_slices_text(card)} (members of an ensemble must run over volumes the same way)"
            )
        ensemble.append((extra, member.weight))
    tiling = spec.tiling
    tile_size = tiling.tile_size if tiling.tile_size is not None else card.tile_size
    options = PredictorOptions(
        device="cuda" if (spec.resources.num_gpus_per_actor or 0) > 0 else "cpu",
        precision=spec.inference.precision,
        batch_size=spec.resources.batch_size or default_batch_size(
            "cuda" if (spec.resources.num_gpus_per_actor or 0) > 0 else "cpu"),
        tile_size=tile_size,
        tile_overlap=tiling.tile_overlap,
        blend=tiling.blend,
        torch_threads=spec.resources.torch_threads or max(1, int(spec.resources.cpus_per_actor)),
        tta=spec.inference.tta,
        scales=spec.inference.scales,
        channels_last=spec.inference.channels_last,
        fold_batchnorm=spec.inference.fold_batchnorm,
        instances=InstanceOptions(**spec.inference.instances.model_dump()),
    )
    root = output_root(spec.output.root, base_dir=base_dir)
    return ResolvedJob(
        spec=spec,
        root=root,
        checkpoint=checkpoint,
        ensemble=tuple(ensemble),
        chunk_size=tiling.chunk_size,
        halo=halo,
        predictor_options=options,
        num_gpus_per_actor=spec.resources.num_gpus_per_actor or 0.0,
    )


def check_instance_job(spec: JobSpec, card: ModelCard, *, where: str) -> None:
    """Refuse the job settings an instance model cannot honour (before any actor starts).

    Probabilities, TTA, multi-scale inference and ensembles all average or write per-class
    probabilities, which an instance model does not give; slice-wise cards wrap semantic 2D
    models.

    Raises:
        ModelCardError: naming the card, the option and what to change.
    """
    if card.slices is not None:
        raise ModelCardError(f"{where}: model {card.name!r} ({card.architecture}) is an instance model with "
                             f"slices {_slices_text(card)}; slice-wise (2.5D) runs semantic models only: drop "
                             "'slices' from the card")
    refused = []
    if spec.output.write_probabilities:
        refused.append("output.write_probabilities (set it to false)")
    if spec.inference.tta:
        refused.append(f"inference.tta {list(spec.inference.tta)} (drop it)")
    if tuple(spec.inference.scales) != (1.0,):
        refused.append(f"inference.scales {list(spec.inference.scales)} (use [1.0])")
    if spec.model.ensemble:
        refused.append("model.ensemble (run one instance model)")
    if refused:
        raise ModelCardError(
            f"{where}: model {card.name!r} ({card.architecture}) is an instance model, which gives no class "
            f"probabilities; the job sets {'; '.join(refused)}"
        )


ACTOR_MEMORY_BYTES = 1.5 * 2**30

"""Memory budgeted per predictor actor when choosing their number (measured on CPU: about 1 GB
PSS for the bundled U-Net on 1088-px tiles: torch alone is about 0.5 GB)."""


def place_on_cluster(job: ResolvedJob, cluster: dict[str, float]) -> ResolvedJob:
    """Fill the defaults that depend on the cluster's resources.

    GPU: 1 GPU per actor when the cluster has GPUs (else CPU). Actors (unless set): one per GPU;
    on CPU one per CPU (cpus_per_actor each, 0.5 CPU left for the split pipeline's tasks), at
    most one per ACTOR_MEMORY_BYTES of the cluster's memory, at least 1.
    """
    res = job.spec.resources
    gpus = cluster.get("GPU", 0.0)
    if res.num_gpus_per_actor is None and gpus > 0:
        batch = res.batch_size or default_batch_size("cuda")
        job = replace(job, num_gpus_per_actor=1.0,
                      predictor_options=replace(job.predictor_options, device="cuda", batch_size=batch))
    if res.actors is not None:
        return replace(job, actors=res.actors)
    if job.num_gpus_per_actor > 0:
        actors = int(gpus // job.num_gpus_per_actor)
    else:
        tasks = 0.0 if fused_stages(job) else 0.5
        actors = int((cluster.get("CPU", 1.0) - tasks) // res.cpus_per_actor)
        if cluster.get("memory"):
            actors = min(actors, int(cluster["memory"] // ACTOR_MEMORY_BYTES))
    return replace(job, actors=max(1, actors))


def fused_stages(job: ResolvedJob) -> bool:
    """Whether the actors read and write their chunks themselves (resources.stages)."""
    stages = job.spec.resources.stages
    return stages == "fused" or (stages == "auto" and job.num_gpus_per_actor <= 0)


def cluster_fit_problem(job: ResolvedJob, cluster: dict[str, float]) -> str | None:
    """Why the actor pool cannot start on `cluster` (Ray would wait forever), or None.

    The actors take actors x cpus_per_actor CPUs (and GPUs) for the whole job; the read and write
    tasks need 0.5 CPU besides.
    """
    res = job.spec.resources
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    tasks = 0.0 if fused_stages(job) else 0.5
    need_cpu = job.actors * res.cpus_per_actor + tasks
    if need_cpu > cpus:
        besides = f" plus {tasks:g} CPU for the read and write tasks" if tasks else ""
        return (f"resources: {job.actors} actor(s) x {res.cpus_per_actor} CPU{besides} need {need_cpu:g} CPUs, "
                f"the Ray cluster has {cpus:g}; lower resources.actors or resources.cpus_per_actor")
    need_gpu = job.actors * job.num_gpus_per_actor
    if need_gpu > gpus:
        return (f"resources: {job.actors} actor(s) x {job.num_gpus_per_actor:g} GPU need {need_gpu:g} GPUs, "
                f"the Ray cluster has {gpus:g}; lower resources.actors or resources.num_gpus_per_actor")
    return None


def output_root(text: str, *, base_dir: Path) -> Location:
    """The job's output root: an ``s3://bucket/prefix`` (S3Location; credentials in it are
    refused, see `pipelines.writers.outroot.as_location`), or a folder, relative to `base_dir`
    unless absolute."""
    location = as_location(text)
    if isinstance(location, S3Location):
        return location
    root = location.expanduser()
    if not root.is_absolute():
        root = base_dir / root
    return root.resolve()


def input_policy(job: ResolvedJob) -> InputPolicy:
    """The readers' input policy of a job: complex bands, the chosen bands (a 4D NIfTI needs them),
    the STAC asset keys (``stac.assets``), and where readers may cache converted inputs (`<root>/_work/inputs`, e.g. a `.nii.gz`
    converted once to a chunked Zarr)."""
    spec = job.spec
    stac = getattr(spec, "stac", None)
    return InputPolicy(complex_bands=spec.complex_bands, bands=spec.bands,
                       # converted inputs are read back window by window: a local cache for an S3 root
                       cache_dir=None if is_s3(job.root) else str(job.root / WORK_DIR / INPUT_CACHE_DIR),
                       assets=tuple(stac.assets) if stac is not None else None)


def check_scene_fits_model(info: SceneInfo, *, bands: tuple[int, ...] | None, card: ModelCard) -> None:
    """Raise InputError (naming the file and the fix) when a scene cannot feed the model."""
    if bands is not None:
        bad = [b for b in bands if b > info.count]
        if bad:
            raise InputError(f"{info.path}: has {info.count} bands, job asks for bands {bad}")
    elif info.count != card.in_channels:
        hint = list(range(1, card.in_channels + 1))
        raise InputError(
            f"{info.path}: {info.count} bands, model {card.name!r} expects {card.in_channels} "
            f"(set bands: {hint} in the job spec to choose them)"
        )
    kind = {2: "an image", 3: "a volume"}.get(info.ndim, f"{info.ndim}-D")
    if card.slices is not None:
        if info.ndim != 3:
            raise InputError(
                f"{info.path}: {kind} of shape {tuple(info.shape)}, but model {card.name!r} is slice-wise "
                f"(slices: {_slices_text(card)}), which runs 2D models over volumes only; use a card without "
                "'slices' for images"
            )
        scene_slice_axis(info, card)  # the orientation names the axis (raises InputError)
    elif not takes_spatial_dims(card.architecture, info.ndim, card.arch_args):
        model_dims = model_spatial_dims(card.architecture, card.arch_args)
        hint = f"use a {info.ndim}-D model for it"
        if info.ndim == 3 and model_dims == 2:
            hint += (", or run this 2D model slice by slice: add \"slices\": {\"axis\": \"axial\", \"context\": 0} "
                     "to its card (axial, coronal or sagittal; context > 0 for 2.5D)")
        raise InputError(f"{info.path}: {kind} of shape {tuple(info.shape)}, but model {card.name!r} "
                         f"({card.architecture}) takes {model_dims}-D inputs; {hint}")
    if card.spacing_mm is not None and info.ndim == 3:
        try:  # the card's spacing fits the volume's axes (the actors resample to it: workers.spacing)
            model_spacing(card, info.spacing, slice_axis=scene_slice_axis(info, card))
        except ValueError as exc:
            raise InputError(f"{info.path}: {exc}") from None
    if info.transform is not None and (info.transform[1] != 0 or info.transform[3] != 0):
        log.warning("%s: rotated/sheared geotransform; x/y coordinates in the store are approximate, "
                    "GeoTransform is exact", info.path)


def _slices_text(card: ModelCard) -> str:
    """A card's ``slices`` as it is written in the card, or ``none``."""
    return "none" if card.slices is None else str(card.slices.model_dump())


def check_slice_mode(card: ModelCard, *, where: str, halo: int, tile_size: int) -> None:
    """Refuse a slice-wise card (``slices``) whose model is not 2D, or a job whose halo or tile
    cannot give each slice its ``context`` neighbours.

    A chunk's output slices see their real neighbours when the window's halo holds at least
    ``context`` slices beyond the core (the window's outer slices see repeated ones,
    `workers.models.slicewise`), and a tile of ``2 * context + 1`` slices or more has a slice
    whose whole context lies inside it.

    Raises:
        ModelCardError: naming the card (`where`) and what to change.
    """
    if card.slices is None:
        return
    if not takes_spatial_dims(card.architecture, 2, card.arch_args):
        raise ModelCardError(
            f"{where}: slices {_slices_text(card)} runs a 2D model over volumes, but {card.architecture!r} "
            f"takes {model_spatial_dims(card.architecture, card.arch_args)}-D inputs; drop 'slices' from the card"
        )
    context = card.slices.context
    if halo < context:
        raise ModelCardError(
            f"{where}: slices context {context} needs a halo of at least {context} slices, the job has {halo}; "
            f"set tiling.halo: {context} (or more) in the job spec, or the card's halo"
        )
    if tile_size < 2 * context + 1:
        raise ModelCardError(
            f"{where}: slices context {context} needs tiles of at least {2 * context + 1} slices, the job has "
            f"tile_size {tile_size}; raise tiling.tile_size"
        )


def scene_slice_axis(info: SceneInfo, card: ModelCard) -> int | None:
    """The spatial array axis of a volume a slice-wise card cuts slices across, from the volume's
    orientation (SceneInfo.orientation, the axis codes of its affine:
    `schemas.model_card.slice_array_axis`); None for a card without ``slices``.

    Raises:
        InputError: the volume has no orientation that names the axis (naming the file).
    """
    if card.slices is None:
        return None
    try:
        return slice_array_axis(card.slices.axis, info.orientation, source=info.path)
    except ValueError as exc:
        raise InputError(f"{exc}; model {card.name!r} is slice-wise (slices: {_slices_text(card)})") from None
