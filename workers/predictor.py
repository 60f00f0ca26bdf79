"""The predictor: one halo window in, class labels of its core out. Knows nothing of Ray.

Per window: normalise (per the model card), cut into overlapping model tiles, run them in
batches, softmax, blend with smooth weights on the device, crop to the core, argmax. The same
object runs in tests, notebooks, the benchmark and (wrapped by `workers.actors`) Ray actors.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from schemas.model_card import ModelCard
from schemas.store import NODATA_CLASS
from workers.options import PredictorOptions
from workers.tileplan import windows_per_pass
from workers.tiles import BlendAccumulator, blend_weights, plan_tiles
from workers.tta import augment, expand_tta, resample, scaled_size


@dataclass(frozen=True)
class Member:
    """One model of an ensemble: the module, its card, and its weight in the average."""

    model: torch.nn.Module
    card: ModelCard
    weight: float = 1.0


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda if available else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every eval-mode BatchNorm2d that directly follows a Conv2d in an nn.Sequential
    folded into that convolution (weight * gamma / sqrt(var + eps), bias shifted likewise) and
    replaced by Identity: one pass over the activations less per pair, and no BN output to hold.

    Folding works on a deep copy, so the caller's module (e.g. one still being trained) is left
    alone; `model` itself comes back when it has nothing to fold. Outputs change by float
    rounding only (bundled U-Net: max |logit difference| 1e-5, labels unchanged on a 1088-px
    tile; 14 % faster on CPU with channels-last).
    """
    if not _foldable_pairs(model):
        return model
    model = copy.deepcopy(model).eval()
    for sequential, conv_name, bn_name in _foldable_pairs(model):
        conv, bn = sequential._modules[conv_name], sequential._modules[bn_name]
        sequential._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
        sequential._modules[bn_name] = torch.nn.Identity()
    return model


def _foldable_pairs(model: torch.nn.Module) -> list[tuple[torch.nn.Sequential, str, str]]:
    """(sequential, conv name, bn name) of each Conv2d directly followed by a BatchNorm2d with
    running statistics, both in eval mode (exact types: a subclass may change forward)."""
    pairs = []
    for module in model.modules():
        if not isinstance(module, torch.nn.Sequential):
            continue
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if (type(conv) is torch.nn.Conv2d and type(bn) is torch.nn.BatchNorm2d
                    and not (conv.training or bn.training) and bn.track_running_stats
                    and bn.running_mean is not None and bn.running_var is not None
                    and conv.out_channels == bn.num_features):
                pairs.append((module, a, b))
    return pairs


def memory_format(*, channels_last: bool) -> torch.memory_format:
    """The memory format the model and its (N, C, H, W) inputs use (PredictorOptions.channels_last)."""
    return torch.channels_last if channels_last else torch.contiguous_format


