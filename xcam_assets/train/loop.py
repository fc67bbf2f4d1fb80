"""The training loop: plain PyTorch on in-memory uint8 tensors.

CPU here, CUDA when present (AMP, channels_last, pinned host memory,
non-blocking copies). Best weights by validation loss. Deterministic for a
seed on the CPU.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xcam_assets.evaluate.diagnostic import roc_auc

MEAN, STD = 0.5, 0.25


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def to_input(images_u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W) uint8 -> (N, 1, H, W) float normalised network input."""
    x = torch.as_tensor(np.asarray(images_u8)) if not torch.is_tensor(images_u8) else images_u8
    return ((x.float() / 255.0) - MEAN).div_(STD).unsqueeze(1)


def augment(x: torch.Tensor, gen: torch.Generator, max_degrees: float = 10.0,
            noise_std: float = 0.05) -> torch.Tensor:
    """Random horizontal flip, small rotation and Gaussian noise (the studies' set)."""
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(max_degrees)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(n)], 1),
                         torch.stack([sin, cos, torch.zeros(n)], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, align_corners=False, padding_mode="border")
    return x + torch.randn(x.shape, generator=gen).to(x) * noise_std


@dataclass
class TrainResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


def predict_logits(model: nn.Module, images_u8: np.ndarray, batch_size: int = 64,
                   device: torch.device | None = None) -> np.ndarray:
    device = device or next(model.parameters()).device
    model.eval()
    outs = []
    with torch.inference_mode():
        for i in range(0, len(images_u8), batch_size):
            x = to_input(images_u8[i:i + batch_size]).to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.to(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    outs.append(model(x).float().cpu())
            else:
                outs.append(model(x).cpu())
    return torch.cat(outs).numpy() if outs else np.zeros((0, 0), np.float32)


def train_classifier(
    model: nn.Module,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    log: Callable[[str], None] = print,
    device: torch.device | None = None,
) -> TrainResult:
    """Train with BCE (positive-class weighting) and keep the best-val-loss weights."""
    device = device or torch.device("cpu")
    seed_everything(seed)
    gen = torch.Generator().manual_seed(seed)
    model.to(device)
    cuda = device.type == "cuda"
    if cuda:
        model.to(memory_format=torch.channels_last)
    y_tr = torch.as_tensor(y_train, dtype=torch.float32)
    pos = y_tr.sum(0).clamp(min=1)
    pos_weight = ((len(y_tr) - pos) / pos).clamp(0.2, 5.0).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    x_tr = torch.as_tensor(x_train)
    if cuda:
        x_tr, y_tr = x_tr.pin_memory(), y_tr.pin_memory()
    scaler_dtype = torch.bfloat16 if cuda else None
    best_loss, best_state, best_epoch = math.inf, None, -1
    history: list[dict[str, float]] = []
    n = len(x_tr)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total, seen, t_epoch = 0.0, 0, time.perf_counter()
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) < 2:
                continue  # BatchNorm needs >1 sample
            xb = augment(to_input(x_tr[idx]), gen).to(device, non_blocking=True)
            yb = y_tr[idx].to(device, non_blocking=True)
            if cuda:
                xb = xb.to(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=scaler_dtype, enabled=cuda):
                logits = model(xb)
            loss = F.binary_cross_entropy_with_logits(logits.float(), yb, pos_weight=pos_weight)
            loss.backward()
            optimizer.step()
            total += float(loss) * len(idx)
            seen += len(idx)
        val_logits = predict_logits(model, x_val, device=device)
        val_loss = float(F.binary_cross_entropy_with_logits(
            torch.as_tensor(val_logits), torch.as_tensor(y_val, dtype=torch.float32)))
        aucs = [roc_auc(y_val[:, k], val_logits[:, k]) for k in range(y_val.shape[1])]
        val_auc = float(np.nanmean(aucs)) if not all(np.isnan(aucs)) else float("nan")
        elapsed = time.perf_counter() - t_epoch
        row = {"epoch": epoch + 1, "train_loss": total / max(seen, 1), "val_loss": val_loss,
               "val_auc": val_auc, "images_per_s": seen / max(elapsed, 1e-9)}
        history.append(row)
        if val_loss < best_loss:
            best_loss, best_epoch = val_loss, epoch + 1
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        left = (time.perf_counter() - t0) / (epoch + 1) * (epochs - epoch - 1)
        log(f"epoch {epoch + 1}/{epochs} train_loss={row['train_loss']:.4f} "
            f"val_loss={val_loss:.4f} val_auc={val_auc:.3f} "
            f"{row['images_per_s']:.1f} img/s, ~{left:.0f}s left")
    assert best_state is not None, "no epoch ran: epochs must be >= 1"
    model.load_state_dict(best_state)
    return TrainResult(best_state=best_state, best_epoch=best_epoch, history=history)
