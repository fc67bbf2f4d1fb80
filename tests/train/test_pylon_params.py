"""PYLON at the paper's size: exact parameter counts and the official initialisation.

ResNet-50 encoder (timm ``features_only``, 1 input channel: 23,501,760 parameters), 14
findings, 128 decoder channels, every conv with a bias as in the official ConvBnRelu. The
decoder counts follow from the channels (256/512/1024/2048): pyramid attention 363,015; UP
modules 1,612,160 with two layers (Cin -> Cin -> 128) or 230,528 with one (Cin -> 128).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from xcam_assets.train.pylon import Pylon, build_pylon, build_pylon_baseline

ENCODER = 23_501_760


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def two_layer() -> Pylon:
    torch.manual_seed(0)
    return build_pylon("resnet50", 14, 1, {}).eval()


def test_two_layer_pylon_has_the_papers_parameter_count(two_layer: Pylon) -> None:
    assert two_layer.up_layers == 2  # the default, as the paper and the official code
    assert n_params(two_layer.encoder) == ENCODER
    assert n_params(two_layer.decoder) == 1_975_175
    assert n_params(two_layer.head) == 128 * 14 + 14
    assert n_params(two_layer) == 25_478_741 == ENCODER + 1_975_175 + 128 * 14 + 14


def test_one_layer_variant_and_baseline_parameter_counts() -> None:
    one = build_pylon("resnet50", 14, 1, {}, up_layers=1)
    assert n_params(one.decoder) == 593_543 and n_params(one) == 24_097_109
    base = build_pylon_baseline("resnet50", 14, 1, {})
    assert n_params(base) == ENCODER + 2048 * 14 + 14 == 23_530_446
    with pytest.raises(ValueError, match="layers"):
        build_pylon("resnet18", 2, 1, {}, up_layers=3)


def test_maps_at_256_px_are_64x64_for_pylon_and_8x8_for_the_baseline(two_layer: Pylon) -> None:
    base = build_pylon_baseline("resnet50", 14, 1, {}).eval()
    x = torch.randn(1, 1, 256, 256)
    with torch.no_grad():
        assert two_layer.class_maps(x).shape == (1, 14, 64, 64)
        maps = base.class_maps(x)
        assert maps.shape == (1, 14, 8, 8) and maps.dtype == torch.float32
        torch.testing.assert_close(base(x), maps.amax(dim=(-2, -1)), rtol=0, atol=0)


def test_initialisation_is_the_official_one(two_layer: Pylon) -> None:
    """smp 0.1.3 initialize_decoder: Kaiming-uniform (fan_in, ReLU) convs, zero biases, BN 1/0;
    initialize_head: Xavier-uniform, zero bias. Checked by bounds and by the spread of the
    largest layers (uniform on [-b, b] has standard deviation b / sqrt(3))."""
    convs = [m for m in two_layer.decoder.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 7 + 3 * 2 and all(c.bias is not None for c in convs)
    for conv in convs:
        fan_in = conv.weight[0].numel()
        bound = math.sqrt(6.0 / fan_in)
        assert conv.weight.abs().max().item() <= bound and not conv.bias.any()
        if conv.weight.numel() > 100_000:
            assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    for bn in (m for m in two_layer.decoder.modules() if isinstance(m, nn.BatchNorm2d)):
        assert bool((bn.weight == 1).all()) and not bn.bias.any()
    head = two_layer.head.weight
    xavier = math.sqrt(6.0 / (128 + 14))
    assert head.abs().max().item() <= xavier and not two_layer.head.bias.any()
    assert head.std().item() == pytest.approx(xavier / math.sqrt(3), rel=0.1)
