"""Numeric precision and memory format for training and CAM inference.

A profile's ``precision: auto | fp32 | bf16`` becomes a :class:`Precision` for one model
on one device (:func:`resolve_precision`):

* ``fp32``: float32 everywhere, contiguous tensors on the CPU (what the loop always did;
  channels_last on CUDA, which changes no arithmetic there).
* ``bf16``: bfloat16 autocast for the forward pass (fp32 master weights, fp32 loss and
  optimizer), channels_last.
* ``auto``: chosen by the hardware and the architecture, by a rule measured here (AMD EPYC
  with ``avx512_bf16``, bare timm training step at 224 px, batch 16; see issue #19):

  ==========================  =====  ===============  =============
  img/s                        fp32  fp32 + ch.last   bf16 + ch.last
  ==========================  =====  ===============  =============
  resnet18                     16.5       18.9             34.7
  densenet121                   6.9        8.5             14.7
  tf_efficientnet_lite0        17.4       28.7             24.8
  ==========================  =====  ===============  =============

  On CUDA: bf16 + channels_last. On a CPU with bf16 instructions (``avx512_bf16`` or
  ``amx_bf16`` in ``/proc/cpuinfo``): bf16 + channels_last, except for models built on
  depthwise convolutions (EfficientNet, MobileNet; PYLON over such an encoder), where
  oneDNN's bf16 depthwise kernels lose to fp32 and fp32 + channels_last is fastest, and
  for PYLON-style class-map models (fp32 + channels_last: a bf16-trained one gave
  non-finite fp32 logits, a cause not yet found).
  Elsewhere fp32 + channels_last (the channels_last kernels are the faster fp32 path of
  oneDNN for every family measured).

Autocast is torch's own (``torch.autocast``); nothing here re-implements mixed precision.
The resolved precision is recorded on the checkpoint's sidecar, the model card and the
heatmap set's metadata, and is part of the training fingerprint: the same seed, data and
precision give the same weights.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

SETTINGS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Precision:
    """What the forward pass runs in: ``dtype`` ``"fp32"`` or ``"bf16"`` (autocast), and
    whether inputs and weights are channels_last."""

    dtype: str = "fp32"
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"precision dtype must be fp32 or bf16, not {self.dtype!r}")

    @property
    def memory_format(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"

    @property
    def label(self) -> str:
        """``bf16+channels_last``, ``fp32+channels_last`` or ``fp32``."""
        return self.dtype + ("+channels_last" if self.channels_last else "")

    def autocast(self, device: torch.device) -> AbstractContextManager:
        """``torch.autocast`` to bfloat16 on ``device`` for bf16, else nothing."""
        if self.dtype == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def record(self) -> dict[str, str]:
        """For sidecars, model cards and metadata."""
        return {"precision": self.dtype, "memory_format": self.memory_format}


LEGACY_CPU = Precision("fp32", False)
CUDA_BF16 = Precision("bf16", True)


def legacy_precision(device: torch.device) -> Precision:
    """What the loop did before precisions were configurable: bf16 + channels_last on
    CUDA, plain fp32 on the CPU (the default of the bare functions)."""
    return CUDA_BF16 if device.type == "cuda" else LEGACY_CPU


@functools.cache
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU advertises native bf16 arithmetic (``avx512_bf16`` or ``amx_bf16``)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def has_depthwise_convs(model: nn.Module) -> bool:
    """True when a sizeable share (>= 10%) of the model's convolutions are depthwise
    (``groups == in_channels > 1``): the EfficientNet/MobileNet families."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [m for m in convs if m.groups > 1 and m.groups == m.in_channels]
    return bool(convs) and len(depthwise) >= 0.1 * len(convs)


def resolve_precision(setting: str, model: nn.Module, device: torch.device,
                      bf16_cpu: bool | None = None) -> Precision:
    """The :class:`Precision` for ``setting`` (``auto | fp32 | bf16``), ``model`` and
    ``device`` (rule in the module docstring). ``bf16_cpu`` overrides the CPU probe."""
    if setting not in SETTINGS:
        raise ValueError(f"precision must be one of {', '.join(SETTINGS)}, not {setting!r}")
    cuda = device.type == "cuda"
    if setting == "fp32":
        return Precision("fp32", channels_last=cuda)
    if setting == "bf16" or cuda:
        return CUDA_BF16
    bf16 = cpu_has_bf16() if bf16_cpu is None else bf16_cpu
    # PYLON-style class-map models stay fp32 on the CPU: a bf16-trained tiny PYLON over
    # ResNet-50 gave non-finite fp32 logits in the clean-clone tests (not understood yet)
    if bf16 and not has_depthwise_convs(model) and not hasattr(model, "class_maps"):
        return Precision("bf16", True)
    return Precision("fp32", True)
