"""Assemble the long metric table from predictions, heatmaps and ground truth.

Pure functions over arrays/frames (no Dagster): the asset and the tests call the same code.
Long format: ``architecture, cam_method, finding, metric, value, ci_low, ci_high, n``
(``cam_method`` null for diagnostic metrics; ``finding`` may be ``macro_average`` or
``box_weighted_average`` for summaries over findings). ``value`` is the metric on the
evaluated images, ``[ci_low, ci_high]`` its 95% CI, ``n`` the number of images the value
rests on. Column ``ci_method`` says how the CI was made:

* ``bootstrap_patients``: percentile bootstrap resampling **patients** (all images of a
  drawn patient; :mod:`xcam_assets.stats`), stratified by class for the diagnostic metrics
  (a patient is positive when any of their images is), the evaluate stage's CIs;
* ``bootstrap_images``: the same resampling images (callers that pass no patient ids);
* ``t_over_seeds``: rows ``<metric>_seed_mean`` (:func:`seed_rows` for the diagnostic
  metrics, :func:`seed_summary_rows` of :mod:`xcam_assets.evaluate.seeds` for the
  localization metrics of each CAM method): the mean over the training seeds of a profile
  with ``seeds: N > 1`` and its Student-t 95% CI across seeds (clipped to the metric's
  range); ``n`` is then the number of seeds. The plain ``<metric>`` row beside it is the
  single checkpoint of record (lowest val loss);
* null: no CI (e.g. ``threshold``).

Patient ids are used only to resample; they are never written into the table.

:data:`METRICS` lists every metric name with its range and direction; the blocking GE suite
``resources/expectations/metric_table.yaml`` encodes the same ranges (a test keeps the two
in step). "DiffGradCAM" is deliberately absent: see :mod:`xcam_assets.evaluate.faithfulness`.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import polars as pl

from xcam_assets.evaluate.diagnostic import diagnostic_rows, gmean_threshold, macro_diagnostic_rows
from xcam_assets.evaluate.localization import (
    REFERENCE_SIZE,
    boxes_to_mask,
    ehr_auc,
    energy_pointing_game,
    is_blank,
    point_localization_accuracy,
    pointing_game_hit,
    pylon_iou,
    scaled_px,
    weak_localization,
)
from xcam_assets.stats import bootstrap_ci, bootstrap_mean_ci, roc_auc, t_confidence_interval

SCHEMA = {"architecture": pl.String, "cam_method": pl.String, "finding": pl.String,
          "metric": pl.String, "value": pl.Float64, "ci_low": pl.Float64,
          "ci_high": pl.Float64, "n": pl.Int64, "split": pl.String,
          "ci_method": pl.String}
"""`split`: the images a row is computed on: `test` (the patient-level test split) or
`external` (batches declared external, scored by the frozen checkpoints). `ci_method`: see
the module docstring."""

#: `ci_method` values (module docstring).
CI_PATIENTS = "bootstrap_patients"
CI_IMAGES = "bootstrap_images"
CI_SEEDS = "t_over_seeds"
#: metric-name suffix of the seed-level rows (mean and t-CI over training seeds)
SEED_SUFFIX = "_seed_mean"

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
    # named by the reference tolerance at 224 px (TorchRay's 15 px), applied scaled to the
    # image size; the effective pixels are the `pointing_tolerance_px` row
    "pointing_game_tol{tol}px": (0.0, 1.0, "higher"),
    "point_localization_accuracy": (0.0, 1.0, "higher"),
    "energy_pointing_game": (0.0, 1.0, "higher"),
    "ehr_auc": (0.0, 1.0, "higher"),
    "weak_localization_iou": (0.0, 1.0, "higher"),
    "weak_localization_hit": (0.0, 1.0, "higher"),
    "weak_localization_hit_iou50": (0.0, 1.0, "higher"),
    "pylon_iou": (0.0, 1.0, "higher"),
    "blank_map_rate": (0.0, 1.0, "lower"),
    # faithfulness (true-positive test images, probability units)
    "aopc": (-1.0, 1.0, "higher"),
    "deletion_auc": (0.0, 1.0, "lower"),
    "insertion_auc": (0.0, 1.0, "higher"),
    "masked_out_area": (0.0, 1.0, "lower"),
    "road_morf": (-1.0, 1.0, "lower"),
    "road_lerf": (-1.0, 1.0, "higher"),
    "road_combined": (-1.0, 1.0, "higher"),
    # calibration (test split; :mod:`xcam_assets.evaluate.calibration`)
    "ece": (0.0, 1.0, "lower"),
    "brier": (0.0, 1.0, "lower"),
    "ece_temperature_scaled": (0.0, 1.0, "lower"),
    "brier_temperature_scaled": (0.0, 1.0, "lower"),
    # subgroups (:mod:`xcam_assets.evaluate.subgroups`): `<metric>@<attribute>=<value>` rows
    # have the range of `<metric>`; `<metric>_gap@<attribute>=<a>_vs_<b>` is the largest
    # difference between two subgroups (a minus b, >= 0; its CI may reach below 0)
    "auc_gap": (-1.0, 1.0, "lower"),
    "sensitivity_gap": (-1.0, 1.0, "lower"),
    "specificity_gap": (-1.0, 1.0, "lower"),
    "pointing_game_gap": (-1.0, 1.0, "lower"),
    # cascading model-parameter randomization test (:mod:`xcam_assets.evaluate.sanity`):
    # `<metric>@step=<k>`; similarity to the original maps, lower = the method reads the model
    "randomization_spearman": (-1.0, 1.0, "lower"),
    "randomization_ssim": (-1.0, 1.0, "lower"),
    "randomization_test_failed": (0.0, 1.0, "lower"),
    # data randomization test (opt-in; :mod:`xcam_assets.evaluate.data_randomization`): the
    # maps of the original vs the permuted-label model, lower = the method reads the labels
    "data_randomization_spearman": (-1.0, 1.0, "lower"),
    "data_randomization_ssim": (-1.0, 1.0, "lower"),
    "data_randomization_test_failed": (0.0, 1.0, "lower"),
    # stability (:mod:`xcam_assets.evaluate.stability`): `<metric>@perturbation=<p>`, and
    # agreement between two CAM methods of one model, `<metric>@with=<other method>`
    "stability_spearman": (-1.0, 1.0, "higher"),
    "stability_pointing": (0.0, 1.0, "higher"),
    "method_agreement_spearman": (-1.0, 1.0, "n/a"),
    "method_agreement_pointing": (0.0, 1.0, "n/a"),
    # parameters recorded beside the values they qualify (:data:`PARAMETERS`)
    "pointing_tolerance_px": (0.0, math.inf, "n/a"),
    "small_box_margin_px": (0.0, math.inf, "n/a"),
    "aopc_grid": (0.0, math.inf, "n/a"),
    "aopc_steps": (0.0, math.inf, "n/a"),
    "ece_bins": (0.0, math.inf, "n/a"),
    "temperature": (0.0, math.inf, "n/a"),
    "randomization_layers": (0.0, math.inf, "n/a"),
    "randomization_max_spearman": (-1.0, 1.0, "n/a"),
    "data_randomization_max_spearman": (-1.0, 1.0, "n/a"),
    "data_randomization_epochs": (0.0, math.inf, "n/a"),
    "stability_shift_px": (0.0, math.inf, "n/a"),
    "stability_noise_sd": (0.0, math.inf, "n/a"),
}

#: separator of a subgroup metric name: ``auc@sex=F`` is the AUC within the images whose
#: inventory says PatientSex F (:mod:`xcam_assets.evaluate.subgroups`)
SUBGROUP_SEP = "@"

#: rows that record a setting the metric values depend on, not a score: no CI, ``n`` = the
#: images of the metrics they qualify. ``pointing_tolerance_px``: the pointing-game
#: tolerance in pixels of the stored maps (the ``pointing_game_tol15px`` name keeps the
#: reference 15 px at 224 px); ``small_box_margin_px``: the ImageNet rule's +10 px at that
#: size (:func:`localization_table`); ``aopc_grid`` / ``aopc_steps``: the AOPC block grid
#: (blocks per side) and its ``L`` (:func:`xcam_assets.evaluate.faithfulness.faithfulness_values`).
PARAMETERS: tuple[str, ...] = ("pointing_tolerance_px", "small_box_margin_px", "aopc_grid",
                               "aopc_steps", "ece_bins", "temperature", "randomization_layers",
                               "randomization_max_spearman", "stability_shift_px",
                               "stability_noise_sd", "data_randomization_max_spearman",
                               "data_randomization_epochs")

#: defaults of the `evaluate:` section of resources/params.yaml
EVALUATE_DEFAULTS: dict[str, Any] = {
    "tolerance_px": 15,
    "weak_localization_threshold": 0.15,
    "faithfulness": {
        "metrics": ["aopc", "deletion", "insertion", "masked_out_area", "road"],
        "max_images": None,
        "findings": None,
        "batch_size": 64,
        "aopc": {"grid": 9, "region_px": 34, "reference_size": 224,
                 "perturbation": "gaussian_noise",
                 "noise_mean": 0.0, "noise_sd": 0.1, "fill": 0.5, "steps": None},
        "deletion": {"steps": 100, "fill": 0.5},
        "insertion": {"steps": 100, "blur_ksize": 11, "blur_sigma": 5.0},
        "masked_out_area": {"step": 0.005, "fill": 0.5},
        "road": {"percentiles": [10, 20, 30, 40, 50, 60, 70, 80, 90], "max_images": None},
    },
    # issue #18 "beyond accuracy" (:mod:`xcam_assets.evaluate.beyond`)
    "calibration": {"bins": 15, "temperature_scaling": True},
    "subgroups": {"attributes": ["sex", "age", "view", "manufacturer"], "min_images": 10},
    "randomization": {"enabled": True, "max_images": 4, "n_steps": 4, "check_step": 1,
                      "max_spearman": 0.5},
    "stability": {"enabled": True, "max_images": 4, "perturbations": ["hflip", "shift", "noise"],
                  "shift_px": 8, "noise_sd": 0.02},
    # issue #17 item 5: localization metrics of every kept seed model (seeds: N > 1);
    # max_images caps the boxed test images, methods (null: all) the CAM methods;
    # faithfulness: the faithfulness metrics scored per seed on its own true positives
    # (:mod:`xcam_assets.evaluate.seeds`)
    "seed_heatmaps": {"enabled": True, "max_images": None, "methods": None,
                      "faithfulness": ["aopc"]},
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
    if SUBGROUP_SEP in name:
        return metric_info(name.split(SUBGROUP_SEP, 1)[0])
    if name.startswith("pointing_game_tol") and name.endswith("px"):
        return METRICS["pointing_game_tol{tol}px"]
    if name.startswith("auc_view_"):
        return METRICS["auc"]
    if name.endswith(SEED_SUFFIX) and name != SEED_SUFFIX:
        return metric_info(name[:-len(SEED_SUFFIX)])
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
              n_boot: int, seed: int, groups: Sequence | np.ndarray | None = None
              ) -> list[dict[str, Any]]:
    """One row per metric: mean of the finite per-image values, bootstrap CI of the mean.

    Undefined per-image values (nan: e.g. masked-out area of an image not called positive)
    are dropped; ``n`` counts the values used. A metric with no finite value gives no row.
    (Localization metrics are never nan: a blank map is a failure and stays in ``n``,
    :mod:`xcam_assets.evaluate.localization`.) :data:`PARAMETERS` rows get no CI.

    ``groups`` (patient per image): the CI resamples patients (cluster bootstrap). A
    metric with fewer values than ``groups`` holds the values of the *first* images (ROAD
    is capped to the first images); more values than ``groups`` is an error.
    """
    rows = []
    for metric, values in per_image.items():
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
        g = None
        if groups is not None:
            g = np.asarray(groups)
            if len(arr) > len(g):
                raise ValueError(f"{metric}: {len(arr)} values for {len(g)} patient ids")
            g = g[:len(arr)]
        keep = np.isfinite(arr)
        arr = arr[keep]
        if not len(arr):
            continue
        ci = None if metric in PARAMETERS else bootstrap_mean_ci(
            arr, n_boot=n_boot, seed=seed, groups=None if g is None else g[keep])
        rows.append(_row(arch, method, finding, metric, float(arr.mean()), ci, len(arr)))
    return rows


def patient_groups(keys: Sequence[str], patients: Mapping[str, str] | None
                   ) -> np.ndarray | None:
    """The (pseudonymous) patient of each image key, for a patient-level bootstrap; None
    without `patients`. An image without a patient is an error (it cannot be clustered)."""
    if patients is None:
        return None
    missing = [k for k in keys if k not in patients]
    if missing:
        raise KeyError(f"{len(missing)} evaluated image(s) have no patient id, e.g. "
                       f"{missing[:3]}")
    return np.asarray([patients[k] for k in keys], dtype=object)


def diagnostic_table(arch: str, predictions: pl.DataFrame, n_boot: int, seed: int,
                     split: str = "test", patients: Mapping[str, str] | None = None
                     ) -> list[dict]:
    """Threshold chosen on val (max geometric mean of sens/spec), metrics on `split`; per
    finding, plus ``macro_average`` rows when the model has several findings (per-class
    report of a multi-label model). `patients` (image key -> patient pseudonym): CIs
    resample patients, stratified by class (:func:`diagnostic_rows`)."""
    rows = []
    findings = predictions["finding"].unique().sort().to_list()
    thresholds, test_cols = [], []
    for finding in findings:
        p = predictions.filter(pl.col("finding") == finding)
        val = p.filter(pl.col("split") == "val")
        test = p.filter(pl.col("split") == split).sort("image_key")
        threshold = gmean_threshold(val["label"].to_numpy(), val["probability"].to_numpy())
        for r in diagnostic_rows(test["label"].to_numpy(), test["probability"].to_numpy(),
                                 threshold, n_boot=n_boot, seed=seed,
                                 groups=patient_groups(test["image_key"].to_list(), patients)):
            rows.append({"architecture": arch, "cam_method": None, "finding": finding, **r})
        rows.append(_row(arch, None, finding, "threshold", threshold, None, val.height))
        thresholds.append(threshold)
        test_cols.append(test)
    if len(findings) > 1:
        y = np.stack([t["label"].to_numpy() for t in test_cols], axis=1)
        s = np.stack([t["probability"].to_numpy() for t in test_cols], axis=1)
        if any(t["image_key"].to_list() != test_cols[0]["image_key"].to_list()
               for t in test_cols):
            raise ValueError("macro rows need every finding predicted on the same images")
        groups = patient_groups(test_cols[0]["image_key"].to_list(), patients)
        for r in macro_diagnostic_rows(y, s, thresholds, n_boot=n_boot, seed=seed,
                                       groups=groups):
            rows.append({"architecture": arch, "cam_method": None, "finding": MACRO, **r})
    return rows


def view_auc_rows(arch: str, predictions: pl.DataFrame, views: Mapping[str, str | None],
                  finding: str, n_boot: int, seed: int, split: str = "test",
                  patients: Mapping[str, str] | None = None) -> list[dict]:
    """Test AUC of `finding` within each acquisition view (`auc_view_PA`, `auc_view_AP`, ...)
    with bootstrap CIs: a model that learnt the view instead of the disease scores well
    overall and near 0.5 within a view. Views with one class only give no row.
    `patients`: CIs resample the view's patients, stratified by class."""
    test = predictions.filter((pl.col("split") == split) & (pl.col("finding") == finding))
    test = test.with_columns(pl.col("image_key").replace_strict(
        dict(views), default=None, return_dtype=pl.String).alias("view"))
    rows = []
    for view in sorted(v for v in test["view"].unique().to_list() if v):
        t = test.filter(pl.col("view") == view)
        y, p = t["label"].to_numpy(), t["probability"].to_numpy()
        if y.min() == y.max():
            continue
        g = patient_groups(t["image_key"].to_list(), patients)
        ci = bootstrap_ci(roc_auc, y, p, n_boot=n_boot, seed=seed, groups=g,
                          stratify=None if g is None else y)
        rows.append(_row(arch, None, finding, f"auc_view_{view}", roc_auc(y, p), ci,
                         t.height))
    return rows


