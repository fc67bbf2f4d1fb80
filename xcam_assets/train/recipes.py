"""Training recipes chosen by configuration (`recipe:` in a profile of resources/params.yaml).

A recipe is a list of phases (optimizer, learning rate, schedule, stopping rule, which
parameters train) plus the data-side choices (class balancing, augmentation). Presets:

* ``adamw`` (default): AdamW, constant LR, ``epochs`` epochs, weight decay 1e-4.
* ``pylon`` (Preechakul et al. 2022): Adam at ``lr`` (the paper: 1e-4), no weight decay;
  LR / 5 when the validation loss has not improved for 2 epochs (ReduceLROnPlateau,
  factor 0.2, patience 2); training stops at the epoch that brings the **second**
  reduction (the reduced LR is never used: "stop after the second reduction");
  ``epochs`` caps the phase.
* ``one_cycle``: AdamW with the one-cycle policy (Smith 2018; peak ``lr``, 30 % warm-up,
  stepped per batch), as in the histopathology study.
* ``frozen_head``: backbone frozen (parameters fixed, BatchNorm statistics fixed), only the
  zoo entry's ``head`` modules train (the COVID-19 AOPC study's frozen backbones).
* ``two_phase``: phase 1 freezes the backbone (encoder) and trains the head/decoder "until
  convergence" (the base recipe's stopping rule, at most ``phase1_epochs``), phase 2
  starts from phase 1's best weights and trains everything; base recipe ``pylon`` unless
  ``two_phase_base`` says otherwise.

The best weights over all phases are kept by validation loss. Profile keys read here:
``recipe``, ``epochs``, ``lr``, ``weight_decay``, ``plateau_patience``, ``plateau_factor``,
``stop_after_reductions``, ``phase1_epochs``, ``phase1_lr``, ``two_phase_base``,
``one_cycle_pct_start``, ``balance`` and ``augment``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

PRESETS = ("adamw", "pylon", "one_cycle", "frozen_head", "two_phase")
BALANCE = ("pos_weight", "sampler", "none")


@dataclass(frozen=True)
class Augment:
    """Random rotation (uniform +-degrees), flips (p = 0.5 each) and Gaussian noise."""

    rotation_deg: float = 10.0
    hflip: bool = True
    vflip: bool = False
    noise_std: float = 0.05
    enabled: bool = True


@dataclass(frozen=True)
class Phase:
    """One stretch of training with one optimizer and schedule."""

    name: str
    epochs: int
    lr: float
    optimizer: str = "adamw"          # adam | adamw | sgd
    weight_decay: float = 1e-4
    schedule: str = "constant"        # constant | plateau | one_cycle
    plateau_patience: int = 2
    plateau_factor: float = 0.2
    stop_after_reductions: int | None = None
    one_cycle_pct_start: float = 0.3
    freeze_backbone: bool = False
    start_from_best: bool = True      # begin from the best weights so far (phase > 1)


@dataclass(frozen=True)
class Recipe:
    name: str
    phases: tuple[Phase, ...]
    balance: str = "pos_weight"       # pos_weight (BCE pos_weight) | sampler | none
    augment: Augment = field(default_factory=Augment)

    @property
    def max_epochs(self) -> int:
        return sum(p.epochs for p in self.phases)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _augment(profile: dict[str, Any]) -> Augment:
    raw = profile.get("augment", True)
    if raw is False or raw is None:
        return Augment(enabled=False)
    if raw is True:
        return Augment()
    known = set(Augment.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"unknown augment keys {sorted(unknown)} (known: {sorted(known)})")
    return Augment(**raw)


def _plateau(profile: dict[str, Any], name: str, epochs: int, lr: float) -> Phase:
    return Phase(name=name, epochs=epochs, lr=lr, optimizer="adam",
                 weight_decay=float(profile.get("weight_decay", 0.0)), schedule="plateau",
                 plateau_patience=int(profile.get("plateau_patience", 2)),
                 plateau_factor=float(profile.get("plateau_factor", 0.2)),
                 stop_after_reductions=int(profile.get("stop_after_reductions", 2)))


def _base_phase(preset: str, profile: dict[str, Any], epochs: int, lr: float) -> Phase:
    wd = float(profile.get("weight_decay", 1e-4))
    if preset == "adamw":
        return Phase(name="train", epochs=epochs, lr=lr, weight_decay=wd)
    if preset == "pylon":
        return _plateau(profile, "train", epochs, lr)
    if preset == "one_cycle":
        return Phase(name="train", epochs=epochs, lr=lr, weight_decay=wd, schedule="one_cycle",
                     one_cycle_pct_start=float(profile.get("one_cycle_pct_start", 0.3)))
    if preset == "frozen_head":
        return Phase(name="head", epochs=epochs, lr=lr, weight_decay=wd, freeze_backbone=True)
    raise ValueError(f"unknown recipe {preset!r} (known: {', '.join(PRESETS)})")


def recipe_from_profile(profile: dict[str, Any]) -> Recipe:
    """The Recipe a profile asks for (`recipe:` preset name, default `adamw`)."""
    name = str(profile.get("recipe", "adamw"))
    epochs, lr = int(profile["epochs"]), float(profile["lr"])
    balance = str(profile.get("balance", "pos_weight"))
    if balance not in BALANCE:
        raise ValueError(f"unknown balance {balance!r} (known: {', '.join(BALANCE)})")
    if name == "two_phase":
        base = str(profile.get("two_phase_base", "pylon"))
        if base in ("two_phase", "frozen_head"):
            raise ValueError(f"two_phase_base must be a one-phase recipe, not {base!r}")
        p1 = _base_phase(base, profile, int(profile.get("phase1_epochs", epochs)),
                         float(profile.get("phase1_lr", lr)))
        p2 = _base_phase(base, profile, epochs, lr)
        phases = (replace(p1, name="frozen", freeze_backbone=True),
                  replace(p2, name="all", freeze_backbone=False))
    else:
        phases = (_base_phase(name, profile, epochs, lr),)
    if any(p.epochs < 1 for p in phases):
        raise ValueError(f"recipe {name}: every phase needs epochs >= 1")
    return Recipe(name=name, phases=phases, balance=balance, augment=_augment(profile))


def default_recipe(epochs: int, lr: float) -> Recipe:
    """The loop's historical behaviour: AdamW, constant LR, BCE pos_weight, augmentation."""
    return recipe_from_profile({"epochs": epochs, "lr": lr})
