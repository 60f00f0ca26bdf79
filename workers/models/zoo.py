"""Builders of library architectures (torchvision, segmentation-models-pytorch) for the registry.

Every builder has the registry's signature ``builder(in_channels, num_classes, **arch_args)``,
takes its options keyword-only (an unknown option is a ``TypeError``, a bad value a
``ValueError``; the registry turns both into ``ModelCardError``), always builds with random init
(no weights are ever downloaded: torchvision ``weights=None, weights_backbone=None``, smp
``encoder_weights=None``) and imports its library only when called.

Semantic builders return a module mapping ``(N, in_channels, H, W)`` float32 to
``(N, num_classes, H, W)`` float32 logits at the input resolution. ``build_maskrcnn`` returns
torchvision's Mask R-CNN unchanged (an instance model: a list of dicts per image).

Input bands: torchvision models are built for RGB and their first conv is replaced by
:func:`adapt_first_conv`; smp adapts its encoder's first conv itself from ``in_channels``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: torchvision's default Mask R-CNN normalisation (ImageNet RGB statistics, inputs in [0, 1]).
IMAGENET_MEAN_RGB: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB: tuple[float, float, float] = (0.229, 0.224, 0.225)

DEEPLABV3_BACKBONES: tuple[str, ...] = ("resnet50", "resnet101", "mobilenet_v3_large")
SMP_DEFAULT_ENCODER = "resnet18"
#: smp's Unet decoder widths for encoder depth 5; shallower encoders take the last ``depth``.
SMP_UNET_DECODER_CHANNELS: tuple[int, ...] = (256, 128, 64, 32, 16)


class SelectOutput(nn.Module):
    """Returns one entry of a wrapped model's dict output (torchvision segmentation: ``"out"``).

    The wrapped model is the submodule ``model``, so its state-dict keys gain a ``model.``
    prefix.

    Args:
        model: a module whose forward returns a dict of tensors.
        key: the entry to return.
    """

    def __init__(self, model: nn.Module, *, key: str = "out") -> None:
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` input -> the ``key`` entry, ``(N, K, H, W)`` logits."""
        return self.model(x)[self.key]

    def extra_repr(self) -> str:
        return f"key={self.key!r}"


def first_conv(module: nn.Module) -> tuple[str, nn.Conv2d]:
    """The first ``Conv2d`` of ``module`` in registration order, with its dotted name.

    Raises:
        ValueError: ``module`` has no ``Conv2d``.
    """
    for name, child in module.named_modules():
        if isinstance(child, nn.Conv2d):
            return name, child
    raise ValueError(f"{type(module).__name__} has no Conv2d to adapt to the input bands")


def adapt_first_conv(module: nn.Module, in_channels: int, *, reuse_weights: bool = True) -> nn.Conv2d:
    """Replace, in place, the first ``Conv2d`` of ``module`` by one taking ``in_channels`` bands.

    The new conv has the old one's hyper-parameters (out channels, kernel, stride, padding,
    dilation, bias, padding mode, dtype, device). Its weights, of shape
    ``(out, in_channels, kh, kw)``, are either a fresh default init (``reuse_weights=False``, the
    right choice for a randomly initialised model: the init scales with the new fan-in) or derived
    from the old ``(out, c_old, kh, kw)`` filters (``reuse_weights=True``, for pretrained ones):

    * ``in_channels >= c_old``: bands ``0..c_old-1`` keep the old (e.g. RGB) filters and every
      extra band gets their mean over the old bands, ``w_old.mean(dim=1)``;
    * ``in_channels < c_old``: every band gets ``w_old.mean(dim=1) * c_old / in_channels``, so one
      grey band answers as the old conv does to that band copied into all ``c_old`` inputs.

    The bias, if any, is copied. Nothing changes when ``in_channels`` equals ``c_old``.

    Args:
        module: the model (or backbone) whose first conv (in registration order) is the input conv.
        in_channels: number of input bands the new conv takes (>= 1).
        reuse_weights: derive the new weights from the old ones (see above).

    Returns:
        The conv now in place (the old one if nothing changed).

    Raises:
        ValueError: ``in_channels`` < 1, no ``Conv2d``, or a grouped first conv.
    """
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise ValueError(f"in_channels must be an int >= 1, got {in_channels!r}")
    name, old = first_conv(module)
    if old.in_channels == in_channels:
        return old
    if old.groups != 1:
        raise ValueError(
            f"first conv {name!r} of {type(module).__name__} is grouped (groups={old.groups}); "
            "adapt_first_conv handles only groups=1"
        )
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=1,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    if reuse_weights:
        with torch.no_grad():
            c_old = old.in_channels
            mean = old.weight.mean(dim=1, keepdim=True)
            if in_channels >= c_old:
                new.weight[:, :c_old] = old.weight
                new.weight[:, c_old:] = mean
            else:
                new.weight.copy_(mean.expand_as(new.weight) * (c_old / in_channels))
            if old.bias is not None:
                new.bias.copy_(old.bias)
    parent_name, _, child_name = name.rpartition(".")
    setattr(module.get_submodule(parent_name), child_name, new)
    return new


