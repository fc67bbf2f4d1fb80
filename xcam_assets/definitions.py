"""The one Definitions object: every stage's assets and checks, automation, resources.

The downstream assets get the nightly automation condition here (xcam_assets.automation).
"""

import dagster as dg

from xcam_assets.automation import (
    NIGHTLY_ASSETS,
    dvc_commit_after_run,
    incoming_batch_sensor,
    ingest_batch_job,
    nightly_condition,
    nightly_reevaluation,
    pacs_dicomweb_sensor,
)
from xcam_assets.evaluate.assets import external_scores, metric_tables
from xcam_assets.evaluate.checks import (
    external_metrics_in_range,
    metrics_in_range,
    subgroup_auc_gap_is_bounded,
)
from xcam_assets.explain.assets import heatmap_sets
from xcam_assets.explain.checks import heatmaps_are_valid
from xcam_assets.ingest.assets import (
    cohort_splits,
    dicom_inventory,
    external_cohort,
    findings,
    raw_dicoms,
)
from xcam_assets.ingest.checks import (
    external_is_unseen,
    inventory_is_usable,
    labels_match_images,
    raw_copy_is_faithful,
    splits_do_not_leak,
)
from xcam_assets.preprocess.assets import clahe_tensors
from xcam_assets.preprocess.checks import tensors_are_sound
from xcam_assets.project import XcamProject
from xcam_assets.train.assets import checkpoints
from xcam_assets.train.checks import model_is_sound

#: the lineage, left to right
ASSETS = [raw_dicoms, dicom_inventory, findings, cohort_splits, clahe_tensors, checkpoints,
          heatmap_sets, metric_tables, external_cohort, external_scores]
CHECKS = [raw_copy_is_faithful, inventory_is_usable, labels_match_images, splits_do_not_leak,
          tensors_are_sound, model_is_sound, heatmaps_are_valid, metrics_in_range,
          subgroup_auc_gap_is_bounded, external_is_unseen, external_metrics_in_range]



def _with_nightly(asset: dg.AssetsDefinition) -> dg.AssetsDefinition:
    if asset.key.to_user_string() not in NIGHTLY_ASSETS:
        return asset
    return asset.map_asset_specs(
        lambda spec: spec.replace_attributes(automation_condition=nightly_condition()))


defs = dg.Definitions(
    assets=[_with_nightly(a) for a in ASSETS],
    asset_checks=CHECKS,
    jobs=[ingest_batch_job],
    sensors=[incoming_batch_sensor, nightly_reevaluation, dvc_commit_after_run,
             pacs_dicomweb_sensor],
    resources={"xcam": XcamProject()},
)
