"""Model card: what a checkpoint is, what it expects and what it predicts.

A card is a JSON file next to its weights (safetensors). It is validated before any actor
starts, so a mismatch (bands, classes, missing file, wrong checksum) fails early and clearly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.errors import ModelCardError

CARD_VERSION = 1

#: Colours of class ids 0-9 whose card gives none: matplotlib's "tab10" (distinct, colour-blind
#: tolerant), fixed here so every store, quicklook and export of a card shows the same colours
#: without matplotlib; ids from 10 on walk the hue circle by the golden angle (`default_class_colors`).
DEFAULT_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                   "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")

#: A finite spacing > 0 (mm).
SpacingMm = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class ClassInfo(BaseModel):
    """One output class of the model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: int = Field(ge=0, le=254, description="Class id in the output `classes` array (255 is nodata).")
    name: str = Field(min_length=1, description="Human-readable class name.", examples=["water"])
    color: str | None = Field(
        default=None, pattern=r"^#[0-9a-fA-F]{6}$",
        description="Display colour '#rrggbb' (overviews' OME image-label colours, quicklooks). None: the "
        "class id's entry of DEFAULT_PALETTE.", examples=["#1f77b4"])


class BandInfo(BaseModel):
    """One input band and its normalisation.

    Without a window: ``x_norm = (x - mean) / std``. With ``window: [lo, hi]`` the raw value is
    clipped first: ``x_norm = (min(max(x, lo), hi) - mean) / std``. CT windowing to [0, 1] is
    ``window: [lo, hi], mean: lo, std: hi - lo``; a z-score of the clipped values is
    ``window: [lo, hi]`` with the mean and std the training set had after clipping.

    mean and std are fixed statistics of the training data, never of the window being
    segmented: a z-score of each chunk's (or tile's) own voxels would make a chunk's labels
    depend on what else it holds and on where the chunk grid falls, so the same volume would
    segment differently with another chunk size. Cards therefore have no per-window z-score.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, description="Band name.", examples=["nir", "ct"])
    mean: float = Field(description="Mean of the raw band values (input units, e.g. DN or HU), after "
                        "clipping to `window` where set; subtracted from every value.")
    std: float = Field(gt=0, description="Standard deviation of the raw band values (input units), after "
                       "clipping to `window` where set; values are divided by it.")
    window: tuple[float, float] | None = Field(
        default=None,
        description="Clip window [lo, hi] in input units (e.g. HU), applied before the mean and std: "
        "x_norm = (min(max(x, lo), hi) - mean) / std. CT windowing to [0, 1]: mean = lo, std = hi - lo. "
        "None (default): no clipping, x_norm = (x - mean) / std.",
        examples=[[-1000.0, 1000.0], [-160.0, 240.0]],
    )

    @model_validator(mode="before")
    @classmethod
    def _no_window_statistics(cls, data: Any) -> Any:
        if isinstance(data, dict) and "zscore" in data:
            raise ValueError(
                "per-window z-score is not supported: statistics of each chunk's own voxels would make its "
                "labels depend on the chunk grid. Put the training set's mean and std in the band's "
                "'mean' and 'std' (a fixed z-score), after clipping to 'window' where set, and drop 'zscore'"
            )
        return data

    @field_validator("window")
    @classmethod
    def _ordered_window(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not (math.isfinite(value[0]) and math.isfinite(value[1]) and value[0] < value[1]):
            raise ValueError(f"window must be [lo, hi] with finite lo < hi (input units), got {list(value)}")
        return value


#: Slice orientations a slice-wise card may name, and the axis codes (nibabel's ``aff2axcodes``
#: letters) of the scanner direction each is perpendicular to: an axial slice is perpendicular to
#: the inferior-superior direction, a coronal one to anterior-posterior, a sagittal one to
#: left-right.
SLICE_AXIS_CODES: dict[str, str] = {"axial": "SI", "coronal": "AP", "sagittal": "LR"}


class SliceMode(BaseModel):
    """Run a 2D model over a volume slice by slice (2.5D with ``context`` > 0).

    The volume's array axis the slices are cut across is the one whose direction in scanner space
    (per the scene's affine) is closest to the named one (:func:`slice_array_axis`): ``axial`` ->
    the S/I axis, ``coronal`` -> A/P, ``sagittal`` -> L/R; never a fixed array axis. In-plane axes
    keep their array order (the data are never reoriented). With ``context`` c, each slice is fed
    with its c neighbours on each side as extra channels, ``(2c + 1) * C`` channels in all,
    ordered by slice offset -c..c, the C bands within each offset.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    axis: Literal["axial", "coronal", "sagittal"] = Field(
        description="Slice orientation: the scanner direction the slices are perpendicular to is "
        "S/I (axial), A/P (coronal) or L/R (sagittal); the array axis is found from each scene's affine.",
        examples=["axial"],
    )
    context: int = Field(
        default=0, ge=0, le=16,
        description="Neighbouring slices on each side stacked as channels (2.5D); 0: plain 2D slices. "
        "The 2D model takes in_channels * (2 * context + 1) channels.",
        examples=[0, 2],
    )


def slice_array_axis(axis: str, orientation: str | None, *, source: str) -> int:
    """The spatial array axis (0, 1, 2 of ``(z, y, x)``) a slice-wise model cuts slices across.

    Args:
        axis: ``"axial"``, ``"coronal"`` or ``"sagittal"`` (:data:`SLICE_AXIS_CODES`).
        orientation: the volume's axis codes, one letter per array axis (SceneInfo.orientation,
            nibabel's ``aff2axcodes`` of its affine: ``"SAR"`` for a (z, y, x) array whose z runs
            to S, y to A and x to R; ``"SPL"`` for DICOM's LPS rows and columns); None for a
            volume without one.
        source: the scene's path, quoted in errors.

    Returns:
        The index of the array axis whose code is one of the axis's two letters.

    Raises:
        ValueError: no orientation, one that does not name exactly one array axis for the
            slice axis, or an unknown axis name.
    """
    if axis not in SLICE_AXIS_CODES:
        raise ValueError(f"{source}: unknown slice axis {axis!r}; one of {', '.join(SLICE_AXIS_CODES)}")
    letters = SLICE_AXIS_CODES[axis]
    hits = [i for i, code in enumerate(orientation or "") if code in letters]
    if len(orientation or "") != 3 or len(hits) != 1:
        raise ValueError(f"{source}: orientation {orientation!r} does not name one array axis along "
                         f"{'/'.join(letters)} for {axis} slices (a volume's affine gives three codes, e.g. 'SAR')")
    return hits[0]


class ModelCard(BaseModel):
    """Everything needed to build, load and run a checkpoint."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    version: int = Field(default=CARD_VERSION, description="Card schema version.")
    name: str = Field(min_length=1, description="Model id, recorded in outputs.", examples=["unet-demo"])
    architecture: str = Field(description="Registry name of the architecture.", examples=["unet"])
    arch_args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the builder.")
    in_channels: int = Field(ge=1, description="Number of input bands the model takes.")
    classes: tuple[ClassInfo, ...] = Field(min_length=1, description="Output classes, ids 0..K-1 in order.")
    bands: tuple[BandInfo, ...] = Field(min_length=1, description="Input bands in model order.")
    tile_size: int = Field(ge=8, description="Native model tile size in px.")
    halo: int = Field(ge=0, description="Recommended halo in px (>= useful receptive-field radius).")
    stride: int = Field(default=1, ge=1, description="Tile sides must be a multiple of this (px).")
    spacing_mm: tuple[SpacingMm, ...] | None = Field(
        default=None, min_length=2, max_length=3,
        description="Pixel or voxel spacing the model was trained at, in mm per spatial axis: (z, y, x) "
        "for a 3D model, (y, x) for a 2D one (in-plane, for a slice-wise card). Volumes whose spacing "
        "differs by more than 1 % on an axis are predicted at this spacing, window by window (trilinear "
        "resampling there and back, workers.spacing); images are never resampled. None: run at the scene's spacing.",
        examples=[[1.5, 0.8, 0.8]],
    )
    slices: SliceMode | None = Field(
        default=None,
        description="Run this 2D model over volumes slice by slice (see SliceMode); None: the model runs on "
        "scenes with as many spatial axes as it takes. in_channels and bands describe the scene's channels; "
        "with context c the model itself takes in_channels * (2c + 1).",
        examples=[{"axis": "axial", "context": 1}],
    )
    weights: str = Field(description="Weights file name, relative to the card's folder.")
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the weights file.")
    training: dict[str, Any] = Field(default_factory=dict, description="Free-form provenance.")
    quicklook_bands: tuple[int, ...] | None = Field(
        default=None, min_length=1, max_length=3,
        description="1-based indexes into `bands` (model order) shown in quicklook PNGs: three as "
        "(red, green, blue), one as grey. None: the first three bands (or the first, with fewer).",
        examples=[[3, 2, 1]])

    @field_validator("version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value != CARD_VERSION:
            raise ValueError(f"unsupported model card version {value}; this tessera reads version {CARD_VERSION}")
        return value

    @field_validator("weights")
    @classmethod
    def _plain_file_name(cls, value: str) -> str:
        if Path(value).name != value or value in {"", ".", ".."}:
            raise ValueError(f"weights must be a file name beside the card, got {value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        ids = [c.id for c in self.classes]
        if ids != list(range(len(ids))):
            raise ValueError(f"class ids must be 0..{len(ids) - 1} in order, got {ids}")
        if len(self.bands) != self.in_channels:
            raise ValueError(f"in_channels is {self.in_channels} but {len(self.bands)} bands are described")
        if self.tile_size % self.stride:
            raise ValueError(f"tile_size {self.tile_size} is not a multiple of stride {self.stride}")
        if self.quicklook_bands is not None:
            if len(self.quicklook_bands) == 2:
                raise ValueError(f"quicklook_bands must be 1 (grey) or 3 (red, green, blue) bands, got "
                                 f"{list(self.quicklook_bands)}")
            bad = [b for b in self.quicklook_bands if not 1 <= b <= len(self.bands)]
            if bad:
                raise ValueError(f"quicklook_bands {list(self.quicklook_bands)}: {bad} not in 1..{len(self.bands)} "
                                 "(1-based indexes into `bands`)")
        return self

    @property
    def model_in_channels(self) -> int:
        """Input channels of the network itself: in_channels, times ``2 * context + 1`` for a
        2.5D slice-wise card (each slice with its neighbours as channels)."""
        return self.in_channels * (2 * self.slices.context + 1) if self.slices else self.in_channels

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    @property
    def class_colors(self) -> tuple[str, ...]:
        """Display colour '#rrggbb' per class id: the card's, else `default_class_colors`' entry."""
        defaults = default_class_colors(len(self.classes))
        return tuple(c.color or default for c, default in zip(self.classes, defaults))

    @property
    def quicklook_model_bands(self) -> tuple[int, ...]:
        """0-based model-order bands a quicklook shows: `quicklook_bands`, else the first three
        (one band when the model takes one or two)."""
        if self.quicklook_bands is not None:
            return tuple(b - 1 for b in self.quicklook_bands)
        return (0, 1, 2) if len(self.bands) >= 3 else (0,)


def default_class_colors(n_classes: int) -> tuple[str, ...]:
    """'#rrggbb' of class ids 0..n_classes-1: DEFAULT_PALETTE, then hue ``k * 0.618...`` (mod 1)
    at saturation 0.65, value 0.9. Deterministic, so stores written without colours, their
    quicklooks and exports agree."""
    import colorsys

    colors = list(DEFAULT_PALETTE[:n_classes])
    for k in range(len(DEFAULT_PALETTE), n_classes):
        r, g, b = colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.65, 0.9)
        colors.append(f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}")
    return tuple(colors)


def parse_model_card(text: str, *, source: str) -> ModelCard:
    """Validate the JSON text of a model card.

    Args:
        text: the card's JSON text.
        source: where it came from (a path), quoted in errors.

    Raises:
        ModelCardError: not JSON, or a field is wrong (named in the message).
    """
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelCardError(f"{source}: model card is not valid JSON: {exc}") from None
    try:
        return ModelCard.model_validate(raw)
    except ValidationError as exc:
        raise ModelCardError(f"{source}: invalid model card:\n{format_validation_errors(exc)}") from None


def format_validation_errors(exc: ValidationError) -> str:
    """One line per error: dotted field path, then the message."""
    return "\n".join(
        f"  {'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
    )
