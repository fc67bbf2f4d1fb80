"""Grad-CAM-family heatmaps by method name, through pytorch-grad-cam, plus PYLON's class maps.

One uniform call::

    compute_heatmaps(model, layers, images_u8, "gradcam", finding_index)

returns ``(N, H, W)`` float32 heatmaps in [0, 1] at input resolution. pytorch-grad-cam
min-max scales each map; a map that ReLU wiped out stays all zero.

Method names (case-insensitive; ``+`` and ``-``/``_`` spelled as in the table below):

* every pytorch-grad-cam CAM class: ``gradcam``, ``gradcam++``, ``xgradcam``, ``hirescam``,
  ``layercam``, ``eigencam``, ``eigengradcam``, ``scorecam``, ``ablationcam``,
  ``gradcamelementwise``, ``fullgrad``, ``kpcacam``, ``shapleycam``, ``fem``, ``randomcam``;
  any other class exported by ``pytorch_grad_cam`` is found by its class name too
  (e.g. ``GradCAMPlusPlus``);
* ``pylon``: the model's own class maps (``model.class_maps(x) -> (N, F, h, w)``, the
  PYLON architecture of Preechakul et al. 2022), bilinearly upsampled to the input size and
  min-max scaled to [0, 1] per map;
* a ``-norelu`` suffix (``gradcam-norelu``, ``gradcam++-norelu``, ...): the same method
  without the final ReLU (see below).

**The no-ReLU variant for sigmoid heads.** Grad-CAM computes ``L = ReLU(sum_k a_k A_k)``
and pytorch-grad-cam then min-max scales ``L``. With one sigmoid logit per finding, an
image the model scores low has mostly *negative* evidence: ``sum_k a_k A_k < 0`` at every
location, the ReLU sets the whole map to 0, and the heatmap is blank (its argmax is then
the top-left pixel, an arbitrary answer). PYLON (Preechakul et al. 2022, iScience 25:103933,
section "Baselines") noticed this and ran Grad-CAM/Grad-CAM++ *without* the ReLU for
binary heads. ``<method>-norelu`` does exactly that: the signed map ``sum_k a_k A_k`` is
min-max scaled to [0, 1], so the locations with the most positive (least negative)
evidence are brightest even when the logit is negative. On images where the ReLU map is
not empty, both variants rank the positive-evidence pixels identically; they differ in
the pixels the ReLU clipped (all 0 with ReLU, graded without). Method-internal ReLUs
(LayerCAM's ``ReLU(grad)``, GradCAMElementWise's element-wise ReLU) are part of those
methods' definitions and stay.

**Speed.** For gradient methods the backward pass is only needed from the logit down to the
target layer. pytorch-grad-cam backpropagates through the whole network (every parameter
requires grad). :func:`compute_heatmaps` freezes the parameters for the duration of the
call and makes the target layer's output the leaf of the graph, so the backward pass stops
there: the same gradients at the target layer (tested against the bare library), about a
third of the work. Methods that need input or bias gradients (FullGrad, ShapleyCAM) run
unchanged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_grad_cam as pgc
import torch
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from xcam_assets.train.loop import to_input
from xcam_assets.train.precision import LEGACY_CPU, Precision

__all__ = [
    "METHODS",
    "MethodSpec",
    "cam_class",
    "class_map_heatmaps",
    "compute_heatmaps",
    "heatmap_stack",
    "parse_method",
    "reshape_transform_for",
    "vit_reshape_transform",
]

def thin_2d_projection(activation_batch: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's ``get_2d_projection`` (EigenCAM: centred activations projected
    on their first right singular vector) with a thin SVD.

    The library calls ``np.linalg.svd(A, full_matrices=True)`` on the ``(h*w, C)`` matrix,
    which also builds the ``(h*w, h*w)`` matrix U it never uses: for PYLON's 56x56 decoder
    output that is a 3136 x 3136 matrix per image (minutes per heatmap set on a CPU). The
    first right singular vector is the same with ``full_matrices=False`` (tested against
    the library's function), so the map is too.
    """
    batch = np.nan_to_num(np.asarray(activation_batch, dtype=np.float32), nan=0.0)
    out = []
    for act in batch:
        flat = act.reshape(act.shape[0], -1).T
        flat = flat - flat.mean(axis=0)
        _, _, vt = np.linalg.svd(flat, full_matrices=False)
        out.append((flat @ vt[0, :]).reshape(act.shape[1:]))
    return np.float32(out)


