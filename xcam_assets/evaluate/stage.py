"""The evaluate stage's run, without Dagster: the metric table over every architecture and
CAM method (diagnostic, localization, faithfulness), the wide comparison and the plots."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from xcam_assets.atomic import atomic_write_bytes, atomic_write_json, atomic_write_parquet
from xcam_assets.config import Settings
from xcam_assets.evaluate.beyond import (
    agreement_table,
    calibration_table,
    inventory_facts,
    pointing_subgroup_table,
    randomization_table,
    stability_table,
    subgroup_table,
)
from xcam_assets.evaluate.calibration import plot_reliability
from xcam_assets.evaluate.data_randomization import (
    PermutedModel,
    data_config,
    data_randomization_table,
    permuted_label_model,
)
from xcam_assets.evaluate.faithfulness import faithfulness_values
from xcam_assets.evaluate.family_plots import family_plots
from xcam_assets.evaluate.plots import plot_heatmap_montage, plot_metric_bars, plot_roc
from xcam_assets.evaluate.scorecard import scorecard
from xcam_assets.evaluate.seeds import (
    seed_faithfulness_table,
    seed_heatmap_table,
    seed_models,
    seed_predictions,
    trained_seeds,
)
from xcam_assets.evaluate.tables import (
    CI_PATIENTS,
    CI_SEEDS,
    SEED_SUFFIX,
    diagnostic_table,
    evaluate_config,
    gt_boxes,
    localization_summary,
    localization_table,
    mean_rows,
    parse_boxes,
    patient_groups,
    seed_rows,
    seed_summary_rows,
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
from xcam_assets.train.stage import precision_for
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
    ci: dict[str, Any] = field(default_factory=dict)
    #: the scorecard (`metrics/scorecard.csv`, :mod:`xcam_assets.evaluate.scorecard`)
    scorecard: pl.DataFrame | None = None


def _test_boxes(settings: Settings, keys: list[str]) -> list[dict]:
    manifest = read_manifests(settings.tensors_dir).select("image_key", "boxes_json")
    order = pl.DataFrame({"image_key": keys}).join(manifest, on="image_key", how="left",
                                                   maintain_order="left")
    return parse_boxes(order["boxes_json"].to_list(), settings.findings)


def split_patients(settings: Settings) -> dict[str, str]:
    """image key -> pseudonymous patient key of every split image (the splits parquet):
    the cluster of the patient-level bootstrap. Used to resample, never written out."""
    return dict(pl.read_parquet(settings.splits_path)
                .select("image_key", "patient_key").iter_rows())


def ci_record(n_boot: int, seed: int, roc_n_boot: int, n_images: int, n_patients: int,
              seeds: dict[str, list[int]],
              seed_heatmaps: dict[str, dict[str, Any]] | None = None,
              seed_faithfulness: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """How the table's CIs were made (`metric_table.json`, the asset's metadata).
    `seed_heatmaps` / `seed_faithfulness`: per architecture, what the per-seed heatmap and
    faithfulness scoring covered (:mod:`xcam_assets.evaluate.seeds`)."""
    multi = {a: s for a, s in seeds.items() if len(s) > 1}
    heat = {a: r for a, r in (seed_heatmaps or {}).items() if a in multi}
    faith = {a: r for a, r in (seed_faithfulness or {}).items() if a in multi}
    scored = any(r.get("enabled") for r in heat.values())
    faith_scored = sorted({m for r in faith.values() if r.get("enabled")
                           for m in r.get("metrics", [])})
    return {
        "ci_level": 0.95,
        "ci_method": "percentile bootstrap, resampling patients (all images of a drawn "
                     "patient; stratified by class for diagnostic metrics)",
        "ci_method_column": {
            CI_PATIENTS: "percentile bootstrap over patients (every bootstrap row)",
            CI_SEEDS: f"`<metric>{SEED_SUFFIX}` rows: mean over training seeds, Student-t "
                      "95% CI across seeds (clipped to the metric's range), n = seeds"},
        "resampling_unit": "patient",
        "stratification": "diagnostic metrics (accuracy, precision, sensitivity, "
                          "specificity, f1, auc, per-view auc, ROC bands): positive and "
                          "negative patients resampled separately; a patient is positive "
                          "when any of their images is positive (for macro rows: for any "
                          "finding)",
        "n_boot": n_boot, "roc_band_n_boot": roc_n_boot, "bootstrap_seed": seed,
        "n_test_images": n_images, "n_test_patients": n_patients,
        "seed_level": ({"method": "Student-t 95% CI over training seeds (PYLON)",
                        "metrics": "diagnostic metrics"
                                   + (" and localization metrics per CAM method (each seed's "
                                      "own heatmaps of the boxed test images)"
                                      if scored else "")
                                   + (f" and faithfulness ({', '.join(faith_scored)}) per "
                                      "CAM method on each seed's own true positives"
                                      if faith_scored else "")
                                   + f", suffix {SEED_SUFFIX}",
                        "seeds": multi,
                        "heatmaps": heat,
                        "faithfulness": faith} if multi else None),
        "beyond_accuracy": {  # issue #18 (xcam_assets/evaluate/beyond.py)
            "calibration": "ece / brier (+ _temperature_scaled): patient bootstrap, "
                           "stratified by class",
            "subgroups": "<metric>@<attr>=<value> and <metric>_gap@<attr>=<a>_vs_<b>: one "
                         "joint patient bootstrap per attribute (stratified by class for "
                         "auc/sensitivity/specificity); the gap's CI is that of the same "
                         "difference",
            "randomization_stability": "per-image similarities, patient bootstrap of the "
                                       "mean over the images"},
    }


def _by_key(per_seed: dict[int, dict[tuple[str, str, str], float]]
            ) -> dict[tuple[str, str, str], list[float]]:
    """seed -> {key: value} as key -> the values over the seeds (in seed order)."""
    out: dict[tuple[str, str, str], list[float]] = {}
    for seed in sorted(per_seed):
        for key, value in per_seed[seed].items():
            out.setdefault(key, []).append(value)
    return out


def evaluate_lineage(settings: Settings, log: Callable[[str], None] = print) -> EvaluateOutcome:
    """Diagnostic metrics (bootstrap 95% CIs, threshold from val; macro rows for several
    findings), heatmap localization metrics (positive test images) and faithfulness metrics
    (true-positive test images, capped per profile) per architecture x CAM method x finding.
    Every bootstrap resamples patients (stratified by class for diagnostic metrics); with
    several training seeds, diagnostic metrics and (each seed model's own heatmaps of the
    boxed test images, `evaluate.seed_heatmaps`) localization metrics per CAM method also
    get `<metric>_seed_mean` rows (mean and t-CI over seeds), and so do the faithfulness
    metrics named in `evaluate.seed_heatmaps.faithfulness` (AOPC by default) on each seed's
    own true positives (:mod:`xcam_assets.evaluate.seeds`).

    Writes `metrics/metric_table.parquet` (long), `metrics/metric_table.json` (how the CIs
    were made), `metrics/comparison.csv` (wide), `metrics/scorecard.csv` (the headline
    metrics per architecture x method) and `metrics/plots/*.png`. Raises
    StaleHeatmaps when a heatmap set is missing or stale."""
    cfg = evaluate_config(settings.params, settings.profile)
    faith = cfg["faithfulness"]
    tol = int(cfg["tolerance_px"])
    n_boot = int(settings.profile["n_boot"])
    keys, x_te, y_te, regions = split_arrays(settings, "test")
    patients = split_patients(settings)
    groups = patient_groups(keys, patients)
    assert groups is not None
    val_arrays: tuple | None = None
    seeds_used: dict[str, list[int]] = {}
    seed_heat_info: dict[str, dict[str, Any]] = {}
    seed_faith_info: dict[str, dict[str, Any]] = {}
    boxes = _test_boxes(settings, keys)
    inventory = union_inventory(settings)
    views = dict(inventory.select("image_key", "view_position").iter_rows())
    facts = inventory_facts(inventory, cfg["subgroups"]["attributes"])  # issue #18
    reliability: dict[str, dict[str, tuple]] = {f: {} for f in settings.findings}
    images01 = x_te.astype(np.float32) / 255.0
    device = pick_device()
    rows: list[dict] = []
    roc_inputs: dict[str, dict[str, tuple]] = {f: {} for f in settings.findings}
    montages: dict[str, bytes] = {}
    timings: dict[str, float] = {}
    data_cfg = data_config(cfg["randomization"])  # issue #18: data randomization (opt-in)
    permuted: dict[str, PermutedModel] = {}
    for arch in settings.architectures:
        out = settings.heatmaps_dir / arch
        if not (out / "predictions.parquet").exists() or not (out / SIDECAR).exists():
            raise StaleHeatmaps(f"no heatmap set for {arch}: materialize heatmap_sets[{arch}]")
        preds = pl.read_parquet(out / "predictions.parquet")
        rows += diagnostic_table(arch, preds, n_boot=n_boot, seed=settings.seed,
                                 patients=patients)
        rows += view_auc_rows(arch, preds, views, settings.findings[0], n_boot=n_boot,
                              seed=settings.seed, patients=patients)
        if len(trained_seeds(settings, arch)) > 1:
            if val_arrays is None:
                val_arrays = split_arrays(settings, "val")
            models = list(seed_models(settings, arch, device))  # loaded and hashed once
            per_seed = seed_predictions(settings, arch, {"val": val_arrays,
                                                         "test": (keys, x_te, y_te, regions)},
                                        device, log, models=models)
            rows += seed_rows(arch, per_seed, views=views, view_finding=settings.findings[0])
            seeds_used[arch] = sorted(per_seed)
            t0 = time.perf_counter()  # issue #17 item 5: heatmap metrics per seed
            per_seed_heat, seed_heat_info[arch] = seed_heatmap_table(
                settings, arch, x_te, regions, boxes, cfg, device, log, models=models)
            timings[f"{arch}/seed_heatmaps_s"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()  # and faithfulness (AOPC by default) per seed
            per_seed_faith, seed_faith_info[arch] = seed_faithfulness_table(
                settings, arch, x_te, y_te, keys, per_seed, cfg, device, log, models=models)
            del models
            rows += seed_summary_rows(arch, _by_key(per_seed_heat) | _by_key(per_seed_faith))
            timings[f"{arch}/seed_faithfulness_s"] = round(time.perf_counter() - t0, 2)
        thresholds = thresholds_from_predictions(preds)
        t0 = time.perf_counter()
        cal_rows, curves = calibration_table(arch, preds, settings.findings, cfg["calibration"],
                                             n_boot, settings.seed, patients)
        rows += cal_rows
        for finding, curve in curves.items():
            reliability[finding][arch] = curve
        rows += subgroup_table(arch, preds, thresholds, facts, cfg["subgroups"], n_boot,
                               settings.seed, patients)
        timings[f"{arch}/calibration_subgroups_s"] = round(time.perf_counter() - t0, 2)
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
        agree: dict[str, list[np.ndarray]] = {}
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
                                       peaks=peaks, groups=groups)
            rows += pointing_subgroup_table(arch, spec.name, settings.findings, maps, regions,
                                            keys, facts, cfg["subgroups"], n_boot,
                                            settings.seed, groups)
            timings[f"{arch}/{spec.name}/localization_s"] = round(time.perf_counter() - t0, 2)
            if cfg["randomization"].get("enabled"):  # issue #18: model randomization test
                t0 = time.perf_counter()
                if model is None:
                    model = load_trained_model(settings, arch, device)
                rows += randomization_table(arch, spec, model, settings.zoo, x_te, y_te,
                                            settings.findings, cfg["randomization"], n_boot,
                                            settings.seed, groups)
                timings[f"{arch}/{spec.name}/randomization_s"] = round(
                    time.perf_counter() - t0, 2)
            if data_cfg["enabled"]:  # issue #18: data randomization test (a training run)
                if model is None:
                    model = load_trained_model(settings, arch, device)
                if arch not in permuted:
                    permuted[arch] = permuted_label_model(settings, arch, data_cfg, device, log)
                    timings[f"{arch}/data_randomization_train_s"] = round(
                        permuted[arch].train_s, 2)
                t0 = time.perf_counter()
                rows += data_randomization_table(
                    arch, spec, model, permuted[arch].model, settings.zoo, x_te, y_te,
                    settings.findings, data_cfg, n_boot, settings.seed, groups,
                    epochs=permuted[arch].record["epochs"])
                timings[f"{arch}/{spec.name}/data_randomization_s"] = round(
                    time.perf_counter() - t0, 2)
            if cfg["stability"].get("enabled"):  # issue #18: stability under perturbations
                t0 = time.perf_counter()
                if model is None:
                    model = load_trained_model(settings, arch, device)
                rows += stability_table(arch, spec, model, settings.zoo, x_te, y_te,
                                        settings.findings, cfg["stability"], tol, n_boot,
                                        settings.seed, groups)
                timings[f"{arch}/{spec.name}/stability_s"] = round(time.perf_counter() - t0, 2)
                agree[spec.name] = [maps[y_te[:, k] > 0, k].astype(np.float16)
                                    for k in range(len(settings.findings))]
            if faith.get("metrics"):
                t0 = time.perf_counter()
                if model is None:
                    model = load_trained_model(settings, arch, device)
                precision = precision_for(settings, arch, device, model)
                for k, finding in enumerate(settings.findings):
                    if faith.get("findings") and finding not in faith["findings"]:
                        continue  # faithfulness limited to these findings (CPU profiles)
                    tp = np.flatnonzero((y_te[:, k] > 0) & (test_prob[:, k] >= thresholds[finding]))
                    if faith.get("max_images") is not None:
                        tp = tp[:int(faith["max_images"])]
                    values = faithfulness_values(
                        model, k, images01[tp], maps[tp, k], thresholds[finding], faith,
                        seed=settings.seed, precision=precision)
                    rows += mean_rows(arch, spec.name, finding, values, n_boot, settings.seed,
                                      groups=groups[tp])
                timings[f"{arch}/{spec.name}/faithfulness_s"] = round(
                    time.perf_counter() - t0, 2)
            shown[spec.name] = maps[first_pos, 0]
        rows += agreement_table(arch, agree, y_te, settings.findings, tol, n_boot, settings.seed,
                                groups)
        if shown and first_pos:
            montages[arch] = plot_heatmap_montage(
                [x_te[i] for i in first_pos], shown,
                [f"{keys[i][:8]} p={test_prob[i, 0]:.2f}" for i in first_pos],
                f"{arch}: {settings.findings[0]}, positive test images (alpha 0.5)",
                boxes=[gt_boxes(boxes, regions, i, 0, settings.findings[0]) for i in first_pos])
        log(f"{arch}: metrics done")
    long = to_frame(rows, ci_method=CI_PATIENTS)
    path = settings.metrics_dir / "metric_table.parquet"
    atomic_write_parquet(path, long)
    roc_n_boot = min(n_boot, 500)
    ci = ci_record(n_boot, settings.seed, roc_n_boot, len(keys), len(set(groups.tolist())),
                   seeds_used, seed_heat_info, seed_faith_info)
    if permuted:  # the permuted-label models the data randomization rows rest on
        ci["data_randomization"] = {a: pm.record for a, pm in permuted.items()}
    atomic_write_json(settings.metrics_dir / "metric_table.json", ci)
    wide = wide_table(long)
    atomic_write_bytes(settings.metrics_dir / "comparison.csv", wide.write_csv().encode())
    card = scorecard(long, settings.findings[0])
    atomic_write_bytes(settings.metrics_dir / "scorecard.csv", card.write_csv().encode())
    plc = localization_summary(long)
    if plc.height:
        atomic_write_bytes(settings.metrics_dir / "localization.csv", plc.write_csv().encode())

    plots: dict[str, bytes] = {}
    for finding in settings.findings:
        plots[f"roc_{finding}"] = plot_roc(roc_inputs[finding], f"{finding}: test ROC (95% CI)",
                                           n_boot=roc_n_boot, seed=settings.seed,
                                           groups=groups)
        plots[f"metrics_{finding}"] = plot_metric_bars(
            long, finding, [m.replace("{tol}", str(tol)) for m in BAR_METRICS])
        if reliability[finding]:
            plots[f"reliability_{finding}"] = plot_reliability(
                reliability[finding], f"{finding}: test calibration",
                int(cfg["calibration"]["bins"]))
    plots.update(family_plots(long, settings.findings[0]))
    for arch, png in montages.items():
        plots[f"montage_{arch}"] = png
    for name, png in plots.items():
        atomic_write_bytes(settings.metrics_dir / "plots" / f"{name}.png", png)
    log("\n" + str(wide))
    return EvaluateOutcome(long=long, wide=wide, path=path, plots=plots, timings=timings,
                           localization=plc, ci=ci, scorecard=card)
