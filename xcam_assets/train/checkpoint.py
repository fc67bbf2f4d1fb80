"""Checkpoint = safetensors weights + JSON sidecar + markdown model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from xcam_assets.hashing import atomic_path, atomic_write_json, atomic_write_text


def save_checkpoint(out_dir: Path, model: nn.Module, sidecar: dict[str, Any], card: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out_dir / "model.safetensors", suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata={"architecture": sidecar.get("architecture", "")})
    atomic_write_text(out_dir / "model_card.md", card)
    atomic_write_json(out_dir / "model.json", sidecar)  # written last: marks completeness


def load_checkpoint(out_dir: Path, model: nn.Module) -> dict[str, Any]:
    sidecar = json.loads((out_dir / "model.json").read_text())
    model.load_state_dict(load_file(str(out_dir / "model.safetensors")))
    model.eval()
    return sidecar


def all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()
               if t.is_floating_point())
