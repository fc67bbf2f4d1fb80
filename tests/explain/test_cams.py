"""Tests for xcam_assets.explain.cams: method names, exact maps on hand-built models, the
no-ReLU variant, PYLON class maps, reshape transforms, and equality with bare
pytorch-grad-cam on real timm families (ResNet, VGG, DenseNet, ViT)."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import timm
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from xcam_assets.explain.cams import (
    RESHAPE_TRANSFORMS,
    cam_class,
    class_map_heatmaps,
    compute_heatmaps,
    heatmap_stack,
    parse_method,
    reshape_transform_for,
    vit_reshape_transform,
)
from xcam_assets.train.loop import to_input


# --------------------------------------------------------------------------- names
def test_parse_method_names_and_variants() -> None:
    spec = parse_method("GradCAM++-noReLU")
    assert (spec.name, spec.base, spec.relu, spec.key) == (
        "gradcam++-norelu", "gradcam++", False, "gradcampp-norelu")
    assert parse_method("gradcam").relu and parse_method("gradcam").key == "gradcam"
    assert parse_method("pylon").is_class_map
    with pytest.raises(ValueError, match="pylon"):
        parse_method("pylon-norelu")
    with pytest.raises(ValueError, match="unknown CAM method"):
        parse_method("gradcam3000")


def test_cam_class_by_short_name_or_class_name() -> None:
    assert cam_class("gradcam++") is pgc.GradCAMPlusPlus
    assert cam_class("GradCAMPlusPlus") is pgc.GradCAMPlusPlus
    assert cam_class("Score_CAM") is pgc.ScoreCAM
    assert cam_class("KPCA_CAM") is pgc.KPCA_CAM
    assert cam_class("EigenGradCAM") is pgc.EigenGradCAM


# --------------------------------------------------------------------------- hand-built model
class PoolLinear(nn.Module):
    """features = Identity(x) (the CAM target), logit = w * mean(features) + b."""

    def __init__(self, w: float, b: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Identity()
        self.fc = nn.Linear(1, 1)
        with torch.no_grad():
            self.fc.weight.fill_(w)
            self.fc.bias.fill_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


IMG = np.array([[[128, 153, 178, 204],
                 [128, 128, 204, 255],
                 [153, 153, 178, 128],
                 [204, 128, 153, 128]]], dtype=np.uint8)


def _activation() -> np.ndarray:
    return ((IMG[0].astype(np.float64) / 255.0) - 0.5) / 0.25


def test_gradcam_exact_on_positive_evidence() -> None:
    # logit = 2 * mean(A): dlogit/dA = 2/16 everywhere, Grad-CAM weight 1/8, cam = A/8
    model = PoolLinear(2.0)
    got = compute_heatmaps(model, [model.features], IMG, "gradcam", 0)
    a = _activation() / 8.0
    relu = np.maximum(a, 0)
    expected = (relu - relu.min()) / ((relu - relu.min()).max() + 1e-7)  # scale_cam_image
    np.testing.assert_allclose(got[0], expected, atol=1e-6)


def test_relu_wipes_a_negative_logit_map_and_norelu_keeps_it() -> None:
    # logit = -2 * mean(A): cam = -A/8 < 0 wherever A > 0 (every pixel here): ReLU -> blank
    model = PoolLinear(-2.0)
    assert (_activation() >= 0).all()
    with_relu = compute_heatmaps(model, [model.features], IMG, "gradcam", 0)
    assert np.array_equal(with_relu, np.zeros_like(with_relu))
    without = compute_heatmaps(model, [model.features], IMG, "gradcam-norelu", 0)
    cam = -_activation() / 8.0
    expected = (cam - cam.min()) / ((cam - cam.min()).max() + 1e-7)
    np.testing.assert_allclose(without[0], expected, atol=1e-6)
    # the least-activated pixels (value 128) are the brightest: argmax (0, 0)
    assert np.unravel_index(np.argmax(without[0]), (4, 4)) == (0, 0)
    assert without[0, 1, 3] == 0.0  # the brightest input pixel has the most negative evidence


def test_fast_path_restores_requires_grad() -> None:
    model = PoolLinear(1.0)
    model.fc.bias.requires_grad_(False)
    compute_heatmaps(model, [model.features], IMG, "gradcam", 0)
    assert model.fc.weight.requires_grad and not model.fc.bias.requires_grad


# --------------------------------------------------------------------------- PYLON
class FakePylon(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))

    def class_maps(self, x: torch.Tensor) -> torch.Tensor:
        base = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
        return torch.stack([base, -base]).unsqueeze(0).repeat(len(x), 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.class_maps(x).amax(dim=(2, 3))


def test_pylon_class_map_is_sigmoid_then_upsampled_then_minmax_scaled() -> None:
    """The official evaluation map (cmb-chula/pylon): sigmoid of the logit map, then
    bilinear upsampling, here min-max scaled for storage."""
    # bilinear 2 -> 4 (align_corners=False) samples at -0.25, 0.25, 0.75, 1.25 (clamped):
    # weights [0, .25, .75, 1] along each axis; the logit map is 2 * r + c
    s = np.array([0.0, 0.25, 0.75, 1.0])

    def expected(sign: float) -> np.ndarray:
        sig = 1.0 / (1.0 + np.exp(-sign * np.array([[0.0, 1.0], [2.0, 3.0]])))
        r, c = s[:, None], s[None, :]
        v = ((1 - r) * (1 - c) * sig[0, 0] + (1 - r) * c * sig[0, 1]
             + r * (1 - c) * sig[1, 0] + r * c * sig[1, 1])
        return (v - v.min()) / (v.max() - v.min())

    x = np.zeros((2, 4, 4), np.uint8)
    maps = compute_heatmaps(FakePylon(), [], x, "pylon", 0)
    np.testing.assert_allclose(maps[0], expected(1.0), atol=1e-6)
    flipped = compute_heatmaps(FakePylon(), [], x, "pylon", 1)  # class 1: -map
    np.testing.assert_allclose(flipped[1], expected(-1.0), atol=1e-6)
    # not the old definition (min-max of the upsampled logits): sigmoid bends it
    assert np.abs(maps[0] - (2 * s[:, None] + s[None, :]) / 3.0).max() > 0.01
    with pytest.raises(ValueError, match="class_maps"):
        class_map_heatmaps(PoolLinear(1.0), torch.zeros(1, 1, 4, 4), 0)


# --------------------------------------------------------------------------- reshape
def test_vit_reshape_transform_drops_prefix_tokens() -> None:
    # 1 class token + 2x2 patch grid, D = 3: token t has value t in every channel
    tokens = torch.arange(5, dtype=torch.float32).view(1, 5, 1).repeat(1, 1, 3)
    grid = vit_reshape_transform(tokens)
    assert grid.shape == (1, 3, 2, 2)
    np.testing.assert_array_equal(grid[0, 0].numpy(), [[1, 2], [3, 4]])
    # 5 prefix tokens (class + 4 registers) + 3x3 grid
    tokens = torch.arange(14, dtype=torch.float32).view(1, 14, 1)
    np.testing.assert_array_equal(vit_reshape_transform(tokens)[0, 0].numpy(),
                                  [[5, 6, 7], [8, 9, 10], [11, 12, 13]])


def test_reshape_transform_from_zoo_entry() -> None:
    zoo = {"v": {"reshape_transform": "vit"}, "r": {}, "bad": {"reshape_transform": "nope"}}
    assert reshape_transform_for("v", zoo) is RESHAPE_TRANSFORMS["vit"]
    assert reshape_transform_for("r", zoo) is None
    with pytest.raises(ValueError, match="unknown reshape_transform"):
        reshape_transform_for("bad", zoo)


# --------------------------------------------------------------------------- real families
def _bare(model: nn.Module, layers: list, x: np.ndarray, cls: type, rt=None,
          category: int = 0) -> np.ndarray:
    with cls(model=model, target_layers=layers, reshape_transform=rt) as cam:
        return cam(input_tensor=to_input(x),
                   targets=[ClassifierOutputTarget(category)] * len(x))


def _small_vgg(**_: object) -> nn.Module:
    """timm's VGG class with a small config and head (the zoo's vgg16 is 130M parameters)."""
    from timm.models.vgg import VGG

    return VGG(cfg=[8, "M", 16, "M", 32, 32, "M"], num_classes=1, in_chans=1, mlp_ratio=0.01)


def _small_densenet() -> nn.Module:
    """timm's DenseNet class (norm5 = BatchNormAct2d, the zoo's target) with few layers."""
    from timm.models.densenet import DenseNet

    return DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_classes=1, in_chans=1)


BUILDERS = {"vgg": _small_vgg, "densenet": _small_densenet}


@pytest.mark.parametrize("name,layer,kwargs,rt", [
    ("resnet18", lambda m: [m.layer4], {}, None),
    ("vgg", lambda m: [m.features[-2]], {}, None),
    ("densenet", lambda m: [m.features.norm5], {}, None),
    ("vit_tiny_patch16_224", lambda m: [m.blocks[-1].norm1], {"img_size": 32},
     vit_reshape_transform),
])
def test_same_maps_as_bare_pytorch_grad_cam(name, layer, kwargs, rt) -> None:
    torch.manual_seed(0)
    model = (BUILDERS[name]() if name in BUILDERS else
             timm.create_model(name, num_classes=1, in_chans=1, **kwargs)).eval()
    x = np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    for method, cls in (("gradcam", pgc.GradCAM), ("gradcam++", pgc.GradCAMPlusPlus)):
        ours = compute_heatmaps(model, layer(model), x, method, 0, batch_size=len(x),
                                reshape_transform=rt)
        bare = _bare(model, layer(model), x, cls, rt)
        assert ours.shape == (3, 32, 32)
        np.testing.assert_allclose(ours, np.clip(np.nan_to_num(bare), 0, 1), atol=1e-6)
    # batching changes float rounding only
    batched = compute_heatmaps(model, layer(model), x, "gradcam", 0, batch_size=2,
                               reshape_transform=rt)
    np.testing.assert_allclose(batched, _bare(model, layer(model), x, pgc.GradCAM, rt),
                               atol=1e-4)


def test_gradient_free_and_stack() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=2, in_chans=1).eval()
    x = np.random.default_rng(1).integers(0, 256, (2, 32, 32), dtype=np.uint8)
    eig = compute_heatmaps(model, [model.layer4], x, "eigencam", 0)
    np.testing.assert_allclose(eig, _bare(model, [model.layer4], x, pgc.EigenCAM), atol=1e-6)
    stack = heatmap_stack(model, [model.layer4], x, "xgradcam", 2)
    assert stack.shape == (2, 2, 32, 32) and stack.dtype == np.float16
    assert np.isfinite(stack).all() and stack.min() >= 0 and stack.max() <= 1
    assert compute_heatmaps(model, [model.layer4], x[:0], "gradcam", 0).shape == (0, 32, 32)


def test_real_pylon_class_maps_and_gradcam_on_its_decoder() -> None:
    from xcam_assets.train.pylon import build_pylon

    torch.manual_seed(0)
    model = build_pylon({"timm_name": "resnet18", "decoder_channels": 8}, 2, 1, {}).eval()
    x = np.random.default_rng(2).integers(0, 256, (2, 64, 64), dtype=np.uint8)
    maps = compute_heatmaps(model, [], x, "pylon", 1)
    assert maps.shape == (2, 64, 64) and maps.min() == 0.0 and maps.max() == pytest.approx(1.0)
    with torch.no_grad():
        raw = model.class_maps(to_input(x))[:, 1]  # 16 x 16 for 64 px
    # the heatmap's peak is where the class map (whose max is the logit) peaks
    r, c = np.unravel_index(np.argmax(maps[0]), (64, 64))
    rr, cc = np.unravel_index(int(torch.argmax(raw[0])), raw.shape[-2:])
    assert abs(r // 4 - rr) <= 1 and abs(c // 4 - cc) <= 1
    grad = compute_heatmaps(model, [model.decoder], x, "gradcam", 1)
    np.testing.assert_allclose(grad, np.clip(np.nan_to_num(
        _bare(model, [model.decoder], x, pgc.GradCAM, category=1)), 0, 1), atol=1e-6)


def test_thin_svd_projection_equals_the_library_one() -> None:
    """EigenCAM's projection with a thin SVD: the library's values on a PYLON-decoder-like
    activation (128 channels, 24 x 24) and on a ResNet-like one (512 channels, 7 x 7)."""
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    from xcam_assets.explain.cams import thin_2d_projection

    rng = np.random.default_rng(3)
    for shape in ((2, 128, 24, 24), (2, 512, 7, 7)):
        act = rng.normal(size=shape).astype(np.float32)
        act[0, :, :3] += 4.0  # one dominant direction
        np.testing.assert_allclose(thin_2d_projection(act), get_2d_projection(act),
                                   rtol=1e-4, atol=1e-4)
