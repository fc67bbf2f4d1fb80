"""External validation: a batch declared external (`batch.yaml`) is scored by the frozen
checkpoints and never enters the split; the lineage's data versions stay as they were.

Real components: demo-cohort DICOMs, a SQLite Dagster instance, the orchestrator that the
CLI and DVC use (tiny profile)."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pydicom
import pytest
from cohorts import arrived_demo_cohort

from xcam_assets.config import load_settings
from xcam_assets.demo import write_demo_cohort
from xcam_assets.ingest.batch_meta import (
    BatchMeta,
    BatchMetaError,
    read_batch_meta,
    write_batch_meta,
)
from xcam_assets.orchestrate import materialize_all
from xcam_assets.train.checkpoint import read_sidecar

WATCHED = ["cohort_splits", "checkpoints"]


def _versions(instance: dg.DagsterInstance, keys: list[str]) -> dict[str, str | None]:
    out = {}
    for key in keys:
        event = instance.get_latest_materialization_event(dg.AssetKey(key))
        mat = event.asset_materialization if event else None
        out[key] = mat.tags.get("dagster/data_version") if mat else None
    return out


def _site_b_batch(incoming: Path, seed: int) -> Path:
    """A demo batch of other patients (IDs prefixed SITEB) under `incoming/site-b`."""
    tmp = incoming.parent / "site-b-build"
    (batch,) = write_demo_cohort(tmp, n_images=24, n_batches=1, size=128, seed=seed + 7,
                                 finding="lesion")
    for path in batch.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.PatientID = "SITEB" + str(ds.PatientID)
        ds.save_as(path)
    target = incoming / "site-b"
    shutil.move(str(batch), target)
    shutil.rmtree(tmp)
    write_batch_meta(target, BatchMeta(role="external", site="Hospital B (synthetic)"))
    (target / ".complete").touch()
    return target


def test_batch_meta_round_trip_and_errors(tmp_path: Path) -> None:
    assert read_batch_meta(tmp_path) == BatchMeta()  # no file: internal
    write_batch_meta(tmp_path, BatchMeta(role="external", site="B"))
    assert read_batch_meta(tmp_path) == BatchMeta(role="external", site="B")
    (tmp_path / "batch.yaml").write_text("role: elsewhere\n")
    with pytest.raises(BatchMetaError, match=r"batch\.yaml: role 'elsewhere'"):
        read_batch_meta(tmp_path)
    (tmp_path / "batch.yaml").write_text("role: external\nsite: B\nextra: 1\n")
    with pytest.raises(BatchMetaError, match=r"unknown key\(s\) \['extra'\]"):
        read_batch_meta(tmp_path)


@pytest.mark.slow
def test_external_batch_is_scored_by_frozen_checkpoints(project: Path) -> None:
    s = load_settings()
    arrived_demo_cohort(s, 80)
    instance = dg.DagsterInstance.get()
    materialize_all(settings=s, instance=instance, log=lambda m: None)
    before = _versions(instance, WATCHED)
    weights = read_sidecar(s.checkpoints_dir / "resnet18")["weights_sha256"]
    split_before = pl.read_parquet(s.splits_path)
    assert pl.read_parquet(s.external_path).height == 0  # nothing external yet

    _site_b_batch(s.incoming_dir, s.seed)
    materialize_all(settings=s, instance=instance, log=lambda m: None)

    # the split and the checkpoints are what they were
    assert _versions(instance, WATCHED) == before
    assert read_sidecar(s.checkpoints_dir / "resnet18")["weights_sha256"] == weights
    assert pl.read_parquet(s.splits_path).equals(split_before)

    # the external cohort: every site-b image, none in the split, its site recorded
    ext = pl.read_parquet(s.external_path)
    assert ext.height == 24 and set(ext["batch"].to_list()) == {"site-b"}
    assert set(ext["site"].to_list()) == {"Hospital B (synthetic)"}
    assert not set(ext["image_key"].to_list()) & set(split_before["image_key"].to_list())

    # scored: rows carry split=external, n = the batch's images
    table = pl.read_parquet(s.external_scores_dir / "metric_table.parquet")
    assert set(table["split"].to_list()) == {"external"}
    auc = table.filter((pl.col("metric") == "auc") & (pl.col("architecture") == "resnet18"))
    assert auc.height == 1 and auc["n"][0] == 24
    preds = pl.read_parquet(s.external_scores_dir / "predictions_resnet18.parquet")
    assert sorted(preds["image_key"].unique().to_list()) == sorted(ext["image_key"].to_list())
    # the internal table is the test split's
    internal = pl.read_parquet(s.metrics_dir / "metric_table.parquet")
    assert set(internal["split"].to_list()) == {"test"}
    # both blocking checks passed
    for key in ("external_cohort", "external_scores"):
        rec = [r for r in instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey(key), {"external_cohort": "external_is_unseen",
                                                "external_scores":
                                                    "external_metrics_in_range"}[key]),
            limit=5)]
        assert rec and rec[0].status.value == "SUCCEEDED", key
