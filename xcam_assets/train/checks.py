"""Blocking checks of checkpoints: a failing model never reaches heatmap_sets."""

import dagster as dg

from xcam_assets.project import XcamProject
from xcam_assets.train.assets import arch_partitions, checkpoints
from xcam_assets.train.checkpoint import all_finite, load_model
from xcam_assets.train.zoo import state_dict_hash


@dg.asset_check(asset=checkpoints, blocking=True, partitions_def=arch_partitions)
def model_is_sound(context: dg.AssetCheckExecutionContext,
                   xcam: XcamProject) -> dg.AssetCheckResult:
    """Weights load, match the sidecar's hash and are finite; validation AUC is above
    chance by the profile's margin: AUC >= `min_val_auc` (default 0.5) and, when set,
    AUC >= 0.5 + `min_auc_margin`."""
    s = xcam.settings()
    out = s.checkpoints_dir / context.partition_key
    model, sidecar = load_model(out, s.zoo)
    finite = all_finite(model)
    intact = state_dict_hash(model) == sidecar["weights_sha256"]
    margin = s.profile.get("min_auc_margin")
    floor = float(s.profile.get("min_val_auc", 0.5))
    if margin is not None:
        floor = max(floor, 0.5 + float(margin))
    auc = float(sidecar["val_auc"]) if sidecar["val_auc"] is not None else float("nan")
    good_auc = auc >= floor  # NaN (a one-class validation split) fails
    passed = finite and intact and good_auc
    return dg.AssetCheckResult(
        passed=passed,
        description=(f"weights finite={finite}, match sidecar hash={intact}; validation AUC "
                     f"{auc:.3f} {'>=' if good_auc else 'not >='} required {floor:.3f}"),
        metadata={"finite": finite, "weights_match_sidecar": intact, "val_auc": auc,
                  "min_val_auc": floor,
                  "min_auc_margin": -1.0 if margin is None else float(margin)},
    )
