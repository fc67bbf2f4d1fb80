"""Checkpoint = safetensors weights + JSON sidecar (provenance) + markdown model card.

Each file is written atomically and the sidecar last. A crash between the files can
leave new weights beside the previous sidecar; the sidecar's `weights_sha256` exposes
that, and the blocking check compares it with the weights it loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from xcam_assets.atomic import atomic_path, atomic_write_json, atomic_write_text
from xcam_assets.config import Settings
from xcam_assets.hashing import sha256_file
from xcam_assets.train.zoo import build_model


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(out_dir: Path, model: nn.Module, sidecar: dict[str, Any],
                    card: str | None = None) -> None:
    """Weights, then the model card, then the sidecar (the completeness marker)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out_dir / "model.safetensors", suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata={"architecture": str(sidecar.get("architecture", ""))})
    if card is not None:
        atomic_write_text(out_dir / "model_card.md", card)
    atomic_write_json(out_dir / "model.json", sidecar)


def read_sidecar(out_dir: Path) -> dict[str, Any]:
    path = out_dir / "model.json"
    if not path.exists():
        raise CheckpointError(f"no checkpoint in {out_dir} (model.json missing): "
                              "materialize checkpoints for this architecture first")
    return json.loads(path.read_text())


def load_checkpoint(out_dir: Path, model: nn.Module) -> dict[str, Any]:
    """Load weights into `model` (eval mode); the sidecar. A shape mismatch (e.g. a ViT
    built for another image size) is reported with the size the checkpoint needs."""
    sidecar = read_sidecar(out_dir)
    try:
        model.load_state_dict(load_file(str(out_dir / "model.safetensors")))
    except RuntimeError as exc:
        raise CheckpointError(
            f"{out_dir}: weights do not fit the model built ({exc.__class__.__name__}); the "
            f"checkpoint is {sidecar.get('architecture')} for {len(sidecar.get('findings', []))} "
            f"finding(s) at image_size={sidecar.get('image_size')}: build it with "
            "build_model(..., n_classes=len(findings), image_size=image_size) or use "
            "load_model()") from exc
    model.eval()
    return sidecar


def load_model(out_dir: Path, zoo: dict[str, dict[str, Any]]) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes (architecture, findings, channels, image
    size from its sidecar) and load its weights: the way to reload without guessing."""
    sidecar = read_sidecar(out_dir)
    model = build_model(sidecar["architecture"], zoo, n_classes=len(sidecar["findings"]),
                        in_chans=int(sidecar.get("in_chans", 1)),
                        image_size=sidecar.get("image_size"))
    return model, load_checkpoint(out_dir, model)


def all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()
               if t.is_floating_point())


def load_trained_model(settings: Settings, arch: str, device: torch.device) -> nn.Module:
    """The architecture's checkpoint in eval mode on `device`, built at the image size it
    was trained at (ViT position embeddings are sized for it; recorded in model.json)."""
    ckpt = settings.checkpoints_dir / arch
    size = json.loads((ckpt / "model.json").read_text()).get("image_size", settings.image_size)
    model = build_model(arch, settings.zoo, n_classes=len(settings.findings), image_size=int(size))
    load_checkpoint(ckpt, model)
    return model.to(device).eval()


def load_transfer_checkpoint(model: nn.Module, ckpt_dir: Path, arch: str,
                             heads: list[str]) -> dict[str, Any]:
    """Initialise `model` from another study's checkpoint of the same architecture (the
    official VinDr protocol starts from the NIH weights): every backbone tensor must be
    there with its shape (strict, else :class:`CheckpointError` naming the file and the
    keys); the head (`heads` prefixes) is taken only when the findings match in number,
    else it keeps its fresh initialisation. Returns the provenance record."""
    sidecar = read_sidecar(ckpt_dir)
    path = ckpt_dir / "model.safetensors"
    if sidecar.get("architecture") != arch:
        raise CheckpointError(f"{path}: a {sidecar.get('architecture')} checkpoint cannot "
                              f"initialise {arch}")
    state = load_file(str(path))
    own = model.state_dict()

    def is_head(key: str) -> bool:
        return any(key == h or key.startswith(h + ".") for h in heads)

    missing = [k for k in own if k not in state and not is_head(k)]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and not is_head(k) and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path}: does not fit {arch} (missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {wrong[:5]}): no partial load")
    take_head = all(k in state and state[k].shape == own[k].shape for k in own if is_head(k))
    new = {k: (state[k] if (take_head or not is_head(k)) else v) for k, v in own.items()}
    model.load_state_dict(new)
    return {"checkpoint": str(ckpt_dir), "file_sha256": sha256_file(path),
            "weights_sha256": sidecar.get("weights_sha256"),
            "findings": sidecar.get("findings"), "head": "loaded" if take_head else "fresh"}
