"""The official PYLON training protocol (cmb-chula/pylon on NIH ChestX-ray14) by configuration.

Plateau rule with the LR floor stop (`stop_at_lr`), the official augmentation keys, frozen
BatchNorm in train mode (`frozen_bn: train`), `pretrained` per architecture, and the model
card's description of each; the defaults must leave today's training bit for bit.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from train_helpers import ZOO, tiny_arrays

from xcam_assets.train import stage
from xcam_assets.train.fit import pretrained_for
from xcam_assets.train.loop import (
    MEAN,
    STD,
    _augment_with,
    augment,
    crop_and_resize,
    random_resized_crop_boxes,
    to_input,
    train_classifier,
)
from xcam_assets.train.recipes import Augment, recipe_from_profile
from xcam_assets.train.stage import describe_recipe
from xcam_assets.train.zoo import build_model, head_prefixes

OFFICIAL_NIH = {
    "recipe": "pylon", "epochs": 40, "lr": 1e-4, "weight_decay": 0.0,
    "plateau_patience": 1, "plateau_factor": 0.2, "stop_at_lr": 1.0e-6, "balance": "none",
    "augment": {"rotation_deg": 90, "rotation_p": 0.5, "rotation_padding": "black",
                "crop_scale": [0.7, 1.0], "crop_ratio": [0.75, 1.3333333333333333],
                "hflip": True, "vflip": False, "brightness": 0.5, "contrast": 0.5,
                "brightness_contrast_p": 0.5, "noise_std": 0.0},
}


# --------------------------------------------------------------------------- schedule
class ScriptedVal(nn.Module):
    """Training: logit 0 with zero gradients (Adam never moves `w`). Validation (eval mode,
    one call per epoch for <= 64 validation images): the k-th call returns the logit
    `script[k]` for every image, so with one positive and one negative the val loss is
    (softplus(c) + softplus(-c)) / 2, increasing in |c|: a scripted val-loss sequence."""

    def __init__(self, script: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.script = list(script)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zero = x.mean(dim=(1, 2, 3))[:, None] * 0.0 + self.w * 0.0
        if self.training:
            return zero
        c = self.script[self.calls]
        self.calls += 1
        return zero + c


def _val_loss(c: float) -> float:
    return (math.log1p(math.exp(c)) + math.log1p(math.exp(-c))) / 2


def _run(script: list[float], **profile) -> tuple[object, list[str]]:
    x_tr, y_tr, x_va, y_va = tiny_arrays(n_train=4, n_val=2, size=8)
    assert sorted(y_va[:, 0].tolist()) == [0.0, 1.0]
    recipe = recipe_from_profile({**OFFICIAL_NIH, "augment": False, **profile})
    logs: list[str] = []
    result = train_classifier(ScriptedVal(script), x_tr, y_tr, x_va, y_va, batch_size=4,
                              seed=0, recipe=recipe, log=logs.append)
    return result, logs


def test_official_recipe_reads_the_protocol_keys() -> None:
    (p,) = recipe_from_profile(OFFICIAL_NIH).phases
    assert (p.optimizer, p.lr, p.weight_decay, p.schedule, p.epochs) == (
        "adam", 1e-4, 0.0, "plateau", 40)
    assert (p.plateau_patience, p.plateau_factor, p.stop_at_lr) == (1, 0.2, 1e-6)
    assert p.stop_after_reductions is None  # the LR floor replaces the reduction count
    both = recipe_from_profile({**OFFICIAL_NIH, "stop_after_reductions": 1}).phases[0]
    assert (both.stop_after_reductions, both.stop_at_lr) == (1, 1e-6)
    old = recipe_from_profile({"recipe": "pylon", "epochs": 5, "lr": 1e-4}).phases[0]
    assert (old.stop_after_reductions, old.stop_at_lr, old.frozen_bn) == (2, None, "eval")
    with pytest.raises(ValueError, match="needs a plateau schedule"):
        recipe_from_profile({"epochs": 2, "lr": 1e-4, "stop_at_lr": 1e-6})
    with pytest.raises(ValueError, match="must lie in"):
        recipe_from_profile({**OFFICIAL_NIH, "stop_at_lr": 1e-4})


def test_constant_val_loss_reduces_1e4_2e5_4e6_and_stops_at_8e7() -> None:
    """Patience 1: epoch 1 sets the best, epochs 2 and 3 do not improve (2 > 1 bad epochs)
    so after epoch 3 the LR drops to 2e-5; after epochs 5 and 7 to 4e-6 and 8e-7. 8e-7 <=
    1e-6: training stops after epoch 7 (8e-7 is never used; the cap of 40 is not reached)."""
    result, logs = _run([0.0] * 40)
    assert [r["lr"] for r in result.history] == pytest.approx(
        [1e-4] * 3 + [2e-5] * 2 + [4e-6] * 2, rel=1e-12)
    assert result.best_epoch == 1
    assert "stopping the train phase as the LR fell to 8.00e-07 <= stop_at_lr 1e-06" in logs[-1]


def test_scripted_val_losses_give_the_hand_computed_lrs_and_stopping_epoch() -> None:
    """Val-loss ranks scripted by |logit|: improvements reset the bad-epoch count, two bad
    epochs in a row (patience 1) divide the LR by 5.

    epoch  1    2    3    4    5    6    7    8    9    10   11   12   13
    |c|    3.0  2.5  2.8  2.0  2.2  2.2  1.5  1.7  1.8  1.8  1.0  1.2  1.2
    event  best best bad  best bad  bad> best bad  bad> bad  best bad  bad> stop
    LR     1e-4 for epochs 1-6, 2e-5 for 7-9, 4e-6 for 10-13, then 8e-7 <= 1e-6: stop after 13.
    """
    script = [3.0, 2.5, 2.8, 2.0, 2.2, 2.2, 1.5, 1.7, 1.8, 1.8, 1.0, 1.2, 1.2] + [0.0] * 27
    result, _ = _run(script)
    assert len(result.history) == 13
    assert [r["lr"] for r in result.history] == pytest.approx(
        [1e-4] * 6 + [2e-5] * 3 + [4e-6] * 4, rel=1e-12)
    assert [r["val_loss"] for r in result.history] == pytest.approx(
        [_val_loss(c) for c in script[:13]], abs=1e-6)
    assert result.best_epoch == 11


def test_the_epoch_cap_and_the_reduction_count_still_stop_first() -> None:
    result, _ = _run([0.0] * 40, epochs=4)  # cap before the LR floor
    assert [r["lr"] for r in result.history] == pytest.approx([1e-4] * 3 + [2e-5], rel=1e-12)
    result, logs = _run([0.0] * 40, stop_after_reductions=1)  # both rules: the first fires
    assert len(result.history) == 3
    assert "stopping the train phase after LR reduction 1" in logs[-1]


def test_a_resumed_run_stops_at_the_same_epoch(tmp_path) -> None:
    x_tr, y_tr, x_va, y_va = tiny_arrays(n_train=4, n_val=2, size=8)
    recipe = recipe_from_profile({**OFFICIAL_NIH, "augment": False})
    script = [0.0] * 40

    class Stop(Exception):
        pass

    def crash(line: str) -> None:
        if line.startswith("epoch 4/"):
            raise Stop

    with pytest.raises(Stop):
        train_classifier(ScriptedVal(script), x_tr, y_tr, x_va, y_va, batch_size=4, seed=0,
                         recipe=recipe, log=crash, resume_path=tmp_path / "r.pt")
    model = ScriptedVal(script)
    model.calls = 4  # the validation calls the crashed run made
    result = train_classifier(model, x_tr, y_tr, x_va, y_va, batch_size=4, seed=0,
                              recipe=recipe, log=lambda m: None, resume_path=tmp_path / "r.pt")
    assert result.resumed_from_epoch == 4
    assert [r["lr"] for r in result.history] == pytest.approx(
        [1e-4] * 3 + [2e-5] * 2 + [4e-6] * 2, rel=1e-12)


# --------------------------------------------------------------------------- augmentation
def legacy_augment(x: torch.Tensor, gen: torch.Generator, max_degrees: float = 10.0,
                   noise_std: float = 0.05, hflip: bool = True,
                   vflip: bool = False) -> torch.Tensor:
    """The loop's augmentation before the official keys existed, verbatim."""
    n = x.shape[0]
    if hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    if max_degrees > 0:
        angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(max_degrees)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros(n)], 1),
                             torch.stack([sin, cos, torch.zeros(n)], 1)], 1).to(x)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, align_corners=False, padding_mode="border")
    if noise_std > 0:
        x = x + torch.randn(x.shape, generator=gen).to(x) * noise_std
    if vflip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-2), x)
    return x


