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

Elements of the official PYLON protocol (cmb-chula/pylon, NIH ChestX-ray14), each a key:

* ``stop_at_lr`` (plateau recipes): stop the phase at the epoch whose plateau step brings
  the LR to ``<= stop_at_lr`` (the reduced LR is never used). The official code stops when
  the LR is <= 1e-6 (``Config.lr_term = 1e-6`` and ``TerminateLRCb`` in
  ``utils/exp_base.py`` / ``trainer/callbacks/common_cb.py``), with ReduceLROnPlateau on
  the val loss, patience 1, factor 0.2 (``rop_patience``, ``rop_factor``), Adam 1e-4, at
  most 40 epochs on NIH (``NIH14Config.n_ep``): 1e-4 -> 2e-5 -> 4e-6 -> 8e-7 stops, so the
  third reduction ends training. With ``stop_at_lr`` set, ``stop_after_reductions``
  defaults to none (give both and the first rule to fire stops the phase); without it,
  ``stop_after_reductions`` defaults to 2 as before.
* ``frozen_bn`` (frozen-backbone phases: ``frozen_head``, ``two_phase``): ``eval``
  (default: the frozen backbone's BatchNorm layers use and keep their running statistics)
  or ``train`` (they normalise by batch statistics and update their running statistics
  while their weights stay frozen: the official two-phase VinDr transfer, whose phase 1
  only sets ``requires_grad_(False)`` on the encoder and keeps the network in train mode,
  ``pylon.py`` ``freeze='enc'``).
* ``augment:`` keys ``rotation_p``, ``rotation_padding``, ``crop_scale``, ``crop_ratio``,
  ``brightness``, ``contrast``, ``brightness_contrast_p`` (see `Augment` and
  `xcam_assets.train.loop.augment`); their defaults leave today's augmentation unchanged.

The best weights over all phases are kept by validation loss. Profile keys read here:
``recipe``, ``epochs``, ``lr``, ``weight_decay``, ``plateau_patience``, ``plateau_factor``,
``stop_after_reductions``, ``stop_at_lr``, ``frozen_bn``, ``phase1_epochs``, ``phase1_lr``,
``two_phase_base``, ``one_cycle_pct_start``, ``balance`` and ``augment``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

PRESETS = ("adamw", "pylon", "one_cycle", "frozen_head", "two_phase")
BALANCE = ("pos_weight", "sampler", "none")
FROZEN_BN = ("eval", "train")
ROTATION_PADDING = ("edge", "black")


@dataclass(frozen=True)
class Augment:
    """Random rotation (uniform +-degrees), flips (p = 0.5 each) and Gaussian noise; and,
    off by default, the official PYLON set (``data/transform.py`` XRayTransformConfig, on
    albumentations 0.5.2): rotation with a probability and black corners, random resized
    crop, brightness/contrast. Applied in `xcam_assets.train.loop.augment` (order there).

    * ``rotation_p``: probability of rotating an image (default 1.0: always, as ever;
      official 0.5 with ``rotation_deg`` 90: ``Rotate(90, border_mode=0, p=0.5)``).
    * ``rotation_padding``: what fills the corners a rotation uncovers: ``edge`` (default:
      the nearest border pixel) or ``black`` (pixel value 0: the official
      ``cv2.BORDER_CONSTANT`` with value 0).
    * ``crop_scale`` ``[min, max]``: random resized crop (off when absent): a box of
      area fraction U(min, max) and aspect ratio log-uniform in ``crop_ratio`` (default
      ``[3/4, 4/3]``, the official's and torchvision's), resized back to the image size;
      official ``RandomResizedCrop(scale=(0.7, 1.0), ratio=(3/4, 4/3), p=1)``.
    * ``brightness`` / ``contrast`` (0 = off): albumentations ``RandomBrightnessContrast``
      with ``brightness_by_max``: pixel v in [0, 1] -> clip(alpha * v + beta, 0, 1) with
      alpha = 1 + U(-contrast, contrast), beta = U(-brightness, brightness), both drawn per
      image, applied with probability ``brightness_contrast_p`` (default 0.5, the
      albumentations default the official code keeps). Not torchvision's ColorJitter (which
      multiplies by U(1 - b, 1 + b) and blends contrast toward the mean grey).
    """

    rotation_deg: float = 10.0
    hflip: bool = True
    vflip: bool = False
    noise_std: float = 0.05
    enabled: bool = True
    rotation_p: float = 1.0
    rotation_padding: str = "edge"
    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = 0.0
    contrast: float = 0.0
    brightness_contrast_p: float = 0.5

    def __post_init__(self) -> None:
        def pair(v: Any) -> tuple[float, float]:
            lo, hi = (float(t) for t in v)
            return lo, hi

        if self.crop_scale is not None:
            object.__setattr__(self, "crop_scale", pair(self.crop_scale))
            lo, hi = self.crop_scale
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"augment crop_scale needs 0 < min <= max <= 1, got {lo, hi}")
        object.__setattr__(self, "crop_ratio", pair(self.crop_ratio))
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"augment crop_ratio needs 0 < min <= max, got {self.crop_ratio}")
        for key in ("rotation_p", "brightness_contrast_p", "contrast"):
            if not 0 <= float(getattr(self, key)) <= 1:
                raise ValueError(f"augment {key} must lie in [0, 1], got {getattr(self, key)}")
        if self.brightness < 0:
            raise ValueError(f"augment brightness must be >= 0, got {self.brightness}")
        if self.rotation_padding not in ROTATION_PADDING:
            raise ValueError(f"augment rotation_padding {self.rotation_padding!r} "
                             f"(known: {', '.join(ROTATION_PADDING)})")


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
    stop_at_lr: float | None = None   # plateau: stop once a reduction brings LR <= this
    one_cycle_pct_start: float = 0.3
    freeze_backbone: bool = False
    frozen_bn: str = "eval"           # frozen backbone's BatchNorm: eval (fixed) | train
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
    stop_at_lr = profile.get("stop_at_lr")
    stop_at_lr = None if stop_at_lr is None else float(stop_at_lr)
    # the LR floor replaces the reduction count unless both are given
    reductions = profile.get("stop_after_reductions", 2 if stop_at_lr is None else None)
    return Phase(name=name, epochs=epochs, lr=lr, optimizer="adam",
                 weight_decay=float(profile.get("weight_decay", 0.0)), schedule="plateau",
                 plateau_patience=int(profile.get("plateau_patience", 2)),
                 plateau_factor=float(profile.get("plateau_factor", 0.2)),
                 stop_after_reductions=None if reductions is None else int(reductions),
                 stop_at_lr=stop_at_lr)


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
    phases = _official_elements(name, profile, phases)
    return Recipe(name=name, phases=phases, balance=balance, augment=_augment(profile))


