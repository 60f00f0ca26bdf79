"""Mask R-CNN parts for :func:`workers.models.zoo.build_maskrcnn`: backbones and a transform
that keeps images at their native resolution. Imports torchvision (only the builder imports it).

torchvision's :class:`GeneralizedRCNNTransform` resizes every image so its shorter side is
``min_size`` (capped by ``max_size`` on the longer side) and the outputs back. For tiles of a
scene that is wrong twice over: objects change apparent size with the window's shape, and a
window cut at a scene edge is scaled differently from its neighbours. With ``min_size=None``
the builder installs :class:`NativeResolutionTransform`, which normalises and pads (to a
multiple of 32, the FPN's stride) but never resizes, in training as in prediction.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
from torchvision.models.detection.transform import GeneralizedRCNNTransform

#: Backbones of ``build_maskrcnn`` (``backbone`` arch_arg): ResNet-50 FPN (torchvision's own
#: Mask R-CNN), ResNet-18 FPN and MobileNetV3-Large FPN (light, for CPUs).
MASKRCNN_BACKBONES: tuple[str, ...] = ("resnet50", "resnet18", "mobilenet_v3_large")


class NativeResolutionTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform without the resize: images (and training targets)
    keep their size; normalisation and padding to ``size_divisible`` stay. Outputs then come
    back at the input size with a scale of exactly 1 (boxes and masks untouched by resizing)."""

    def resize(self, image: torch.Tensor, target: dict[str, Any] | None = None
               ) -> tuple[torch.Tensor, dict[str, Any] | None]:
        return image, target


def build_maskrcnn_model(num_classes: int, *, backbone: str, min_size: int | None, max_size: int,
                         image_mean: list[float], image_std: list[float], box_score_thresh: float,
                         box_detections_per_img: int, rpn_pre_nms_top_n_test: int = 1000,
                         rpn_post_nms_top_n_test: int = 1000) -> nn.Module:
    """Mask R-CNN with random init on `backbone` (one of :data:`MASKRCNN_BACKBONES`), taking 3
    bands (the caller adapts the first conv); BatchNorm (not frozen) in the backbone, as for
    training from scratch. ``min_size=None``: :class:`NativeResolutionTransform`."""
    if backbone not in MASKRCNN_BACKBONES:
        raise ValueError(f"maskrcnn backbone must be one of {MASKRCNN_BACKBONES}, got {backbone!r}")
    common = dict(num_classes=num_classes, min_size=min_size or 800, max_size=max_size, image_mean=image_mean,
                  image_std=image_std, box_score_thresh=box_score_thresh,
                  box_detections_per_img=box_detections_per_img, rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
                  rpn_post_nms_top_n_test=rpn_post_nms_top_n_test)
    if backbone == "resnet50":
        model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **common)
    elif backbone == "resnet18":
        body = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=nn.BatchNorm2d,
                                   trainable_layers=5)
        model = MaskRCNN(body, **common)
    else:  # torchvision's fasterrcnn_mobilenet_v3_large_fpn: 2 feature maps + pool, 3 anchor sizes each
        body = mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True,
                                  norm_layer=nn.BatchNorm2d, trainable_layers=6)
        anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
        model = MaskRCNN(body, rpn_anchor_generator=anchors, **common)
    if min_size is None:
        model.transform = NativeResolutionTransform(800, max_size, image_mean, image_std)
    return model
