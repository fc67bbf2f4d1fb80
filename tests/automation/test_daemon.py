"""The real daemon: a batch folder dropped into data/incoming/ is ingested and
preprocessed with no other action; a batch whose labels name a missing image fails its
blocking check, gets no tensors, and blocks the downstream re-evaluation."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import dagster as dg
import pytest
from automation.harness import dagster_services, make_project, nightly_defs, wait_for

from xcam_assets.automation import INGEST_ASSETS
from xcam_assets.demo import write_demo_cohort

pytestmark = pytest.mark.slow


def _drop(staging: Path, incoming: Path) -> Path:
    """Move a finished upload into the drop zone; the marker is written last."""
    incoming.mkdir(parents=True, exist_ok=True)
    target = incoming / staging.name
    shutil.move(str(staging), target)
    (target / ".complete").touch()
    return target


def test_daemon_ingests_a_dropped_batch_and_stops_a_bad_one(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    root = make_project(tmp_path / "project")
    for k, v in {"XCAM_ROOT": str(root), "XCAM_DATA_DIR": str(root / "data"),
                 "DAGSTER_HOME": str(root / "dagster_home")}.items():
        monkeypatch.setenv(k, v)
    staging = tmp_path / "upload"
    good, bad = write_demo_cohort(staging, n_images=24, n_batches=2, size=64, seed=7)
    labels = bad / "labels.csv"
    labels.write_text(labels.read_text() + "ghost.dcm,lesion,0,,,,,\n")
    incoming = root / "data" / "incoming"
    instance = dg.DagsterInstance.get()

    defs = nightly_defs()
    t0 = dt.datetime.now(dt.UTC)
    before = dg.evaluate_automation_conditions(defs, instance, evaluation_time=t0)
    with dagster_services(root, tmp_path / "logs", XCAM_SENSOR_INTERVAL_S="2") as services:
        logs = services["logs"]
        # the sensor runs by default: wait for its first (empty) tick, then drop the batches
        wait_for("the sensor's first tick",
                 lambda: "incoming_batch_sensor" in logs[-1].read_text(errors="replace"),
                 120, logs=logs)
        _drop(good, incoming)
        _drop(bad, incoming)

        def finished() -> list[dg.DagsterRun] | None:
            runs = instance.get_runs(dg.RunsFilter(tags={"dagster/sensor_name":
                                                         "incoming_batch_sensor"}))
            done = [r for r in runs if r.is_finished]
            return done if len(done) == 2 else None

        runs = wait_for("two sensor runs to finish", finished, 240, interval=2, logs=logs)

    by_batch = {r.tags["dagster/partition"]: r for r in runs}
    assert set(by_batch) == {good.name, bad.name}
    assert by_batch[good.name].status == dg.DagsterRunStatus.SUCCESS
    assert by_batch[bad.name].status == dg.DagsterRunStatus.FAILURE
    # the launcher stamped provenance on the daemon-launched runs
    assert by_batch[good.name].tags.get("xcam/host") and by_batch[good.name].tags.get("xcam/user")
    for asset in INGEST_ASSETS:
        key = dg.AssetKey(asset)
        mats = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, asset_partitions=[good.name]), limit=5).records
        assert mats, f"{asset}[{good.name}] not materialized"
    assert (root / "data" / "tensors" / good.name / "images.npy").exists()
    # the bad batch: findings written, its blocking check failed naming the file, no tensors
    check = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(dg.AssetKey("findings"), "labels_match_images"), limit=5)
    failed = [c for c in check if c.partition == bad.name]
    assert failed and failed[0].status.value == "FAILED"
    assert "ghost.dcm" in str(failed[0].event.dagster_event.event_specific_data.metadata)
    assert not instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=dg.AssetKey("clahe_tensors"), asset_partitions=[bad.name]), limit=1).records
    assert not (root / "data" / "tensors" / bad.name).exists()

    # not used downstream, across runs: after the nightly tick nothing downstream is
    # requested while a dependency partition has a failed blocking check ...
    t1 = max(dt.datetime.now(dt.UTC), t0 + dt.timedelta(seconds=61))
    res = dg.evaluate_automation_conditions(defs, instance, cursor=before.cursor,
                                            evaluation_time=t1)
    assert res.total_requested == 0, res.get_requested_partitions(dg.AssetKey("cohort_splits"))
    # ... whereas without the bad batch the next tick requests the splits
    instance.delete_dynamic_partition("batches", bad.name)
    res2 = dg.evaluate_automation_conditions(defs, instance, cursor=res.cursor,
                                             evaluation_time=t1 + dt.timedelta(seconds=61))
    assert res2.get_num_requested(dg.AssetKey("cohort_splits")) == 1
    assert res2.total_requested == 1  # the rest waits for the splits (next ticks)