def thresholds_from_predictions(predictions: pl.DataFrame) -> dict[str, float]:
    """finding -> the val threshold of :func:`diagnostic_table`."""
    out = {}
    for finding in predictions["finding"].unique().sort().to_list():
        val = predictions.filter((pl.col("finding") == finding) & (pl.col("split") == "val"))
        out[finding] = gmean_threshold(val["label"].to_numpy(), val["probability"].to_numpy())
    return out


def seed_rows(arch: str, per_seed: Mapping[int, pl.DataFrame], split: str = "test",
              views: Mapping[str, str | None] | None = None, view_finding: str | None = None,
              confidence: float = 0.95) -> list[dict]:
    """Seed-level rows ``<metric>_seed_mean``: mean over training seeds and Student-t CI.

    ``per_seed``: training seed -> that seed's checkpoint's predictions (val and `split`,
    the format of ``predictions.parquet``). Each seed is scored as the checkpoint of record
    is (:func:`diagnostic_table`: its own val threshold; per finding and, with several
    findings, ``macro_average``; with `views`, the per-view AUCs of `view_finding`), then
    per (finding, metric) :func:`~xcam_assets.stats.t_confidence_interval` over the seeds
    gives ``value`` = the mean and ``[ci_low, ci_high]`` = ``mean -/+ t_{0.975, k-1} s /
    sqrt(k)`` (PYLON's protocol), clipped to the metric's range (:func:`metric_info`; a
    t-interval of a bounded rate can overshoot it). ``n`` = number of seeds ``k``,
    ``ci_method`` = :data:`CI_SEEDS`. The decision thresholds are not summarised. Fewer
    than two seeds give no rows. A seed where a metric is undefined (nan) makes that
    row's value nan (not silently dropped).
    """
    if len(per_seed) < 2:
        return []
    values: dict[tuple[str, str], list[float]] = {}
    for s in sorted(per_seed):
        preds = per_seed[s]
        rows = diagnostic_table(arch, preds, n_boot=0, seed=0, split=split)
        if views is not None and view_finding is not None:
            rows += view_auc_rows(arch, preds, views, view_finding, n_boot=0, seed=0,
                                  split=split)
        for r in rows:
            if r["metric"] != "threshold":
                values.setdefault((r["finding"], r["metric"]), []).append(r["value"])
    return seed_summary_rows(arch, {(None, f, m): v for (f, m), v in values.items()},
                             confidence)


