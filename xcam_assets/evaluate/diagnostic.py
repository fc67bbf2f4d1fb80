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

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

__all__ = [
    "CONFUSION_METRICS",
    "bootstrap_ci",
    "bootstrap_mean_ci",
    "confusion_counts",
    "confusion_metrics",
    "diagnostic_rows",
    "gmean_threshold",
    "macro_diagnostic_rows",
    "roc_auc",
    "t_confidence_interval",
]

#: Metric names returned by :func:`confusion_metrics`, in row order of :func:`diagnostic_rows`.
CONFUSION_METRICS: tuple[str, ...] = ("accuracy", "precision", "sensitivity", "specificity", "f1")

# Largest number of index elements materialised at once by the bootstrap (memory bound).
_MAX_BOOT_ELEMENTS = 2_000_000


# --------------------------------------------------------------------------- validation
def _as_binary(y: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if arr.size and not np.all((arr == 0) | (arr == 1)):
        raise ValueError(f"{name} must contain only 0/1 (or bool) values")
    return arr.astype(bool)


def _as_scores(scores: ArrayLike, n: int) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"scores has length {arr.shape[0]}, y_true has length {n}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("scores must be finite (no nan/inf)")
    return arr


def _safe_div(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


# --------------------------------------------------------------------------- ROC AUC
def _auc_from_ranks(ranks: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC along the last axis from mid-ranks; nan where a class is absent."""
    n_pos = y.sum(axis=-1).astype(np.float64)
    n_neg = y.shape[-1] - n_pos
    rank_sum = np.where(y, ranks, 0.0).sum(axis=-1)
    return _safe_div(rank_sum - n_pos * (n_pos + 1) / 2.0, n_pos * n_neg)


def roc_auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve, computed from ranks.

    Definition: AUC = P(score of a random positive > score of a random negative)
    + 0.5 * P(tie), i.e. the Mann-Whitney U statistic divided by ``n_pos * n_neg``
    (Hanley & McNeil 1982, Radiology 143:29). Tied scores get their average rank, which
    equals the trapezoidal ROC area (same value as ``sklearn.metrics.roc_auc_score``).

    Returns ``nan`` when ``y_true`` has no positives or no negatives.
    """
    y = _as_binary(y_true, "y_true")
    s = _as_scores(scores, y.shape[0])
    if y.size == 0:
        return float("nan")
    ranks = stats.rankdata(s, method="average")
    return float(_auc_from_ranks(ranks, y))


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
    y = _as_binary(y_true, "y_true")
    s = _as_scores(scores, y.shape[0])
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
    y = _as_binary(y_true, "y_true")
    p = _as_binary(y_pred, "y_pred")
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
        "accuracy": _safe_div(tp + tn, tp + fp + tn + fn),
        "precision": _safe_div(tp, tp + fp),
        "sensitivity": _safe_div(tp, tp + fn),
        "specificity": _safe_div(tn, tn + fp),
        "f1": _safe_div(2 * tp, 2 * tp + fp + fn),
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


# --------------------------------------------------------------------------- bootstrap
def _resample_indices(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield bootstrap index matrices (chunk, n) from one seeded stream.

    Shared by :func:`bootstrap_ci` and :func:`diagnostic_rows` so both see the same
    resamples for the same ``seed``.
    """
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_BOOT_ELEMENTS // max(n, 1))
    done = 0
    while done < n_boot:
        size = min(chunk, n_boot - done)
        yield rng.integers(0, n, size=(size, n))
        done += size


def _percentile_interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def _check_boot_args(n_boot: int, alpha: float) -> None:
    if n_boot < 0:
        raise ValueError("n_boot must be >= 0")
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must be in (0, 1)")


def bootstrap_ci(
    stat_fn: Callable[..., float],
    *arrays: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``stat_fn(*arrays)``.

    Definition (Efron & Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13): draw
    ``n_boot`` resamples of the ``n`` rows with replacement -- the **same row indices for
    every array** (rows are resampled jointly, e.g. label and score of one image stay
    together) -- evaluate the statistic on each, and return the ``alpha/2`` and
    ``1 - alpha/2`` quantiles (numpy's default linear interpolation) of the statistic.

    Resamples where the statistic is ``nan`` (e.g. AUC on a resample with one class) are
    dropped before taking quantiles; if all are nan (or ``n_boot == 0`` or ``n == 0``) the
    result is ``(nan, nan)``. Deterministic for a given ``seed``. Arrays are indexed along
    axis 0 and must share their first dimension.
    """
    _check_boot_args(n_boot, alpha)
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array")
    arrs = [np.asarray(a) for a in arrays]
    n = arrs[0].shape[0] if arrs[0].ndim else 0
    if any(a.ndim == 0 or a.shape[0] != n for a in arrs):
        raise ValueError("all arrays must be at least 1-D with the same length")
    if n == 0 or n_boot == 0:
        return float("nan"), float("nan")
    values = np.empty(n_boot, dtype=np.float64)
    i = 0
    for block in _resample_indices(n, n_boot, seed):
        for idx in block:
            values[i] = float(stat_fn(*(a[idx] for a in arrs)))
            i += 1
    return _percentile_interval(values, alpha)


def bootstrap_mean_ci(
    values: ArrayLike, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of per-image values, vectorised.

    Same definition, resamples and result as ``bootstrap_ci(np.mean, values, ...)`` (Efron &
    Tibshirani 1993), computed as one gather per chunk of resamples instead of a Python call
    per resample. ``values`` must be finite (drop undefined per-image values first).
    """
    _check_boot_args(n_boot, alpha)
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    n = arr.shape[0]
    if n == 0 or n_boot == 0:
        return float("nan"), float("nan")
    means = np.concatenate([arr[idx].mean(axis=1) for idx in _resample_indices(n, n_boot, seed)])
    return _percentile_interval(means, alpha)


def diagnostic_rows(
    y_true: ArrayLike,
    scores: ArrayLike,
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> list[dict[str, Any]]:
    """Diagnostic metric table with percentile-bootstrap confidence intervals.

    Returns one row ``{"metric", "value", "ci_low", "ci_high", "n"}`` per metric, in the order
    accuracy, precision, sensitivity, specificity, f1, auc. ``value`` is the metric on all
    samples (see :func:`confusion_metrics`, with ``y_pred = scores >= threshold``, and
    :func:`roc_auc`); the CI is the percentile bootstrap of :func:`bootstrap_ci` (same
    resamples for the same ``seed``, nan resamples dropped), computed here in vectorised
    form. ``n`` is the number of samples (images) the metric was computed on.
    """
    _check_boot_args(n_boot, alpha)
    y = _as_binary(y_true, "y_true")
    s = _as_scores(scores, y.shape[0])
    n = int(y.size)
    pred = s >= threshold
    point = confusion_metrics(y, pred)
    point["auc"] = roc_auc(y, s) if n else float("nan")

    boot: dict[str, list[np.ndarray]] = {k: [] for k in point}
    if n and n_boot:
        for idx in _resample_indices(n, n_boot, seed):
            yb, pb = y[idx], pred[idx]
            tp = np.sum(yb & pb, axis=1).astype(np.float64)
            fp = np.sum(~yb & pb, axis=1).astype(np.float64)
            tn = np.sum(~yb & ~pb, axis=1).astype(np.float64)
            fn = np.sum(yb & ~pb, axis=1).astype(np.float64)
            for key, val in _metrics_from_counts(tp, fp, tn, fn).items():
                boot[key].append(val)
            ranks = stats.rankdata(s[idx], method="average", axis=1)
            boot["auc"].append(_auc_from_ranks(ranks, yb))

    rows: list[dict[str, Any]] = []
    for metric in (*CONFUSION_METRICS, "auc"):
        if boot[metric]:
            low, high = _percentile_interval(np.concatenate(boot[metric]), alpha)
        else:
            low, high = float("nan"), float("nan")
        rows.append(
            {"metric": metric, "value": point[metric], "ci_low": low, "ci_high": high, "n": n}
        )
    return rows


def macro_diagnostic_rows(
    y_true: ArrayLike,
    scores: ArrayLike,
    thresholds: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
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
    """
    _check_boot_args(n_boot, alpha)
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    thr = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if y.ndim != 2 or s.shape != y.shape or thr.shape[0] != y.shape[1]:
        raise ValueError("y_true and scores must be (N, F) with one threshold per finding")
    cols = [_as_binary(y[:, f], "y_true") for f in range(y.shape[1])]
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
    if n and n_boot:
        for idx in _resample_indices(n, n_boot, seed):
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
                per["auc"].append(_auc_from_ranks(ranks, yb))
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
            low, high = _percentile_interval(np.concatenate(boot[metric]), alpha)
        else:
            low, high = float("nan"), float("nan")
        rows.append({"metric": metric, "value": value, "ci_low": low, "ci_high": high, "n": n})
    return rows


# --------------------------------------------------------------------------- seeds
def t_confidence_interval(
    values: ArrayLike, confidence: float = 0.95
) -> tuple[float, float, float]:
    """Mean and Student-t confidence interval over independent runs (e.g. training seeds).

    Definition: with ``k`` values, mean ``m`` and sample standard deviation ``s`` (ddof=1),
    the interval is ``m -/+ t_{(1+confidence)/2, k-1} * s / sqrt(k)`` (PYLON, Preechakul et
    al. 2022, report 95% t-based CIs over 5 seeds). Returns ``(mean, low, high)``.

    ``k == 0`` gives ``(nan, nan, nan)``; ``k == 1`` gives ``(value, nan, nan)``. NaN inputs
    propagate (a failed seed is not silently dropped).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be in (0, 1)")
    arr = np.asarray(values, dtype=np.float64).ravel()
    k = arr.size
    if k == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(arr.mean())
    if k == 1:
        return mean, float("nan"), float("nan")
    sem = float(arr.std(ddof=1)) / np.sqrt(k)
    half = float(stats.t.ppf((1.0 + confidence) / 2.0, df=k - 1)) * sem
    return mean, mean - half, mean + half
