"""PYLON: shapes, max-pooled logits, the upsampling module by hand, CAM resolution."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from train_helpers import ZOO, tiny_arrays

from xcam_assets.explain.cams import compute_heatmaps
from xcam_assets.train.pylon import Pylon, PyramidAttention, Upsample
from xcam_assets.train.zoo import build_model, target_layers


@pytest.fixture(scope="module")
def pylon() -> Pylon:
    torch.manual_seed(0)
    return build_model("pylon_resnet50", ZOO, n_classes=3).eval()


def test_output_shapes_and_logits_are_the_class_maps_maxima(pylon: Pylon) -> None:
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        logits, maps = pylon(x), pylon.class_maps(x)
    assert logits.shape == (2, 3)
    assert maps.shape == (2, 3, 16, 16)  # stride 4: the decoder's resolution
    torch.testing.assert_close(logits, maps.amax(dim=(-2, -1)), rtol=0, atol=0)


def test_the_decoder_is_pyramid_attention_plus_three_upsampling_modules(pylon: Pylon) -> None:
    assert isinstance(pylon.decoder.pa, PyramidAttention)
    ups = [pylon.decoder.up3, pylon.decoder.up2, pylon.decoder.up1]
    assert all(isinstance(u, Upsample) for u in ups)
    # lateral 1x1 convs from ResNet-50's stride-16/8/4 features (1024/512/256 channels)
    assert [u.lateral[0].in_channels for u in ups] == [1024, 512, 256]
    assert all(u.lateral[0].kernel_size == (1, 1) for u in ups)
    assert pylon.head.kernel_size == (1, 1) and pylon.head.out_channels == 3


def test_upsampling_module_adds_bilinear_2x_to_the_lateral_conv() -> None:
    up = Upsample(c_lateral=1, c_out=1).eval()
    torch.nn.init.zeros_(up.lateral[0].weight)  # lateral branch -> BN(0) = 0 -> ReLU 0
    coarse = torch.tensor([[[[0.0, 3.0], [6.0, 9.0]]]])
    out = up(torch.zeros(1, 1, 4, 4), coarse)
    # align_corners bilinear from 2 to 4 samples: positions 0, 1/3, 2/3, 1
    expected_row0 = torch.tensor([0.0, 1.0, 2.0, 3.0])
    torch.testing.assert_close(out[0, 0, 0], expected_row0)
    torch.testing.assert_close(out[0, 0, :, 0], torch.tensor([0.0, 2.0, 4.0, 6.0]))
    # with the lateral branch on, it is added: a constant lateral conv output of 1
    torch.nn.init.constant_(up.lateral[0].weight, 1.0)
    with torch.no_grad():
        added = up(torch.ones(1, 1, 4, 4), coarse)
    bn = up.lateral[1]
    one = F.relu((1.0 - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)).item()
    torch.testing.assert_close(added - out, torch.full_like(out, one))


def test_pylon_class_map_is_higher_resolution_than_a_resnet50_cam(pylon: Pylon) -> None:
    """At 64 px a ResNet-50 CAM (layer4) is 2x2; PYLON's class map and its Grad-CAM
    target (the decoder) are 16x16: 64 times as many cells, the paper's point."""
    resnet = build_model("resnet50", ZOO, n_classes=3).eval()
    x = torch.randn(1, 1, 64, 64)
    seen: dict[str, tuple] = {}
    for name, model in (("resnet50", resnet), ("pylon", pylon)):
        layer = target_layers(model, name if name == "resnet50" else "pylon_resnet50", ZOO)[0]
        handle = layer.register_forward_hook(
            lambda m, i, o, n=name: seen.__setitem__(n, tuple(o.shape[-2:])))
        with torch.no_grad():
            model(x)
        handle.remove()
    assert seen == {"resnet50": (2, 2), "pylon": (16, 16)}
    # explain's `pylon` method reads model.class_maps(x): heatmaps at input size in [0, 1]
    images, _, _, _ = tiny_arrays(n_train=2, size=64)
    maps = compute_heatmaps(pylon, [], images, "pylon", 0)
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all()
    assert maps.min() == 0.0 and maps.max() == 1.0  # min-max scaled per map


def test_any_timm_encoder_works() -> None:
    encoder = timm.create_model("densenet121", features_only=True, in_chans=1)
    model = Pylon(encoder, n_classes=2, decoder_channels=32).eval()
    with torch.no_grad():
        maps = model.class_maps(torch.randn(1, 1, 64, 64))
    assert maps.shape == (1, 2, 16, 16)


def test_small_inputs_survive_the_pyramid(pylon: Pylon) -> None:
    with torch.no_grad():
        assert pylon(torch.randn(1, 1, 32, 32)).shape == (1, 3)
