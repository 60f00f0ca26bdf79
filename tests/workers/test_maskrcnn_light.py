"""The light Mask R-CNN (registry ``maskrcnn_light``): 4 bands, trains, never resizes, checks its options."""

from __future__ import annotations

import pytest
import torch

from schemas.errors import ModelCardError
from workers.registry import build_model, model_kind, native_stride


def _target(h: int, w: int) -> dict[str, torch.Tensor]:
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    masks[0, 4:20, 6:30] = 1
    masks[1, 30:50, 30:44] = 1
    return {
        "boxes": torch.tensor([[6.0, 4.0, 30.0, 20.0], [30.0, 30.0, 44.0, 50.0]]),
        "labels": torch.tensor([1, 1]),
        "masks": masks,
    }


def test_four_bands_forward_backward_on_64px():
    torch.manual_seed(0)
    # narrow heads and few proposals keep the step short; the backbone is the default ResNet-18
    model = build_model("maskrcnn_light", in_channels=4, num_classes=2,
                        arch_args={"fpn_channels": 32, "rpn_proposals": 50, "box_batch_size_per_image": 32})
    assert model.backbone.body.conv1.in_channels == 4 and model.backbone.body.layer4[-1].conv2.out_channels == 512
    assert model_kind("maskrcnn_light") == "instance" and native_stride("maskrcnn_light", {}) == 1
    model.train()
    losses = model([torch.randn(4, 64, 64)], [_target(64, 64)])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.backbone.body.conv1.parameters()]
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in grads)


def test_inference_keeps_the_tile_size():
    """No resizing: masks come back at the input's own size, whatever it is."""
    model = build_model("maskrcnn_light", in_channels=3, num_classes=3,
                        arch_args={"box_score_thresh": 0.0, "box_detections_per_img": 5}).eval()
    with torch.no_grad():
        out = model([torch.randn(3, 72, 100)])[0]
    assert set(out) == {"boxes", "labels", "scores", "masks"}
    assert out["masks"].shape[1:] == (1, 72, 100) and len(out["scores"]) <= 5
    images, _ = model.transform([torch.randn(3, 72, 100)])
    assert images.image_sizes == [(72, 100)]


@pytest.mark.parametrize(
    ("arch_args", "message"),
    [
        ({"backbone": "resnet50"}, "backbone must be one of"),
        ({"norm": "layer"}, "norm must be 'group' or 'batch'"),
        ({"fpn_channels": 100}, "multiple of 8"),
        ({"anchor_sizes": [16, 32]}, "anchor_sizes must be 5 positive ints"),
        ({"image_std": [1.0, 0.0, 1.0, 1.0]}, "image_std must hold positive numbers"),
        ({"min_size": 256}, "unexpected keyword argument 'min_size'"),
    ],
)
def test_bad_options_name_the_option(arch_args, message):
    with pytest.raises(ModelCardError, match=message):
        build_model("maskrcnn_light", in_channels=4, num_classes=2, arch_args=arch_args)
