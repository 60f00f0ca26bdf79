"""Predictor options: a plain dataclass without torch, so the driver can build them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PredictorOptions:
    """How the predictor runs (all keyword, all with working defaults).

    Attributes:
        device: "cpu", "cuda", "cuda:1", or "auto" (cuda when available).
        precision: "auto" (bf16 on GPUs that support it, else fp16; fp32 on CPU), "fp32",
            "bf16" (GPU or CPU), "fp16" (GPU only). Autocast only; blending always accumulates in float32.
        batch_size: model tiles per forward pass.
        tile_size: model tile side in px (voxels for volumes), the same on every spatial axis
            (clipped to the window).
        tile_overlap: fraction of the tile side shared by neighbouring tiles, in [0, 1).
        blend: "gaussian" or "constant".
        torch_threads: intra-op threads on CPU (None: leave torch's setting).
        tta: test-time augmentations (names or presets of `workers.tta`; presets expand per
            number of spatial axes, e.g. "flips" flips each of the 2 or 3 axes); probabilities
            of every augmented view are mapped back and averaged. () = none.
        scales: input scale factors; probabilities are resampled back to the tile (bilinear
            in 2D, trilinear in 3D) and averaged.
        channels_last: run the model on channels-last tensors (NHWC in 2D, NDHWC in 3D), on
            CPU as on GPU: oneDNN's and cuDNN's convolutions take them without reordering.
            Measured on CPU (bundled U-Net, 1088-px tile, 1 thread): 1.5x faster. Outputs
            differ from NCHW only by float rounding (about 1e-5). Not measured for 3D models.
        fold_batchnorm: fold each BatchNorm2d (BatchNorm3d) that directly follows a Conv2d
            (Conv3d) in an nn.Sequential into the convolution
            (`workers.predictor.fold_batchnorm`): measured 14 % faster on CPU for the bundled
            U-Net; outputs differ by float rounding only.
    """

    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 2
    tile_size: int = 512
    tile_overlap: float = 0.25
    blend: str = "gaussian"
    torch_threads: int | None = None
    tta: tuple[str, ...] = ()
    scales: tuple[float, ...] = (1.0,)
    channels_last: bool = True
    fold_batchnorm: bool = True
