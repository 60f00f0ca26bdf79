"""Model card: what a checkpoint is, what it expects and what it predicts.

A card is a JSON file next to its weights (safetensors). It is validated before any actor
starts, so a mismatch (bands, classes, missing file, wrong checksum) fails early and clearly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.errors import ModelCardError

CARD_VERSION = 1


class ClassInfo(BaseModel):
    """One output class of the model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: int = Field(ge=0, le=254, description="Class id in the output `classes` array (255 is nodata).")
    name: str = Field(min_length=1, description="Human-readable class name.", examples=["water"])
    color: str = Field(default="#808080", pattern=r"^#[0-9a-fA-F]{6}$", description="Display colour.")


class BandInfo(BaseModel):
    """One input band and its normalisation: x_norm = (x - mean) / std."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, description="Band name.", examples=["nir"])
    mean: float = Field(description="Mean of the raw band values (input units, e.g. DN).")
    std: float = Field(gt=0, description="Standard deviation of the raw band values (input units).")


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
    weights: str = Field(description="Weights file name, relative to the card's folder.")
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the weights file.")
    training: dict[str, Any] = Field(default_factory=dict, description="Free-form provenance.")

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
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)


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