def extend_band_stats(stats: Sequence[float], in_channels: int) -> list[float]:
    """Per-band statistics for ``in_channels`` bands from per-RGB ones (the conv rule above).

    ``in_channels >= len(stats)``: keep them and give every extra band their mean;
    fewer bands: every band gets their mean.
    """
    mean = sum(stats) / len(stats)
    if in_channels >= len(stats):
        return [float(s) for s in stats] + [mean] * (in_channels - len(stats))
    return [mean] * in_channels


# ---------------------------------------------------------------------------- torchvision


def build_fcn_resnet50(in_channels: int, num_classes: int) -> nn.Module:
    """torchvision FCN, ResNet-50 backbone (output stride 8), no aux head; logits out.

    Takes no arch_args. Any input size works (logits are interpolated back to it).
    """
    from torchvision.models.segmentation import fcn_resnet50

    _check_sizes("fcn_resnet50", in_channels, num_classes)
    model = fcn_resnet50(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
    adapt_first_conv(model.backbone, in_channels, reuse_weights=False)
    return SelectOutput(model)


def build_deeplabv3(in_channels: int, num_classes: int, *, backbone: str = "resnet50") -> nn.Module:
    """torchvision DeepLabV3 (ASPP head), no aux head; logits out.

    Args:
        in_channels: input bands.
        num_classes: output classes.
        backbone: one of :data:`DEEPLABV3_BACKBONES` (ResNets at output stride 8, MobileNetV3 16).

    Any input size works (logits are interpolated back to it). Its ASPP image-pooling branch
    has a BatchNorm on a 1x1 map, so training needs batches of more than one tile.
    """
    from torchvision.models import segmentation

    _check_sizes("deeplabv3", in_channels, num_classes)
    if backbone not in DEEPLABV3_BACKBONES:
        raise ValueError(f"deeplabv3 backbone must be one of {DEEPLABV3_BACKBONES}, got {backbone!r}")
    factory = getattr(segmentation, f"deeplabv3_{backbone}")
    model = factory(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
    adapt_first_conv(model.backbone, in_channels, reuse_weights=False)
    return SelectOutput(model)


def build_lraspp(in_channels: int, num_classes: int) -> nn.Module:
    """torchvision LR-ASPP, MobileNetV3-Large backbone: the light CPU model; logits out.

    Takes no arch_args. Any input size works (logits are interpolated back to it).
    """
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    _check_sizes("lraspp", in_channels, num_classes)
    model = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes)
    adapt_first_conv(model.backbone, in_channels, reuse_weights=False)
    return SelectOutput(model)


def build_maskrcnn(
    in_channels: int,
    num_classes: int,
    *,
    backbone: str = "resnet50",
    min_size: int | None = 800,
    max_size: int = 1333,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    box_score_thresh: float = 0.05,
    box_detections_per_img: int = 100,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_test: int = 1000,
) -> nn.Module:
    """torchvision Mask R-CNN with an FPN backbone: an INSTANCE model, returned unchanged.

    In eval mode ``model(x)`` with ``x`` ``(N, C, H, W)`` (or a list of ``(C, H, W)``) returns one
    dict per image: ``boxes`` ``(D, 4)`` float32 ``(x1, y1, x2, y2)`` px, ``labels`` ``(D,)`` int64,
    ``scores`` ``(D,)`` float32, ``masks`` ``(D, 1, H, W)`` float32 probabilities at input size.

    Args:
        in_channels: input bands.
        num_classes: classes INCLUDING background (id 0), as torchvision counts them (>= 2).
        backbone: ``"resnet50"`` (torchvision's ``maskrcnn_resnet50_fpn``), ``"resnet18"`` or
            ``"mobilenet_v3_large"`` (light backbones for CPUs), see
            :data:`workers.models.detection.MASKRCNN_BACKBONES`.
        min_size: the shorter image side is resized to this (px; torchvision default 800);
            None: never resize (:class:`workers.models.detection.NativeResolutionTransform`),
            the setting for tiles of a scene: training crops and prediction windows keep the
            scene's ground resolution whatever their shape.
        max_size: cap on the longer side after resizing (px; unused with ``min_size=None``).
        image_mean: per-band mean subtracted inside the model (``in_channels`` values); default:
            ImageNet RGB means extended by :func:`extend_band_stats`. Use zeros (and ``image_std``
            ones) for inputs already normalised by the model card (the predictor always
            applies the card's band normalisation first).
        image_std: per-band std (``in_channels`` positive values); default as ``image_mean``.
        box_score_thresh: detections scoring below this are dropped.
        box_detections_per_img: at most this many detections per image.
        rpn_pre_nms_top_n_test: region proposals per feature map kept before the RPN's NMS
            in eval mode (torchvision's name and default).
        rpn_post_nms_top_n_test: proposals per image after it, each run through the box head
            in eval mode. On CPU the heads dominate (README, "Instance models": ResNet-18 FPN,
            96 x 112 window, 1 thread: 2.1-2.8 s with 1000 proposals and 20 detections, 0.7-0.9 s
            with 50 and 4; the mask head's cost grows with ``box_detections_per_img``).
    """
    from workers.models.detection import build_maskrcnn_model

    _check_sizes("maskrcnn", in_channels, num_classes)
    if num_classes < 2:
        raise ValueError(f"maskrcnn num_classes counts background (id 0), so must be >= 2, got {num_classes}")
    if min_size is not None:
        _check_int("maskrcnn", "min_size", min_size, minimum=1)
    for name, value in (("max_size", max_size), ("box_detections_per_img", box_detections_per_img),
                        ("rpn_pre_nms_top_n_test", rpn_pre_nms_top_n_test),
                        ("rpn_post_nms_top_n_test", rpn_post_nms_top_n_test)):
        _check_int("maskrcnn", name, value, minimum=1)
    mean = _band_stats("image_mean", image_mean, IMAGENET_MEAN_RGB, in_channels, positive=False)
    std = _band_stats("image_std", image_std, IMAGENET_STD_RGB, in_channels, positive=True)
    model = build_maskrcnn_model(num_classes, backbone=backbone, min_size=min_size, max_size=max_size,
                                 image_mean=mean, image_std=std, box_score_thresh=float(box_score_thresh),
                                 box_detections_per_img=box_detections_per_img,
                                 rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
                                 rpn_post_nms_top_n_test=rpn_post_nms_top_n_test)
    adapt_first_conv(model.backbone.body, in_channels, reuse_weights=False)
    return model


#: Backbones :func:`build_maskrcnn_light` takes (torchvision ResNets, random init).
MASKRCNN_LIGHT_BACKBONES: tuple[str, ...] = ("resnet18", "resnet34")
#: Its default anchor sides per FPN level P2..P6 (px): half torchvision's, for objects of 10-100 px.
MASKRCNN_LIGHT_ANCHOR_SIZES: tuple[int, ...] = (16, 32, 64, 128, 256)


def build_maskrcnn_light(
    in_channels: int,
    num_classes: int,
    *,
    backbone: str = "resnet18",
    fpn_channels: int = 128,
    norm: str = "group",
    anchor_sizes: Sequence[int] = MASKRCNN_LIGHT_ANCHOR_SIZES,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    box_score_thresh: float = 0.05,
    box_detections_per_img: int = 100,
    rpn_batch_size_per_image: int = 128,
    box_batch_size_per_image: int = 128,
    rpn_proposals: int = 300,
    mask_head_channels: int = 64,
    mask_head_layers: int = 2,
) -> nn.Module:
    """A light torchvision Mask R-CNN (ResNet-18/34 FPN, narrow heads) that trains on CPU: INSTANCE.

    Same outputs as :func:`build_maskrcnn` (one dict per image: ``boxes`` ``(D, 4)`` float32
    ``(x1, y1, x2, y2)`` px, ``labels`` ``(D,)`` int64, ``scores`` ``(D,)`` float32, ``masks``
    ``(D, 1, H, W)`` float32 probabilities). Unlike ``maskrcnn`` with ``backbone="resnet18"``
    (BatchNorm, torchvision's 256-wide heads), it is built for small CPU budgets and tiles of
    synthetic or aerial imagery:

    * the backbone is a random-init torchvision ResNet (``backbone``) whose first conv takes
      ``in_channels`` bands, all layers trainable, with GroupNorm (``norm="group"``, 32 groups or
      fewer; behaves the same in train and eval mode, so short from-scratch training needs no
      running-statistics warm-up) or BatchNorm (``norm="batch"``);
    * FPN and box head (two FC layers ``4 * fpn_channels`` wide) are ``fpn_channels`` wide
      instead of 256/1024, the mask head has ``mask_head_layers`` 3x3 convs of
      ``mask_head_channels`` instead of four of 256 (the default head is ~60x cheaper: on 2 CPU
      cores torchvision's mask head cost more than the whole ResNet-18), and the RPN keeps
      ``rpn_proposals`` proposals per image after NMS (``2 * rpn_proposals`` before) instead of
      2000/1000 (train/test);
    * images are NEVER resized (:class:`workers.models.detection.NativeResolutionTransform`, as
      ``maskrcnn`` with ``min_size=None``): a tile of any size is predicted at its own resolution;
    * inputs are expected normalised by the model card, so ``image_mean`` defaults to zeros and
      ``image_std`` to ones.

    Args:
        in_channels: input bands.
        num_classes: classes INCLUDING background (id 0), as torchvision counts them (>= 2).
        backbone: one of :data:`MASKRCNN_LIGHT_BACKBONES`.
        fpn_channels: FPN and head width (8..256, a multiple of 8).
        norm: ``"group"`` or ``"batch"`` normalisation in the backbone.
        anchor_sizes: anchor side (px) per FPN level P2, P3, P4, P5, pool (5 ints), aspect
            ratios 0.5, 1, 2.
        image_mean: per-band mean subtracted inside the model (``in_channels`` values); default 0.
        image_std: per-band std (``in_channels`` positive values); default 1.
        box_score_thresh: detections scoring below this are dropped.
        box_detections_per_img: at most this many detections per image.
        rpn_batch_size_per_image: anchors sampled per image for the RPN loss (torchvision: 256).
        box_batch_size_per_image: proposals sampled per image for the box and mask losses
            (torchvision: 512).
        rpn_proposals: proposals kept per image after the RPN's NMS, in training and inference
            (an upper bound on the objects a tile can hold).
        mask_head_channels: width of the mask head's convs (and its upsampling layer).
        mask_head_layers: 3x3 convs in the mask head (>= 1).
    """
    from torchvision.models import resnet
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import AnchorGenerator
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    from workers.models.detection import NativeResolutionTransform

    arch = "maskrcnn_light"
    _check_sizes(arch, in_channels, num_classes)
    if num_classes < 2:
        raise ValueError(f"{arch} num_classes counts background (id 0), so must be >= 2, got {num_classes}")
    if backbone not in MASKRCNN_LIGHT_BACKBONES:
        raise ValueError(f"{arch} backbone must be one of {MASKRCNN_LIGHT_BACKBONES}, got {backbone!r}")
    if norm not in ("group", "batch"):
        raise ValueError(f"{arch} norm must be 'group' or 'batch', got {norm!r}")
    _check_int(arch, "fpn_channels", fpn_channels, minimum=8, maximum=256)
    if fpn_channels % 8:
        raise ValueError(f"{arch} fpn_channels must be a multiple of 8, got {fpn_channels}")
    for name, value in (("box_detections_per_img", box_detections_per_img),
                        ("rpn_batch_size_per_image", rpn_batch_size_per_image),
                        ("box_batch_size_per_image", box_batch_size_per_image),
                        ("rpn_proposals", rpn_proposals), ("mask_head_channels", mask_head_channels),
                        ("mask_head_layers", mask_head_layers)):
        _check_int(arch, name, value, minimum=1)
    sizes = list(anchor_sizes) if isinstance(anchor_sizes, Sequence) and not isinstance(anchor_sizes, str) else None
    if sizes is None or len(sizes) != 5 or any(not isinstance(a, int) or isinstance(a, bool) or a < 1 for a in sizes):
        raise ValueError(f"{arch} anchor_sizes must be 5 positive ints (P2..P6, px), got {anchor_sizes!r}")
    mean = _band_stats("image_mean", image_mean, (0.0,), in_channels, positive=False)
    std = _band_stats("image_std", image_std, (1.0,), in_channels, positive=True)

    def group_norm(channels: int) -> nn.GroupNorm:
        return nn.GroupNorm(min(32, channels // 4), channels)

    norm_layer = group_norm if norm == "group" else nn.BatchNorm2d
    body = getattr(resnet, backbone)(weights=None, norm_layer=norm_layer)
    adapt_first_conv(body, in_channels, reuse_weights=False)
    widths = [body.layer1[-1].conv2.out_channels * (2**i) for i in range(4)]  # 64, 128, 256, 512
    features = BackboneWithFPN(
        body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}, widths, fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    head_width = 4 * fpn_channels
    model = MaskRCNN(
        features,
        num_classes=None,
        image_mean=mean,
        image_std=std,
        rpn_anchor_generator=AnchorGenerator(tuple((a,) for a in sizes), ((0.5, 1.0, 2.0),) * 5),
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        rpn_pre_nms_top_n_train=2 * rpn_proposals,
        rpn_post_nms_top_n_train=rpn_proposals,
        rpn_pre_nms_top_n_test=2 * rpn_proposals,
        rpn_post_nms_top_n_test=rpn_proposals,
        box_head=TwoMLPHead(fpn_channels * 7 * 7, head_width),
        box_predictor=FastRCNNPredictor(head_width, num_classes),
        box_score_thresh=float(box_score_thresh),
        box_detections_per_img=box_detections_per_img,
        box_batch_size_per_image=box_batch_size_per_image,
        mask_head=MaskRCNNHeads(fpn_channels, (mask_head_channels,) * mask_head_layers, 1),
        mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes),
    )
    base = model.transform
    model.transform = NativeResolutionTransform(base.min_size, base.max_size, base.image_mean, base.image_std)
    return model


# ---------------------------------------------------------------------------- smp


def build_smp_deeplabv3plus(
    in_channels: int,
    num_classes: int,
    *,
    encoder: str = SMP_DEFAULT_ENCODER,
    encoder_output_stride: int = 16,
    decoder_channels: int = 256,
) -> nn.Module:
    """smp DeepLabV3+ (5-level encoder, dilated to ``encoder_output_stride``); logits out.

    Its ASPP image-pooling branch has a BatchNorm on a 1x1 map, so training needs batches of
    more than one tile.

    Args:
        in_channels: input bands.
        num_classes: output classes.
        encoder: smp encoder name (``resnet18``, ``resnet34``, ``efficientnet-b0``, ...) or
            ``tu-<timm model>``.
        encoder_output_stride: 16 or 8; input H and W must be multiples of it.
        decoder_channels: ASPP / decoder width.
    """
    import segmentation_models_pytorch as smp

    _check_sizes("deeplabv3plus", in_channels, num_classes)
    _check_encoder("deeplabv3plus", encoder)
    if encoder_output_stride not in (8, 16):
        raise ValueError(f"deeplabv3plus encoder_output_stride must be 8 or 16, got {encoder_output_stride!r}")
    _check_int("deeplabv3plus", "decoder_channels", decoder_channels, minimum=1)
    return smp.DeepLabV3Plus(
        encoder_name=encoder,
        encoder_weights=None,
        encoder_output_stride=encoder_output_stride,
        decoder_channels=decoder_channels,
        in_channels=in_channels,
        classes=num_classes,
    )


def build_smp_pspnet(
    in_channels: int,
    num_classes: int,
    *,
    encoder: str = SMP_DEFAULT_ENCODER,
    encoder_depth: int = 3,
    psp_out_channels: int = 512,
) -> nn.Module:
    """smp PSPNet (pyramid pooling on the ``encoder_depth``-th encoder level); logits out.

    The final upsampling is set to ``2**encoder_depth`` so the logits come back at input size
    (smp's own default, 8, fits only depth 3). Input H and W must be multiples of
    ``2**encoder_depth``.

    Args:
        in_channels: input bands.
        num_classes: output classes.
        encoder: smp encoder name or ``tu-<timm model>``.
        encoder_depth: encoder levels used, 1..5.
        psp_out_channels: width of the pyramid pooling output.
    """
    import segmentation_models_pytorch as smp

    _check_sizes("pspnet", in_channels, num_classes)
    _check_encoder("pspnet", encoder)
    _check_int("pspnet", "encoder_depth", encoder_depth, minimum=1, maximum=5)
    _check_int("pspnet", "psp_out_channels", psp_out_channels, minimum=1)
    return smp.PSPNet(
        encoder_name=encoder,
        encoder_weights=None,
        encoder_depth=encoder_depth,
        psp_out_channels=psp_out_channels,
        upsampling=2**encoder_depth,
        in_channels=in_channels,
        classes=num_classes,
    )


def build_smp_unet(
    in_channels: int,
    num_classes: int,
    *,
    encoder: str = SMP_DEFAULT_ENCODER,
    encoder_depth: int = 5,
    decoder_channels: Sequence[int] | None = None,
) -> nn.Module:
    """smp U-Net; logits out.

    Args:
        in_channels: input bands.
        num_classes: output classes.
        encoder: smp encoder name or ``tu-<timm model>``.
        encoder_depth: encoder levels, 3..5; input H and W should be multiples of
            ``2**encoder_depth`` (smp 0.6 runs on other sizes by resizing skips, but tiles then
            lose exact pyramid alignment).
        decoder_channels: one width per decoder stage (``encoder_depth`` values); default the
            last ``encoder_depth`` of :data:`SMP_UNET_DECODER_CHANNELS`.
    """
    import segmentation_models_pytorch as smp

    _check_sizes("unet_smp", in_channels, num_classes)
    _check_encoder("unet_smp", encoder)
    _check_int("unet_smp", "encoder_depth", encoder_depth, minimum=3, maximum=5)
    if decoder_channels is None:
        decoder_channels = SMP_UNET_DECODER_CHANNELS[len(SMP_UNET_DECODER_CHANNELS) - encoder_depth:]
    decoder_channels = tuple(decoder_channels)
    if len(decoder_channels) != encoder_depth:
        raise ValueError(
            f"unet_smp decoder_channels needs {encoder_depth} widths (one per encoder level), "
            f"got {list(decoder_channels)}"
        )
    for width in decoder_channels:
        _check_int("unet_smp", "decoder_channels", width, minimum=1)
    return smp.Unet(
        encoder_name=encoder,
        encoder_weights=None,
        encoder_depth=encoder_depth,
        decoder_channels=decoder_channels,
        in_channels=in_channels,
        classes=num_classes,
    )


# ---------------------------------------------------------------------------- checks


def _check_int(arch: str, name: str, value: object, *, minimum: int, maximum: int | None = None) -> None:
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bound = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise ValueError(f"{arch} {name} must be an int {bound}, got {value!r}")


def _check_sizes(arch: str, in_channels: int, num_classes: int) -> None:
    _check_int(arch, "in_channels", in_channels, minimum=1)
    _check_int(arch, "num_classes", num_classes, minimum=1)


def _check_encoder(arch: str, encoder: object) -> None:
    """smp raises a KeyError with 70+ names for a bad encoder; say it once, with the fix."""
    if not isinstance(encoder, str):
        raise ValueError(f"{arch} encoder must be a string, got {encoder!r}")
    if encoder.startswith("tu-"):
        import timm

        if not timm.is_model(encoder[3:]):
            raise ValueError(f"{arch} encoder {encoder!r}: {encoder[3:]!r} is not a timm model name")
        return
    from segmentation_models_pytorch.encoders import get_encoder_names

    names = get_encoder_names()
    if encoder not in names:
        examples = ", ".join(n for n in names if n.startswith(("resnet", "efficientnet-b0", "mobilenet")))
        raise ValueError(
            f"{arch} encoder {encoder!r} is not an smp encoder; use one of "
            "segmentation_models_pytorch.encoders.get_encoder_names() "
            f"(e.g. {examples}) or 'tu-<timm model>'"
        )


def _band_stats(
    name: str, values: Sequence[float] | None, rgb: Sequence[float], in_channels: int, *, positive: bool
) -> list[float]:
    if values is None:
        return extend_band_stats(rgb, in_channels)
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != in_channels:
        raise ValueError(f"maskrcnn {name} must list {in_channels} numbers (one per band), got {values!r}")
    out = []
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or (positive and v <= 0):
            kind = "positive numbers" if positive else "numbers"
            raise ValueError(f"maskrcnn {name} must hold {kind}, got {values!r}")
        out.append(float(v))
    return out
