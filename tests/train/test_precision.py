"""Precision and memory format: the rule, determinism per precision, CAMs under bf16."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from train_helpers import ZOO, tiny_arrays

from xcam_assets.explain.cams import compute_heatmaps
from xcam_assets.train.loop import predict_logits, train_classifier
from xcam_assets.train.precision import (
    LEGACY_CPU,
    Precision,
    cpu_has_bf16,
    has_depthwise_convs,
    resolve_precision,
)
from xcam_assets.train.recipes import default_recipe
from xcam_assets.train.zoo import build_model, state_dict_hash

CPU = torch.device("cpu")


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, in_chans=1, num_classes=1)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx2\n")
    assert cpu_has_bf16.__wrapped__(str(cpuinfo)) is True
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx2\n")
    assert cpu_has_bf16.__wrapped__(str(cpuinfo)) is False
    cpuinfo.write_text("flags\t\t: amx_bf16 amx_tile\n")
    assert cpu_has_bf16.__wrapped__(str(cpuinfo)) is True
    assert cpu_has_bf16.__wrapped__(str(tmp_path / "missing")) is False


def test_the_rule_by_hardware_and_family() -> None:
    resnet, lite = _model("resnet18"), _model("tf_efficientnet_lite0")
    assert not has_depthwise_convs(resnet) and has_depthwise_convs(lite)
    # a bf16 CPU: bf16 + channels_last, except depthwise families (fp32 + channels_last)
    assert resolve_precision("auto", resnet, CPU, bf16_cpu=True) == Precision("bf16", True)
    assert resolve_precision("auto", lite, CPU, bf16_cpu=True) == Precision("fp32", True)
    # PYLON-style class-map models stay fp32 + channels_last on the CPU
    pylon = build_model("pylon_resnet50", ZOO, n_classes=1)
    assert resolve_precision("auto", pylon, CPU, bf16_cpu=True) == Precision("fp32", True)
    # no bf16 instructions: fp32 + channels_last for every family
    assert resolve_precision("auto", resnet, CPU, bf16_cpu=False) == Precision("fp32", True)
    # CUDA: bf16 + channels_last; explicit settings win over the rule
    cuda = torch.device("cuda")
    assert resolve_precision("auto", lite, cuda, bf16_cpu=False) == Precision("bf16", True)
    assert resolve_precision("fp32", resnet, CPU, bf16_cpu=True) == LEGACY_CPU
    assert resolve_precision("bf16", lite, CPU, bf16_cpu=False) == Precision("bf16", True)
    assert Precision("bf16", True).record() == {"precision": "bf16",
                                                "memory_format": "channels_last"}
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, not 'fp16'"):
        resolve_precision("fp16", resnet, CPU)
    with pytest.raises(ValueError, match="fp32 or bf16"):
        Precision("fp16")


def _train(precision: Precision, seed: int = 0) -> str:
    x_tr, y_tr, x_va, y_va = tiny_arrays(n_train=8, n_val=4, size=32)
    torch.manual_seed(seed)
    model = build_model("resnet18", ZOO, n_classes=1)
    train_classifier(model, x_tr, y_tr, x_va, y_va, batch_size=4, seed=seed,
                     recipe=default_recipe(2, 1e-3), log=lambda m: None, precision=precision)
    return state_dict_hash(model.to(memory_format=torch.contiguous_format))


@pytest.mark.parametrize("precision", [LEGACY_CPU, Precision("fp32", True),
                                       Precision("bf16", True)],
                         ids=lambda p: p.label)
def test_same_seed_same_precision_same_weights(precision: Precision) -> None:
    assert _train(precision) == _train(precision)


def test_bf16_trains_other_weights_than_fp32() -> None:
    """The precision is part of what determinism promises (and of the fingerprint): bf16
    arithmetic gives other weights than fp32 from the same seed and data."""
    assert _train(Precision("bf16", True)) != _train(LEGACY_CPU)


def test_bf16_predictions_are_close_to_fp32() -> None:
    x = tiny_arrays(n_train=6, size=64)[0]
    model = build_model("resnet18", ZOO, n_classes=1).eval()
    fp32 = predict_logits(model, x, precision=LEGACY_CPU)
    bf16 = predict_logits(model, x, precision=Precision("bf16", True))
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    assert not np.array_equal(bf16, fp32)  # bf16 really ran
    np.testing.assert_allclose(bf16, fp32, atol=0.05 * max(1.0, float(np.abs(fp32).max())))


@pytest.mark.parametrize("method", ["gradcam", "gradcam-norelu", "eigencam", "fullgrad"])
def test_cams_run_under_bf16_autocast(method: str) -> None:
    """pytorch-grad-cam alone fails under bf16 autocast (numpy has no bfloat16); ours casts
    the hooked activations to float32 and gives maps close to the fp32 ones."""
    x = tiny_arrays(n_train=4, size=64)[0]
    model = build_model("resnet18", ZOO, n_classes=1).eval()
    layers = [model.layer4]
    fp32 = compute_heatmaps(model, layers, x, method, 0, precision=LEGACY_CPU)
    bf16 = compute_heatmaps(model, layers, x, method, 0, precision=Precision("bf16", True))
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape == x.shape
    assert np.isfinite(bf16).all() and bf16.min() >= 0 and bf16.max() <= 1
    assert float(np.abs(bf16 - fp32).mean()) < 0.1
    model.to(memory_format=torch.contiguous_format)
    for p in model.parameters():  # the fast path restores what it froze
        assert p.requires_grad
