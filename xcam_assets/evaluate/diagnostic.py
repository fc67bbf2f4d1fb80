"""Diagnostic (classification) metrics for binary chest X-ray classifiers.

Pure functions, no Dagster. Covers the diagnostic metrics of the studies in MISSION.md:
accuracy, precision, sensitivity (recall), specificity, F1 and ROC AUC (study 1, study 5),
the geometric-mean decision threshold used by PYLON's masked-out-area metric (study 4,
Preechakul et al. 2022), percentile-bootstrap confidence intervals for per-image metrics,
and t-based confidence intervals over training seeds (PYLON reports mean and t-based 95% CI
over 5 seeds).

Conventions
-----------
* ``y_true`` / ``y_pred`` are 1-D arrays of 0/1 (or bool); anything else raises ``ValueError``.
* ``scores`` are 1-D finite floats (probabilities or logits); the positive class is predicted
  when ``score >= threshold``.
* Undefined ratios (zero denominators, one class absent) are ``nan``, never 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from xcam_assets.stats import (
    as_binary,
    as_scores,
    auc_from_ranks,
    check_boot_args,
    cluster_draws,
    make_clusters,
    percentile_interval,
    resample_indices,
    roc_auc,
    safe_div,
    weighted_auc,
)

__all__ = [
    "CONFUSION_METRICS",
    "confusion_counts",
    "confusion_metrics",
    "diagnostic_rows",
    "gmean_threshold",
    "macro_diagnostic_rows",
]

#: Metric names returned by :func:`confusion_metrics`, in row order of :func:`diagnostic_rows`.
CONFUSION_METRICS: tuple[str, ...] = ("accuracy", "precision", "sensitivity", "specificity", "f1")


# --------------------------------------------------------------------------- threshold
def gmean_threshold(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Decision threshold maximising the geometric mean of sensitivity and specificity.

    Definition: among the candidate thresholds ``t`` = the unique values of ``scores``, with
    the rule "predict positive when ``score >= t``", pick the ``t`` maximising
    ``G(t) = sqrt(sensitivity(t) * specificity(t))``. This is the operating point PYLON's
    masked-out-area metric uses to decide when a prediction flips from positive to negative
    (Preechakul et al. 2022, "Improved image classification explainability with
    high-accuracy heatmaps", iScience 25:103933).

    Ties: when several thresholds reach the maximum (within 1e-12), the **smallest** one is
    returned, i.e. the most sensitive operating point among equally good ones (missing a
    finding is usually costlier than a false alarm in screening). Because candidates are
    actual scores, the returned threshold classifies at least one sample as positive.

    Raises ``ValueError`` when ``y_true`` lacks either class (sensitivity or specificity is
    undefined) or is empty.
    """
    y = as_binary(y_true, "y_true")
    s = as_scores(scores, y.shape[0])
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("gmean_threshold needs both classes in y_true")
    candidates = np.unique(s)  # ascending
    pos_sorted = np.sort(s[y])
    neg_sorted = np.sort(s[~y])
    # Number of positives with score >= t, negatives with score < t.
    tp = n_pos - np.searchsorted(pos_sorted, candidates, side="left")
    tn = np.searchsorted(neg_sorted, candidates, side="left")
    gmean = np.sqrt((tp / n_pos) * (tn / n_neg))
    best = np.flatnonzero(gmean >= gmean.max() - 1e-12)[0]
    return float(candidates[best])


# --------------------------------------------------------------------------- confusion
def confusion_counts(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, int]:
    """Confusion-matrix counts ``{"tp", "fp", "tn", "fn"}`` for binary labels (positive = 1)."""
    y = as_binary(y_true, "y_true")
    p = as_binary(y_pred, "y_pred")
    if y.shape != p.shape:
        raise ValueError(f"y_true has shape {y.shape}, y_pred has shape {p.shape}")
    return {
        "tp": int(np.sum(y & p)),
        "fp": int(np.sum(~y & p)),
        "tn": int(np.sum(~y & ~p)),
        "fn": int(np.sum(y & ~p)),
    }


def _metrics_from_counts(
    tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray
) -> dict[str, np.ndarray]:
    return {
        "accuracy": safe_div(tp + tn, tp + fp + tn + fn),
        "precision": safe_div(tp, tp + fp),
        "sensitivity": safe_div(tp, tp + fn),
        "specificity": safe_div(tn, tn + fp),
        "f1": safe_div(2 * tp, 2 * tp + fp + fn),
    }


