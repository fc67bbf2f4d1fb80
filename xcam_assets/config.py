"""Project paths and parameters, read from `resources/` (no Dagster here).

One loader so that Dagster assets, the `xcam` CLI and DVC stages see the same
numbers: `resources/params.yaml` (DVC's params file), an optional study file
`resources/studies/<XCAM_STUDY>.yaml` layered on top, and the profile named by
`XCAM_PROFILE` (or `profile:` in params.yaml) that sizes the work.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def project_root() -> Path:
    """The checkout holding `resources/` (XCAM_ROOT overrides, for tests)."""
    return Path(os.environ.get("XCAM_ROOT", PACKAGE_ROOT)).resolve()


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# training keys a profile may set per architecture (`per_architecture:`)
PER_ARCHITECTURE_KEYS = frozenset({
    "recipe", "epochs", "lr", "weight_decay", "plateau_patience", "plateau_factor",
    "stop_after_reductions", "stop_at_lr", "frozen_bn", "phase1_epochs", "phase1_lr",
    "two_phase_base", "one_cycle_pct_start", "balance", "augment", "batch_size", "seeds",
    "resume"})


@dataclass(frozen=True)
class Settings:
    """Resolved parameters for one run: root, data dir, merged params, profile."""

    root: Path
    data_dir: Path
    params: dict[str, Any]
    profile_name: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def profile(self) -> dict[str, Any]:
        return self.params["profiles"][self.profile_name]

    @property
    def seed(self) -> int:
        return int(self.params["seed"])

    @property
    def findings(self) -> list[str]:
        return list(self.params["cohort"]["findings"])

    @property
    def clahe(self) -> dict[str, Any]:
        return dict(self.params["clahe"])

    @property
    def image_size(self) -> int:
        return int(self.profile["image_size"])

    @property
    def precision(self) -> str:
        """The profile's ``precision`` (auto | fp32 | bf16; default auto): see
        :mod:`xcam_assets.train.precision`."""
        value = str(self.profile.get("precision", "auto"))
        if value not in ("auto", "fp32", "bf16"):
            raise ValueError(f"profile {self.profile_name}: precision must be auto, fp32 or "
                             f"bf16, not {value!r}")
        return value

    @property
    def architectures(self) -> list[str]:
        return list(self.profile["architectures"])

    def training_profile(self, arch: str) -> dict[str, Any]:
        """The profile as `arch` trains by it: the profile's keys, with the training keys of
        ``per_architecture: {arch: {...}}`` laid over them (e.g. more epochs for the one
        pretrained model a study leans on, fewer for a from-scratch contrast). Only training
        keys may differ per architecture: the image size, findings and splits are the
        study's, so every model is scored on the same tensors."""
        table = self.profile.get("per_architecture") or {}
        unknown_arch = sorted(set(table) - set(self.architectures))
        if unknown_arch:
            raise ValueError(f"profile {self.profile_name}: per_architecture names "
                             f"{unknown_arch}, not in its architectures {self.architectures}")
        extra = dict(table.get(arch) or {})
        bad = sorted(set(extra) - PER_ARCHITECTURE_KEYS)
        if bad:
            raise ValueError(f"profile {self.profile_name}: per_architecture.{arch} sets {bad}; "
                             f"only training keys may differ per architecture: "
                             f"{sorted(PER_ARCHITECTURE_KEYS)}")
        merged = {k: v for k, v in self.profile.items() if k != "per_architecture"}
        merged.update(extra)
        return merged

    @cached_property
    def zoo(self) -> dict[str, dict[str, Any]]:
        return yaml.safe_load((self.root / "resources" / "models.yaml").read_text())

    # -- data layout -----------------------------------------------------------
    @property
    def incoming_dir(self) -> Path:
        return self.data_dir / "incoming"

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "raw"

    @property
    def inventory_dir(self) -> Path:
        return self.data_dir / "inventory"

    @property
    def findings_dir(self) -> Path:
        return self.data_dir / "findings"

    @property
    def splits_path(self) -> Path:
        return self.data_dir / "splits" / "cohort_splits.parquet"

    @property
    def external_path(self) -> Path:
        """The external-validation cohort (images of batches declared external)."""
        return self.data_dir / "external_cohort" / "external_cohort.parquet"

    @property
    def external_scores_dir(self) -> Path:
        """The frozen checkpoints' predictions and metric rows on the external cohort."""
        return self.data_dir / "external_scores"

    @property
    def tensors_dir(self) -> Path:
        return self.data_dir / "tensors"

    @property
    def checkpoints_dir(self) -> Path:
        return self.data_dir / "checkpoints"

    @property
    def heatmaps_dir(self) -> Path:
        return self.data_dir / "heatmaps"

    @property
    def metrics_dir(self) -> Path:
        return self.data_dir / "metrics"


def load_settings(
    root: Path | None = None,
    profile: str | None = None,
    study: str | None = None,
    data_dir: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Read params.yaml (+ study file) and pick the profile.

    Precedence: explicit argument > environment (XCAM_PROFILE, XCAM_STUDY,
    XCAM_DATA_DIR) > params.yaml.
    """
    root = (root or project_root()).resolve()
    params = yaml.safe_load((root / "resources" / "params.yaml").read_text())
    study = study or os.environ.get("XCAM_STUDY") or None
    if study:
        study_path = root / "resources" / "studies" / f"{study}.yaml"
        if not study_path.exists():
            raise FileNotFoundError(f"study profile {study_path} does not exist")
        params = _deep_merge(params, yaml.safe_load(study_path.read_text()) or {})
    if overrides:
        params = _deep_merge(params, overrides)
    profile_name = profile or os.environ.get("XCAM_PROFILE") or params["profile"]
    if profile_name not in params["profiles"]:
        raise ValueError(
            f"profile {profile_name!r} is not in resources/params.yaml "
            f"(known: {', '.join(params['profiles'])})"
        )
    env_data = os.environ.get("XCAM_DATA_DIR")
    data = Path(data_dir or env_data or root / "data").resolve()
    return Settings(root=root, data_dir=data, params=params, profile_name=profile_name,
                    overrides=overrides or {})
