"""Deterministic "oracle" models: known answers for testing the pipeline and benchmarking it.

They are real torch modules with a tiny state (so they load through the same checkpoint path as
trained models), but their output is a fixed function of the input:

* ``ThresholdOracle``: class = number of thresholds below the band mean of the normalised input,
  smoothed over a (2r+1)^2 box ((2r+1)^3 for volumes; r = ``radius``, reflect padding). It
  takes (N, C, H, W) images and (N, C, D, H, W) volumes alike. With radius 0 it is pointwise,
  so tiled + blended output must equal whole-image output exactly; with radius r > 0 a chunk
  is exact when its halo is >= r and the model sees the whole window in one tile.
* ``RampOracle``: two classes whose logit difference is a ramp over the pixel's position *inside
  the tile it is predicted in*, plus the band mean. Where tiles overlap, each tile scores the same
  pixel differently, so the blended label depends on the blend weights: tiled output checks the
  blend itself (a pointwise oracle gives the same argmax whatever the weights).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class ThresholdOracle(torch.nn.Module):
    """Quantises the (box-smoothed) band mean into num_classes classes.

    Args:
        in_channels: input bands.
        num_classes: output classes (K >= 2); K - 1 thresholds, evenly spaced in [-1, 1].
        radius: box filter radius in px (0 = pointwise).
        sharpness: logit scale; large values make the soft-max one-hot (no near-ties).
    """

    def __init__(self, in_channels: int, num_classes: int, *, radius: int = 0, sharpness: float = 50.0):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if radius < 0:
            raise ValueError(f"radius must be >= 0, got {radius}")
        self.radius = radius
        self.sharpness = sharpness
        self.register_buffer("thresholds", torch.linspace(-1.0, 1.0, num_classes - 1))
        self.stride = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) normalised input, spatial (H, W) or (D, H, W) -> (N, K, *spatial) logits."""
        spatial = x.ndim - 2
        if spatial not in (2, 3):
            raise ValueError(f"ThresholdOracle takes (N, C, H, W) or (N, C, D, H, W), got {tuple(x.shape)}")
        v = x.mean(dim=1, keepdim=True)
        if self.radius:
            r = self.radius
            pool = F.avg_pool2d if spatial == 2 else F.avg_pool3d
            v = pool(F.pad(v, (r, r) * spatial, mode="reflect"), 2 * r + 1, stride=1)
        classes = (v > self.thresholds.view(1, -1, *(1,) * spatial)).sum(dim=1)
        one_hot = F.one_hot(classes, num_classes=self.thresholds.numel() + 1).movedim(-1, 1)
        return one_hot.to(x.dtype) * self.sharpness


