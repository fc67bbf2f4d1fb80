"""PYLON: a classifier whose class activation map is high-resolution by construction.

Preechakul et al. 2022 (iScience 25:103933), "Improved image classification explainability
with high-accuracy heatmaps". Any encoder (ResNet-50 in the paper; here any timm model with
``features_only``) feeds a decoder:

* a **Pyramid Attention** module on the deepest feature (stride 32): a 1x1 conv-BN-ReLU
  "middle" branch multiplied by a spatial attention map built from a 3-level pyramid
  (max-pool then 7x7, 5x5, 3x3 conv-BN-ReLU to one channel, upsampled back and summed);
* three **Upsampling** modules: the coarser decoder map is bilinearly upsampled 2x (to the
  lateral feature's size) and added to a 1x1 conv-BN-ReLU of the lateral (skip) feature,
  strides 32 -> 16 -> 8 -> 4;
* a 1x1 conv **prediction head**: one map per finding at 1/4 of the input resolution;
* **global max pooling** of each map gives the finding's logit.

The class map (``class_maps(x)``) is the heatmap: 64x64 for a 256 px input where a
ResNet-50 CAM is 8x8. Pooling sizes are taken from the tensors (ceil-mode pooling,
upsampling to recorded sizes), so inputs down to 32 px work (tests run small).
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn


class ConvBnRelu(nn.Sequential):
    """conv (no bias) -> BatchNorm -> ReLU, 'same' padding."""

    def __init__(self, c_in: int, c_out: int, kernel: int) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


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
    """2x bilinear upsample of the decoder map + 1x1 conv of the lateral skip feature."""

    def __init__(self, c_lateral: int, c_out: int) -> None:
        super().__init__()
        self.lateral = ConvBnRelu(c_lateral, c_out, 1)

    def forward(self, lateral: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        return _up(coarse, lateral.shape[-2:]) + self.lateral(lateral)


class PylonDecoder(nn.Module):
    """Pyramid attention on stride 32, then upsampling modules to stride 4."""

    def __init__(self, channels: list[int], c_dec: int) -> None:
        super().__init__()
        if len(channels) < 4:
            raise ValueError(f"PYLON needs 4 encoder feature levels, got {channels}")
        c4, c8, c16, c32 = channels[-4:]
        self.pa = PyramidAttention(c32, c_dec)
        self.up3 = Upsample(c16, c_dec)
        self.up2 = Upsample(c8, c_dec)
        self.up1 = Upsample(c4, c_dec)

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

    def __init__(self, encoder: nn.Module, n_classes: int, decoder_channels: int = 128) -> None:
        super().__init__()
        self.encoder = encoder
        channels = list(encoder.feature_info.channels())
        self.decoder = PylonDecoder(channels, decoder_channels)
        self.head = nn.Conv2d(decoder_channels, n_classes, kernel_size=1)
        self.num_classes = n_classes

    def class_maps(self, x: torch.Tensor) -> torch.Tensor:
        """One map per finding at the decoder's resolution (1/4 of the input), float32."""
        return self.head(self.decoder(self.encoder(x))).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.amax(self.class_maps(x), dim=(-2, -1))


def build_pylon(entry: dict[str, Any], n_classes: int, in_chans: int,
                timm_kwargs: dict[str, Any]) -> Pylon:
    """A PYLON model for a zoo entry; `timm_kwargs` carries pretrained-file settings."""
    encoder = timm.create_model(entry["timm_name"], features_only=True, in_chans=in_chans,
                                **timm_kwargs)
    return Pylon(encoder, n_classes, int(entry.get("decoder_channels", 128)))
