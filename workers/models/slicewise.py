"""A 2D model run over volume tiles slice by slice, optionally 2.5D (neighbouring slices as channels).

``SliceWise(model2d, axis=a, context=c)`` takes ``(N, C, D, H, W)`` tiles and returns
``(N, K, D, H, W)`` logits: spatial axis ``a`` (0, 1, 2 of ``(D, H, W)``) is folded into the batch,
so the 2D model sees ``N * S`` images (S the tile's size along ``a``), each of the other two
spatial axes in their order. With ``c > 0`` slice ``s`` is fed with slices ``s - c .. s + c`` as
channels, ``(2c + 1) * C`` in all, ordered by offset, the C bands within each offset
(``channel = (offset + c) * C + band``). Inside a tile, slices beyond its first and last are the
edge slice repeated (replicate padding): a tile knows nothing of the volume around it.

What that means in a job: the predictor cuts tiles out of a chunk's halo window and blends their
outputs. Where a tile spans the window along the slice axis (tile_size >= the window's side, the
usual case: a 2D card's tile is larger than a volume chunk plus its halo), only the window's first
and last ``c`` slices see repeated neighbours, and they lie in the halo (the job refuses
``halo < context``), so every output slice sees its real neighbours; at the volume's first and
last slice the reader's reflect padding supplies them (slice -1 is slice 1). Where tiles split the
slice axis, a slice within ``c`` of a tile's face sees repeated neighbours in that tile, and its
label is the blend of that tile's prediction with the overlapping tiles' (down-weighted by the
Gaussian blend near tile faces, but not exact).

The predictor's other options act on the 3D tiles: the card's stride pads every tile axis, the
slice axis too (repeated end slices, cropped away: waste, not a change); a TTA flip of the slice
axis reverses the order of the neighbour channels the 2D model sees; multi-scale inference
resamples the slice axis as well (fewer or more slices).
"""

from __future__ import annotations

import torch


class SliceWise(torch.nn.Module):
    """Wraps a 2D model ``(M, C', A, B) -> (M, K, A, B)`` to take ``(N, C, D, H, W)`` volume tiles.

    Args:
        model2d: the 2D model; it takes ``C' = C * (2 * context + 1)`` channels.
        axis: the spatial axis of the tile (0: D, 1: H, 2: W) slices are cut across.
        context: neighbouring slices on each side stacked as channels (0: plain 2D).

    Attributes:
        window_spatial_dims: 3, the spatial axes of the tiles it takes (its weights are 2D; the
            predictor reads this instead of counting the weights' axes).
    """

    window_spatial_dims = 3

    def __init__(self, model2d: torch.nn.Module, *, axis: int = 0, context: int = 0):
        super().__init__()
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be a spatial axis 0, 1 or 2 of (D, H, W), got {axis!r}")
        if context < 0:
            raise ValueError(f"context must be >= 0 slices, got {context}")
        self.model2d = model2d
        self.axis = axis
        self.context = context

    def stack_context(self, slices: torch.Tensor) -> torch.Tensor:
        """(N, S, C, A, B) slices -> (N, S, (2c + 1) * C, A, B): each slice with its ``c``
        neighbours on each side, by offset -c..c; the first and last slice repeated beyond the ends."""
        c = self.context
        if c == 0:
            return slices
        n, s = slices.shape[:2]
        index = (torch.arange(s, device=slices.device).view(-1, 1)
                 + torch.arange(-c, c + 1, device=slices.device).view(1, -1)).clamp_(0, s - 1)  # (S, 2c+1)
        stacked = slices[:, index.reshape(-1)]  # (N, S * (2c+1), C, A, B)
        return stacked.reshape(n, s, (2 * c + 1) * slices.shape[2], *slices.shape[3:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, D, H, W) -> (N, K, D, H, W) logits of the 2D model, slice by slice."""
        if x.ndim != 5:
            raise ValueError(f"SliceWise takes (N, C, D, H, W) tiles, got shape {tuple(x.shape)}")
        channels_last = x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
        slices = x.movedim(2 + self.axis, 1)  # (N, S, C, A, B)
        slices = self.stack_context(slices)
        n, s = slices.shape[:2]
        images = slices.reshape(n * s, *slices.shape[2:])
        # the predictor hands channels-last 3D tiles when it runs channels-last: keep that for the 2D model
        images = images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        logits = self.model2d(images)  # (N * S, K, A, B)
        return logits.reshape(n, s, *logits.shape[1:]).movedim(1, 2 + self.axis)

