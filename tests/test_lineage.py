"""The whole lineage, in-process, on a small synthetic demo cohort (tiny profile).

Asserts real outputs and recomputes the metric values independently.
"""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import polars as pl
import pytest
import torch
from cohorts import arrived_demo_cohort
from sklearn.metrics import roc_auc_score

from xcam_assets.config import load_settings
from xcam_assets.definitions import ASSETS, CHECKS, defs
from xcam_assets.orchestrate import STAGES, StageFailed, _run, materialize_all, register_batches
from xcam_assets.project import XcamProject
from xcam_assets.train.checkpoint import load_checkpoint
from xcam_assets.train.loop import predict_logits
from xcam_assets.train.precision import Precision, resolve_precision
from xcam_assets.train.zoo import build_model


def _cohort(s, n_images: int = 80) -> list:
    return arrived_demo_cohort(s, n_images)


def test_definitions_load_with_a_blocking_check_per_asset() -> None:
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {"raw_dicoms", "dicom_inventory", "findings", "cohort_splits",
                    "clahe_tensors", "checkpoints", "heatmap_sets", "metric_tables",
                    "external_cohort", "external_scores"}
    checked = {c.asset_key.to_user_string() for c in defs.resolve_asset_graph().asset_check_keys}
    assert checked == keys
    for check_def in CHECKS:
        for spec in check_def.check_specs:
            assert spec.blocking, f"{spec.key} is not blocking"


