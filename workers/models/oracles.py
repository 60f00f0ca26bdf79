"""Deterministic "oracle" models: known answers for testing the pipeline and benchmarking it.

They are real torch modules with a tiny state (so they load through the same checkpoint path as
trained models), but their output is a fixed function of the input:

* ``ThresholdOracle``: class = number of thresholds below the band mean of the normalised input,
  smoothed over a (2r+1)^2 box ((2r+1)^3 for volumes; r = ``radius``, reflect padding). It
  takes (N, C, H, W) images and (N, C, D, H, W) volumes alike. With radius 0 it is pointwise,
  so tiled + blended output must equal whole-image output exactly; with radius r > 0 a chunk
  is exact when its halo is >= r and the model sees the whole window in one tile.
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


def threshold_oracle_numpy(normalised: np.ndarray, num_classes: int) -> np.ndarray:
    """The pointwise (radius 0) oracle on a whole (C, *spatial) normalised image or volume ->
    spatial uint8."""
    thresholds = np.linspace(-1.0, 1.0, num_classes - 1, dtype=np.float32)
    v = normalised.astype(np.float32).mean(axis=0)
    return (v[..., None] > thresholds).sum(axis=-1).astype(np.uint8)