class ThinEigenCAM(pgc.EigenCAM):
    """EigenCAM through :func:`thin_2d_projection` (same maps, no unused U matrix)."""

    def get_cam_image(self, input_tensor, target_layer, target_category,  # noqa: ANN001
                      activations, grads, eigen_smooth):  # noqa: ANN001
        return thin_2d_projection(activations)


METHODS: dict[str, type] = {
    "gradcam": pgc.GradCAM,
    "gradcam++": pgc.GradCAMPlusPlus,
    "gradcamplusplus": pgc.GradCAMPlusPlus,
    "xgradcam": pgc.XGradCAM,
    "hirescam": pgc.HiResCAM,
    "layercam": pgc.LayerCAM,
    "eigencam": ThinEigenCAM,
    "eigengradcam": pgc.EigenGradCAM,
    "scorecam": pgc.ScoreCAM,
    "ablationcam": pgc.AblationCAM,
    "gradcamelementwise": pgc.GradCAMElementWise,
    "fullgrad": pgc.FullGrad,
    "kpcacam": pgc.KPCA_CAM,
    "shapleycam": pgc.ShapleyCAM,
    "fem": pgc.FEM,
    "randomcam": pgc.RandomCAM,
}

#: methods whose heatmap needs gradients below the target layer (input or bias gradients,
#: Hessian-vector products): run through pytorch-grad-cam unchanged.
FULL_BACKWARD = {pgc.FullGrad, pgc.ShapleyCAM}

PYLON = "pylon"
NO_RELU_SUFFIX = "-norelu"


@dataclass(frozen=True)
class MethodSpec:
    """A configured heatmap method: the base method name and whether the final ReLU is kept.

    ``name`` is the configured string (``"gradcam++-norelu"``), ``base`` the method
    (``"gradcam++"``), ``relu`` False for the ``-norelu`` variant, ``key`` the file stem
    (``"gradcampp-norelu"``: ``+`` is not welcome in file names).
    """

    name: str
    base: str
    relu: bool

    @property
    def key(self) -> str:
        return self.name.replace("+", "p")

    @property
    def is_class_map(self) -> bool:
        return self.base == PYLON


def _normalise(name: str) -> str:
    return re.sub(r"[\s_]", "", name.strip().lower())


def cam_class(method: str) -> type:
    """The pytorch-grad-cam class for a method name (see module docstring)."""
    key = _normalise(method)
    if key in METHODS:
        return METHODS[key]
    by_class = {n.lower().replace("_", ""): getattr(pgc, n) for n in dir(pgc)
                if isinstance(getattr(pgc, n), type) and issubclass(getattr(pgc, n), BaseCAM)}
    flat = key.replace("-", "")
    if flat in by_class:
        return by_class[flat]
    raise ValueError(f"unknown CAM method {method!r} (known: {', '.join(METHODS)}, {PYLON}, "
                     f"or any pytorch_grad_cam class name; suffix {NO_RELU_SUFFIX} for no ReLU)")


