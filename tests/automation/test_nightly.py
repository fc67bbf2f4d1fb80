"""Declarative automation after a change: on a full tiny run, a new batch arrives and is
ingested (as the sensor's run does); on the next tick only the assets downstream of the
change re-materialize, in dependency order; a later batch that fails a blocking check
stops the re-evaluation across runs. The event log is the evidence."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import dagster as dg
import pytest
from automation.harness import copy_project, full_tiny_run, nightly_defs

from xcam_assets.automation import INGEST_ASSETS
from xcam_assets.definitions import ASSETS
from xcam_assets.demo import write_demo_cohort
from xcam_assets.orchestrate import StageFailed, _run, register_batches
from xcam_assets.project import XcamProject

pytestmark = pytest.mark.slow


@pytest.fixture
def full_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = copy_project(full_tiny_run(request, tmp_path_factory), tmp_path / "project")
    for k, v in {"XCAM_ROOT": str(root), "XCAM_DATA_DIR": str(root / "data"),
                 "DAGSTER_HOME": str(root / "dagster_home"), "XCAM_PROFILE": "tiny"}.items():
        monkeypatch.setenv(k, v)
    return root


def _new_batch(root: Path, name: str, seed: int, ghost: bool = False) -> str:
    staging = root.parent / f"upload-{name}"
    (batch,) = write_demo_cohort(staging, n_images=12, n_batches=1, size=64, seed=seed)
    if ghost:
        labels = batch / "labels.csv"
        labels.write_text(labels.read_text() + "ghost.dcm,lesion,0,,,,,\n")
    target = root / "data" / "incoming" / name
    shutil.move(str(batch), target)
    (target / ".complete").touch()
    return name


def _requested(result: dg.EvaluateAutomationConditionsResult) -> dict[str, list[str | None]]:
    out: dict[str, list[str | None]] = {}
    for asset in ASSETS:
        parts = result.get_requested_partitions(asset.key)
        if parts:
            out[asset.key.to_user_string()] = sorted(parts, key=str)
    return out


def test_nightly_reevaluates_only_what_is_downstream_of_a_new_batch(full_run: Path) -> None:
    instance = dg.DagsterInstance.get()
    defs = nightly_defs()  # the nightly condition on a per-minute tick
    resource = XcamProject()
    t = dt.datetime.now(dt.UTC)
    result = dg.evaluate_automation_conditions(defs, instance, evaluation_time=t)
    assert result.total_requested == 0  # the full run is up to date
    # nothing changed: the tick passes and nothing is requested
    t += dt.timedelta(seconds=61)
    result = dg.evaluate_automation_conditions(defs, instance, cursor=result.cursor,
                                               evaluation_time=t)
    assert result.total_requested == 0
    start_id = max(r.storage_id for r in instance.fetch_materializations(
        dg.AssetKey("metric_tables"), limit=1).records)

    new = _new_batch(full_run, "site-b-2026-12", seed=11)
    register_batches(instance, [new])
    _run(INGEST_ASSETS, instance, resource, new, log=print)  # the sensor's ingest_batch run

    order: list[dict[str, list[str | None]]] = []
    for _ in range(6):
        t = max(dt.datetime.now(dt.UTC), t + dt.timedelta(seconds=61))
        result = dg.evaluate_automation_conditions(defs, instance, cursor=result.cursor,
                                                   evaluation_time=t)
        requested = _requested(result)
        if not requested:
            break
        order.append(requested)
        for asset, partitions in requested.items():
            for partition in partitions:
                _run([asset], instance, resource, partition, log=print)
    # the external-validation assets (external_cohort after the split, external_scores
    # after the heatmap sets) follow the same chain, each in its dependency wave
    assert order == [{"cohort_splits": [None]},
                     {"checkpoints": ["resnet18"], "external_cohort": [None]},
                     {"heatmap_sets": ["resnet18"]},
                     {"metric_tables": [None], "external_scores": [None]}], order

    # the event log since the change: the new batch's partitions and the downstream chain
    changed = set()
    for asset in ("raw_dicoms", "dicom_inventory", "findings", "clahe_tensors",
                  "cohort_splits", "checkpoints", "heatmap_sets", "metric_tables"):
        for rec in instance.fetch_materializations(dg.AssetRecordsFilter(
                asset_key=dg.AssetKey(asset), after_storage_id=start_id), limit=100).records:
            changed.add((asset, rec.partition_key))
    assert changed == {(a, new) for a in INGEST_ASSETS} | {
        ("cohort_splits", None), ("checkpoints", "resnet18"), ("heatmap_sets", "resnet18"),
        ("metric_tables", None)}, sorted(changed, key=str)

    # a batch that fails its blocking check: ingested (and failed), then nothing downstream
    bad = _new_batch(full_run, "site-c-2026-12", seed=12, ghost=True)
    register_batches(instance, [bad])
    with pytest.raises(StageFailed, match="labels_match_images"):
        _run(INGEST_ASSETS, instance, resource, bad, log=print)
    for _ in range(2):
        t = max(dt.datetime.now(dt.UTC), t + dt.timedelta(seconds=61))
        result = dg.evaluate_automation_conditions(defs, instance, cursor=result.cursor,
                                                   evaluation_time=t)
        assert result.total_requested == 0, _requested(result)
