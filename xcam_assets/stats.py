"""Statistics shared by training and evaluation: ROC AUC, bootstrap and t-based CIs.

Pure numpy/scipy, no Dagster and no stage: the training loop (validation AUC, seed
summaries) and the evaluate stage (test metrics with CIs) both import it from here, so no
stage imports a later one. Written by hand where scipy/sklearn have no equivalent with
these conventions (nan for undefined values, joint resampling of several arrays).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

# Largest number of index elements materialised at once by the bootstrap (memory bound).
_MAX_BOOT_ELEMENTS = 2_000_000


# --------------------------------------------------------------------------- validation
def as_binary(y: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if arr.size and not np.all((arr == 0) | (arr == 1)):
        raise ValueError(f"{name} must contain only 0/1 (or bool) values")
    return arr.astype(bool)


def as_scores(scores: ArrayLike, n: int) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"scores has length {arr.shape[0]}, y_true has length {n}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("scores must be finite (no nan/inf)")
    return arr


def safe_div(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


# --------------------------------------------------------------------------- ROC AUC
def auc_from_ranks(ranks: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC along the last axis from mid-ranks; nan where a class is absent."""
    n_pos = y.sum(axis=-1).astype(np.float64)
    n_neg = y.shape[-1] - n_pos
    rank_sum = np.where(y, ranks, 0.0).sum(axis=-1)
    return safe_div(rank_sum - n_pos * (n_pos + 1) / 2.0, n_pos * n_neg)


def roc_auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve, computed from ranks.

    Definition: AUC = P(score of a random positive > score of a random negative)
    + 0.5 * P(tie), i.e. the Mann-Whitney U statistic divided by ``n_pos * n_neg``
    (Hanley & McNeil 1982, Radiology 143:29). Tied scores get their average rank, which
    equals the trapezoidal ROC area (same value as ``sklearn.metrics.roc_auc_score``).

    Returns ``nan`` when ``y_true`` has no positives or no negatives.
    """
    y = as_binary(y_true, "y_true")
    s = as_scores(scores, y.shape[0])
    if y.size == 0:
        return float("nan")
    ranks = stats.rankdata(s, method="average")
    return float(auc_from_ranks(ranks, y))


# --------------------------------------------------------------------------- bootstrap
def resample_indices(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
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


def percentile_interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def check_boot_args(n_boot: int, alpha: float) -> None:
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
    check_boot_args(n_boot, alpha)
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
    for block in resample_indices(n, n_boot, seed):
        for idx in block:
            values[i] = float(stat_fn(*(a[idx] for a in arrs)))
            i += 1
    return percentile_interval(values, alpha)


def bootstrap_mean_ci(
    values: ArrayLike, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of per-image values, vectorised.

    Same definition, resamples and result as ``bootstrap_ci(np.mean, values, ...)`` (Efron &
    Tibshirani 1993), computed as one gather per chunk of resamples instead of a Python call
    per resample. ``values`` must be finite (drop undefined per-image values first).
    """
    check_boot_args(n_boot, alpha)
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    n = arr.shape[0]
    if n == 0 or n_boot == 0:
        return float("nan"), float("nan")
    means = np.concatenate([arr[idx].mean(axis=1) for idx in resample_indices(n, n_boot, seed)])
    return percentile_interval(means, alpha)


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
