"""The predictor: one halo window in, class labels of its core out. Knows nothing of Ray.

A window is ``(C, *spatial)`` with 2 spatial axes ``(H, W)`` (a 2D model) or 3 ``(D, H, W)``
(a 3D model): the number of spatial axes is ``pixels.ndim - 1`` and everything below works
over them alike. Per window: normalise (per the model card), cut into overlapping model tiles,
run them in batches (padded to the model's stride), softmax, then hand the tiles' outputs to
the stitcher of the model's output kind (`workers.stitch`: for semantic models, blend with
smooth weights on the device, crop to the core, argmax). The same object runs in tests,
notebooks, the benchmark and (wrapped by `workers.actors`) Ray actors.

Instance models (`workers.registry.model_kind` "instance": Mask R-CNN, registered instance
models) run on the whole halo window, so an object cut by the core border is seen whole where
it fits in the halo: one tile when the window fits `tile_size` (Mask R-CNN takes any size),
else overlapping tiles whose duplicates the instance stitcher suppresses. Their tiles are not
padded to the card's stride and get no softmax; the result is an `InstanceResult` (the class of
each core pixel's object and the window's `InstanceWindow`). TTA, multi-scale and ensembles
average probabilities and are refused for them (there is no probability map to average).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from schemas.errors import ModelCardError
from schemas.model_card import ModelCard
from workers.options import PredictorOptions
from workers.registry import model_kind
from workers.stitch import (
    InstanceResult,
    SemanticResult,
    SemanticStitcher,
    StitchWindow,
    argmax_classes,
    stitcher_factory,
)
from workers.tileplan import windows_per_pass
from workers.tiles import blend_weights, plan_tiles
from workers.tta import SPATIAL_DIMS, augment, expand_tta, resample, scaled_size

__all__ = ["Member", "Predictor", "PredictorOptions", "argmax_classes", "fold_batchnorm", "memory_format",
           "resolve_autocast_dtype", "resolve_device"]

#: (convolution, batch norm) types that `fold_batchnorm` folds, 2D and 3D.
_FOLDABLE = ((torch.nn.Conv2d, torch.nn.BatchNorm2d), (torch.nn.Conv3d, torch.nn.BatchNorm3d))


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
    """`model` with every eval-mode BatchNorm2d (BatchNorm3d) that directly follows a Conv2d
    (Conv3d) in an nn.Sequential folded into that convolution and replaced by Identity: one pass
    over the activations less per pair, and no BN output to hold. Per output channel o,
    ``w'_o = w_o * gamma_o / sqrt(var_o + eps)`` and
    ``b'_o = (b_o - mean_o) * gamma_o / sqrt(var_o + eps) + beta_o`` (torch's fuse_conv_bn_eval).

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
    """(sequential, conv name, bn name) of each Conv2d (Conv3d) directly followed by a
    BatchNorm2d (BatchNorm3d) with running statistics, both in eval mode (exact types: a
    subclass may change forward)."""
    pairs = []
    for module in model.modules():
        if not isinstance(module, torch.nn.Sequential):
            continue
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if (any(type(conv) is c and type(bn) is b for c, b in _FOLDABLE)
                    and not (conv.training or bn.training) and bn.track_running_stats
                    and bn.running_mean is not None and bn.running_var is not None
                    and conv.out_channels == bn.num_features):
                pairs.append((module, a, b))
    return pairs


def memory_format(*, channels_last: bool, spatial_dims: int = 2) -> torch.memory_format:
    """The memory format a model and its (N, C, *spatial) inputs use (PredictorOptions.channels_last):
    `torch.channels_last` for 2 spatial axes (4-D tensors), `torch.channels_last_3d` for 3
    (5-D tensors), contiguous when not `channels_last`.

    Raises:
        ValueError: channels-last for another number of spatial axes (torch has no such format).
    """
    if not channels_last:
        return torch.contiguous_format
    formats = {2: torch.channels_last, 3: torch.channels_last_3d}
    if spatial_dims not in formats:
        raise ValueError(f"channels-last memory needs 2 or 3 spatial axes, got {spatial_dims}")
    return formats[spatial_dims]


