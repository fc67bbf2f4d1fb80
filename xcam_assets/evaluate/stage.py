"""The evaluate stage's run, without Dagster: the metric table over every architecture and
CAM method (diagnostic, localization, faithfulness), the wide comparison and the plots."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from xcam_assets.atomic import atomic_write_bytes, atomic_write_parquet
from xcam_assets.config import Settings
from xcam_assets.evaluate.faithfulness import faithfulness_values
from xcam_assets.evaluate.plots import plot_heatmap_montage, plot_metric_bars, plot_roc
from xcam_assets.evaluate.tables import (
    diagnostic_table,
    evaluate_config,
    gt_boxes,
    localization_summary,
    localization_table,
    mean_rows,
    parse_boxes,
    thresholds_from_predictions,
    to_frame,
    view_auc_rows,
    wide_table,
)
from xcam_assets.explain.cams import parse_method
from xcam_assets.explain.stage import SIDECAR, read_sidecar
from xcam_assets.ingest.stage import union_inventory
from xcam_assets.preprocess.store import read_manifests, split_arrays
from xcam_assets.train.checkpoint import load_trained_model
from xcam_assets.train.zoo import pick_device

BAR_METRICS = ["pointing_game", "pointing_game_tol{tol}px", "point_localization_accuracy",
               "energy_pointing_game", "ehr_auc", "weak_localization_iou", "aopc",
               "deletion_auc", "insertion_auc", "masked_out_area", "road_combined"]


class StaleHeatmaps(RuntimeError):
    """An architecture's heatmap set is missing or lacks a configured method."""


@dataclass
class EvaluateOutcome:
    """The written tables and plots (PNG bytes by name) and per-step timings."""

    long: pl.DataFrame
    wide: pl.DataFrame
    path: Path
    plots: dict[str, bytes]
    timings: dict[str, float]
    localization: pl.DataFrame


def _test_boxes(settings: Settings, keys: list[str]) -> list[dict]:
    manifest = read_manifests(settings.tensors_dir).select("image_key", "boxes_json")
    order = pl.DataFrame({"image_key": keys}).join(manifest, on="image_key", how="left",
                                                   maintain_order="left")
    return parse_boxes(order["boxes_json"].to_list(), settings.findings)