def resolve_autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting on a device; None means plain fp32.

    On CPU, "auto" is fp32 (the same bytes on every CPU) and "bf16" autocasts to bfloat16
    (oneDNN; fast where the CPU has AMX or AVX512-BF16: measured 1.8x on a Sapphire Rapids
    core for the bundled U-Net, 99.98 % of labels unchanged; slow emulation elsewhere).

    Raises:
        ValueError: fp16 on CPU (no fast CPU kernels; use bf16 or fp32).
    """
    if precision == "fp32":
        return None
    if device.type != "cuda":
        if precision == "fp16":
            raise ValueError("precision fp16 needs a GPU; on CPU use bf16 or fp32")
        return torch.bfloat16 if precision == "bf16" else None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class Predictor:
    """Segments halo windows with one model or a weighted ensemble.

    Args:
        model: maps (N, C, h, w) float32 normalised input to (N, K, h, w) logits.
        card: the model card (bands and normalisation, classes, stride).
        options: runtime options.
        extra_members: further ensemble members; every member's probabilities (after its own
            normalisation, TTA and scales) are averaged with the members' weights.

    Raises:
        ValueError: ensemble members disagree on classes or input bands.
    """

    def __init__(self, model: torch.nn.Module, card: ModelCard, *, options: PredictorOptions = PredictorOptions(),
                 weight: float = 1.0, extra_members: tuple[Member, ...] = ()):
        self.card = card
        self.options = options
        self.device = resolve_device(options.device)
        if options.torch_threads is not None and self.device.type == "cpu":
            torch.set_num_threads(options.torch_threads)
        self.autocast_dtype = resolve_autocast_dtype(options.precision, self.device)
        self._memory_format = memory_format(channels_last=options.channels_last)
        self.tta = expand_tta(options.tta)
        if not options.scales or any(s <= 0 for s in options.scales):
            raise ValueError(f"scales must be positive factors, got {options.scales}")
        self._members = [self._prepare(m) for m in (Member(model, card, weight), *extra_members)]
        total = sum(m.weight for m in (Member(model, card, weight), *extra_members))
        if total <= 0:
            raise ValueError("ensemble weights must sum to a positive number")
        self._member_weights = [m.weight / total for m in (Member(model, card, weight), *extra_members)]
        self._weights: dict[tuple[int, ...], torch.Tensor] = {}

    def _prepare(self, member: Member) -> _PreparedMember:
        card = member.card
        if card.class_names != self.card.class_names:
            raise ValueError(f"ensemble member {card.name!r} has classes {card.class_names}, "
                             f"expected {self.card.class_names}")
        if card.in_channels != self.card.in_channels:
            raise ValueError(f"ensemble member {card.name!r} takes {card.in_channels} bands, "
                             f"expected {self.card.in_channels}")
        model = member.model.eval()
        if self.options.fold_batchnorm:
            model = fold_batchnorm(model)
        model = model.to(self.device).to(memory_format=self._memory_format)
        mean = torch.tensor([b.mean for b in card.bands], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor([b.std for b in card.bands], dtype=torch.float32).view(1, -1, 1, 1)
        return _PreparedMember(model=model, stride=card.stride, mean=mean.to(self.device),
                               inv_std=(1.0 / std).to(self.device))

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

    def _stack_to_device(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """(N, *shape) tensor on the device of N same-shape arrays: each copied once into one
        buffer (pinned for a GPU), then one transfer. Per-array `_to_device` and a stack cost
        a copy of a read-only (object store) array, a pinned copy and a device-side stack."""
        dtype = torch.from_numpy(np.empty(0, dtype=arrays[0].dtype)).dtype
        buffer = torch.empty((len(arrays), *arrays[0].shape), dtype=dtype, pin_memory=self.device.type == "cuda")
        view = buffer.numpy()
        for i, a in enumerate(arrays):
            view[i] = a
        return buffer.to(self.device, non_blocking=True) if self.device.type == "cuda" else buffer

    def _tile_weights(self, tile_shape: tuple[int, ...]) -> torch.Tensor:
        if tile_shape not in self._weights:
            w = blend_weights(tile_shape, mode=self.options.blend)
            self._weights[tile_shape] = torch.from_numpy(np.array(w)).to(self.device)
        return self._weights[tile_shape]

    def _forward(self, member: _PreparedMember, tiles: torch.Tensor, *, softmax: bool = True) -> torch.Tensor:
        """(N, C, h, w) normalised -> (N, K, h, w) float32 probabilities (logits when not
        `softmax`); pads h, w to the stride."""
        stride = member.stride
        h, w = tiles.shape[-2:]
        ph, pw = (-h) % stride, (-w) % stride
        if ph or pw:
            tiles = F.pad(tiles, (0, pw, 0, ph), mode="replicate")
        tiles = tiles.contiguous(memory_format=self._memory_format)
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            logits = member.model(tiles)
        logits = logits[..., :h, :w].float()
        return torch.softmax(logits, dim=1) if softmax else logits

    def _member_probabilities(self, member: _PreparedMember, tiles: torch.Tensor) -> torch.Tensor:
        """Average over scales and TTA views of one member's probabilities, at the tile size."""
        size = tuple(tiles.shape[-2:])
        total: torch.Tensor | None = None
        for scale in self.options.scales:
            scaled = resample(tiles, scaled_size(size, scale)) if scale != 1.0 else tiles
            for name in self.tta:
                forward, inverse = augment(name)
                probs = inverse(self._forward(member, forward(scaled)))
                probs = resample(probs, size) if scale != 1.0 else probs
                total = probs if total is None else total + probs
        views = len(self.options.scales) * len(self.tta)
        return total if views == 1 else total / views

    @property
    def single_pass(self) -> bool:
        """One member, one scale, one view: a tile's labels are the argmax of one forward pass."""
        return len(self._members) == 1 and len(self.options.scales) == 1 and len(self.tta) == 1

    def _normalise(self, member: _PreparedMember, raw: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """(N, C, h, w) raw tiles (any numeric dtype) -> float32 (raw - mean) / std, 0 where
        `valid` (bool or 0/1) is False. A float32 copy, then in place (`_forward` makes it
        channels-last: converting and reordering in one copy measured 2x slower on CPU)."""
        x = raw.to(torch.float32, copy=True)
        x.sub_(member.mean).mul_(member.inv_std)
        if valid is not None:  # nodata -> 0, i.e. the band mean after normalisation
            x.mul_(valid)
        return x

    def _tile_probabilities(self, raw: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """(N, C, h, w) raw float32 tiles -> (N, K, h, w) ensemble-averaged probabilities."""
        if len(self._members) == 1:
            return self._member_probabilities(self._members[0], self._normalise(self._members[0], raw, valid))
        total: torch.Tensor | None = None
        for member, weight in zip(self._members, self._member_weights):
            probs = self._member_probabilities(member, self._normalise(member, raw, valid)) * weight
            total = probs if total is None else total + probs
        return total

    def _whole_tiles(self, tiles: torch.Tensor, valid: torch.Tensor | None, *, logits_ok: bool) -> torch.Tensor:
        """(N, C, H, W) raw windows that are each one model tile -> (N, K, H, W) probabilities,
        or logits when `logits_ok` and the predictor makes a single pass (same argmax)."""
        if logits_ok and self.single_pass:
            member = self._members[0]
            return self._forward(member, self._normalise(member, tiles, valid), softmax=False)
        return self._tile_probabilities(tiles, valid)

    @torch.inference_mode()
    def predict_probabilities(self, pixels: np.ndarray, valid: np.ndarray | None = None, *,
                              logits_ok: bool = False) -> torch.Tensor:
        """Blended class probabilities of a whole window.

        Args:
            pixels: (C, H, W) raw band values (any numeric dtype), C == card.in_channels.
            valid: (H, W) bool, False at nodata pixels (fed to the model as the band mean).
            logits_ok: the caller only needs the argmax: when the window is one tile and the
                predictor makes a single pass (`single_pass`), return the logits and skip the
                softmax (same argmax, one pass over K planes less).

        Returns:
            (K, H, W) float32 probabilities (or logits, see `logits_ok`) on the predictor's device.
        """
        if pixels.ndim != 3 or pixels.shape[0] != self.card.in_channels:
            raise ValueError(
                f"window must be (C={self.card.in_channels}, H, W), got shape {pixels.shape}"
            )
        window_shape = tuple(pixels.shape[1:])
        x = self._to_device(pixels)  # the raw dtype: _normalise converts
        v = None if valid is None else self._to_device(valid).unsqueeze(0)
        tile_shape, offsets = plan_tiles(window_shape, self.options.tile_size, self.options.tile_overlap)
        if len(offsets) == 1:  # the model takes the whole window: nothing to blend
            return self._whole_tiles(x.unsqueeze(0), None if v is None else v.unsqueeze(0), logits_ok=logits_ok)[0]
        # tiles are cut and stacked in float32 (uint16 tensors have few kernels, on CUDA fewer)
        x = x.to(torch.float32)
        v = None if v is None else v.to(torch.float32)
        weights = self._tile_weights(tile_shape)
        acc = BlendAccumulator(window_shape, self.num_classes, device=self.device)
        bs = self.options.batch_size
        for start in range(0, len(offsets), bs):
            batch_offsets = offsets[start : start + bs]
            windows = [(slice(r, r + tile_shape[0]), slice(c, c + tile_shape[1])) for r, c in batch_offsets]
            tiles = torch.stack([x[(slice(None), *wnd)] for wnd in windows])
            tile_valid = None if v is None else torch.stack([v[(slice(None), *wnd)] for wnd in windows])
            acc.add_batch(batch_offsets, self._tile_probabilities(tiles, tile_valid), weights)
        return acc.finalize()

    def predict_core(
        self, pixels: np.ndarray, valid: np.ndarray | None = None, *, core: tuple[slice, ...] | None = None,
        with_probabilities: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Class labels (and optionally probabilities) of a window's core.

        Args:
            pixels: (C, H, W) raw band values.
            valid: (H, W) bool or None.
            core: slices of the core inside the window (default: the whole window).
            with_probabilities: also return (K, h, w) float16 probabilities.

        Returns:
            (labels, probs): labels (h, w) uint8 class ids, NODATA_CLASS (255) where `valid` is
            False; probs (K, h, w) float16 (NaN at nodata) or None.
        """
        valid = _none_if_all(valid)
        probs = self.predict_probabilities(pixels, valid, logits_ok=not with_probabilities)
        return self._finish_core(probs, valid, core, with_probabilities)

    def windows_per_pass(self, window_shape: tuple[int, ...]) -> int:
        """How many windows of `window_shape` `predict_cores` runs in one forward pass:
        batch_size when the whole window is one model tile, else 1 (its tiles are batched)."""
        o = self.options
        return windows_per_pass(window_shape, o.tile_size, o.tile_overlap, o.batch_size)

    @torch.inference_mode()
    def predict_cores(
        self, windows: list[tuple[np.ndarray, np.ndarray | None, tuple[slice, ...] | None]], *,
        with_probabilities: bool = False,
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """`predict_core` of several windows, whole windows batched into one forward pass.

        Windows that are each a single model tile (the window fits the tile, as with the
        bundled model) and share a shape run `windows_per_pass` at a time: on a GPU a forward
        pass per window would leave it mostly idle. Other windows run one by one (their own
        tiles are batched). Results equal `predict_core` window by window.

        Args:
            windows: (pixels (C, H, W), valid (H, W) bool or None, core slices or None) each.
            with_probabilities: as in `predict_core`.

        Returns:
            One (labels, probs) per window, in order (see `predict_core`).
        """
        out: list[tuple[np.ndarray, np.ndarray | None] | None] = [None] * len(windows)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (pixels, _, _) in enumerate(windows):
            shape = tuple(pixels.shape[1:])
            if pixels.ndim == 3 and self.windows_per_pass(shape) > 1:
                groups.setdefault(shape, []).append(i)
            else:
                out[i] = self._predict_one(windows[i], with_probabilities)
        for shape, members in groups.items():
            n = self.windows_per_pass(shape)
            for start in range(0, len(members), n):
                batch = members[start:start + n]
                if len(batch) == 1:
                    out[batch[0]] = self._predict_one(windows[batch[0]], with_probabilities)
                    continue
                for i, result in zip(batch, self._predict_stacked([windows[i] for i in batch], with_probabilities)):
                    out[i] = result
        return out  # type: ignore[return-value]

    def _predict_one(self, window: tuple[np.ndarray, np.ndarray | None, tuple[slice, ...] | None],
                     with_probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
        pixels, valid, core = window
        return self.predict_core(pixels, valid, core=core, with_probabilities=with_probabilities)

    def _predict_stacked(self, windows: list[tuple[np.ndarray, np.ndarray | None, tuple[slice, ...] | None]],
                         with_probabilities: bool) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Same-shape single-tile windows as one (N, C, H, W) batch."""
        for pixels, _, _ in windows:
            if pixels.shape[0] != self.card.in_channels:
                raise ValueError(f"window must be (C={self.card.in_channels}, H, W), got shape {pixels.shape}")
        x = self._stack_to_device([p for p, _, _ in windows])  # the raw dtype: _normalise converts
        masks = [_none_if_all(v) for _, v, _ in windows]
        v = None
        if any(m is not None for m in masks):
            ones = np.ones(windows[0][0].shape[1:], dtype=bool)
            v = self._stack_to_device([ones if m is None else m for m in masks]).unsqueeze(1)
        probs = self._whole_tiles(x, v, logits_ok=not with_probabilities)
        return [self._finish_core(probs[i], valid, core, with_probabilities)
                for i, ((_, _, core), valid) in enumerate(zip(windows, masks))]

    def _finish_core(self, probs: torch.Tensor, valid: np.ndarray | None, core: tuple[slice, ...] | None,
                     with_probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """(K, H, W) window scores -> labels (and float16 probabilities) of the core."""
        core = core or (slice(None), slice(None))
        core_probs = probs[(slice(None), *core)]
        labels = argmax_classes(core_probs)
        if valid is not None:
            core_valid = self._to_device(np.ascontiguousarray(valid[core]))
            labels = torch.where(core_valid, labels, torch.full_like(labels, NODATA_CLASS))
            if with_probabilities:
                core_probs = torch.where(core_valid, core_probs, torch.full_like(core_probs, float("nan")))
        out_probs = core_probs.to(torch.float16).cpu().numpy() if with_probabilities else None
        return labels.cpu().numpy(), out_probs

    def predict_labels(
        self, pixels: np.ndarray, valid: np.ndarray | None = None, *, core: tuple[slice, ...] | None = None
    ) -> np.ndarray:
        """(h, w) uint8 class labels of a window's core (see `predict_core`)."""
        return self.predict_core(pixels, valid, core=core)[0]


def _none_if_all(valid: np.ndarray | None) -> np.ndarray | None:
    """None for a mask without nodata: the same result (x * 1, labels kept) without moving,
    converting and applying a window-sized mask (about 7 ms of a 1088² CPU window)."""
    return None if valid is None or bool(valid.all()) else valid


def argmax_classes(probs: torch.Tensor) -> torch.Tensor:
    """(K, H, W) scores -> (H, W) uint8 index of the maximum (first on ties, like torch.argmax).

    Scores in channels-last memory (the class axis innermost, stride 1) take the indices of
    torch.max over that axis (documented to be the first maximal index, as torch.argmax; on CPU
    15 ms against torch.argmax's 22 ms for 5 x 1024² random scores, 1 thread). Otherwise a
    running maximum over the K class planes: each step is a contiguous elementwise pass, about
    10x faster on CPU than torch.argmax(dim=0) over a cropped (strided) NCHW view.
    """
    if probs.stride(0) == 1 and probs.shape[0] > 1:
        return torch.max(probs, dim=0).indices.to(torch.uint8)
    best = probs[0].contiguous()
    labels = torch.zeros(best.shape, dtype=torch.uint8, device=probs.device)
    for k in range(1, probs.shape[0]):
        plane = probs[k]
        better = plane > best
        best = torch.where(better, plane, best)
        labels.masked_fill_(better, k)
    return labels


@dataclass(frozen=True)
class _PreparedMember:
    model: torch.nn.Module
    stride: int
    mean: torch.Tensor
    inv_std: torch.Tensor
