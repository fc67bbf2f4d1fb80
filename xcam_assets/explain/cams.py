"""Grad-CAM-family heatmaps by method name, through pytorch-grad-cam.

One uniform call: `compute_heatmaps(model, layers, images_u8, "gradcam", finding_index)`
returns (N, H, W) float32 heatmaps in [0, 1] at input resolution (pytorch-grad-cam
min-max scales each map; a map that ReLU wiped out stays all zero).
"""

from __future__ import annotations

import numpy as np
import pytorch_grad_cam as pgc
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from xcam_assets.train.loop import to_input

METHODS: dict[str, type] = {
    "gradcam": pgc.GradCAM,
    "gradcam++": pgc.GradCAMPlusPlus,
    "xgradcam": pgc.XGradCAM,
    "hirescam": pgc.HiResCAM,
    "layercam": pgc.LayerCAM,
    "eigencam": pgc.EigenCAM,
    "eigengradcam": pgc.EigenGradCAM,
    "scorecam": pgc.ScoreCAM,
    "ablationcam": pgc.AblationCAM,
    "gradcamelementwise": pgc.GradCAMElementWise,
}


def cam_class(method: str) -> type:
    key = method.lower()
    if key not in METHODS:
        raise ValueError(f"unknown CAM method {method!r} (known: {', '.join(METHODS)})")
    return METHODS[key]


def compute_heatmaps(
    model: nn.Module,
    layers: list[nn.Module],
    images_u8: np.ndarray,
    method: str,
    finding_index: int,
    batch_size: int = 16,
) -> np.ndarray:
    """Heatmaps for one finding's logit, batched; (N, H, W) float32 in [0, 1]."""
    model.eval()
    device = next(model.parameters()).device
    out = np.zeros(images_u8.shape, dtype=np.float32)
    with cam_class(method)(model=model, target_layers=layers) as cam:
        for i in range(0, len(images_u8), batch_size):
            x = to_input(images_u8[i:i + batch_size]).to(device)
            targets = [ClassifierOutputTarget(finding_index)] * len(x)
            with torch.enable_grad():
                maps = cam(input_tensor=x, targets=targets)
            out[i:i + len(x)] = np.nan_to_num(maps, nan=0.0)
    return np.clip(out, 0.0, 1.0)