def evaluate_lineage(settings: Settings, log: Callable[[str], None] = print) -> EvaluateOutcome:
    """Diagnostic metrics (bootstrap 95% CIs, threshold from val; macro rows for several
    findings), heatmap localization metrics (positive test images) and faithfulness metrics
    (true-positive test images, capped per profile) per architecture x CAM method x finding.

    Writes `metrics/metric_table.parquet` (long), `metrics/comparison.csv` (wide) and
    `metrics/plots/*.png`. Raises StaleHeatmaps when a heatmap set is missing or stale."""
    cfg = evaluate_config(settings.params, settings.profile)
    faith = cfg["faithfulness"]
    tol = int(cfg["tolerance_px"])
    n_boot = int(settings.profile["n_boot"])
    keys, x_te, y_te, regions = split_arrays(settings, "test")
    boxes = _test_boxes(settings, keys)
    views = dict(union_inventory(settings).select("image_key", "view_position").iter_rows())
    images01 = x_te.astype(np.float32) / 255.0
    device = pick_device()
    rows: list[dict] = []
    roc_inputs: dict[str, dict[str, tuple]] = {f: {} for f in settings.findings}
    montages: dict[str, bytes] = {}
    timings: dict[str, float] = {}
    for arch in settings.architectures:
        out = settings.heatmaps_dir / arch
        if not (out / "predictions.parquet").exists() or not (out / SIDECAR).exists():
            raise StaleHeatmaps(f"no heatmap set for {arch}: materialize heatmap_sets[{arch}]")
        preds = pl.read_parquet(out / "predictions.parquet")
        rows += diagnostic_table(arch, preds, n_boot=n_boot, seed=settings.seed)
        rows += view_auc_rows(arch, preds, views, settings.findings[0], n_boot=n_boot,
                              seed=settings.seed)
        thresholds = thresholds_from_predictions(preds)
        test_prob = np.zeros(y_te.shape)
        for k, finding in enumerate(settings.findings):
            t = preds.filter((pl.col("split") == "test") & (pl.col("finding") == finding))
            t = pl.DataFrame({"image_key": keys}).join(t, on="image_key", how="left",
                                                       maintain_order="left")
            test_prob[:, k] = t["probability"].to_numpy()
            roc_inputs[finding][arch] = (t["label"].to_numpy(), test_prob[:, k])
        sidecar = read_sidecar(out)
        model = None
        shown: dict[str, np.ndarray] = {}
        first_pos = [i for i in range(len(keys)) if regions[i, 0].any()][:4]
        for method in settings.profile["cam_methods"]:
            spec = parse_method(method)
            info = sidecar["methods"].get(spec.name)
            if info is None:
                raise StaleHeatmaps(f"heatmap set of {arch} has no {spec.name} heatmaps (stale): "
                                 f"materialize heatmap_sets[{arch}]")
            if info["status"] != "ok":
                continue  # e.g. `pylon` on a model without class maps (reason in the sidecar)
            maps = np.load(out / info["file"]).astype(np.float32)
            peaks = np.load(out / info["peaks_file"]) if info.get("peaks_file") else None
            t0 = time.perf_counter()
            rows += localization_table(arch, spec.name, settings.findings, maps, regions,
                                       n_boot=n_boot, seed=settings.seed, tolerance_px=tol,
                                       boxes=boxes,
                                       weak_threshold=float(cfg["weak_localization_threshold"]),
                                       peaks=peaks)
            timings[f"{arch}/{spec.name}/localization_s"] = round(time.perf_counter() - t0, 2)
            if faith.get("metrics"):
                t0 = time.perf_counter()
                if model is None:
                    model = load_trained_model(settings, arch, device)
                for k, finding in enumerate(settings.findings):
                    if faith.get("findings") and finding not in faith["findings"]:
                        continue  # faithfulness limited to these findings (CPU profiles)
                    tp = np.flatnonzero((y_te[:, k] > 0) & (test_prob[:, k] >= thresholds[finding]))
                    if faith.get("max_images") is not None:
                        tp = tp[:int(faith["max_images"])]
                    values = faithfulness_values(model, k, images01[tp], maps[tp, k],
                                                 thresholds[finding], faith, seed=settings.seed)
                    rows += mean_rows(arch, spec.name, finding, values, n_boot, settings.seed)
                timings[f"{arch}/{spec.name}/faithfulness_s"] = round(
                    time.perf_counter() - t0, 2)
            shown[spec.name] = maps[first_pos, 0]
        if shown and first_pos:
            montages[arch] = plot_heatmap_montage(
                [x_te[i] for i in first_pos], shown,
                [f"{keys[i][:8]} p={test_prob[i, 0]:.2f}" for i in first_pos],
                f"{arch}: {settings.findings[0]}, positive test images (alpha 0.5)",
                boxes=[gt_boxes(boxes, regions, i, 0, settings.findings[0]) for i in first_pos])
        log(f"{arch}: metrics done")
    long = to_frame(rows)
    path = settings.metrics_dir / "metric_table.parquet"
    atomic_write_parquet(path, long)
    wide = wide_table(long)
    atomic_write_bytes(settings.metrics_dir / "comparison.csv", wide.write_csv().encode())
    plc = localization_summary(long)
    if plc.height:
        atomic_write_bytes(settings.metrics_dir / "localization.csv", plc.write_csv().encode())

    plots: dict[str, bytes] = {}
    for finding in settings.findings:
        plots[f"roc_{finding}"] = plot_roc(roc_inputs[finding], f"{finding}: test ROC (95% CI)",
                                           n_boot=min(n_boot, 500), seed=settings.seed)
        plots[f"metrics_{finding}"] = plot_metric_bars(
            long, finding, [m.replace("{tol}", str(tol)) for m in BAR_METRICS])
    for arch, png in montages.items():
        plots[f"montage_{arch}"] = png
    for name, png in plots.items():
        atomic_write_bytes(settings.metrics_dir / "plots" / f"{name}.png", png)
    log("\n" + str(wide))
    return EvaluateOutcome(long=long, wide=wide, path=path, plots=plots, timings=timings,
                           localization=plc)
