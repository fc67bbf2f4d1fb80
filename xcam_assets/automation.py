"""Sensors and schedules: new arrival batches ingest themselves."""

import json

import dagster as dg

from xcam_assets.config import load_settings
from xcam_assets.ingest.assets import dicom_inventory, findings, raw_dicoms
from xcam_assets.preprocess.assets import clahe_tensors
from xcam_assets.resources import batch_partitions

ingest_batch_job = dg.define_asset_job(
    "ingest_batch",
    selection=dg.AssetSelection.assets(raw_dicoms, dicom_inventory, findings, clahe_tensors),
    partitions_def=batch_partitions,
    description="One arrival batch: raw copy, inventory, findings, CLAHE tensors.",
)


def complete_batches(incoming) -> list[str]:
    """Batch folders ready to ingest: they hold `labels.csv` and a `.complete` marker
    (written last by the uploader, or by `xcam demo` / `xcam import-tbx11k`)."""
    if not incoming.is_dir():
        return []
    return sorted(d.name for d in incoming.iterdir()
                  if d.is_dir() and (d / ".complete").exists() and (d / "labels.csv").exists())


@dg.sensor(job=ingest_batch_job, minimum_interval_seconds=30,
           default_status=dg.DefaultSensorStatus.RUNNING)
def incoming_batch_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """A new complete folder under data/incoming/ becomes a `batches` partition and a run."""
    seen = set(json.loads(context.cursor)) if context.cursor else set()
    ready = complete_batches(load_settings().incoming_dir)
    new = [b for b in ready if b not in seen]
    known = set(context.instance.get_dynamic_partitions(batch_partitions.name))
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=b, run_key=f"ingest-{b}") for b in new],
        dynamic_partitions_requests=[batch_partitions.build_add_request(
            [b for b in new if b not in known])] if new else [],
        cursor=json.dumps(sorted(seen | set(new))),
    )
