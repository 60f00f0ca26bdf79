"""Predictor options: a plain dataclass without torch, so the driver can build them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceOptions:
    """How an instance model's detections become objects (`workers.stitch.InstanceStitcher`).

    Attributes:
        score_threshold: detections scoring below this are dropped, in [0, 1].
        mask_threshold: a soft mask's pixel belongs to the object where its value exceeds this.
        iou_threshold: of two detections whose masks overlap with an IoU above this (e.g. one
            object seen by two overlapping tiles), only the higher-scoring one is kept.
        min_pixels: objects left with fewer pixels in the window (after higher-scoring objects
            took theirs) are dropped.
    """

    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    iou_threshold: float = 0.5
    min_pixels: int = 1

    def __post_init__(self) -> None:
        for name in ("score_threshold", "mask_threshold", "iou_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if isinstance(self.min_pixels, bool) or not isinstance(self.min_pixels, int) or self.min_pixels < 1:
            raise ValueError(f"min_pixels must be an int >= 1, got {self.min_pixels!r}")


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
        instances: thresholds of instance models (`InstanceOptions`); unused by semantic ones.
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
    instances: InstanceOptions = InstanceOptions()

