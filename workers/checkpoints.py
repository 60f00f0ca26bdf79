"""Checkpoints: a model card (JSON) + safetensors weights beside it.

Loading never executes pickled code: weights are safetensors (or, for `.pt` files,
`torch.load(weights_only=True)`), and the file's SHA-256 must match the card.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from schemas.errors import ModelCardError
from schemas.job import BUILTIN_PREFIX
from schemas.model_card import ModelCard, parse_model_card
from workers.hashing import file_sha256

if TYPE_CHECKING:
    import torch

BUILTIN_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class Checkpoint:
    """A validated card and the resolved path of its weights."""

    card: ModelCard
    card_path: Path
    weights_path: Path


def resolve_card_path(ref: str, *, base_dir: Path | None = None) -> Path:
    """'builtin:<name>' -> the shipped card; a relative path -> against base_dir (default cwd)."""
    if ref.startswith(BUILTIN_PREFIX):
        name = ref[len(BUILTIN_PREFIX):]
        path = BUILTIN_DIR / f"{name}.json"
        if Path(name).name != name or not path.is_file():
            shipped = sorted(p.stem for p in BUILTIN_DIR.glob("*.json"))
            raise ModelCardError(f"no builtin model {name!r}; shipped: {', '.join(shipped) or 'none'}")
        return path
    path = Path(ref).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def load_checkpoint(card_path: str | Path, *, verify_sha256: bool = True) -> Checkpoint:
    """Read and validate a card, and check that its weights exist (and match the checksum).

    Raises:
        ModelCardError: card missing/invalid, weights missing, or checksum mismatch.
    """
    card_path = Path(card_path)
    try:
        text = card_path.read_text()
    except FileNotFoundError:
        raise ModelCardError(f"{card_path}: model card not found") from None
    except OSError as exc:
        raise ModelCardError(f"{card_path}: cannot read model card: {exc}") from None
    card = parse_model_card(text, source=str(card_path))
    weights_path = card_path.parent / card.weights
    if not weights_path.is_file():
        raise ModelCardError(f"{card_path}: weights file {weights_path} not found")
    if verify_sha256:
        actual = file_sha256(weights_path)
        if actual != card.weights_sha256:
            raise ModelCardError(
                f"{weights_path}: SHA-256 {actual} does not match the card's weights_sha256 "
                f"{card.weights_sha256} (wrong or corrupted file)"
            )
    return Checkpoint(card=card, card_path=card_path, weights_path=weights_path)


def load_state_dict(weights_path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (or a `.pt` state dict loaded with weights_only=True)."""
    if weights_path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(weights_path))
    import torch

    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ModelCardError(f"{weights_path}: expected a state dict, got {type(state).__name__}")
    return state


def aligned_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of a loaded state dict in storage of its own, floats as float32.

    safetensors hands out views into the file's buffer at the offsets the file gives them
    (``data_ptr() % 64`` of 8, 16, 20, ... for a smp PSPNet). A model that keeps such views
    (the meta-device build assigns the loaded tensors) runs other CPU kernels than the model
    that was saved: on AVX-512 machines oneDNN/MKL pick a different code path for unaligned
    weights, and outputs differed by up to 1.7e-6. A fresh allocation from torch's CPU
    allocator is 64-byte aligned, so a loaded model computes exactly like the saved one.
    """
    import torch

    return {k: v.to(torch.float32 if v.is_floating_point() else v.dtype, copy=True).contiguous()
            for k, v in state.items()}


def build_from_checkpoint(ckpt: Checkpoint) -> torch.nn.Module:
    """Build the card's architecture and load its weights (strict), in eval mode, on CPU, fp32.

    A slice-wise card (``slices``) gives its 2D model wrapped in
    `workers.models.slicewise.SliceWise` (slices across the tiles' first spatial axis), built
    with ``card.model_in_channels`` input channels."""
    from workers.registry import build_model

    card = ckpt.card
    state = aligned_state(load_state_dict(ckpt.weights_path))
    model = _build_on_meta(card, state)
    if model is not None:
        return _slice_wise(card, model.eval())
    model = build_model(
        card.architecture, in_channels=card.model_in_channels, num_classes=card.num_classes, arch_args=card.arch_args
    )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelCardError(f"{ckpt.weights_path}: weights do not fit architecture {card.architecture!r}: {exc}") from None
    return _slice_wise(card, model.eval())


def _slice_wise(card: ModelCard, model: torch.nn.Module) -> torch.nn.Module:
    """`model` wrapped to run over volume tiles slice by slice (`workers.models.slicewise.SliceWise`)
    when the card has ``slices``, across the tiles' first spatial axis: the predictor's caller
    (`workers.actors.PredictorActor`) puts each scene's slice axis first. Else `model` itself."""
    if card.slices is None:
        return model
    from workers.models.slicewise import SliceWise

    return SliceWise(model, axis=0, context=card.slices.context).eval()


def _build_on_meta(card: ModelCard, state: dict[str, torch.Tensor]) -> torch.nn.Module | None:
    """The architecture built on the meta device and given the loaded tensors (no random init:
    a ResNet-50 backbone's init costs a predictor actor about a second of start-up), or None
    where that does not work: a builder that computes on its weights, a tensor the state dict
    lacks (a non-persistent buffer), a shape mismatch. The caller then builds the plain way,
    which also gives the error message a mismatch deserves."""
    import torch

    from workers.registry import build_model

    try:
        with torch.device("meta"):
            model = build_model(card.architecture, in_channels=card.model_in_channels,
                                num_classes=card.num_classes, arch_args=card.arch_args)
        model.load_state_dict(state, strict=True, assign=True)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return None
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return None
    return model


def save_checkpoint(model: torch.nn.Module, card_fields: dict, out_dir: Path, *, name: str) -> Path:
    """Write `<name>.safetensors` (the model's state dict) and `<name>.json` (its card).

    Args:
        model: the module whose state_dict is saved (tensors made contiguous, on CPU).
        card_fields: every card field except `name`, `weights` and `weights_sha256`.
        out_dir: destination folder (created).
        name: model id and file stem.

    Returns:
        The card path. The card is validated before it is written.
    """
    from safetensors.torch import save_file

    from schemas.model_card import ModelCard

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{name}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights))
    card = ModelCard.model_validate(
        {**card_fields, "name": name, "weights": weights.name, "weights_sha256": file_sha256(weights)}
    )
    card_path = out_dir / f"{name}.json"
    card_path.write_text(card.model_dump_json(indent=2))
    return card_path