def seed_summary_rows(arch: str, values: Mapping[tuple[str | None, str, str], Sequence[float]],
                      confidence: float = 0.95) -> list[dict]:
    """``<metric>_seed_mean`` rows from per-seed values: ``(cam_method, finding, metric)``
    -> one value per seed (``cam_method`` None for diagnostic metrics). ``value`` = the mean,
    ``[ci_low, ci_high]`` = :func:`~xcam_assets.stats.t_confidence_interval` across the
    seeds clipped to the metric's range, ``n`` = seeds, ``ci_method`` = :data:`CI_SEEDS`.
    Shared by :func:`seed_rows` and the per-seed heatmap metrics
    (:mod:`xcam_assets.evaluate.seeds`), so both follow one convention. Keys with fewer than
    two values give no row (no spread to make a CI from)."""
    out = []
    for (method, finding, metric), vals in values.items():
        if len(vals) < 2:
            continue
        mean, low, high = t_confidence_interval(vals, confidence)
        lo_r, hi_r, _ = metric_info(metric)
        ci = (float(np.clip(low, lo_r, hi_r)), float(np.clip(high, lo_r, hi_r)))
        row = _row(arch, method, finding, metric + SEED_SUFFIX, mean, ci, len(vals))
        out.append({**row, "ci_method": CI_SEEDS})
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
                           threshold: float = 0.15, margin_px: float = 10.0
                           ) -> dict[str, float]:
    """:func:`weak_localization` against several ground-truth boxes: the largest IoU over
    the boxes, and a hit when any box is hit (ImageNet rule with margin ``margin_px`` /
    IoU >= 0.5), as in ILSVRC localization where a prediction may match any instance."""
    results = [weak_localization(heatmap, b, threshold=threshold, margin_px=margin_px)
               for b in boxes]
    return {"weak_localization_iou": max(r["iou"] for r in results),
            "weak_localization_hit": float(any(r["hit"] for r in results)),
            "weak_localization_hit_iou50": float(any(r["hit_at_05"] for r in results))}