@pytest.mark.slow
def test_whole_lineage_materializes_with_real_outputs(project) -> None:
    s = load_settings()
    _cohort(s)
    instance = dg.DagsterInstance.get()
    logs: list[str] = []
    materialize_all(settings=s, instance=instance, log=logs.append)

    # every asset materialized in the project instance, every check passed
    for asset in ASSETS:
        key = asset.key
        assert instance.get_latest_materialization_event(key) is not None, key
    evaluations = instance.get_records_for_run  # noqa: F841  (API exists; checks below)
    for check_def in CHECKS:
        for spec in check_def.check_specs:
            rec = instance.event_log_storage.get_asset_check_execution_history(spec.key, limit=20)
            assert rec and all(r.status.value == "SUCCEEDED" for r in rec), spec.key

    # tensors: shape, dtype, range
    splits = pl.read_parquet(s.splits_path)
    n_images = splits.height
    manifests = pl.concat([pl.read_parquet(p) for p in s.tensors_dir.glob("*/manifest.parquet")])
    assert manifests.height == n_images == 80
    for batch_dir in s.tensors_dir.iterdir():
        images = np.load(batch_dir / "images.npy")
        regions = np.load(batch_dir / "regions.npy")
        assert images.dtype == np.uint8 and images.shape[1:] == (64, 64)
        assert regions.shape == (len(images), 1, 64, 64)
        assert images.max() > 200 and images.min() < 50
    # a positive image has a region, a negative none
    pos = splits.filter(pl.col("y_lesion") == 1)["image_key"].to_list()
    assert 20 <= len(pos) <= 60

    # checkpoint loads and predicts: same probabilities as stored by heatmap_sets
    arch = "resnet18"
    model = build_model(arch, s.zoo, n_classes=1)
    sidecar = load_checkpoint(s.checkpoints_dir / arch, model)
    assert sidecar["architecture"] == arch and sidecar["findings"] == ["lesion"]
    assert len(sidecar["history"]) == s.profile["epochs"]
    preds = pl.read_parquet(s.heatmaps_dir / arch / "predictions.parquet")
    test_preds = preds.filter(pl.col("split") == "test").sort("image_key")
    from xcam_assets.preprocess.store import split_arrays

    keys, x_te, y_te, regions_te = split_arrays(s, "test")
    assert keys == test_preds["image_key"].to_list()
    # in the precision the heatmap set records (auto: the checkpoint's, on this machine)
    hm_side = json.loads((s.heatmaps_dir / arch / "heatmaps.json").read_text())
    used = Precision(hm_side["precision"], hm_side["memory_format"] == "channels_last")
    assert used.record() == {k: sidecar[k] for k in ("precision", "memory_format")}
    assert used == resolve_precision(s.precision, model, torch.device("cpu"))
    prob = 1 / (1 + np.exp(-predict_logits(model, x_te, precision=used)[:, 0]))
    np.testing.assert_allclose(prob, test_preds["probability"].to_numpy(), atol=1e-5)

    # heatmaps: input size, [0, 1]
    maps = np.load(s.heatmaps_dir / arch / "gradcam.npy").astype(np.float32)
    assert maps.shape == (len(keys), 1, 64, 64)
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1

    # metric values equal an independent recomputation
    table = pl.read_parquet(s.metrics_dir / "metric_table.parquet")
    assert set(table.columns) >= {"architecture", "cam_method", "finding", "metric", "value",
                                  "ci_low", "ci_high", "n"}

    def value(metric: str, method: str | None = None) -> float:
        rows = table.filter((pl.col("metric") == metric)
                            & (pl.col("cam_method").is_null() if method is None
                               else pl.col("cam_method") == method))
        assert rows.height == 1, (metric, method, rows)
        return rows["value"][0]

    y = test_preds["label"].to_numpy()
    p = test_preds["probability"].to_numpy()
    assert value("auc") == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    t = value("threshold")
    pred = p >= t
    assert value("accuracy") == pytest.approx(np.mean(pred == y), abs=1e-12)
    assert value("sensitivity") == pytest.approx(pred[y == 1].mean(), abs=1e-12)
    assert value("specificity") == pytest.approx((~pred[y == 0]).mean(), abs=1e-12)
    hits = []
    for i in range(len(keys)):
        region = regions_te[i, 0] > 0
        if region.any():  # a blank (constant) map is a miss
            r, c = np.unravel_index(np.argmax(maps[i, 0]), maps[i, 0].shape)
            hits.append(bool(region[r, c]) and maps[i, 0].max() > maps[i, 0].min())
    assert value("pointing_game", "gradcam") == pytest.approx(np.mean(hits), abs=1e-12)
    auc_row = table.filter(pl.col("metric") == "auc")
    assert auc_row["ci_low"][0] <= auc_row["value"][0] <= auc_row["ci_high"][0]
    assert (s.metrics_dir / "comparison.csv").exists()
    # the scorecard: CSV, table metadata in the UI, the standalone report, the printout
    card = pl.read_csv(s.metrics_dir / "scorecard.csv", infer_schema=False)
    assert card.height >= 1 and card.columns[:3] == ["architecture", "cam_method", "auc"]
    mat = instance.get_latest_materialization_event(
        dg.AssetKey("metric_tables")).asset_materialization
    meta = mat.metadata["scorecard"]
    assert isinstance(meta, dg.TableMetadataValue)
    assert [c.name for c in meta.schema.columns] == card.columns
    assert [r.data["cam_method"] for r in meta.records] == card["cam_method"].to_list()
    assert not (s.metrics_dir / "report.html").exists()  # not in the versioned outputs
    report = (s.root / "reports" / "report.html").read_text()
    assert card["auc"][0] in report and "data:image/png;base64," in report
    assert "src='http" not in report and 'src="http' not in report
    from xcam_assets.cli import main as xcam_main
    from xcam_assets.evaluate.report import terminal_summary

    xcam_main(["report", "--out", str(s.root / "reports" / "study.html")])
    full = (s.root / "reports" / "study.html").read_text()
    assert "metrics_in_range" in full and card["auc"][0] in full  # the metric table's check
    summary = terminal_summary(s, width=120)
    table_part = summary.split("full metric table")[0]
    assert max(len(line) for line in table_part.splitlines()) <= 120
    assert str(s.metrics_dir / "metric_table.parquet") in summary

    # every configured method has every localization metric; energy pointing game recomputed
    for method in s.profile["cam_methods"]:
        names = set(table.filter(pl.col("cam_method") == method)["metric"].to_list())
        assert {"pointing_game", "pointing_game_tol15px", "point_localization_accuracy",
                "energy_pointing_game", "ehr_auc", "weak_localization_iou",
                "weak_localization_hit", "weak_localization_hit_iou50"} <= names, method
    # energy of the heat above each map's median; a map with none (e.g. blank) scores 0
    m64 = maps.astype(np.float64)
    ev = np.maximum(m64[:, 0] - np.median(m64[:, 0], axis=(1, 2), keepdims=True), 0.0)
    energy = [ev[i][regions_te[i, 0] > 0].sum() / ev[i].sum() if ev[i].sum() > 0 else 0.0
              for i in range(len(keys)) if regions_te[i, 0].any()]
    assert value("energy_pointing_game", "gradcam") == pytest.approx(np.mean(energy), abs=1e-9)
    # faithfulness on true positives (first 4 in key order): AOPC recomputed step by step
    from aopc_reference import morf_aopc_stepwise

    from xcam_assets.evaluate.faithfulness import torch_predictor

    tp = np.flatnonzero((y == 1) & pred)[:4]
    if len(tp):
        for metric in ("aopc", "deletion_auc", "insertion_auc", "road_combined"):
            assert table.filter((pl.col("metric") == metric)
                                & (pl.col("cam_method") == "gradcam")).height == 1, metric
        # scored in the model's own precision, as its predictions and heatmaps were made
        predictor = torch_predictor(model, 0, precision=resolve_precision(
            s.precision, model, torch.device("cpu")))
        ref = morf_aopc_stepwise(predictor, x_te[tp] / 255.0, maps[tp, 0],
                                 grid=9, steps=8, seed=s.seed)
        assert value("aopc", "gradcam") == pytest.approx(ref.values.mean(), abs=1e-5)
    for name in ("roc_lesion", "metrics_lesion", f"montage_{arch}"):
        assert (s.metrics_dir / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    sidecar = json.loads((s.heatmaps_dir / arch / "heatmaps.json").read_text())
    assert sidecar["methods"]["gradcam"]["status"] == "ok"
    assert (s.heatmaps_dir / arch / "montage_gradcam.png").exists()
    json.loads((s.checkpoints_dir / arch / "model.json").read_text())


def test_label_for_missing_image_blocks_the_batch(project) -> None:
    s = load_settings()
    batches = _cohort(s, n_images=40)
    labels = batches[0] / "labels.csv"
    labels.write_text(labels.read_text() + "ghost.dcm,lesion,0,,,,,\n")
    instance = dg.DagsterInstance.get()
    register_batches(instance, [b.name for b in batches])
    with pytest.raises(StageFailed, match="labels_match_images"):
        _run(STAGES["ingest"] + STAGES["preprocess"], instance, XcamProject(), batches[0].name,
             log=print)
    assert instance.get_latest_materialization_event(dg.AssetKey("findings")) is not None
    assert instance.get_latest_materialization_event(dg.AssetKey("clahe_tensors")) is None
    assert not (s.tensors_dir / batches[0].name).exists()
    # the check says which file
    rec = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(dg.AssetKey("findings"), "labels_match_images"), limit=1)
    assert rec[0].status.value == "FAILED"
