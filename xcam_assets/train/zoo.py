"""The model zoo: `resources/models.yaml` entries built through timm's factory.

Each entry names a timm model and the layer whose activations its CAMs use.
Pretrained weights are read from a local file only (no hub access here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn


class ZooError(ValueError):
    pass


def build_model(
    name: str,
    zoo: dict[str, dict[str, Any]],
    n_classes: int,
    in_chans: int = 1,
    pretrained_file: str | Path | None = None,
) -> nn.Module:
    """timm.create_model for a zoo entry; one logit per finding."""
    if name not in zoo:
        raise ZooError(f"architecture {name!r} is not in resources/models.yaml "
                       f"(known: {', '.join(sorted(zoo))})")
    entry = zoo[name]
    kwargs: dict[str, Any] = {"num_classes": n_classes, "in_chans": in_chans}
    if pretrained_file:
        path = Path(pretrained_file)
        if not path.exists():
            raise ZooError(f"pretrained weights for {name} demanded but {path} does not exist "
                           "(no network here: download them once and point the profile at the file)")
        kwargs["pretrained"] = True
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    return timm.create_model(entry["timm_name"], **kwargs)


def resolve_layer(model: nn.Module, dotted: str) -> nn.Module:
    """`layer4` or `features.norm5` or `blocks.11.norm1` -> the module."""
    module: Any = model
    for part in dotted.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def target_layers(model: nn.Module, name: str, zoo: dict[str, dict[str, Any]]) -> list[nn.Module]:
    layer = zoo[name]["target_layer"]
    layers = layer if isinstance(layer, list) else [layer]
    return [resolve_layer(model, dotted) for dotted in layers]


def state_dict_hash(model: nn.Module) -> str:
    """sha256 over parameters/buffers in name order (bitwise weights identity)."""
    import hashlib

    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