def parse_method(method: str) -> MethodSpec:
    """``"GradCAM++-noReLU"`` -> MethodSpec(name="gradcam++-norelu", base="gradcam++", relu=False).

    Raises ValueError for an unknown method, and for ``pylon-norelu`` (class maps have no ReLU).
    """
    name = _normalise(method)
    relu = not name.endswith(NO_RELU_SUFFIX)
    base = name if relu else name[: -len(NO_RELU_SUFFIX)]
    if base == PYLON:
        if not relu:
            raise ValueError("pylon class maps have no ReLU to drop: use 'pylon'")
    else:
        cls = cam_class(base)
        if not relu and cls is pgc.FullGrad:
            raise ValueError("FullGrad has no final ReLU variant in xcam")
    return MethodSpec(name=name, base=base, relu=relu)


# --------------------------------------------------------------------------- reshape transforms
def vit_reshape_transform(tensor: torch.Tensor) -> torch.Tensor:
    """ViT tokens ``(B, P + g*g, D)`` -> feature grid ``(B, D, g, g)``.

    ``P`` prefix tokens (class token, register tokens) are dropped; ``g`` is the largest
    integer with ``g*g <= n_tokens`` (square inputs; ``P < 2g + 1``), which covers timm's
    ViT/DeiT/BEiT layouts. Same grid order as pytorch-grad-cam's ``vit_reshape_transform``
    (row-major patches) without its hard-coded 14x14.
    """
    if tensor.ndim != 3:
        raise ValueError(f"ViT tokens must be (B, N, D), got {tuple(tensor.shape)}")
    n = tensor.shape[1]
    g = math.isqrt(n)
    prefix = n - g * g
    grid = tensor[:, prefix:, :].reshape(tensor.shape[0], g, g, tensor.shape[2])
    return grid.permute(0, 3, 1, 2)


def swin_reshape_transform(tensor: torch.Tensor) -> torch.Tensor:
    """Swin / NHWC feature maps ``(B, H, W, C)`` -> ``(B, C, H, W)``."""
    if tensor.ndim != 4:
        raise ValueError(f"NHWC features must be 4-D, got {tuple(tensor.shape)}")
    return tensor.permute(0, 3, 1, 2)


RESHAPE_TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "vit": vit_reshape_transform,
    "vit_tokens": vit_reshape_transform,
    "swin": swin_reshape_transform,
    "nhwc": swin_reshape_transform,
}