def localization_table(arch: str, method: str, findings: list[str], maps: np.ndarray,
                       regions: np.ndarray, n_boot: int, seed: int,
                       tolerance_px: int = 15, boxes: Sequence[Mapping] | None = None,
                       weak_threshold: float = 0.15,
                       peaks: np.ndarray | None = None,
                       groups: Sequence | np.ndarray | None = None,
                       reference_size: int = REFERENCE_SIZE,
                       iou_threshold: float = 0.5) -> list[dict]:
    """Localization metrics of one architecture x method over test images that have a
    non-empty ground-truth region of the finding (positives).

    Per finding: pointing game strict and with ``tolerance_px`` (region mask), energy
    pointing game, EHR AUC (region mask), weak localization IoU / hits, ``blank_map_rate``
    (share of the evaluated maps that are constant), and on the boxes (:func:`gt_boxes`)
    PYLON's point localization accuracy and PYLON's IoU (:func:`pylon_iou`, map above
    ``iou_threshold`` of its maximum vs the boxes' mask). Both PYLON metrics also get
    ``macro_average`` (mean over findings) and ``box_weighted_average`` rows: each finding
    weighted by its number of **boxed images**, as PYLON's official code does (= total over
    all boxed (image, finding) pairs); CIs resample images jointly over findings.

    Rules (:mod:`xcam_assets.evaluate.localization` module notes): a blank (constant) map is
    a failure for every metric and stays in ``n`` (every metric of a finding rests on the
    same images); energy, EHR AUC, weak localization and PYLON IoU read the evidence above
    each map's median, so ReLU and no-ReLU maps compare. Pixel tolerances are defined at
    ``reference_size`` (224 px) and scaled to the maps' side: the pointing tolerance is
    ``tolerance_px * size / reference_size`` (the metric keeps the reference name,
    ``pointing_game_tol15px``) and the ImageNet small-box margin ``10 * size /
    reference_size``; the rows ``pointing_tolerance_px`` and ``small_box_margin_px``
    record the effective pixel values (:data:`PARAMETERS`).
    ``peaks`` (N, F, 2): each map's argmax taken in float32 before storage (the explain
    stage's `*_peaks.npy`); point localization accuracy then points there, so maxima that
    tie in the stored float16 maps do not fall to the first pixel.
    ``groups`` (N,): the patient of each image; every CI (per finding and the macro /
    box-weighted averages) then resamples patients (cluster bootstrap) instead of images.
    """
    rows: list[dict] = []
    n_img, n_f = maps.shape[0], len(findings)
    pg = None if groups is None else np.asarray(groups)
    if pg is not None and len(pg) != n_img:
        raise ValueError(f"groups has {len(pg)} entries for {n_img} images")
    size = math.sqrt(maps.shape[-2] * maps.shape[-1])  # the side (maps are square)
    tol = scaled_px(tolerance_px, size, reference_size)
    margin = scaled_px(10.0, size, reference_size)
    tol_name = metric_name("pointing_game_tol{tol}px", tolerance_px)
    plc_hits = np.full((n_img, n_f), np.nan)
    box_iou = np.full((n_img, n_f), np.nan)
    plc_images: list[tuple[dict, dict]] = []
    for i in range(n_img):
        heat: dict[str, np.ndarray] = {}
        bx: dict[str, list] = {}
        for k, finding in enumerate(findings):
            b = gt_boxes(boxes, regions, i, k, finding) if regions[i, k].any() else []
            if b:
                heat[finding] = _peak_map(maps[i, k], None if peaks is None else peaks[i, k])
                bx[finding] = b
                box_mask = boxes_to_mask(b, maps[i, k].shape)
                if not box_mask.any():
                    raise ValueError(f"image {i}: boxes of {finding!r} fall outside the "
                                     f"{maps[i, k].shape} heatmap")
                plc_hits[i, k] = float(pointing_game_hit(heat[finding], box_mask))
                box_iou[i, k] = pylon_iou(maps[i, k], box_mask, threshold=iou_threshold)
        plc_images.append((heat, bx))
    plc = point_localization_accuracy(plc_images, findings=findings)

    for k, finding in enumerate(findings):
        idx = [i for i in range(n_img) if regions[i, k].any()]
        if not idx:
            continue
        per: dict[str, list[float]] = {
            "pointing_game": [], tol_name: [], "energy_pointing_game": [], "ehr_auc": [],
            "weak_localization_iou": [], "weak_localization_hit": [],
            "weak_localization_hit_iou50": [], "blank_map_rate": [],
            "pointing_tolerance_px": [], "small_box_margin_px": []}
        for i in idx:
            h, region = maps[i, k], regions[i, k] > 0
            per["blank_map_rate"].append(float(is_blank(h)))
            per["pointing_game"].append(float(pointing_game_hit(h, region)))
            per[tol_name].append(float(pointing_game_hit(h, region, tolerance_px=tol)))
            per["energy_pointing_game"].append(energy_pointing_game(h, region))
            per["ehr_auc"].append(ehr_auc(h, region))
            b = gt_boxes(boxes, regions, i, k, finding)
            for key, v in weak_localization_best(h, b, weak_threshold, margin).items():
                per[key].append(v)
            per["pointing_tolerance_px"].append(tol)
            per["small_box_margin_px"].append(margin)
        rows += mean_rows(arch, method, finding, per, n_boot, seed,
                          groups=None if pg is None else pg[idx])
        fl = plc.per_finding[finding]
        if fl.n_images:
            boxed = ~np.isnan(plc_hits[:, k])
            hits = plc_hits[:, k][boxed]
            rows.append(_row(arch, method, finding, "point_localization_accuracy", fl.accuracy,
                             bootstrap_mean_ci(hits, n_boot=n_boot, seed=seed,
                                               groups=None if pg is None else pg[boxed]),
                             fl.n_images))
            ious = box_iou[:, k][boxed]
            rows.append(_row(arch, method, finding, "pylon_iou", float(ious.mean()),
                             bootstrap_mean_ci(ious, n_boot=n_boot, seed=seed,
                                               groups=None if pg is None else pg[boxed]),
                             fl.n_images))
    scored = [f for f in plc.per_finding.values() if f.n_images]
    if scored:
        keep = ~np.all(np.isnan(plc_hits), axis=1)

        def macro(v: np.ndarray) -> float:
            return _finding_summary(v)[0]

        def weighted(v: np.ndarray) -> float:
            return _finding_summary(v)[1]

        n_used = int(keep.sum())
        kept = None if pg is None else pg[keep]
        iou_macro, iou_weighted = _finding_summary(box_iou[keep])
        for metric, values, m_val, w_val in (
                ("point_localization_accuracy", plc_hits[keep], plc.macro, plc.box_weighted),
                ("pylon_iou", box_iou[keep], iou_macro, iou_weighted)):
            rows.append(_row(arch, method, MACRO, metric, m_val,
                             bootstrap_ci(macro, values, n_boot=n_boot, seed=seed,
                                          groups=kept), n_used))
            rows.append(_row(arch, method, BOX_WEIGHTED, metric, w_val,
                             bootstrap_ci(weighted, values, n_boot=n_boot, seed=seed,
                                          groups=kept), n_used))
    return rows


