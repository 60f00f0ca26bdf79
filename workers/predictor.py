"""The predictor: one halo window in, class labels of its core out. Knows nothing of Ray.

Per window: normalise (per the model card), cut into overlapping model tiles, run them in
batches, softmax, blend with smooth weights on the device, crop to the core, argmax. The same
object runs in tests, notebooks, the benchmark and (wrapped by `workers.actors`) Ray actors.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from schemas.model_card import ModelCard
from schemas.store import NODATA_CLASS
from workers.tiles import BlendAccumulator, blend_weights, plan_tiles


@dataclass(frozen=True)
class PredictorOptions:
    """How the predictor runs (all keyword, all with working defaults).

    Attributes:
        device: "cpu", "cuda", "cuda:1", or "auto" (cuda when available).
        precision: "auto" (bf16 on GPUs that support it, else fp16; fp32 on CPU), "fp32",
            "bf16", "fp16". Autocast only; blending always accumulates in float32.
        batch_size: model tiles per forward pass.
        tile_size: model tile side in px (clipped to the window).
        tile_overlap: fraction of the tile side shared by neighbouring tiles, in [0, 1).
        blend: "gaussian" or "constant".
        torch_threads: intra-op threads on CPU (None: leave torch's setting).
    """

    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 2
    tile_size: int = 512
    tile_overlap: float = 0.25
    blend: str = "gaussian"
    torch_threads: int | None = None


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda if available else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting on a device; None means plain fp32."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class Predictor:
    """Segments halo windows with one model.

    Args:
        model: maps (N, C, h, w) float32 normalised input to (N, K, h, w) logits.
        card: the model card (bands and normalisation, classes, stride).
        options: runtime options.
    """

    def __init__(self, model: torch.nn.Module, card: ModelCard, *, options: PredictorOptions = PredictorOptions()):
        self.card = card
        self.options = options
        self.device = resolve_device(options.device)
        if options.torch_threads is not None and self.device.type == "cpu":
            torch.set_num_threads(options.torch_threads)
        self.autocast_dtype = resolve_autocast_dtype(options.precision, self.device)
        self.model = model.eval().to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        mean = torch.tensor([b.mean for b in card.bands], dtype=torch.float32)
        std = torch.tensor([b.std for b in card.bands], dtype=torch.float32)
        self._mean = mean.view(-1, 1, 1).to(self.device)
        self._inv_std = (1.0 / std).view(-1, 1, 1).to(self.device)
        self._weights: dict[tuple[int, ...], torch.Tensor] = {}

    @property
    def num_classes(self) -> int:
        return self.card.num_classes

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        if not array.flags.writeable:  # e.g. zero-copy from Ray's object store; torch wants writable
            array = array.copy()
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def _normalise(self, pixels: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """(C, H, W) raw -> float32 (x - mean) / std; invalid pixels set to 0 (the band mean)."""
        x = (pixels.to(torch.float32) - self._mean) * self._inv_std
        if valid is not None:
            x = x * valid.unsqueeze(0)
        return x

    def _tile_weights(self, tile_shape: tuple[int, ...]) -> torch.Tensor:
        if tile_shape not in self._weights:
            w = blend_weights(tile_shape, mode=self.options.blend)
            self._weights[tile_shape] = torch.from_numpy(np.array(w)).to(self.device)
        return self._weights[tile_shape]

    def _forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, K, h, w) float32 probabilities; pads h, w up to the model stride."""
        stride = self.card.stride
        h, w = tiles.shape[-2:]
        ph, pw = (-h) % stride, (-w) % stride
        if ph or pw:
            tiles = F.pad(tiles, (0, pw, 0, ph), mode="replicate")
        if self.device.type == "cuda":
            tiles = tiles.contiguous(memory_format=torch.channels_last)
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            logits = self.model(tiles)
        return torch.softmax(logits[..., :h, :w].float(), dim=1)

    @torch.inference_mode()
    def predict_probabilities(self, pixels: np.ndarray, valid: np.ndarray | None = None) -> torch.Tensor:
        """Blended class probabilities of a whole window.

        Args:
            pixels: (C, H, W) raw band values (any numeric dtype), C == card.in_channels.
            valid: (H, W) bool, False at nodata pixels (fed to the model as the band mean).

        Returns:
            (K, H, W) float32 probabilities on the predictor's device.
        """
        if pixels.ndim != 3 or pixels.shape[0] != self.card.in_channels:
            raise ValueError(
                f"window must be (C={self.card.in_channels}, H, W), got shape {pixels.shape}"
            )
        window_shape = tuple(pixels.shape[1:])
        x = self._normalise(
            self._to_device(pixels), None if valid is None else self._to_device(valid)
        )
        tile_shape, offsets = plan_tiles(window_shape, self.options.tile_size, self.options.tile_overlap)
        weights = self._tile_weights(tile_shape)
        acc = BlendAccumulator(window_shape, self.num_classes, device=self.device)
        bs = self.options.batch_size
        for start in range(0, len(offsets), bs):
            batch_offsets = offsets[start : start + bs]
            tiles = torch.stack(
                [x[:, r : r + tile_shape[0], c : c + tile_shape[1]] for r, c in batch_offsets]
            )
            probs = self._forward(tiles)
            for offset, p in zip(batch_offsets, probs):
                acc.add(offset, p, weights)
        return acc.finalize()

    def predict_labels(
        self, pixels: np.ndarray, valid: np.ndarray | None = None, *, core: tuple[slice, ...] | None = None
    ) -> np.ndarray:
        """Class labels of a window's core.

        Args:
            pixels: (C, H, W) raw band values.
            valid: (H, W) bool or None.
            core: slices of the core inside the window (default: the whole window).

        Returns:
            (h, w) uint8 class ids; NODATA_CLASS (255) where `valid` is False.
        """
        probs = self.predict_probabilities(pixels, valid)
        core = core or (slice(None), slice(None))
        labels = torch.argmax(probs[(slice(None), *core)], dim=0).to(torch.uint8)
        if valid is not None:
            core_valid = self._to_device(np.ascontiguousarray(valid[core]))
            labels = torch.where(core_valid, labels, torch.full_like(labels, NODATA_CLASS))
        return labels.cpu().numpy()