def reshape_transform_for(
    arch: str, zoo: dict[str, dict[str, Any]]
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The reshape transform named by the zoo entry's ``reshape_transform`` (None if absent).

    A name is looked up in :data:`RESHAPE_TRANSFORMS`, then as a callable attribute of
    ``xcam_assets.train.zoo`` (where the model zoo may define its own).
    """
    name = (zoo.get(arch) or {}).get("reshape_transform")
    if not name:
        return None
    if callable(name):
        return name
    if name in RESHAPE_TRANSFORMS:
        return RESHAPE_TRANSFORMS[name]
    from xcam_assets.train import zoo as zoo_module

    fn = getattr(zoo_module, str(name), None)
    if callable(fn):
        return fn
    raise ValueError(f"{arch}: unknown reshape_transform {name!r} "
                     f"(known: {', '.join(RESHAPE_TRANSFORMS)})")


# --------------------------------------------------------------------------- no-ReLU variant
class _NoReLUMixin:
    """BaseCAM without the final ``np.maximum(cam, 0)``: signed map, min-max scaled."""

    def compute_cam_per_layer(self, input_tensor, targets, eigen_smooth):  # noqa: ANN001
        acts = [a.cpu().data.numpy() for a in self.activations_and_grads.activations]
        grads = [g.cpu().data.numpy() for g in self.activations_and_grads.gradients]
        size = self.get_target_width_height(input_tensor)
        out = []
        for i, layer in enumerate(self.target_layers):
            cam = self.get_cam_image(input_tensor, layer, targets,
                                     acts[i] if i < len(acts) else None,
                                     grads[i] if i < len(grads) else None, eigen_smooth)
            out.append(scale_cam_image(cam, size)[:, None, :])
        return out

    def aggregate_multi_layers(self, cam_per_target_layer):  # noqa: ANN001
        return scale_cam_image(np.mean(np.concatenate(cam_per_target_layer, axis=1), axis=1))


_NO_RELU_CLASSES: dict[type, type] = {}


def _no_relu(cls: type) -> type:
    if cls not in _NO_RELU_CLASSES:
        _NO_RELU_CLASSES[cls] = type(f"{cls.__name__}NoReLU", (_NoReLUMixin, cls), {})
    return _NO_RELU_CLASSES[cls]


# --------------------------------------------------------------------------- speed / quiet
@contextmanager
def _backward_stops_at(model: nn.Module, layers: list[nn.Module]) -> Iterator[None]:
    """Freeze parameters; make each target layer's output a fresh float32 graph leaf.

    The hook is prepended, so pytorch-grad-cam's own hooks (registered later) see a tensor
    that requires grad and record its gradient; nothing below the layer is differentiated.
    Under bf16 autocast the leaf is float32 (pytorch-grad-cam turns the hooked activations
    and gradients into numpy, which has no bfloat16); the layers above recast it.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if (torch.is_grad_enabled() and isinstance(output, torch.Tensor)
                and not output.requires_grad):
            return output.detach().float().requires_grad_(True).clone()
        return None

    handles = [layer.register_forward_hook(hook, prepend=True) for layer in layers]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


class _Silent:
    """Stand-in for the ``tqdm`` module inside pytorch-grad-cam (no progress bars)."""

    @staticmethod
    def tqdm(iterable: Any, *args: Any, **kwargs: Any) -> Any:
        return iterable


@contextmanager
def _quiet_progress() -> Iterator[None]:
    import pytorch_grad_cam.ablation_cam as ab
    import pytorch_grad_cam.score_cam as sc

    saved = [(m, m.tqdm) for m in (ab, sc)]
    try:
        for m, _ in saved:
            m.tqdm = _Silent
        yield
    finally:
        for m, old in saved:
            m.tqdm = old


# --------------------------------------------------------------------------- heatmaps
def class_map_heatmaps(model: nn.Module, x: torch.Tensor, finding_index: int) -> np.ndarray:
    """PYLON heatmaps: the map the authors score, min-max scaled to [0, 1].

    Definition (Preechakul et al. 2022; the official code's evaluation map): PYLON's
    prediction head outputs one logit map per class (its global max is the logit); the
    heatmap is ``sigmoid`` of that map, bilinearly upsampled (``align_corners=False``) to
    the input size (``xcam_assets.train.pylon.official_eval_map``), then scaled by
    ``(m - min) / (max - min)`` (a constant map becomes all zeros). Returns ``(N, H, W)``
    float32 in [0, 1]; its argmax is the official one.
    """
    from xcam_assets.train.pylon import official_eval_map

    if not hasattr(model, "class_maps"):
        raise ValueError(f"{type(model).__name__} has no class_maps(): 'pylon' heatmaps need "
                         "a PYLON model")
    with torch.no_grad():
        maps = model.class_maps(x)[:, finding_index:finding_index + 1].float()
        maps = official_eval_map(maps, tuple(x.shape[-2:]))[:, 0]
        flat = maps.reshape(len(maps), -1)
        lo = flat.min(dim=1).values.view(-1, 1, 1)
        span = (flat.max(dim=1).values.view(-1, 1, 1) - lo)
        out = torch.where(span > 0, (maps - lo) / span.clamp_min(1e-12), torch.zeros_like(maps))
    return out.cpu().numpy().astype(np.float32)


def compute_heatmaps(
    model: nn.Module,
    layers: list[nn.Module],
    images_u8: np.ndarray,
    method: str | MethodSpec,
    finding_index: int,
    batch_size: int = 16,
    reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    precision: Precision | None = None,
) -> np.ndarray:
    """Heatmaps for one finding's logit, batched; ``(N, H, W)`` float32 in [0, 1].

    ``precision`` (:mod:`xcam_assets.train.precision`; default plain fp32): the forward
    and backward pass run under its autocast dtype and memory format; the target layer's
    activations and gradients, the CAM and the map are float32 in every precision (FullGrad
    and ShapleyCAM run without autocast).

    ``method`` is a name or :class:`MethodSpec` (see module docstring); the CAM target is
    the finding's logit (``ClassifierOutputTarget(finding_index)``; for a single-logit
    sigmoid head that is the logit itself). ``reshape_transform`` turns the target layer's
    output into ``(B, C, h, w)`` (ViT tokens: :func:`vit_reshape_transform`). NaNs (0/0 in
    a degenerate map) become 0.
    """
    spec = method if isinstance(method, MethodSpec) else parse_method(method)
    precision = precision or LEGACY_CPU
    precision.prepare_model(model)
    model.eval()
    device = next(model.parameters()).device
    out = np.zeros(images_u8.shape, dtype=np.float32)
    if len(images_u8) == 0:
        return out
    if spec.is_class_map:
        for i in range(0, len(images_u8), batch_size):
            x = precision.prepare_input(to_input(images_u8[i:i + batch_size]).to(device))
            with precision.autocast(device):
                out[i:i + len(x)] = class_map_heatmaps(model, x, finding_index)
        return out
    cls = cam_class(spec.base)
    if not spec.relu:
        cls = _no_relu(cls)
    fast = not any(issubclass(cls, slow) for slow in FULL_BACKWARD)
    # methods that need input/bias gradients (FullGrad, ShapleyCAM) hook tensors all over
    # the network, which bf16 would leave unconvertible to numpy: they run in fp32
    autocast = precision.autocast(device) if fast else nullcontext()
    with (_backward_stops_at(model, layers) if fast else nullcontext()), \
            _quiet_progress(), \
            cls(model=model, target_layers=layers, reshape_transform=reshape_transform) as cam:
        if hasattr(cam, "batch_size"):
            cam.batch_size = max(int(batch_size), 1)
        for i in range(0, len(images_u8), batch_size):
            x = precision.prepare_input(to_input(images_u8[i:i + batch_size]).to(device))
            targets = [ClassifierOutputTarget(finding_index)] * len(x)
            with torch.enable_grad(), autocast:
                maps = cam(input_tensor=x, targets=targets)
            out[i:i + len(x)] = np.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(out, 0.0, 1.0)


def heatmap_stack(
    model: nn.Module,
    layers: list[nn.Module],
    images_u8: np.ndarray,
    method: str | MethodSpec,
    n_findings: int,
    batch_size: int = 16,
    reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    only: np.ndarray | None = None,
    peaks: np.ndarray | None = None,
    precision: Precision | None = None,
) -> np.ndarray:
    """Every finding's heatmaps: ``(N, F, H, W)`` float16 in [0, 1] (the stored form).

    ``only`` (N, F) bool computes the maps of those (image, finding) pairs alone (e.g. the
    positives: localization and faithfulness score nothing else); the others stay 0.
    ``peaks`` (N, F, 2) int receives each computed map's argmax (row, col) taken in float32
    before the float16 cast, so near-equal maxima do not tie in storage (-1 elsewhere).
    """
    maps = np.zeros((len(images_u8), n_findings, *images_u8.shape[1:]), dtype=np.float16)
    if peaks is not None:
        peaks[:] = -1
    for k in range(n_findings):
        rows = np.arange(len(images_u8)) if only is None else np.flatnonzero(only[:, k])
        if len(rows) == 0:
            continue
        heat = compute_heatmaps(model, layers, images_u8[rows], method, k,
                                batch_size=batch_size, reshape_transform=reshape_transform,
                                precision=precision)
        maps[rows, k] = heat
        if peaks is not None:
            flat = heat.reshape(len(rows), -1).argmax(axis=1)
            peaks[rows, k, 0], peaks[rows, k, 1] = np.unravel_index(flat, heat.shape[1:])
    return maps