def _batch(n: int = 6, size: int = 16, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return to_input(rng.integers(0, 256, (n, size, size), dtype=np.uint8))


@pytest.mark.parametrize("kw", [{}, {"max_degrees": 15, "vflip": True},
                                {"max_degrees": 0, "noise_std": 0.0, "hflip": False},
                                {"noise_std": 0.2, "hflip": False}])
def test_defaults_reproduce_todays_augmentation_bit_for_bit(kw: dict) -> None:
    x = _batch()
    g_old, g_new = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(legacy_augment(x, g_old, **kw), augment(x, g_new, **kw))
    assert torch.equal(g_old.get_state(), g_new.get_state())  # the same draws, no more
    g_old, g_new = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(legacy_augment(x, g_old), _augment_with(x, g_new, Augment()))
    assert torch.equal(g_old.get_state(), g_new.get_state())
    a = Augment()
    assert (a.rotation_p, a.rotation_padding, a.crop_scale, a.brightness, a.contrast) == (
        1.0, "edge", None, 0.0, 0.0)


def test_rotation_with_probability_zero_or_half() -> None:
    x = _batch(n=32)
    kw = {"max_degrees": 90, "noise_std": 0.0, "hflip": False}
    assert torch.equal(augment(x, torch.Generator().manual_seed(1), rotation_p=0.0, **kw), x)
    half = augment(x, torch.Generator().manual_seed(1), rotation_p=0.5, **kw)
    same = [torch.equal(a, b) for a, b in zip(half, x, strict=True)]
    assert 0 < sum(same) < len(same)  # untouched images are exactly the originals


def test_rotation_padding_edge_keeps_a_flat_image_flat_black_fills_with_pixel_0() -> None:
    flat = to_input(np.full((16, 12, 12), 200, np.uint8))
    kw = {"max_degrees": 90, "noise_std": 0.0, "hflip": False}
    edge = augment(flat, torch.Generator().manual_seed(2), **kw)
    torch.testing.assert_close(edge, flat)
    black = augment(flat, torch.Generator().manual_seed(2), rotation_padding="black", **kw)
    assert black.min().item() == pytest.approx(-MEAN / STD, abs=1e-5)  # pixel 0 corners
    assert black.max().item() == pytest.approx(flat.max().item(), abs=1e-5)


def test_random_resized_crop_boxes_follow_the_rule_and_keep_the_image_size() -> None:
    gen = torch.Generator().manual_seed(0)
    boxes = random_resized_crop_boxes(4000, 64, 64, (0.7, 1.0), (3 / 4, 4 / 3), gen)
    top, left, h, w = boxes.T
    assert bool(((top >= 0) & (left >= 0) & (top + h <= 64) & (left + w <= 64)).all())
    frac = (h * w).double() / 64**2
    assert frac.min() > 0.68 and frac.max() <= 1.0  # U(0.7, 1) up to rounding
    ratio = w.double() / h
    assert ratio.min() > 0.72 and ratio.max() < 1.39  # [3/4, 4/3] up to rounding
    assert (h != w).any() and (top > 0).any() and (left > 0).any()
    # nothing fits (ratio 4-5 on a square at full area): the central crop, ratio clamped
    (fallback,) = random_resized_crop_boxes(1, 64, 64, (1.0, 1.0), (4.0, 5.0),
                                            torch.Generator().manual_seed(0)).tolist()
    assert fallback == [24, 0, 16, 64]

    x = _batch(n=5, size=20)
    out = augment(x, torch.Generator().manual_seed(7), max_degrees=0, noise_std=0.0,
                  hflip=False, crop_scale=(0.5, 0.9))
    assert out.shape == x.shape and not torch.equal(out, x)
    # the crop is the box resized by bilinear sampling (F.interpolate of the cut-out)
    g = torch.Generator().manual_seed(7)
    for img, src, (t, le, hh, ww) in zip(
            out, x, random_resized_crop_boxes(5, 20, 20, (0.5, 0.9), (3 / 4, 4 / 3), g).tolist(),
            strict=True):
        ref = F.interpolate(src[None, :, t:t + hh, le:le + ww], size=(20, 20), mode="bilinear",
                            align_corners=False)[0]
        torch.testing.assert_close(img, ref, atol=1e-5, rtol=0)
    whole = crop_and_resize(x, torch.tensor([[0, 0, 20, 20]] * 5))
    torch.testing.assert_close(whole, x, atol=1e-5, rtol=0)


def _pixels(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


def test_brightness_and_contrast_follow_albumentations_ranges() -> None:
    n = 2000
    grey = to_input(np.full((n, 2, 2), 128, np.uint8))
    v = 128 / 255
    kw = {"max_degrees": 0, "noise_std": 0.0, "hflip": False}
    # brightness by max: v + U(-0.5, 0.5) (no clipping from v = 128/255), on about half
    aug = augment(grey, torch.Generator().manual_seed(0), brightness=0.5, **kw)
    changed = (aug != grey).flatten(1).any(1)
    assert 0.45 < changed.float().mean() < 0.55  # brightness_contrast_p 0.5
    assert torch.equal(aug[~changed], grey[~changed])
    shift = _pixels(aug)[changed][:, 0, 0, 0].double() - v
    assert shift.min() >= -0.5 - 1e-6 and shift.max() <= 0.5 + 1e-6
    assert shift.min() < -0.45 and shift.max() > 0.45
    assert torch.equal(aug, aug[:, :, :1, :1].expand_as(aug))  # one shift per image
    # contrast: v * U(0.5, 1.5), always applied at p = 1
    out = _pixels(augment(grey, torch.Generator().manual_seed(0), contrast=0.5,
                          brightness_contrast_p=1.0, **kw))
    factor = out[:, 0, 0, 0].double() / v
    assert factor.min() >= 0.5 - 1e-5 and factor.max() <= 1.5 + 1e-5
    assert factor.min() < 0.55 and factor.max() > 1.45 and (factor != 1).all()
    # clipping at white
    bright = to_input(np.full((64, 2, 2), 250, np.uint8))
    out = augment(bright, torch.Generator().manual_seed(1), brightness=0.5,
                  brightness_contrast_p=1.0, **kw)
    assert out.max().item() == pytest.approx((1 - MEAN) / STD)


def test_the_official_augmentation_is_seeded() -> None:
    aug = recipe_from_profile(OFFICIAL_NIH).augment
    x = _batch(n=8, size=24)
    a = _augment_with(x, torch.Generator().manual_seed(5), aug)
    b = _augment_with(x, torch.Generator().manual_seed(5), aug)
    c = _augment_with(x, torch.Generator().manual_seed(6), aug)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert aug.crop_scale == (0.7, 1.0) and aug.crop_ratio == pytest.approx((0.75, 4 / 3))
    for bad in ({"rotation_p": 1.5}, {"crop_scale": [0.0, 1.0]}, {"crop_scale": [0.9, 0.7]},
                {"rotation_padding": "mirror"}, {"contrast": 2.0}, {"brightness": -0.1},
                {"colour": 1}):
        with pytest.raises(ValueError):
            recipe_from_profile({"epochs": 1, "lr": 1e-3, "augment": bad})


# --------------------------------------------------------------------------- frozen BN
def _bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def test_frozen_bn_train_updates_running_statistics_but_not_the_weights() -> None:
    x_tr, y_tr, x_va, y_va = tiny_arrays(n_train=4, n_val=2, size=32)
    torch.manual_seed(0)
    model = build_model("resnet18", ZOO, n_classes=1)
    heads = head_prefixes(model, "resnet18", ZOO)
    params0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    stats0 = _bn_buffers(model)
    recipe = recipe_from_profile({"recipe": "frozen_head", "epochs": 1, "lr": 1e-2,
                                  "frozen_bn": "train"})
    assert recipe.phases[0].frozen_bn == "train"
    train_classifier(model, x_tr, y_tr, x_va, y_va, batch_size=4, seed=0, recipe=recipe,
                     heads=heads, log=lambda m: None)
    for k, v in model.named_parameters():
        assert torch.equal(v, params0[k]) == (not k.startswith("fc.")), k  # only fc moved
    stats1 = _bn_buffers(model)
    assert stats1["bn1.num_batches_tracked"].item() == 1
    assert not torch.equal(stats0["bn1.running_mean"], stats1["bn1.running_mean"])
    assert not torch.equal(stats0["layer4.1.bn2.running_var"], stats1["layer4.1.bn2.running_var"])


def test_frozen_bn_applies_to_the_frozen_phase_only_and_is_checked() -> None:
    two = recipe_from_profile({"recipe": "two_phase", "epochs": 2, "lr": 1e-4,
                               "frozen_bn": "train", "stop_at_lr": 1e-6,
                               "plateau_patience": 1})
    assert [(p.name, p.frozen_bn, p.stop_at_lr, p.stop_after_reductions)
            for p in two.phases] == [("frozen", "train", 1e-6, None),
                                     ("all", "eval", 1e-6, None)]
    with pytest.raises(ValueError, match="unknown frozen_bn"):
        recipe_from_profile({"recipe": "frozen_head", "epochs": 1, "lr": 1,
                             "frozen_bn": "frozen"})
    with pytest.raises(ValueError, match="frozen-backbone phase"):
        recipe_from_profile({"recipe": "pylon", "epochs": 1, "lr": 1, "frozen_bn": "train"})


# --------------------------------------------------------------------------- pretrained
def test_pretrained_per_architecture() -> None:
    names = list(ZOO)
    assert pretrained_for(True, "resnet18", names) is True
    assert pretrained_for(False, "resnet18", names) is False
    assert pretrained_for(None, "resnet18", names) is False
    listed = ["efficientnet_lite0", "pylon_efficientnet_lite0"]
    assert pretrained_for(listed, "pylon_efficientnet_lite0", names) is True
    assert pretrained_for(listed, "resnet18", names) is None  # from scratch, no file
    with pytest.raises(ValueError, match="does not know"):
        pretrained_for(["resnet81"], "resnet18", names)


@pytest.mark.parametrize(("raw", "arch", "expected"), [
    (True, "resnet18", [("resnet18", True)]), (False, "resnet18", [("resnet18", False)]),
    (["efficientnet_lite0"], "efficientnet_lite0", [("efficientnet_lite0", True)]),
    (["efficientnet_lite0"], "resnet18", [])])
def test_train_and_save_asks_for_pretrained_weights_per_architecture(
        monkeypatch: pytest.MonkeyPatch, raw: object, arch: str, expected: list) -> None:
    calls: list[tuple[str, bool]] = []

    class Reached(Exception):
        pass

    def fake_resolve(name, zoo, pretrained=False, **kw):
        calls.append((name, pretrained))

    def stop(*a, **kw):
        raise Reached

    monkeypatch.setattr(stage, "resolve_pretrained", fake_resolve)
    monkeypatch.setattr(stage, "split_arrays", stop)
    profile = {"epochs": 1, "lr": 1e-3, "pretrained": raw, "pretrained_file": None}
    settings = SimpleNamespace(profile=profile, training_profile=lambda _arch: profile, zoo=ZOO,
                               seed=0, root=None)
    with pytest.raises(Reached):
        stage.train_and_save(settings, arch, log=lambda m: None)
    assert calls == expected


# --------------------------------------------------------------------------- model card
def test_the_model_card_names_the_official_elements() -> None:
    text = describe_recipe(recipe_from_profile(OFFICIAL_NIH))
    for needle in ("LR x0.2 after 1 epochs without val-loss improvement",
                   "stop when the LR falls to <= 1e-06", "at most 40 epochs",
                   "rotation +-90 deg with p 0.5 (black corners)",
                   "random resized crop scale 0.7-1 ratio 0.75-1.33",
                   "brightness +-0.5 / contrast +-0.5", "with p 0.5", "noise sd 0"):
        assert needle in text, needle
    assert "stop after reduction" not in text
    frozen = describe_recipe(recipe_from_profile({"recipe": "two_phase", "epochs": 3,
                                                  "lr": 1e-4, "frozen_bn": "train"}))
    assert "BatchNorm in train mode" in frozen and "stop after reduction 2" in frozen
    today = describe_recipe(recipe_from_profile({"recipe": "pylon", "epochs": 5, "lr": 1e-4}))
    assert today == ("recipe `pylon`; phase `train`: all layers, adam lr 0.0001 wd 0, LR x0.2 "
                     "after 2 epochs without val-loss improvement, stop after reduction 2, at "
                     "most 5 epochs. Class balance: pos_weight. Augmentation: rotation +-10 "
                     "deg, hflip True, vflip False, noise sd 0.05.")
