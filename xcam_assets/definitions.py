"""The one Definitions object: every stage's assets and checks, automation, resources."""

from __future__ import annotations

import dagster as dg

from xcam_assets.automation import incoming_batch_sensor, ingest_batch_job
from xcam_assets.evaluate.assets import metric_tables
from xcam_assets.evaluate.checks import metrics_in_range
from xcam_assets.explain.assets import heatmap_sets
from xcam_assets.explain.checks import heatmaps_are_valid
from xcam_assets.ingest.assets import cohort_splits, dicom_inventory, findings, raw_dicoms
from xcam_assets.ingest.checks import (
    inventory_is_usable,
    labels_match_images,
    raw_copy_is_faithful,
    splits_do_not_leak,
)
from xcam_assets.preprocess.assets import clahe_tensors
from xcam_assets.preprocess.checks import tensors_are_sound
from xcam_assets.resources import XcamConfig
from xcam_assets.train.assets import checkpoints
from xcam_assets.train.checks import model_is_sound

#: the lineage, left to right
ASSETS = [raw_dicoms, dicom_inventory, findings, cohort_splits, clahe_tensors, checkpoints,
          heatmap_sets, metric_tables]
CHECKS = [raw_copy_is_faithful, inventory_is_usable, labels_match_images, splits_do_not_leak,
          tensors_are_sound, model_is_sound, heatmaps_are_valid, metrics_in_range]

defs = dg.Definitions(
    assets=ASSETS,
    asset_checks=CHECKS,
    jobs=[ingest_batch_job],
    sensors=[incoming_batch_sensor],
    resources={"xcam": XcamConfig()},
)