def _official_elements(name: str, profile: dict[str, Any],
                       phases: tuple[Phase, ...]) -> tuple[Phase, ...]:
    """Check `stop_at_lr` (plateau phases only, below every phase's LR) and set `frozen_bn`
    on the frozen-backbone phases; a key the recipe cannot use is an error, not ignored."""
    if profile.get("stop_at_lr") is not None:
        if not any(p.schedule == "plateau" for p in phases):
            raise ValueError(f"recipe {name}: stop_at_lr needs a plateau schedule "
                             "(recipe pylon, or two_phase on pylon)")
        for p in phases:
            if p.stop_at_lr is not None and not 0 < p.stop_at_lr < p.lr:
                raise ValueError(f"recipe {name}: stop_at_lr {p.stop_at_lr:g} must lie in "
                                 f"(0, the phase LR {p.lr:g})")
    if "frozen_bn" not in profile:
        return phases
    mode = str(profile["frozen_bn"])
    if mode not in FROZEN_BN:
        raise ValueError(f"unknown frozen_bn {mode!r} (known: {', '.join(FROZEN_BN)})")
    if not any(p.freeze_backbone for p in phases):
        raise ValueError(f"recipe {name}: frozen_bn applies to a frozen-backbone phase "
                         "(recipes frozen_head, two_phase)")
    return tuple(replace(p, frozen_bn=mode) if p.freeze_backbone else p for p in phases)


def default_recipe(epochs: int, lr: float) -> Recipe:
    """The loop's historical behaviour: AdamW, constant LR, BCE pos_weight, augmentation."""
    return recipe_from_profile({"epochs": epochs, "lr": lr})
