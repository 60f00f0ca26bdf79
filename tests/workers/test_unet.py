"""Tests of the U-Net (workers.models.unet)."""

from __future__ import annotations

import pytest
import torch

from workers.models.unet import UNet


@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
@pytest.mark.parametrize(("depth", "size"), [(2, (32, 48)), (3, (64, 40)), (4, (64, 64))])
def test_output_has_input_size(upsample: str, depth: int, size: tuple[int, int]) -> None:
    model = UNet(4, 5, base_channels=4, depth=depth, upsample=upsample).eval()
    with torch.inference_mode():
        out = model(torch.randn(2, 4, *size))
    assert out.shape == (2, 5, *size)
    assert out.dtype == torch.float32
    assert model.stride == 2**depth


@pytest.mark.parametrize("size", [(30, 32), (32, 36), (8, 8)])
def test_sizes_not_divisible_by_the_stride_are_rejected(size: tuple[int, int]) -> None:
    model = UNet(3, 2, base_channels=4, depth=4)
    with pytest.raises(ValueError, match=r"multiples of 16.*\(1, 3, " + str(size[0])):
        model(torch.zeros(1, 3, *size))


def test_wrong_channel_count_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"\(N, 4, H, W\).*\(1, 3, 32, 32\)"):
        UNet(4, 2, base_channels=4, depth=2)(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"depth": 0}, "depth"), ({"base_channels": 0}, "base_channels"), ({"upsample": "nearest"}, "upsample")],
)
def test_bad_arguments_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UNet(4, 5, **kwargs)


def test_parameter_count_matches_the_architecture() -> None:
    # Classic U-Net at base 64, depth 4 has ~31 M parameters; it scales with base**2.
    big = sum(p.numel() for p in UNet(3, 2, base_channels=64, depth=4).parameters())
    assert 29e6 < big < 33e6
    small = sum(p.numel() for p in UNet(3, 2, base_channels=16, depth=4).parameters())
    assert small == pytest.approx(big / 16, rel=0.02)
    bilinear = sum(p.numel() for p in UNet(3, 2, base_channels=16, depth=4, upsample="bilinear").parameters())
    assert bilinear < small  # 1x1 convs instead of 2x2 transposed convs


def test_eval_is_deterministic_and_batch_independent() -> None:
    torch.manual_seed(0)
    model = UNet(4, 5, base_channels=8, depth=3).eval()
    x = torch.randn(3, 4, 64, 64)
    with torch.inference_mode():
        first = model(x)
        second = model(x)
        alone = model(x[1:2])
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first[1:2], alone, rtol=1e-5, atol=1e-5)


def test_trains_on_a_toy_problem() -> None:
    torch.manual_seed(0)
    model = UNet(1, 2, base_channels=4, depth=2)
    x = torch.randn(4, 1, 32, 32)
    y = (x[:, 0] > 0).long()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.inference_mode():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.95
