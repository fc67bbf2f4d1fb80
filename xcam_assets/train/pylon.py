"""PYLON: a classifier whose class activation map is high-resolution by construction.

Preechakul et al. 2022 (iScience 25:103933), "Improved image classification explainability
with high-accuracy heatmaps"; matched to the authors' code (github.com/cmb-chula/pylon at
e2d493c, on segmentation_models_pytorch 0.1.3; tests/train/test_pylon_reference.py checks the
outputs against it). Any encoder (ResNet-50 in the paper; here any timm model with
``features_only``) feeds a decoder:

* a **Pyramid Attention** module on the deepest feature (stride 32): a 1x1 conv-BN-ReLU
  "middle" branch multiplied by a spatial attention map built from a 3-level pyramid
  (max-pool then 7x7, 5x5, 3x3 conv-BN-ReLU to one channel, upsampled back and summed);
* three **Upsampling** (UP) modules: the coarser decoder map is bilinearly upsampled 2x (to
  the lateral feature's size) and added to conv-BN-ReLU layers of the lateral (skip) feature,
  strides 32 -> 16 -> 8 -> 4. Two 1x1 layers (Cin -> Cin -> C) as in the paper and the
  official default (``up_type='2layer'``); one layer (Cin -> C, ``'1layer'``) as a variant;
* a 1x1 conv **prediction head**: one map per finding at 1/4 of the input resolution;
* **global max pooling** of each map gives the finding's logit.

Every conv has a bias, as in the official ConvBnRelu. Initialisation is the official one
(smp's initialize_decoder / initialize_head): decoder convs Kaiming-uniform (fan_in, ReLU),
head Xavier-uniform, all biases zero. The paper's baseline (:class:`PylonBaseline`) is the
same encoder + a 1x1 conv on the last feature + global max pooling.

The class map (``class_maps(x)``) is the heatmap: 64x64 for a 256 px input where a
ResNet-50 CAM is 8x8; :func:`official_eval_map` is how the authors turn it into the map they
score (sigmoid, bilinear to the image size). Pooling sizes are taken from the tensors
(ceil-mode pooling, upsampling to recorded sizes), so inputs down to 32 px work (tests run
small); where the official code runs (stride-32 map divisible by 8, e.g. 256 px) the two agree.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

UP_LAYERS = (1, 2)


class ConvBnRelu(nn.Sequential):
    """conv (with bias, as the official code) -> BatchNorm -> ReLU, 'same' padding.

    The conv is initialised as the official decoder's (Kaiming-uniform fan_in, zero bias) here,
    so every decoder part starts as the authors' does however it is built."""

    def __init__(self, c_in: int, c_out: int, kernel: int) -> None:
        conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=True)
        nn.init.kaiming_uniform_(conv.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        super().__init__(conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _up(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class PyramidAttention(nn.Module):
    """Feature Pyramid Attention (Li et al. 2018 as used by PYLON) on the deepest feature."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.mid = ConvBnRelu(c_in, c_out, 1)
        self.down1 = ConvBnRelu(c_in, 1, 7)
        self.down2 = ConvBnRelu(1, 1, 5)
        self.down3 = ConvBnRelu(1, 1, 3)
        self.conv1 = ConvBnRelu(1, 1, 7)
        self.conv2 = ConvBnRelu(1, 1, 5)
        self.conv3 = ConvBnRelu(1, 1, 3)

    @staticmethod
    def _pool(x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mid = self.mid(x)
        x1 = self.down1(self._pool(x))
        x2 = self.down2(self._pool(x1))
        x3 = self.down3(self._pool(x2))
        att = _up(self.conv3(x3), x2.shape[-2:])
        att = _up(self.conv2(x2) + att, x1.shape[-2:])
        att = _up(self.conv1(x1) + att, x.shape[-2:])
        return mid * att


class Upsample(nn.Module):
    """2x bilinear upsample of the decoder map + 1x1 conv-BN-ReLU layer(s) of the lateral feature.

    ``layers=2`` is the paper's UP module (Cin -> Cin -> C); ``layers=1`` (Cin -> C) the
    official '1layer' variant. ``lateral`` is one flat Sequential (conv, BN, ReLU per layer),
    so ``lateral[0]`` is the first conv either way. The module-level default stays 1 (its
    historical behaviour); :class:`PylonDecoder` and the builders default to 2."""

    def __init__(self, c_lateral: int, c_out: int, layers: int = 1) -> None:
        super().__init__()
        if layers not in UP_LAYERS:
            raise ValueError(f"UP module layers must be one of {UP_LAYERS}, got {layers}")
        widths = [c_lateral] * layers + [c_out]
        self.lateral = nn.Sequential(*(m for a, b in pairwise(widths)
                                       for m in ConvBnRelu(a, b, 1)))

    def forward(self, lateral: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        return _up(coarse, lateral.shape[-2:]) + self.lateral(lateral)


class PylonDecoder(nn.Module):
    """Pyramid attention on stride 32, then upsampling modules to stride 4."""

    def __init__(self, channels: list[int], c_dec: int, up_layers: int = 2) -> None:
        super().__init__()
        if len(channels) < 4:
            raise ValueError(f"PYLON needs 4 encoder feature levels, got {channels}")
        c4, c8, c16, c32 = channels[-4:]
        self.pa = PyramidAttention(c32, c_dec)
        self.up3 = Upsample(c16, c_dec, up_layers)
        self.up2 = Upsample(c8, c_dec, up_layers)
        self.up1 = Upsample(c4, c_dec, up_layers)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        f4, f8, f16, f32 = features[-4:]
        x = self.pa(f32)
        x = self.up3(f16, x)
        x = self.up2(f8, x)
        return self.up1(f4, x)


class Pylon(nn.Module):
    """Encoder (timm ``features_only``) + PYLON decoder + 1x1 head; logits by max pooling.

    ``forward(x)`` gives logits (N, F) like any timm classifier (so the training loop,
    pytorch-grad-cam and the checks treat it uniformly); ``class_maps(x)`` gives the
    (N, F, H/4, W/4) maps whose global maxima are those logits.
    """

    def __init__(self, encoder: nn.Module, n_classes: int, decoder_channels: int = 128,
                 up_layers: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        channels = list(encoder.feature_info.channels())
        self.decoder = PylonDecoder(channels, decoder_channels, up_layers)
        self.head = nn.Conv2d(decoder_channels, n_classes, kernel_size=1)
        nn.init.xavier_uniform_(self.head.weight)  # the official initialize_head
        nn.init.zeros_(self.head.bias)
        self.num_classes = n_classes
        self.up_layers = up_layers

    def class_maps(self, x: torch.Tensor) -> torch.Tensor:
        """One map per finding at the decoder's resolution (1/4 of the input), float32."""
        return self.head(self.decoder(self.encoder(x))).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.amax(self.class_maps(x), dim=(-2, -1))


class PylonBaseline(nn.Module):
    """The paper's baseline: the same encoder, a 1x1 conv on its last feature, global max pool.

    As the official ``BaselineModel`` (pooling 'maxpool'): the conv has a bias and PyTorch's
    default initialisation. ``class_maps(x)`` are (N, F, H/32, W/32) for a stride-32 encoder,
    so the two models' heatmaps come from the same code path at different resolutions."""

    def __init__(self, encoder: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Conv2d(encoder.feature_info.channels()[-1], n_classes, kernel_size=1)
        self.num_classes = n_classes

    def class_maps(self, x: torch.Tensor) -> torch.Tensor:
        """One map per finding at the encoder's last stride, float32."""
        return self.head(self.encoder(x)[-1]).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.amax(self.class_maps(x), dim=(-2, -1))


def official_eval_map(class_maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """The map the authors score (point localization, IoBB): sigmoid, then bilinear to the image.

    As the official LocalizationAccCb / point_loc_acc: ``sigmoid`` of the logit maps
    (N, F, h, w), upsampled bilinearly with ``align_corners=False`` to ``size`` (the input's
    height and width), float32; the point is its argmax. Sigmoid is monotonic but bilinear
    upsampling does not commute with it, so the argmax can differ from the raw map's."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(torch.sigmoid(class_maps.float()), size=hw, mode="bilinear",
                         align_corners=False)


def _encoder(timm_name: str, in_chans: int, timm_kwargs: dict[str, Any]) -> nn.Module:
    return timm.create_model(timm_name, features_only=True, in_chans=in_chans, **timm_kwargs)


def build_pylon(timm_name: str | dict[str, Any], n_classes: int, in_chans: int,
                timm_kwargs: dict[str, Any], decoder_channels: int = 128,
                up_layers: int = 2) -> Pylon:
    """A PYLON model on the timm encoder `timm_name`; `timm_kwargs` carries pretrained settings.

    The older call shape ``build_pylon(entry, ...)`` with a zoo entry dict still works: its
    ``timm_name``, ``decoder_channels`` and ``up_layers`` are read from the entry."""
    if isinstance(timm_name, dict):
        entry = timm_name
        timm_name = str(entry["timm_name"])
        decoder_channels = int(entry.get("decoder_channels", decoder_channels))
        up_layers = int(entry.get("up_layers", up_layers))
    return Pylon(_encoder(timm_name, in_chans, timm_kwargs), n_classes, decoder_channels,
                 up_layers)


def build_pylon_baseline(timm_name: str, n_classes: int, in_chans: int,
                         timm_kwargs: dict[str, Any]) -> PylonBaseline:
    """The paper's baseline on the timm encoder `timm_name` (same encoder as PYLON)."""
    return PylonBaseline(_encoder(timm_name, in_chans, timm_kwargs), n_classes)