def model_spatial_dims(model: torch.nn.Module) -> int | None:
    """2 or 3 when every 4-D or 5-D parameter and buffer of `model` (convolution weights) has
    the same rank, i.e. the model takes (N, C, H, W) or (N, C, D, H, W) inputs; None when it
    has none (e.g. a parameter-free oracle) or both."""
    ranks = {t.dim() for t in itertools.chain(model.parameters(), model.buffers()) if t.dim() in (4, 5)}
    return ranks.pop() - 2 if len(ranks) == 1 else None


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
        model: maps (N, C, *tile) float32 normalised input to (N, K, *tile) logits, with 2
            spatial axes (h, w) or 3 (d, h, w); windows must have as many.
        card: the model card (bands and normalisation, classes, stride, architecture: its
            output kind picks the stitcher, `workers.stitch.stitcher_factory`).
        options: runtime options.
        extra_members: further ensemble members; every member's probabilities (after its own
            normalisation, TTA and scales) are averaged with the members' weights.

    Raises:
        ValueError: ensemble members disagree on classes or input bands; unknown TTA names;
            TTA, scales other than (1.0,) or ensembles with an instance model.
        ModelCardError: a model whose output kind has no stitcher.
    """

    def __init__(self, model: torch.nn.Module, card: ModelCard, *, options: PredictorOptions = PredictorOptions(),
                 weight: float = 1.0, extra_members: tuple[Member, ...] = ()):
        self.card = card
        self.options = options
        self.device = resolve_device(options.device)
        if options.torch_threads is not None and self.device.type == "cpu":
            torch.set_num_threads(options.torch_threads)
        self.autocast_dtype = resolve_autocast_dtype(options.precision, self.device)
        self.kind = model_kind(card.architecture)
        self._new_stitcher = stitcher_factory(card, device=self.device, instance_options=options.instances)
        if self.kind == "instance":
            refused = [f"{name} {value}" for name, value, off in (
                ("tta", list(options.tta), not options.tta), ("scales", list(options.scales), options.scales == (1.0,)),
                ("ensemble members", [m.card.name for m in extra_members], not extra_members)) if not off]
            if refused:
                raise ValueError(f"model {card.name!r} ({card.architecture}) is an instance model: "
                                 f"{', '.join(refused)} average class probabilities, which instance models do "
                                 "not give; drop them (TTA, multi-scale and ensembles of instances are not built)")
        expand_tta(options.tta, spatial_dims=max(SPATIAL_DIMS))  # unknown names fail here, not per window
        self._tta: dict[int, tuple[str, ...]] = {}
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
        stitcher_factory(card)  # every member's output kind has a stitcher (raises naming the model)
        if model_kind(card.architecture) != self.kind:
            raise ModelCardError(f"ensemble member {card.name!r} ({card.architecture}) is an "
                                 f"{model_kind(card.architecture)} model, {self.card.name!r} a {self.kind} one: "
                                 "ensemble members must give the same kind of output")
        model = member.model.eval()
        if self.options.fold_batchnorm:
            model = fold_batchnorm(model)
        model = model.to(self.device)
        spatial_dims = model_spatial_dims(model)
        if spatial_dims in SPATIAL_DIMS:  # else no 4-D/5-D tensor to reorder (or both kinds)
            model = model.to(memory_format=memory_format(channels_last=self.options.channels_last,
                                                         spatial_dims=spatial_dims))
        # (C,) per band; viewed as (1, C, 1, ...) to broadcast over any number of spatial axes
        mean = torch.tensor([b.mean for b in card.bands], dtype=torch.float32)
        std = torch.tensor([b.std for b in card.bands], dtype=torch.float32)
        clip_lo = clip_hi = None
        if any(b.window is not None for b in card.bands):  # bands without a window: (-inf, inf)
            windows = [(-np.inf, np.inf) if b.window is None else b.window for b in card.bands]
            clip_lo = torch.tensor([w[0] for w in windows], dtype=torch.float32).to(self.device)
            clip_hi = torch.tensor([w[1] for w in windows], dtype=torch.float32).to(self.device)
        # a model over other tiles than its weights' rank says (SliceWise: 2D weights, 3D tiles) tells
        window_dims = getattr(model, "window_spatial_dims", spatial_dims)
        return _PreparedMember(model=model, name=card.name, stride=card.stride, spatial_dims=window_dims,
                               mean=mean.to(self.device), inv_std=(1.0 / std).to(self.device),
                               clip_lo=clip_lo, clip_hi=clip_hi)

    @property
    def num_classes(self) -> int:
        return self.card.num_classes

    def tta_views(self, spatial_dims: int) -> tuple[str, ...]:
        """The TTA transform names run on tiles with `spatial_dims` spatial axes (presets
        expanded per dimension, `workers.tta.expand_tta`); identity first."""
        if spatial_dims not in self._tta:
            self._tta[spatial_dims] = expand_tta(self.options.tta, spatial_dims=spatial_dims)
        return self._tta[spatial_dims]

    def _check_window(self, pixels: np.ndarray, valid: np.ndarray | None) -> int:
        """The number of spatial axes of a (C, *spatial) window, checked against the card's
        bands, the members' models (where their weights tell) and the mask's shape."""
        spatial_dims = pixels.ndim - 1
        if spatial_dims not in SPATIAL_DIMS or pixels.shape[0] != self.card.in_channels:
            raise ValueError(
                f"window must be (C={self.card.in_channels}, H, W) or (C={self.card.in_channels}, D, H, W), "
                f"got shape {pixels.shape}"
            )
        for member in self._members:
            if member.spatial_dims is not None and member.spatial_dims != spatial_dims:
                raise ValueError(
                    f"model {member.name!r} takes {member.spatial_dims}D tiles, got a {spatial_dims}D window "
                    f"of shape {pixels.shape}"
                )
        if valid is not None and tuple(valid.shape) != tuple(pixels.shape[1:]):
            raise ValueError(f"valid mask of shape {valid.shape} does not match the window {pixels.shape[1:]}")
        return spatial_dims

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
        """(N, C, *tile) normalised -> (N, K, *tile) float32 probabilities (logits when not
        `softmax`). Each spatial axis of size s is padded at its end to the next multiple of
        the stride, ``s + (-s) % stride``, by replicating the last plane, and the outputs are
        cropped back to ``tile``."""
        spatial = tuple(tiles.shape[2:])
        pads = [(-s) % member.stride for s in spatial]
        if any(pads):  # F.pad lists (before, after) pairs from the last axis backwards
            tiles = F.pad(tiles, tuple(p for pad in reversed(pads) for p in (0, pad)), mode="replicate")
        tiles = tiles.contiguous(memory_format=memory_format(channels_last=self.options.channels_last,
                                                             spatial_dims=len(spatial)))
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            logits = member.model(tiles)
        logits = logits[(..., *(slice(0, s) for s in spatial))].float()
        return torch.softmax(logits, dim=1) if softmax else logits

    def _member_probabilities(self, member: _PreparedMember, tiles: torch.Tensor) -> torch.Tensor:
        """Average over scales and TTA views of one member's probabilities, at the tile size:
        ``p = mean_{s, T} R_tile(T^-1(model(T(R_s(x)))))`` with R_s the resampling to
        ``round(tile * s)`` (bilinear in 2D, trilinear in 3D) and T the TTA transforms."""
        size = tuple(tiles.shape[2:])
        views = self.tta_views(len(size))
        total: torch.Tensor | None = None
        for scale in self.options.scales:
            scaled = resample(tiles, scaled_size(size, scale)) if scale != 1.0 else tiles
            for name in views:
                forward, inverse = augment(name)
                probs = inverse(self._forward(member, forward(scaled)))
                probs = resample(probs, size) if scale != 1.0 else probs
                total = probs if total is None else total + probs
        n = len(self.options.scales) * len(views)
        return total if n == 1 else total / n

    @property
    def single_pass(self) -> bool:
        """One member, one scale, one view: a tile's labels are the argmax of one forward pass.
        (A TTA list has one view in 3D exactly when it has one in 2D: only the identity.)"""
        return (len(self._members) == 1 and len(self.options.scales) == 1
                and len(self.tta_views(max(SPATIAL_DIMS))) == 1)

    def _normalise(self, member: _PreparedMember, raw: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """(N, C, *tile) raw tiles (any numeric dtype) -> float32 per band
        ``(min(max(raw, lo), hi) - mean) * (1 / std)`` where the card gives the band a clip
        `window` [lo, hi], else ``(raw - mean) * (1 / std)``; 0 where `valid` ((N, 1, *tile),
        bool or 0/1) is False. All in float32 on the device, 2D and 3D alike. A float32 copy,
        then in place (`_forward` makes it channels-last: converting and reordering in one
        copy measured 2x slower on CPU)."""
        x = raw.to(torch.float32, copy=True)
        bands = (1, -1) + (1,) * (raw.ndim - 2)  # broadcast over N and every spatial axis
        if member.clip_lo is not None:  # cards without windows skip this: the same bytes as before
            x.clamp_(min=member.clip_lo.view(bands), max=member.clip_hi.view(bands))
        x.sub_(member.mean.view(bands)).mul_(member.inv_std.view(bands))
        if valid is not None:  # nodata -> 0, i.e. the band mean after normalisation
            x.mul_(valid)
        return x

    def _tile_probabilities(self, raw: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """(N, C, *tile) raw float32 tiles -> (N, K, *tile) ensemble-averaged probabilities."""
        if len(self._members) == 1:
            return self._member_probabilities(self._members[0], self._normalise(self._members[0], raw, valid))
        total: torch.Tensor | None = None
        for member, weight in zip(self._members, self._member_weights):
            probs = self._member_probabilities(member, self._normalise(member, raw, valid)) * weight
            total = probs if total is None else total + probs
        return total

    def _whole_tiles(self, tiles: torch.Tensor, valid: torch.Tensor | None, *, logits_ok: bool) -> torch.Tensor:
        """(N, C, *window) raw windows that are each one model tile -> (N, K, *window)
        probabilities, or logits when `logits_ok` and the predictor makes a single pass (same argmax)."""
        if logits_ok and self.single_pass:
            member = self._members[0]
            return self._forward(member, self._normalise(member, tiles, valid), softmax=False)
        return self._tile_probabilities(tiles, valid)

    def _stitch_window(self, pixels: np.ndarray, valid: np.ndarray | None, window: StitchWindow, *,
                       tile_shape: tuple[int, ...], offsets: list[tuple[int, ...]],
                       logits_ok: bool) -> SemanticStitcher:
        """Run a window's model tiles (planned by `plan_tiles`) and add their outputs to a new
        stitcher of `window`; the caller finalizes it."""
        x = self._to_device(pixels)  # the raw dtype: _normalise converts
        v = None if valid is None else self._to_device(valid).unsqueeze(0)
        stitcher = self._new_stitcher(window)
        if len(offsets) == 1:  # the model takes the whole window: nothing to blend
            stitcher.add(offsets, self._whole_tiles(x.unsqueeze(0), None if v is None else v.unsqueeze(0),
                                                    logits_ok=logits_ok))
            return stitcher
        # tiles are cut and stacked in float32 (uint16 tensors have few kernels, on CUDA fewer)
        x = x.to(torch.float32)
        v = None if v is None else v.to(torch.float32)
        bs = self.options.batch_size
        for start in range(0, len(offsets), bs):
            batch_offsets = offsets[start : start + bs]
            regions = [(slice(None), *(slice(o, o + t) for o, t in zip(offset, tile_shape, strict=True)))
                       for offset in batch_offsets]
            tiles = torch.stack([x[region] for region in regions])
            tile_valid = None if v is None else torch.stack([v[region] for region in regions])
            stitcher.add(batch_offsets, self._tile_probabilities(tiles, tile_valid))
        return stitcher

    def _forward_instances(self, member: _PreparedMember, tiles: torch.Tensor) -> list:
        """(N, C, *tile) normalised tiles -> the instance model's N per-tile outputs (detection
        dicts or LabelImages), at the tile's own size (no stride padding, no resizing here)."""
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            outputs = member.model(tiles)
        if not isinstance(outputs, (list, tuple)) or len(outputs) != tiles.shape[0]:
            raise ValueError(f"instance model {member.name!r} returned {type(outputs).__name__} for "
                             f"{tiles.shape[0]} tiles; expected a list with one output per tile")
        return list(outputs)

    def _instance_window(self, pixels: np.ndarray, valid: np.ndarray | None,
                         core: tuple[slice, ...] | None) -> InstanceResult:
        """An instance model on a halo window: its tiles (one when the window fits the tile
        size) normalised, run `batch_size` at a time, and their detections handed to an
        `InstanceStitcher` with the window's raw pixels (for the objects' band sums)."""
        self._check_window(pixels, valid)
        window_shape = tuple(pixels.shape[1:])
        tile_shape, offsets = plan_tiles(window_shape, self.options.tile_size, self.options.tile_overlap)
        stitcher = self._new_stitcher(StitchWindow(window_shape, core=core, valid=valid, pixels=pixels))
        member = self._members[0]
        x = self._to_device(pixels)
        v = None if valid is None else self._to_device(valid).unsqueeze(0)
        if len(offsets) > 1:  # tiles are cut and stacked in float32, as for semantic models
            x = x.to(torch.float32)
            v = None if v is None else v.to(torch.float32)
        bs = self.options.batch_size
        for start in range(0, len(offsets), bs):
            batch_offsets = offsets[start : start + bs]
            regions = [(slice(None), *(slice(o, o + t) for o, t in zip(offset, tile_shape, strict=True)))
                       for offset in batch_offsets]
            tiles = torch.stack([x[region] for region in regions])
            tile_valid = None if v is None else torch.stack([v[region] for region in regions])
            stitcher.add(batch_offsets, self._forward_instances(member, self._normalise(member, tiles, tile_valid)))
        return stitcher.finalize()

    def _window(self, pixels: np.ndarray, valid: np.ndarray | None, core: tuple[slice, ...] | None,
                with_probabilities: bool, *, logits_ok: bool) -> SemanticStitcher:
        """Check a window, plan its tiles and stitch them (see `_stitch_window`)."""
        self._check_window(pixels, valid)
        window_shape = tuple(pixels.shape[1:])
        tile_shape, offsets = plan_tiles(window_shape, self.options.tile_size, self.options.tile_overlap)
        weights = None if len(offsets) == 1 else self._tile_weights(tile_shape)
        window = StitchWindow(window_shape, core=core, valid=valid, tile_weights=weights,
                              with_probabilities=with_probabilities)
        return self._stitch_window(pixels, valid, window, tile_shape=tile_shape, offsets=offsets,
                                   logits_ok=logits_ok)

    @torch.inference_mode()
    def predict_probabilities(self, pixels: np.ndarray, valid: np.ndarray | None = None, *,
                              logits_ok: bool = False) -> torch.Tensor:
        """Blended class probabilities of a whole window.

        Args:
            pixels: (C, *spatial) raw band values (any numeric dtype), C == card.in_channels,
                spatial (H, W) or (D, H, W) as the model takes.
            valid: spatial bool, False at nodata pixels (fed to the model as the band mean).
            logits_ok: the caller only needs the argmax: when the window is one tile and the
                predictor makes a single pass (`single_pass`), return the logits and skip the
                softmax (same argmax, one pass over K planes less).

        Returns:
            (K, *spatial) float32 probabilities (or logits, see `logits_ok`) on the predictor's
            device: ``sum_t w_t p_t / sum_t w_t`` over the tiles t covering each pixel.

        Raises:
            ValueError: a window of the wrong bands or number of spatial axes; an instance model.
        """
        if self.kind == "instance":
            raise ValueError(f"model {self.card.name!r} is an instance model: it gives no class probabilities")
        return self._window(pixels, valid, None, False, logits_ok=logits_ok).finalize_scores()

    @torch.inference_mode()
    def predict_result(
        self, pixels: np.ndarray, valid: np.ndarray | None = None, *, core: tuple[slice, ...] | None = None,
        with_probabilities: bool = False,
    ) -> SemanticResult | InstanceResult:
        """The result of a window's core in the form of the model's output kind.

        Args: as `predict_core`.

        Returns:
            A `SemanticResult` (labels, probabilities) for a semantic model; an
            `InstanceResult` (labels: the class of each core pixel's object, 0 where none,
            255 at nodata; instances: the window's `InstanceWindow`) for an instance model.
            Both have `labels`, `probabilities` and `instances` (None for semantic models).

        Raises:
            ValueError: a window of the wrong bands or spatial axes; probabilities asked of an
                instance model.
        """
        valid = _none_if_all(valid)
        if self.kind == "instance":
            if with_probabilities:
                raise ValueError(f"model {self.card.name!r} is an instance model: it gives no class probabilities")
            return self._instance_window(pixels, valid, core)
        return self._window(pixels, valid, core, with_probabilities, logits_ok=not with_probabilities).finalize()

    def predict_core(
        self, pixels: np.ndarray, valid: np.ndarray | None = None, *, core: tuple[slice, ...] | None = None,
        with_probabilities: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Class labels (and optionally probabilities) of a window's core.

        Args:
            pixels: (C, *spatial) raw band values, spatial (H, W) or (D, H, W).
            valid: spatial bool or None.
            core: slices of the core inside the window, one per spatial axis (default: the
                whole window).
            with_probabilities: also return (K, *core) float16 probabilities.

        Returns:
            (labels, probs): labels core-shaped uint8 class ids, NODATA_CLASS (255) where
            `valid` is False; probs (K, *core) float16 (NaN at nodata) or None. For an
            instance model the labels are its objects' classes (`predict_result`).
        """
        result = self.predict_result(pixels, valid, core=core, with_probabilities=with_probabilities)
        return result.labels, result.probabilities

    def windows_per_pass(self, window_shape: tuple[int, ...]) -> int:
        """How many windows of `window_shape` `predict_cores` runs in one forward pass:
        batch_size when the whole window is one model tile, else 1 (its tiles are batched);
        1 for instance models (one window at a time)."""
        if self.kind == "instance":
            return 1
        o = self.options
        return windows_per_pass(window_shape, o.tile_size, o.tile_overlap, o.batch_size)

    def predict_cores(
        self, windows: list[tuple[np.ndarray, np.ndarray | None, tuple[slice, ...] | None]], *,
        with_probabilities: bool = False,
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """`predict_core` of several windows, whole windows batched into one forward pass
        (see `predict_results`).

        Returns:
            One (labels, probs) per window, in order (see `predict_core`).
        """
        return [(r.labels, r.probabilities) for r in self.predict_results(windows, with_probabilities=with_probabilities)]

    @torch.inference_mode()
    def predict_results(
        self, windows: list[tuple[np.ndarray, np.ndarray | None, tuple[slice, ...] | None]], *,
        with_probabilities: bool = False,
    ) -> list[SemanticResult | InstanceResult]:
        """`predict_result` of several windows, whole windows batched into one forward pass.

        Windows that are each a single model tile (the window fits the tile, as with the
        bundled model) and share a shape run `windows_per_pass` at a time: on a GPU a forward
        pass per window would leave it mostly idle. Other windows run one by one (their own
        tiles are batched). Results equal `predict_result` window by window.

        Args:
            windows: (pixels (C, *spatial), valid spatial bool or None, core slices or None) each.
            with_probabilities: as in `predict_core`.

        Returns:
            One result per window, in order (see `predict_result`).
        """
        out: list[SemanticResult | InstanceResult | None] = [None] * len(windows)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (pixels, _, _) in enumerate(windows):
            shape = tuple(pixels.shape[1:])
            if pixels.ndim - 1 in SPATIAL_DIMS and self.windows_per_pass(shape) > 1:
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
                     with_probabilities: bool) -> SemanticResult | InstanceResult:
        pixels, valid, core = window
        return self.predict_result(pixels, valid, core=core, with_probabilities=with_probabilities)

    def _predict_stacked(self, windows: list[tuple[np.ndarray, np.ndarray | None, tuple[slice, ...] | None]],
                         with_probabilities: bool) -> list[SemanticResult]:
        """Same-shape single-tile windows as one (N, C, *spatial) batch; each window's output
        goes to its own stitcher (its core and nodata mask)."""
        for pixels, valid, _ in windows:
            self._check_window(pixels, valid)
        x = self._stack_to_device([p for p, _, _ in windows])  # the raw dtype: _normalise converts
        masks = [_none_if_all(v) for _, v, _ in windows]
        v = None
        if any(m is not None for m in masks):
            ones = np.ones(windows[0][0].shape[1:], dtype=bool)
            v = self._stack_to_device([ones if m is None else m for m in masks]).unsqueeze(1)
        probs = self._whole_tiles(x, v, logits_ok=not with_probabilities)
        shape = tuple(windows[0][0].shape[1:])
        origin = (0,) * len(shape)
        results = []
        for i, ((_, _, core), valid) in enumerate(zip(windows, masks)):
            stitcher = self._new_stitcher(StitchWindow(shape, core=core, valid=valid,
                                                       with_probabilities=with_probabilities))
            stitcher.add([origin], probs[i : i + 1])
            results.append(stitcher.finalize())
        return results

    def predict_labels(
        self, pixels: np.ndarray, valid: np.ndarray | None = None, *, core: tuple[slice, ...] | None = None
    ) -> np.ndarray:
        """Core-shaped uint8 class labels of a window's core (see `predict_core`)."""
        return self.predict_core(pixels, valid, core=core)[0]


def _none_if_all(valid: np.ndarray | None) -> np.ndarray | None:
    """None for a mask without nodata: the same result (x * 1, labels kept) without moving,
    converting and applying a window-sized mask (about 7 ms of a 1088² CPU window)."""
    return None if valid is None or bool(valid.all()) else valid


@dataclass(frozen=True)
class _PreparedMember:
    """A member ready to run: model on the device (folded, memory format set), its card's
    name and stride, spatial axes of the tiles it takes (its ``window_spatial_dims`` attribute,
    else what its weights imply; None: unknown), (C,) float32 band
    statistics, and (C,) float32 clip bounds (-inf, inf for bands without a window; None when
    no band has one)."""

    model: torch.nn.Module
    name: str
    stride: int
    spatial_dims: int | None
    mean: torch.Tensor
    inv_std: torch.Tensor
    clip_lo: torch.Tensor | None = None
    clip_hi: torch.Tensor | None = None