def confusion_metrics(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """Threshold-dependent diagnostic metrics from binary predictions.

    Definitions (standard; e.g. Sokolova & Lapalme 2009, Inf. Process. Manag. 45:427), with
    TP, FP, TN, FN the confusion-matrix counts for the positive class 1:

    * accuracy    = (TP + TN) / N
    * precision   = TP / (TP + FP)          (positive predictive value)
    * sensitivity = TP / (TP + FN)          (recall, true-positive rate)
    * specificity = TN / (TN + FP)          (true-negative rate)
    * f1          = 2 TP / (2 TP + FP + FN) (harmonic mean of precision and sensitivity)

    A zero denominator gives ``nan`` (e.g. precision with no predicted positive). F1 uses the
    count form, so it is 0 (not nan) when there are positives but none is found, and nan only
    when there are neither true nor predicted positives; this matches scikit-learn >= 1.3.
    Keys are :data:`CONFUSION_METRICS`.
    """
    c = confusion_counts(y_true, y_pred)
    m = _metrics_from_counts(
        np.float64(c["tp"]), np.float64(c["fp"]), np.float64(c["tn"]), np.float64(c["fn"])
    )
    return {k: float(v) for k, v in m.items()}


def diagnostic_rows(
    y_true: ArrayLike,
    scores: ArrayLike,
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: ArrayLike | None = None,
) -> list[dict[str, Any]]:
    """Diagnostic metric table with percentile-bootstrap confidence intervals.

    Returns one row ``{"metric", "value", "ci_low", "ci_high", "n"}`` per metric, in the order
    accuracy, precision, sensitivity, specificity, f1, auc. ``value`` is the metric on all
    samples (see :func:`confusion_metrics`, with ``y_pred = scores >= threshold``, and
    :func:`roc_auc`); the CI is the percentile bootstrap of :func:`bootstrap_ci` (same
    resamples for the same ``seed``, nan resamples dropped), computed here in vectorised
    form. ``n`` is the number of samples (images) the metric was computed on.

    ``groups`` (patient per sample): the CI resamples **patients**, stratified by class
    (``bootstrap_ci(..., groups=groups, stratify=y_true)``: positive patients -- any
    positive image -- and negative patients are drawn separately, so every resample has
    both classes when the data has).
    """
    check_boot_args(n_boot, alpha)
    y = as_binary(y_true, "y_true")
    s = as_scores(scores, y.shape[0])
    n = int(y.size)
    pred = s >= threshold
    point = confusion_metrics(y, pred)
    point["auc"] = roc_auc(y, s) if n else float("nan")

    boot: dict[str, list[np.ndarray]] = {k: [] for k in point}
    if n and n_boot and groups is not None:
        for key, vals in _cluster_boot(y[:, None], s[:, None], pred[:, None], groups,
                                       n_boot, seed).items():
            boot[key] = [vals[:, 0]]
    elif n and n_boot:
        for idx in resample_indices(n, n_boot, seed):
            yb, pb = y[idx], pred[idx]
            tp = np.sum(yb & pb, axis=1).astype(np.float64)
            fp = np.sum(~yb & pb, axis=1).astype(np.float64)
            tn = np.sum(~yb & ~pb, axis=1).astype(np.float64)
            fn = np.sum(yb & ~pb, axis=1).astype(np.float64)
            for key, val in _metrics_from_counts(tp, fp, tn, fn).items():
                boot[key].append(val)
            ranks = stats.rankdata(s[idx], method="average", axis=1)
            boot["auc"].append(auc_from_ranks(ranks, yb))

    rows: list[dict[str, Any]] = []
    for metric in (*CONFUSION_METRICS, "auc"):
        if boot[metric]:
            low, high = percentile_interval(np.concatenate(boot[metric]), alpha)
        else:
            low, high = float("nan"), float("nan")
        rows.append(
            {"metric": metric, "value": point[metric], "ci_low": low, "ci_high": high, "n": n}
        )
    return rows


def _cluster_boot(y: np.ndarray, s: np.ndarray, pred: np.ndarray, groups: ArrayLike,
                  n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """Per-resample metrics (n_boot, F) of the class-stratified patient bootstrap.

    ``y``, ``pred`` (N, F) bool, ``s`` (N, F) scores. Patients are stratified by "any
    positive image for any finding" (:func:`~xcam_assets.stats.make_clusters`); each
    resample is given as patient counts, so confusion counts are count-weighted per-patient
    sums and the AUC the count-weighted Mann-Whitney statistic
    (:func:`~xcam_assets.stats.weighted_auc`): the values of the resample's images taken
    one by one, as :func:`~xcam_assets.stats.bootstrap_ci` would compute them.
    """
    clusters = make_clusters(groups, stratify=y)
    n, n_f = y.shape
    if clusters.codes.size != n:
        raise ValueError(f"groups has {clusters.codes.size} rows, y_true has {n}")
    per_patient = {}
    for name, cell in (("tp", y & pred), ("fp", ~y & pred), ("tn", ~y & ~pred),
                       ("fn", y & ~pred)):
        per_patient[name] = np.stack(
            [np.bincount(clusters.codes, weights=cell[:, f].astype(np.float64),
                         minlength=clusters.n_clusters) for f in range(n_f)], axis=1)
    out: dict[str, list[np.ndarray]] = {k: [] for k in (*CONFUSION_METRICS, "auc")}
    for draws in cluster_draws(clusters, n_boot, seed, max_width=n):
        counts = clusters.counts(draws)  # (B, G)
        c = {k: counts @ v for k, v in per_patient.items()}  # (B, F)
        for key, val in _metrics_from_counts(c["tp"], c["fp"], c["tn"], c["fn"]).items():
            out[key].append(val)
        weights = counts[:, clusters.codes]  # (B, N)
        out["auc"].append(np.stack([weighted_auc(weights, y[:, f], s[:, f])
                                    for f in range(n_f)], axis=1))
    return {k: np.concatenate(v, axis=0) for k, v in out.items()}


def macro_diagnostic_rows(
    y_true: ArrayLike,
    scores: ArrayLike,
    thresholds: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: ArrayLike | None = None,
) -> list[dict[str, Any]]:
    """Macro-averaged diagnostic metrics of a multi-label model, with bootstrap CIs.

    Definition: for ``F`` findings (columns of ``y_true`` / ``scores``, each with its own
    decision threshold), each metric of :func:`diagnostic_rows` is computed per finding and
    averaged with equal weight over the findings where it is defined (``nanmean``; the
    usual "macro average" of per-class reports, e.g. scikit-learn's
    ``classification_report``). The CI resamples **images** (rows), jointly for all
    findings, from the same seeded stream as :func:`diagnostic_rows`, and takes percentiles
    of the macro average. ``n`` is the number of images. Rows in the order of
    :func:`diagnostic_rows`.

    ``groups`` (patient per image): the CI resamples patients instead, jointly for all
    findings, stratified by "any positive image for any finding" (one stratification for
    the joint resample; a rare finding may still miss from a resample, which the
    ``nanmean`` then skips).
    """
    check_boot_args(n_boot, alpha)
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    thr = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if y.ndim != 2 or s.shape != y.shape or thr.shape[0] != y.shape[1]:
        raise ValueError("y_true and scores must be (N, F) with one threshold per finding")
    cols = [as_binary(y[:, f], "y_true") for f in range(y.shape[1])]
    ys = np.stack(cols, axis=1) if cols else y.astype(bool)
    n, n_f = ys.shape
    pred = s >= thr[None, :]
    point: dict[str, list[float]] = {m: [] for m in (*CONFUSION_METRICS, "auc")}
    for f in range(n_f):
        cm = confusion_metrics(ys[:, f], pred[:, f])
        for m in CONFUSION_METRICS:
            point[m].append(cm[m])
        point["auc"].append(roc_auc(ys[:, f], s[:, f]) if n else float("nan"))
    boot: dict[str, list[np.ndarray]] = {k: [] for k in point}
    if n and n_boot and groups is not None:
        for key, vals in _cluster_boot(ys, s, pred, groups, n_boot, seed).items():
            with np.errstate(invalid="ignore"):
                counts = np.sum(~np.isnan(vals), axis=1)
                sums = np.nansum(vals, axis=1)
            boot[key] = [np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)]
    elif n and n_boot:
        for idx in resample_indices(n, n_boot, seed):
            per: dict[str, list[np.ndarray]] = {k: [] for k in point}
            for f in range(n_f):
                yb, pb = ys[:, f][idx], pred[:, f][idx]
                tp = np.sum(yb & pb, axis=1).astype(np.float64)
                fp = np.sum(~yb & pb, axis=1).astype(np.float64)
                tn = np.sum(~yb & ~pb, axis=1).astype(np.float64)
                fn = np.sum(yb & ~pb, axis=1).astype(np.float64)
                for key, val in _metrics_from_counts(tp, fp, tn, fn).items():
                    per[key].append(val)
                ranks = stats.rankdata(s[:, f][idx], method="average", axis=1)
                per["auc"].append(auc_from_ranks(ranks, yb))
            for key, vals in per.items():
                stacked = np.stack(vals, axis=0)
                with np.errstate(invalid="ignore"):
                    counts = np.sum(~np.isnan(stacked), axis=0)
                    sums = np.nansum(stacked, axis=0)
                boot[key].append(np.where(counts > 0, sums / np.maximum(counts, 1), np.nan))
    rows: list[dict[str, Any]] = []
    for metric in (*CONFUSION_METRICS, "auc"):
        vals = np.asarray(point[metric], dtype=np.float64)
        value = float(np.nanmean(vals)) if np.any(~np.isnan(vals)) else float("nan")
        if boot[metric]:
            low, high = percentile_interval(np.concatenate(boot[metric]), alpha)
        else:
            low, high = float("nan"), float("nan")
        rows.append({"metric": metric, "value": value, "ci_low": low, "ci_high": high, "n": n})
    return rows


