"""Small shared pieces for the training tests: the zoo, tiny synthetic arrays."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from xcam_assets.train.recipes import Augment, default_recipe

REPO = Path(__file__).resolve().parents[2]
ZOO: dict = yaml.safe_load((REPO / "resources" / "models.yaml").read_text())


def tiny_arrays(n_train: int = 8, n_val: int = 4, size: int = 32, n_findings: int = 1,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """uint8 images with a bright square on positives; labels alternate so both classes exist."""
    rng = np.random.default_rng(seed)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.integers(0, 120, (n, size, size), dtype=np.uint8)
        y = np.zeros((n, n_findings), np.float32)
        for i in range(n):
            for k in range(n_findings):
                y[i, k] = float((i + k) % 2)
                if y[i, k]:
                    q = size // 4
                    x[i, q * k % size:q * k % size + q, q:2 * q] = 250
        return x, y

    x_tr, y_tr = make(n_train)
    x_va, y_va = make(n_val)
    return x_tr, y_tr, x_va, y_va


DDP_RECIPE = dataclasses.replace(default_recipe(3, 3e-3), augment=Augment(enabled=False))


def small_net() -> nn.Module:
    """No BatchNorm: two DDP ranks then compute exactly the one-process gradient."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, 1))


def ddp_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 16, 16), dtype=np.uint8)
    y = (x[:, :8].mean((1, 2)) > x[:, 8:].mean((1, 2))).astype(np.float32)[:, None]
    return x[:24], y[:24], x[24:], y[24:]
