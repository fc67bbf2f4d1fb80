"""Blocking checks of checkpoints: a failing model never reaches heatmap_sets."""

import json

import dagster as dg

from xcam_assets.resources import XcamConfig
from xcam_assets.train.assets import arch_partitions, checkpoints
from xcam_assets.train.checkpoint import all_finite, load_checkpoint
from xcam_assets.train.zoo import build_model


@dg.asset_check(asset=checkpoints, blocking=True, partitions_def=arch_partitions)
def model_is_sound(context: dg.AssetCheckExecutionContext,
                   xcam: XcamConfig) -> dg.AssetCheckResult:
    """Weights load and are finite; validation AUC >= the profile's `min_val_auc`."""
    s = xcam.settings()
    arch = context.partition_key
    out = s.checkpoints_dir / arch
    sidecar = json.loads((out / "model.json").read_text())
    model = build_model(arch, s.zoo, n_classes=len(s.findings))
    load_checkpoint(out, model)
    finite = all_finite(model)
    floor = float(s.profile.get("min_val_auc", 0.5))
    auc = float(sidecar["val_auc"])
    passed = finite and auc >= floor
    return dg.AssetCheckResult(
        passed=passed,
        description=(f"weights finite={finite}; validation AUC {auc:.3f} "
                     f"{'>=' if auc >= floor else '<'} required {floor:.3f}"),
        metadata={"finite": finite, "val_auc": auc, "min_val_auc": floor},
    )