class RampOracle(torch.nn.Module):
    """Class scores that ramp with the pixel's position inside its tile, plus the band mean.

    For a tile of ``h x w`` px and a pixel at ``(row, col)`` inside it (0-based),
    ``ramp = (row / (h - 1) + col / (w - 1)) / 2`` in ``[0, 1]`` (an axis of size 1 counts 0),
    ``v`` the band mean of the normalised input and ``d = slope * (ramp - 0.5) + gain * v``.
    With ``K - 1`` thresholds ``tau_j = slope * ((j + 1) / K - 0.5)``, ``j = 0 .. K - 2``, the
    logits are ordinal: ``logit_k = sum_{j < k} (d - tau_j)`` (``logit_0 = 0``), so the argmax
    of one tile is the number of thresholds below ``d`` (for ``K = 2``: ``(0, d)``, class 1 where
    ``d > 0``). The output depends on where the tile starts, so a tiled window's labels are
    defined by its tile plan and blend weights (checked in ``tests/integration/test_blend.py``).

    Args:
        in_channels: input bands.
        num_classes: output classes K >= 2.
        slope: logit change of ``d`` from the tile's top-left to its bottom-right corner.
        gain: logit change of ``d`` per unit of the normalised band mean.
    """

    def __init__(self, in_channels: int, num_classes: int, *, slope: float = 8.0, gain: float = 1.0):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        # a tiny state, so that it saves and loads through the checkpoint path like a real model
        self.register_buffer("scale", torch.tensor([float(slope), float(gain)]))
        taus = float(slope) * (torch.arange(1, num_classes, dtype=torch.float32) / num_classes - 0.5)
        # logit_k = k * d - sum_{j < k} tau_j
        self.register_buffer("offsets", torch.cat([torch.zeros(1), torch.cumsum(taus, 0)]))
        self.stride = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) normalised input -> (N, K, H, W) logits."""
        h, w = x.shape[-2:]
        rows = torch.arange(h, dtype=x.dtype, device=x.device) / max(h - 1, 1)
        cols = torch.arange(w, dtype=x.dtype, device=x.device) / max(w - 1, 1)
        ramp = (rows.view(-1, 1) + cols.view(1, -1)) / 2
        slope, gain = self.scale.to(x.dtype)
        d = slope * (ramp - 0.5) + gain * x.mean(dim=1, keepdim=True)  # (N, 1, H, W)
        k = torch.arange(self.offsets.numel(), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return k * d - self.offsets.to(x.dtype).view(1, -1, 1, 1)


def threshold_oracle_numpy(normalised: np.ndarray, num_classes: int) -> np.ndarray:
    """The pointwise (radius 0) oracle on a whole (C, *spatial) normalised image or volume ->
    spatial uint8."""
    thresholds = np.linspace(-1.0, 1.0, num_classes - 1, dtype=np.float32)
    v = normalised.astype(np.float32).mean(axis=0)
    return (v[..., None] > thresholds).sum(axis=-1).astype(np.uint8)


class InstanceOracle(torch.nn.Module):
    """An instance "model" with known answers: the connected components of
    ``x[0] > threshold`` in each tile (8-connected in 2D, 26-connected in 3D: every
    neighbour sharing a corner), numbered in raster order as ``skimage.measure.label`` (and
    ``scipy.ndimage.label``) number them; ``x`` is the tile after the card's normalisation
    (with mean 0 and std 1 the raw values).

    With ``given_labels``, channel 0 is a label image instead (rounded to ints; > 0 is an
    object): each id present in the tile is one object, renumbered 1..k within the tile in raster
    order of its first pixel, so tiles share no ids and touching objects with different ids stay
    apart (e.g. real instance annotations, which a real model would predict per tile).

    Every object scores 1.0. Its class is 1, or with ``class_channel`` set, the largest value
    of that channel over the object's pixels rounded to an int, which must lie in
    ``1 .. num_classes - 1``. An object larger than the tile is labelled as far as the tile
    sees it.

    Args:
        in_channels: input bands.
        num_classes: classes including the background (>= 2).
        threshold: foreground where channel 0 exceeds it.
        class_channel: band carrying each object's class, or None (class 1).
        given_labels: channel 0 holds the ids (above), not a foreground to label.

    Returns (forward): one :class:`workers.stitch.LabelImage` per tile.
    """

    def __init__(self, in_channels: int, num_classes: int, *, threshold: float = 0.5,
                 class_channel: int | None = None, given_labels: bool = False):
        super().__init__()
        if not isinstance(given_labels, bool):
            raise ValueError(f"given_labels must be true or false, got {given_labels!r}")
        self.given_labels = given_labels
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background, so must be >= 2, got {num_classes}")
        if class_channel is not None and not (isinstance(class_channel, int) and 0 <= class_channel < in_channels):
            raise ValueError(f"class_channel must be a band index in 0..{in_channels - 1} or None, got {class_channel!r}")
        self.class_channel = class_channel
        self.num_classes = num_classes
        # a tiny state, so that it saves and loads through the checkpoint path like a real model
        self.register_buffer("threshold", torch.tensor([float(threshold)]))

    def forward(self, x: torch.Tensor) -> list:
        """(N, C, *spatial) normalised tiles, spatial (H, W) or (D, H, W) -> N label images."""
        from scipy import ndimage

        from schemas.instances import LabelImage

        if x.ndim not in (4, 5):
            raise ValueError(f"InstanceOracle takes (N, C, H, W) or (N, C, D, H, W), got {tuple(x.shape)}")
        array = x.detach().to(device="cpu", dtype=torch.float32).numpy()
        structure = np.ones((3,) * (x.ndim - 2), dtype=bool)
        out = []
        for tile in array:
            if self.given_labels:
                ids, n = _renumbered(np.rint(tile[0]).astype(np.int64))
            else:
                ids, n = ndimage.label(tile[0] > float(self.threshold), structure=structure)
            classes = None
            if self.class_channel is not None and n:
                top = ndimage.maximum(tile[self.class_channel], labels=ids, index=np.arange(1, n + 1))
                classes = np.rint(np.asarray(top)).astype(np.int64)
                if classes.min() < 1 or classes.max() >= self.num_classes:
                    raise ValueError(f"InstanceOracle: class channel {self.class_channel} gives classes "
                                     f"{sorted(set(classes.tolist()))}, outside 1..{self.num_classes - 1}")
            out.append(LabelImage(ids.astype(np.int32), classes=classes))
        return out


def _renumbered(given: np.ndarray) -> tuple[np.ndarray, int]:
    """A label image's ids > 0 renumbered 1..k in raster order of each id's first pixel."""
    flat = given.ravel()
    fg = np.flatnonzero(flat > 0)
    if not fg.size:
        return np.zeros(given.shape, dtype=np.int64), 0
    present, first = np.unique(flat[fg], return_index=True)
    rank = np.empty(len(present), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(1, len(present) + 1)
    out = np.zeros(flat.shape, dtype=np.int64)
    out[fg] = rank[np.searchsorted(present, flat[fg])]
    return out.reshape(given.shape), len(present)