def _peak_map(heat: np.ndarray, peak: np.ndarray | None) -> np.ndarray:
    """`heat`, or where a float32 peak (row, col) was recorded a map whose only maximum is
    there (argmax-based metrics then point at the recorded peak). A blank stored map stays
    blank (a miss), whatever peak its all-zero float32 map recorded."""
    if peak is None or peak[0] < 0 or is_blank(heat):
        return heat
    one = np.zeros(heat.shape, dtype=np.float32)
    one[int(peak[0]), int(peak[1])] = 1.0
    return one


def _finding_summary(values: np.ndarray) -> tuple[float, float]:
    """(macro, "box-weighted") average over findings of an (images, findings) matrix of
    per-image scores (nan = no box of that finding): the mean of the per-finding means, and
    their mean weighted by each finding's number of boxed images (PYLON's official
    weighting), i.e. the mean over all boxed (image, finding) pairs."""
    has = ~np.isnan(values)
    n = has.sum(axis=0)
    ok = n > 0
    if not ok.any():
        return float("nan"), float("nan")
    per = (np.nansum(values, axis=0)[ok] / n[ok]).astype(np.float64)
    w = n[ok].astype(np.float64)
    return float(per.mean()), float(np.sum(per * w) / np.sum(w))


# --------------------------------------------------------------------------- frames
def to_frame(rows: list[dict], split: str = "test",
             ci_method: str | None = CI_IMAGES) -> pl.DataFrame:
    """The long table of `rows`; rows without a `split` get `split`; rows with a CI and
    no `ci_method` get `ci_method` (the bootstrap the caller ran: :data:`CI_PATIENTS`
    when it passed patient ids, :data:`CI_IMAGES` otherwise)."""
    return (pl.DataFrame(rows, schema=SCHEMA)
            .with_columns(pl.col("split").fill_null(split),
                          pl.when(pl.col("ci_method").is_null() & pl.col("ci_low").is_not_null())
                          .then(pl.lit(ci_method, dtype=pl.String))
                          .otherwise(pl.col("ci_method")).alias("ci_method"))
            .sort("architecture", "cam_method", "finding", "metric", nulls_last=False))


