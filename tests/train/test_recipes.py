"""Recipes by configuration: the presets' settings and their exact schedules and freezing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from train_helpers import ZOO, tiny_arrays

from xcam_assets.train.loop import (
    augment,
    balanced_sample_weights,
    positive_weight,
    train_classifier,
)
from xcam_assets.train.recipes import Augment, recipe_from_profile
from xcam_assets.train.zoo import build_model, head_prefixes


class ConstantLogit(nn.Module):
    """Logit 0 whatever the input or weights: zero gradients, so Adam never moves the
    weights and the validation loss is exactly ln 2 every epoch (a perfect plateau)."""

    def __init__(self, n_classes: int = 1) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))[:, None] * 0.0 + self.w * 0.0


def test_presets_encode_the_papers_settings() -> None:
    pylon = recipe_from_profile({"recipe": "pylon", "epochs": 50, "lr": 1e-4})
    (p,) = pylon.phases
    assert (p.optimizer, p.lr, p.weight_decay, p.schedule) == ("adam", 1e-4, 0.0, "plateau")
    assert (p.plateau_patience, p.plateau_factor, p.stop_after_reductions) == (2, 0.2, 2)
    two = recipe_from_profile({"recipe": "two_phase", "epochs": 9, "phase1_epochs": 4,
                               "lr": 1e-4})
    assert [(q.name, q.freeze_backbone, q.epochs, q.schedule) for q in two.phases] == [
        ("frozen", True, 4, "plateau"), ("all", False, 9, "plateau")]
    assert recipe_from_profile({"epochs": 1, "lr": 1e-3}).phases[0].optimizer == "adamw"
    assert recipe_from_profile({"recipe": "frozen_head", "epochs": 1, "lr": 1e-3}
                               ).phases[0].freeze_backbone
    assert not recipe_from_profile({"epochs": 1, "lr": 1, "augment": False}).augment.enabled
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe_from_profile({"recipe": "magic", "epochs": 1, "lr": 1e-3})
    with pytest.raises(ValueError, match="unknown balance"):
        recipe_from_profile({"balance": "oversample", "epochs": 1, "lr": 1e-3})


def test_pylon_plateau_divides_lr_by_5_and_stops_at_the_second_reduction() -> None:
    """Constant val loss: epoch 1 sets the best; epochs 2-4 do not improve, so after epoch 4
    (3 > patience 2 bad epochs) the LR drops 1e-4 -> 2e-5; after epoch 7 the second
    reduction comes and training stops (the cap of 20 epochs is never reached)."""
    x_tr, y_tr, x_va, y_va = tiny_arrays(n_train=4, n_val=2, size=8)
    recipe = recipe_from_profile({"recipe": "pylon", "epochs": 20, "lr": 1e-4,
                                  "augment": False})
    logs: list[str] = []
    result = train_classifier(ConstantLogit(), x_tr, y_tr, x_va, y_va, batch_size=4, seed=0,
                              recipe=recipe, log=logs.append)
    assert [r["lr"] for r in result.history] == pytest.approx([1e-4] * 4 + [2e-5] * 3,
                                                              rel=1e-12)
    assert [r["val_loss"] for r in result.history] == pytest.approx([np.log(2)] * 7, abs=1e-7)
    assert result.best_epoch == 1
    assert "stopping the train phase after LR reduction 2" in logs[-1]


def test_one_cycle_starts_at_max_lr_over_25() -> None:
    x_tr, y_tr, x_va, y_va = tiny_arrays(n_train=4, n_val=2, size=8)
    recipe = recipe_from_profile({"recipe": "one_cycle", "epochs": 4, "lr": 1e-3,
                                  "augment": False})
    result = train_classifier(ConstantLogit(), x_tr, y_tr, x_va, y_va, batch_size=2, seed=0,
                              recipe=recipe, log=lambda m: None)
    lrs = [r["lr"] for r in result.history]
    assert lrs[0] == pytest.approx(1e-3 / 25, rel=1e-9)  # OneCycleLR div_factor 25
    assert lrs[1] > lrs[0] and lrs[3] < lrs[2]  # warm-up, then annealing


def _snapshot(model: nn.Module, heads: list[str]) -> tuple[dict, dict]:
    def is_head(n: str) -> bool:
        return any(n == h or n.startswith(h + ".") for h in heads)

    state = {k: v.clone() for k, v in model.state_dict().items()}
    return ({k: v for k, v in state.items() if not is_head(k)},
            {k: v for k, v in state.items() if is_head(k)})


def test_frozen_backbone_trains_only_the_head_and_keeps_batchnorm_statistics() -> None:
    x_tr, y_tr, x_va, y_va = tiny_arrays(n_train=4, n_val=2, size=32)
    torch.manual_seed(0)
    model = build_model("resnet18", ZOO, n_classes=1)
    heads = head_prefixes(model, "resnet18", ZOO)
    backbone0, head0 = _snapshot(model, heads)
    recipe = recipe_from_profile({"recipe": "frozen_head", "epochs": 1, "lr": 1e-2})
    train_classifier(model, x_tr, y_tr, x_va, y_va, batch_size=4, seed=0, recipe=recipe,
                     heads=heads, log=lambda m: None)
    backbone1, head1 = _snapshot(model, heads)
    assert all(torch.equal(backbone0[k], backbone1[k]) for k in backbone0)  # incl. BN stats
    assert not torch.equal(head0["fc.weight"], head1["fc.weight"])
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again afterwards


def test_two_phase_freezes_the_encoder_first_then_trains_all() -> None:
    x_tr, y_tr, x_va, y_va = tiny_arrays(n_train=4, n_val=2, size=32)
    torch.manual_seed(0)
    model = build_model("pylon_resnet50", ZOO, n_classes=1)
    heads = head_prefixes(model, "pylon_resnet50", ZOO)
    assert heads == ["decoder", "head"]
    encoder0 = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    decoder0 = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    moved: dict[str, tuple[bool, bool]] = {}

    def snapshot(line: str) -> None:  # called after each epoch, on the live model
        phase = line.split("[")[1].split("]")[0]
        enc = any(not torch.equal(encoder0[k], v) for k, v in model.encoder.state_dict().items())
        dec = any(not torch.equal(decoder0[k], v) for k, v in model.decoder.state_dict().items())
        moved[phase] = (enc, dec)

    recipe = recipe_from_profile({"recipe": "two_phase", "phase1_epochs": 1, "epochs": 1,
                                  "lr": 1e-3})
    result = train_classifier(model, x_tr, y_tr, x_va, y_va, batch_size=4, seed=0,
                              recipe=recipe, heads=heads, log=snapshot)
    assert [r["phase"] for r in result.history] == ["frozen", "all"]
    assert moved == {"frozen": (False, True), "all": (True, True)}


def test_class_balance_weights_by_hand() -> None:
    y = np.array([[1], [0], [0], [0]], np.float32)
    np.testing.assert_allclose(balanced_sample_weights(y).numpy(), [1.0, 1 / 3, 1 / 3, 1 / 3])
    assert positive_weight(torch.as_tensor(y)).tolist() == [3.0]  # 3 negatives / 1 positive
    y2 = np.array([[1, 0], [0, 0], [0, 1], [0, 1]], np.float32)
    np.testing.assert_allclose(balanced_sample_weights(y2).numpy(),
                               [(1 + 1 / 2) / 2, (1 / 3 + 1 / 2) / 2,
                                (1 / 3 + 1 / 2) / 2, (1 / 3 + 1 / 2) / 2])
    # the sampler draws positives about as often as negatives
    x_tr, y_tr, x_va, y_va = tiny_arrays(n_train=8, n_val=2, size=8)
    y_tr[:] = 0
    y_tr[0] = 1
    w = balanced_sample_weights(y_tr)
    draws = torch.multinomial(w, 4000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert abs(float((draws == 0).float().mean()) - 0.5) < 0.03


def test_multi_label_head_trains_one_logit_per_finding() -> None:
    x_tr, y_tr, x_va, y_va = tiny_arrays(n_train=4, n_val=4, size=32, n_findings=2)
    torch.manual_seed(0)
    model = build_model("resnet18", ZOO, n_classes=2)
    result = train_classifier(model, x_tr, y_tr, x_va, y_va, batch_size=4, seed=0,
                              recipe=recipe_from_profile({"epochs": 1, "lr": 1e-3,
                                                          "balance": "sampler"}),
                              log=lambda m: None)
    assert model.fc.out_features == 2 and np.isfinite(result.history[0]["val_auc"])


def test_augmentation_flips_rotates_and_adds_noise_reproducibly() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(8, 1, 1, 1)
    flipped = augment(x, torch.Generator().manual_seed(1), max_degrees=0, noise_std=0)
    for img in flipped:  # each image is the original or its mirror, both occur
        assert torch.equal(img, x[0]) or torch.equal(img, x[0].flip(-1))
    assert {torch.equal(img, x[0]) for img in flipped} == {True, False}
    a = augment(x, torch.Generator().manual_seed(2), max_degrees=15, noise_std=0.1, vflip=True)
    b = augment(x, torch.Generator().manual_seed(2), max_degrees=15, noise_std=0.1, vflip=True)
    assert torch.equal(a, b) and not torch.equal(a, x)
    assert Augment().rotation_deg == 10.0 and Augment().noise_std == 0.05
