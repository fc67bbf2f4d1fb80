"""Assemble the long metric table from predictions, heatmaps and ground truth.

Pure functions over arrays/frames (no Dagster): the asset and the tests call the same code.
Long format: ``architecture, cam_method, finding, metric, value, ci_low, ci_high, n``
(``cam_method`` null for diagnostic metrics; ``finding`` may be ``macro_average`` or
``box_weighted_average`` for summaries over findings). ``value`` is the metric on the
evaluated images, ``[ci_low, ci_high]`` its percentile-bootstrap 95% CI over images, ``n``
the number of images the value rests on.

:data:`METRICS` lists every metric name with its range and direction; the blocking GE suite
``resources/expectations/metric_table.yaml`` encodes the same ranges (a test keeps the two
in step). "DiffGradCAM" is deliberately absent: see :mod:`xcam_assets.evaluate.faithfulness`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import polars as pl

from xcam_assets.evaluate.diagnostic import diagnostic_rows, gmean_threshold, macro_diagnostic_rows
from xcam_assets.evaluate.localization import (
    boxes_to_mask,
    ehr_auc,
    energy_pointing_game,
    point_localization_accuracy,
    pointing_game_hit,
    weak_localization,
)
from xcam_assets.stats import bootstrap_ci, bootstrap_mean_ci, roc_auc

SCHEMA = {"architecture": pl.String, "cam_method": pl.String, "finding": pl.String,
          "metric": pl.String, "value": pl.Float64, "ci_low": pl.Float64,
          "ci_high": pl.Float64, "n": pl.Int64, "split": pl.String}
"""`split`: the images a row is computed on: `test` (the patient-level test split) or
`external` (batches declared external, scored by the frozen checkpoints)."""

MACRO = "macro_average"
BOX_WEIGHTED = "box_weighted_average"

#: metric -> (low, high, better). "better" is the direction of a more accurate model or
#: a more trustworthy heatmap. The GE suite encodes the same ranges.
METRICS: dict[str, tuple[float, float, str]] = {
    # diagnostic (test split; threshold from val)
    "accuracy": (0.0, 1.0, "higher"),
    "precision": (0.0, 1.0, "higher"),
    "sensitivity": (0.0, 1.0, "higher"),  # = recall
    "specificity": (0.0, 1.0, "higher"),
    "f1": (0.0, 1.0, "higher"),
    "auc": (0.0, 1.0, "higher"),
    "threshold": (0.0, 1.0, "n/a"),
    # localization (positive test images)
    "pointing_game": (0.0, 1.0, "higher"),
    "pointing_game_tol{tol}px": (0.0, 1.0, "higher"),
    "point_localization_accuracy": (0.0, 1.0, "higher"),
    "energy_pointing_game": (0.0, 1.0, "higher"),
    "ehr_auc": (0.0, 1.0, "higher"),
    "weak_localization_iou": (0.0, 1.0, "higher"),
    "weak_localization_hit": (0.0, 1.0, "higher"),
    "weak_localization_hit_iou50": (0.0, 1.0, "higher"),
    # faithfulness (true-positive test images, probability units)
    "aopc": (-1.0, 1.0, "higher"),
    "deletion_auc": (0.0, 1.0, "lower"),
    "insertion_auc": (0.0, 1.0, "higher"),
    "masked_out_area": (0.0, 1.0, "lower"),
    "road_morf": (-1.0, 1.0, "lower"),
    "road_lerf": (-1.0, 1.0, "higher"),
    "road_combined": (-1.0, 1.0, "higher"),
}

#: defaults of the `evaluate:` section of resources/params.yaml
EVALUATE_DEFAULTS: dict[str, Any] = {
    "tolerance_px": 15,
    "weak_localization_threshold": 0.15,
    "faithfulness": {
        "metrics": ["aopc", "deletion", "insertion", "masked_out_area", "road"],
        "max_images": None,
        "findings": None,
        "batch_size": 64,
        "aopc": {"region_px": 34, "reference_size": 224, "perturbation": "gaussian_noise",
                 "noise_mean": 0.0, "noise_sd": 0.1, "fill": 0.5, "steps": None},
        "deletion": {"steps": 100, "fill": 0.5},
        "insertion": {"steps": 100, "blur_ksize": 11, "blur_sigma": 5.0},
        "masked_out_area": {"step": 0.005, "fill": 0.5},
        "road": {"percentiles": [10, 20, 30, 40, 50, 60, 70, 80, 90], "max_images": None},
    },
}


def _merge(base: Mapping[str, Any], top: Mapping[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in (top or {}).items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def evaluate_config(params: Mapping[str, Any], profile: Mapping[str, Any]) -> dict[str, Any]:
    """:data:`EVALUATE_DEFAULTS` <- ``params['evaluate']`` <- ``profile['evaluate']``."""
    return _merge(_merge(EVALUATE_DEFAULTS, params.get("evaluate")), profile.get("evaluate"))


def metric_name(metric: str, tolerance_px: int) -> str:
    return metric.replace("{tol}", str(int(tolerance_px)))


def metric_info(name: str) -> tuple[float, float, str]:
    """(low, high, better) of a metric name as it appears in the table."""
    if name in METRICS:
        return METRICS[name]
    if name.startswith("pointing_game_tol") and name.endswith("px"):
        return METRICS["pointing_game_tol{tol}px"]
    if name.startswith("auc_view_"):
        return METRICS["auc"]
    raise KeyError(f"unknown metric {name!r}")


def known_metrics(tolerance_px: int) -> list[str]:
    return [metric_name(m, tolerance_px) for m in METRICS]


# --------------------------------------------------------------------------- rows
def _row(arch: str, method: str | None, finding: str, metric: str, value: float,
         ci: tuple[float, float] | None, n: int) -> dict[str, Any]:
    lo, hi = ci if ci is not None else (None, None)
    return {"architecture": arch, "cam_method": method, "finding": finding, "metric": metric,
            "value": float(value), "ci_low": lo, "ci_high": hi, "n": int(n)}


def mean_rows(arch: str, method: str | None, finding: str, per_image: Mapping[str, Any],
              n_boot: int, seed: int) -> list[dict[str, Any]]:
    """One row per metric: mean of the finite per-image values, bootstrap CI of the mean.

    Undefined per-image values (nan: e.g. EHR AUC of a constant heatmap, masked-out area of
    an image not called positive) are dropped; ``n`` counts the values used. A metric with
    no finite value gives no row.
    """
    rows = []
    for metric, values in per_image.items():
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
        arr = arr[np.isfinite(arr)]
        if not len(arr):
            continue
        rows.append(_row(arch, method, finding, metric, float(arr.mean()),
                         bootstrap_mean_ci(arr, n_boot=n_boot, seed=seed), len(arr)))
    return rows


def diagnostic_table(arch: str, predictions: pl.DataFrame, n_boot: int, seed: int,
                     split: str = "test") -> list[dict]:
    """Threshold chosen on val (max geometric mean of sens/spec), metrics on `split`; per
    finding, plus ``macro_average`` rows when the model has several findings (per-class
    report of a multi-label model)."""
    rows = []
    findings = predictions["finding"].unique().sort().to_list()
    thresholds, test_cols = [], []
    for finding in findings:
        p = predictions.filter(pl.col("finding") == finding)
        val = p.filter(pl.col("split") == "val")
        test = p.filter(pl.col("split") == split).sort("image_key")
        threshold = gmean_threshold(val["label"].to_numpy(), val["probability"].to_numpy())
        for r in diagnostic_rows(test["label"].to_numpy(), test["probability"].to_numpy(),
                                 threshold, n_boot=n_boot, seed=seed):
            rows.append({"architecture": arch, "cam_method": None, "finding": finding, **r})
        rows.append(_row(arch, None, finding, "threshold", threshold, None, val.height))
        thresholds.append(threshold)
        test_cols.append(test)
    if len(findings) > 1:
        y = np.stack([t["label"].to_numpy() for t in test_cols], axis=1)
        s = np.stack([t["probability"].to_numpy() for t in test_cols], axis=1)
        for r in macro_diagnostic_rows(y, s, thresholds, n_boot=n_boot, seed=seed):
            rows.append({"architecture": arch, "cam_method": None, "finding": MACRO, **r})
    return rows


def view_auc_rows(arch: str, predictions: pl.DataFrame, views: Mapping[str, str | None],
                  finding: str, n_boot: int, seed: int, split: str = "test") -> list[dict]:
    """Test AUC of `finding` within each acquisition view (`auc_view_PA`, `auc_view_AP`, ...)
    with bootstrap CIs: a model that learnt the view instead of the disease scores well
    overall and near 0.5 within a view. Views with one class only give no row."""
    test = predictions.filter((pl.col("split") == split) & (pl.col("finding") == finding))
    test = test.with_columns(pl.col("image_key").replace_strict(
        dict(views), default=None, return_dtype=pl.String).alias("view"))
    rows = []
    for view in sorted(v for v in test["view"].unique().to_list() if v):
        t = test.filter(pl.col("view") == view)
        y, p = t["label"].to_numpy(), t["probability"].to_numpy()
        if y.min() == y.max():
            continue
        rows.append(_row(arch, None, finding, f"auc_view_{view}", roc_auc(y, p),
                         bootstrap_ci(roc_auc, y, p, n_boot=n_boot, seed=seed), t.height))
    return rows


def thresholds_from_predictions(predictions: pl.DataFrame) -> dict[str, float]:
    """finding -> the val threshold of :func:`diagnostic_table`."""
    out = {}
    for finding in predictions["finding"].unique().sort().to_list():
        val = predictions.filter((pl.col("finding") == finding) & (pl.col("split") == "val"))
        out[finding] = gmean_threshold(val["label"].to_numpy(), val["probability"].to_numpy())
    return out


# --------------------------------------------------------------------------- ground truth
def parse_boxes(boxes_json: Sequence[str | None], findings: Sequence[str]) -> list[dict]:
    """Manifest ``boxes_json`` (finding -> [[x0, y0, x1, y1], ...] in tensor pixels) per image."""
    out = []
    for raw in boxes_json:
        d = json.loads(raw) if raw else {}
        out.append({f: [tuple(float(v) for v in b) for b in d.get(f, []) or []]
                    for f in findings})
    return out


def region_boxes(region: np.ndarray) -> list[tuple[float, float, float, float]]:
    """Bounding boxes (max exclusive) of the 8-connected components of a mask: the box
    ground truth of a finding annotated by mask only (e.g. SIIM-ACR)."""
    mask = np.asarray(region).astype(np.uint8)
    n, _, st, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    return [(float(st[i, 0]), float(st[i, 1]), float(st[i, 0] + st[i, 2]),
             float(st[i, 1] + st[i, 3])) for i in range(1, n)]


def gt_boxes(boxes: Sequence[Mapping[str, Sequence]] | None, regions: np.ndarray, i: int,
             k: int, finding: str) -> list[tuple[float, float, float, float]]:
    """Boxes of finding ``k`` on image ``i``: the annotated boxes, else the region's
    component boxes (mask-only annotation)."""
    listed = list((boxes[i].get(finding) or []) if boxes is not None else [])
    if listed:
        return [tuple(b) for b in listed]  # type: ignore[misc]
    return region_boxes(regions[i, k] > 0) if regions[i, k].any() else []


# --------------------------------------------------------------------------- localization
def weak_localization_best(heatmap: np.ndarray, boxes: Sequence[Sequence[float]],
                           threshold: float = 0.15) -> dict[str, float]:
    """:func:`weak_localization` against several ground-truth boxes: the largest IoU over
    the boxes, and a hit when any box is hit (ImageNet rule / IoU >= 0.5), as in ILSVRC
    localization where a prediction may match any instance."""
    results = [weak_localization(heatmap, b, threshold=threshold) for b in boxes]
    return {"weak_localization_iou": max(r["iou"] for r in results),
            "weak_localization_hit": float(any(r["hit"] for r in results)),
            "weak_localization_hit_iou50": float(any(r["hit_at_05"] for r in results))}


def localization_table(arch: str, method: str, findings: list[str], maps: np.ndarray,
                       regions: np.ndarray, n_boot: int, seed: int,
                       tolerance_px: int = 15, boxes: Sequence[Mapping] | None = None,
                       weak_threshold: float = 0.15,
                       peaks: np.ndarray | None = None) -> list[dict]:
    """Localization metrics of one architecture x method over test images that have a
    non-empty ground-truth region of the finding (positives).

    Per finding: pointing game strict and with ``tolerance_px`` (region mask), energy
    pointing game, EHR AUC (region mask), weak localization IoU / hits and PYLON's point
    localization accuracy (boxes: :func:`gt_boxes`). Point localization accuracy also gets
    ``macro_average`` and ``box_weighted_average`` rows (values from
    :func:`point_localization_accuracy`; CIs resample images jointly over findings).
    ``peaks`` (N, F, 2): each map's argmax taken in float32 before storage (the explain
    stage's `*_peaks.npy`); point localization accuracy then points there, so maxima that
    tie in the stored float16 maps do not fall to the first pixel.
    """
    rows: list[dict] = []
    n_img, n_f = maps.shape[0], len(findings)
    plc_hits = np.full((n_img, n_f), np.nan)
    plc_boxes = np.zeros((n_img, n_f))
    plc_images: list[tuple[dict, dict]] = []
    for i in range(n_img):
        heat: dict[str, np.ndarray] = {}
        bx: dict[str, list] = {}
        for k, finding in enumerate(findings):
            b = gt_boxes(boxes, regions, i, k, finding) if regions[i, k].any() else []
            if b:
                heat[finding] = _peak_map(maps[i, k], None if peaks is None else peaks[i, k])
                bx[finding] = b
                plc_hits[i, k] = float(pointing_game_hit(heat[finding],
                                                         boxes_to_mask(b, maps[i, k].shape)))
                plc_boxes[i, k] = len(b)
        plc_images.append((heat, bx))
    plc = point_localization_accuracy(plc_images, findings=findings)

    for k, finding in enumerate(findings):
        idx = [i for i in range(n_img) if regions[i, k].any()]
        if not idx:
            continue
        per: dict[str, list[float]] = {
            "pointing_game": [], metric_name("pointing_game_tol{tol}px", tolerance_px): [],
            "energy_pointing_game": [], "ehr_auc": [], "weak_localization_iou": [],
            "weak_localization_hit": [], "weak_localization_hit_iou50": []}
        for i in idx:
            h, region = maps[i, k], regions[i, k] > 0
            per["pointing_game"].append(float(pointing_game_hit(h, region)))
            per[metric_name("pointing_game_tol{tol}px", tolerance_px)].append(
                float(pointing_game_hit(h, region, tolerance_px=tolerance_px)))
            per["energy_pointing_game"].append(energy_pointing_game(h, region))
            per["ehr_auc"].append(ehr_auc(h, region))
            b = gt_boxes(boxes, regions, i, k, finding)
            for key, v in weak_localization_best(h, b, weak_threshold).items():
                per[key].append(v)
        rows += mean_rows(arch, method, finding, per, n_boot, seed)
        fl = plc.per_finding[finding]
        if fl.n_images:
            hits = plc_hits[:, k][~np.isnan(plc_hits[:, k])]
            rows.append(_row(arch, method, finding, "point_localization_accuracy", fl.accuracy,
                             bootstrap_mean_ci(hits, n_boot=n_boot, seed=seed), fl.n_images))
    scored = [f for f in plc.per_finding.values() if f.n_images]
    if scored:
        keep = ~np.all(np.isnan(plc_hits), axis=1)
        hits, nbox = plc_hits[keep], plc_boxes[keep]

        def macro(h: np.ndarray, b: np.ndarray) -> float:
            return _plc_summary(h, b)[0]

        def weighted(h: np.ndarray, b: np.ndarray) -> float:
            return _plc_summary(h, b)[1]

        n_used = int(keep.sum())
        rows.append(_row(arch, method, MACRO, "point_localization_accuracy", plc.macro,
                         bootstrap_ci(macro, hits, nbox, n_boot=n_boot, seed=seed), n_used))
        rows.append(_row(arch, method, BOX_WEIGHTED, "point_localization_accuracy",
                         plc.box_weighted,
                         bootstrap_ci(weighted, hits, nbox, n_boot=n_boot, seed=seed), n_used))
    return rows


def _peak_map(heat: np.ndarray, peak: np.ndarray | None) -> np.ndarray:
    """`heat`, or where a float32 peak (row, col) was recorded a map whose only maximum is
    there (argmax-based metrics then point at the recorded peak)."""
    if peak is None or peak[0] < 0:
        return heat
    one = np.zeros(heat.shape, dtype=np.float32)
    one[int(peak[0]), int(peak[1])] = 1.0
    return one


def _plc_summary(hits: np.ndarray, nbox: np.ndarray) -> tuple[float, float]:
    """(macro, box-weighted) point localization accuracy of an (images, findings) hit
    matrix (nan = no box of that finding) and box counts."""
    has = ~np.isnan(hits)
    n = has.sum(axis=0)
    ok = n > 0
    if not ok.any():
        return float("nan"), float("nan")
    acc = np.where(ok, np.nansum(hits, axis=0) / np.maximum(n, 1), np.nan)[ok]
    w = nbox.sum(axis=0)[ok]
    return float(acc.mean()), float(np.sum(acc * w) / np.sum(w))


# --------------------------------------------------------------------------- frames
def to_frame(rows: list[dict], split: str = "test") -> pl.DataFrame:
    """The long table of `rows`; rows without a `split` get `split`."""
    return (pl.DataFrame(rows, schema=SCHEMA)
            .with_columns(pl.col("split").fill_null(split))
            .sort("architecture", "cam_method", "finding", "metric", nulls_last=False))


def wide_table(long: pl.DataFrame) -> pl.DataFrame:
    """The studies' comparison table: one row per (architecture, cam_method, finding), one
    column per metric, cells ``'v [lo, hi]'``.

    Diagnostic metrics (no CAM method) are repeated on each of the architecture's method
    rows of the same finding, so a row reads "model accuracy | heatmap trust"; an
    architecture without heatmap rows keeps its ``-`` row.
    """
    fmt = long.with_columns(
        pl.col("cam_method").fill_null("-"),
        pl.when(pl.col("ci_low").is_not_null() & pl.col("ci_low").is_not_nan())
        .then(pl.format("{} [{}, {}]", pl.col("value").round(3), pl.col("ci_low").round(3),
                        pl.col("ci_high").round(3)))
        .otherwise(pl.col("value").round(3).cast(pl.String)).alias("cell"))
    keys = ["architecture", "cam_method", "finding"]
    diag = fmt.filter(pl.col("cam_method") == "-")
    heat = fmt.filter(pl.col("cam_method") != "-")
    methods = heat.select("architecture", "cam_method").unique()
    spread = diag.drop("cam_method").join(methods, on="architecture", how="inner")
    lonely = diag.join(methods.select("architecture").unique(), on="architecture", how="anti")
    cells = pl.concat([heat.select(*keys, "metric", "cell"),
                       spread.select(*keys, "metric", "cell"),
                       lonely.select(*keys, "metric", "cell")])
    if cells.is_empty():
        return pl.DataFrame(schema={k: pl.String for k in keys})
    wide = cells.pivot(on="metric", index=keys, values="cell").sort(keys)
    order = _metric_order([c for c in wide.columns if c not in keys])
    return wide.select(*keys, *order)


def _metric_order(names: list[str]) -> list[str]:
    rank = {m.split("{")[0]: i for i, m in enumerate(METRICS)}

    def key(name: str) -> tuple[int, str]:
        base = name if name in rank else next((b for b in rank if b and name.startswith(b)
                                               and b.endswith("_tol")), name)
        return rank.get(base, len(rank)), name

    return sorted(names, key=key)


#: PYLON's NIH ChestX-ray14 point localization accuracy (Preechakul et al. 2022, as quoted
#: in MISSION.md): macro average and the pneumothorax row, per heatmap method. Trained on
#: NIH's 112k images at 256 px on a GPU; shown beside this platform's figures for scale.
PAPER_NIH_PLC: dict[str, dict[str, float]] = {
    "CAM (baseline)": {MACRO: 0.44, "Pneumothorax": 0.16},
    "Grad-CAM": {MACRO: 0.44, "Pneumothorax": 0.16},
    "Grad-CAM++": {MACRO: 0.29, "Pneumothorax": 0.11},
    "XGrad-CAM": {MACRO: 0.22, "Pneumothorax": 0.12},
    "PYLON": {MACRO: 0.60, "Pneumothorax": 0.20},
}


def localization_summary(long: pl.DataFrame, reference: bool = True) -> pl.DataFrame:
    """PYLON's localization table: one row per (architecture, CAM method), one column per
    boxed finding plus the macro and box-weighted averages, cells ``v [lo, hi] n=N``
    (point localization accuracy); with `reference`, the paper's NIH rows below
    (architecture ``PYLON paper (NIH)``), where it reported a figure."""
    plc = long.filter(pl.col("metric") == "point_localization_accuracy").with_columns(
        pl.when(pl.col("ci_low").is_not_null() & pl.col("ci_low").is_not_nan())
        .then(pl.format("{} [{}, {}] n={}", pl.col("value").round(2), pl.col("ci_low").round(2),
                        pl.col("ci_high").round(2), pl.col("n")))
        .otherwise(pl.format("{} n={}", pl.col("value").round(2), pl.col("n"))).alias("cell"))
    if plc.is_empty():
        return pl.DataFrame(schema={"architecture": pl.String, "cam_method": pl.String})
    table = plc.pivot(on="finding", index=["architecture", "cam_method"], values="cell")
    findings = sorted(c for c in table.columns
                      if c not in ("architecture", "cam_method", MACRO, BOX_WEIGHTED))
    cols = ["architecture", "cam_method", *findings,
            *[c for c in (MACRO, BOX_WEIGHTED) if c in table.columns]]
    table = table.select(cols).sort("architecture", "cam_method")
    if reference:
        ref = pl.DataFrame([{"architecture": "PYLON paper (NIH)", "cam_method": method,
                             **{f: f"{v:.2f}" for f, v in vals.items() if f in cols}}
                            for method, vals in PAPER_NIH_PLC.items()])
        table = pl.concat([table, ref], how="diagonal_relaxed")
    return table.fill_null("-")