def wide_table(long: pl.DataFrame) -> pl.DataFrame:
    """The studies' comparison table: one row per (architecture, cam_method, finding), one
    column per metric, cells ``'v [lo, hi] n=N'`` (``'v n=N'`` without a CI), ``N`` the
    images the value rests on (the long table's ``n``).

    Diagnostic metrics (no CAM method) are repeated on each of the architecture's method
    rows of the same finding, so a row reads "model accuracy | heatmap trust"; an
    architecture without heatmap rows keeps its ``-`` row. Subgroup rows
    (``<metric>@<attribute>=<value>``) stay in the long table only.
    """
    long = long.filter(~pl.col("metric").str.contains(SUBGROUP_SEP, literal=True))
    fmt = long.with_columns(
        pl.col("cam_method").fill_null("-"),
        pl.when(pl.col("ci_low").is_not_null() & pl.col("ci_low").is_not_nan())
        .then(pl.format("{} [{}, {}] n={}", pl.col("value").round(3),
                        pl.col("ci_low").round(3), pl.col("ci_high").round(3), pl.col("n")))
        .otherwise(pl.format("{} n={}", pl.col("value").round(3), pl.col("n"))).alias("cell"))
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

    def key(name: str) -> tuple[int, str, str]:
        stem = name[:-len(SEED_SUFFIX)] if name.endswith(SEED_SUFFIX) else name
        base = stem if stem in rank else next((b for b in rank if b and stem.startswith(b)
                                               and b.endswith("_tol")), stem)
        return rank.get(base, len(rank)), stem, name  # `<m>_seed_mean` right after `<m>`

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
    boxed finding plus the macro and box-weighted averages (each finding weighted by its
    boxed images, as PYLON's official code), cells ``v [lo, hi] n=N``
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
