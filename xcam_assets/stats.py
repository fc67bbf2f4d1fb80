"""Statistics shared by training and evaluation: ROC AUC, bootstrap and t-based CIs.

Pure numpy/scipy, no Dagster and no stage: the training loop (validation AUC, seed
summaries) and the evaluate stage (test metrics with CIs) both import it from here, so no
stage imports a later one. Written by hand where scipy/sklearn have no equivalent with
these conventions (nan for undefined values, joint resampling of several arrays).

Resampling unit. Every bootstrap here takes ``groups=`` (one cluster id per row, e.g. the
pseudonymous patient of each image). Without it rows (images) are resampled, as always.
With it the **cluster bootstrap** resamples whole clusters: draw as many patients as there
are, with replacement, and take all rows of each drawn patient (Davison & Hinkley 1997,
"Bootstrap Methods and their Application", sec. 3.8; Field & Welsh 2007, JRSS-B 69:369).
Images of one patient are correlated, so an image-level bootstrap under-covers.

Stratification (``stratify=`` row labels, used for diagnostic metrics): the patients are
split into strata and each stratum is resampled separately, keeping its size, so every
resample holds as many positive and negative patients as the data and no resample lacks a
class. **Rule:** a patient is in the positive stratum when *any* of their rows is positive
(for an (N, F) label matrix: any row positive for any finding), else in the negative one.

Clusters are numbered in order of first appearance, so with one row per cluster and no
stratification the cluster bootstrap draws exactly the image bootstrap's row indices for
the same seed (and gives the same CI).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Clusters:
    """Rows grouped into clusters (patients), optionally in two strata (class).

    ``codes[i]``: cluster of row ``i``, numbered ``0..n_clusters-1`` in order of first
    appearance; ``strata[g]``: True for a cluster in the positive stratum (None: one
    stratum). ``members`` / ``offsets``: the rows of cluster ``g`` are
    ``members[offsets[g]:offsets[g + 1]]`` (in row order).
    """

    codes: np.ndarray
    n_clusters: int
    strata: np.ndarray | None
    members: np.ndarray
    offsets: np.ndarray

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def rows(self, draw: np.ndarray) -> np.ndarray:
        """Row indices of one resample: all rows of each drawn cluster, in draw order."""
        if not len(draw):
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([self.members[self.offsets[g]:self.offsets[g + 1]]
                               for g in draw])

    def counts(self, draws: np.ndarray) -> np.ndarray:
        """(B, n_clusters) float counts: how often each cluster is in each resample."""
        b, g = draws.shape[0], self.n_clusters
        flat = (draws + np.arange(b)[:, None] * g).ravel()
        return np.bincount(flat, minlength=b * g).reshape(b, g).astype(np.float64)

    def row_weights(self, draws: np.ndarray) -> np.ndarray:
        """(B, n) weights: how often each row is in each resample."""
        return self.counts(draws)[:, self.codes]


def make_clusters(groups: ArrayLike, stratify: ArrayLike | None = None) -> Clusters:
    """:class:`Clusters` of ``groups`` (one id per row; any hashable, non-null values),
    stratified by ``stratify`` (0/1 labels per row, 1-D or (N, F)) with the rule of the
    module docstring: a patient is positive when any of their rows is positive."""
    g = np.asarray(groups)
    if g.ndim != 1:
        raise ValueError(f"groups must be 1-D, got shape {g.shape}")
    if g.dtype == object and any(v is None for v in g):
        raise ValueError("groups must not contain nulls (every row needs its patient)")
    if g.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Clusters(empty, 0, None if stratify is None else np.zeros(0, bool), empty,
                        np.zeros(1, dtype=np.int64))
    _, first, inverse = np.unique(g, return_index=True, return_inverse=True)
    by_first = np.argsort(first, kind="stable")
    rank = np.empty_like(by_first)
    rank[by_first] = np.arange(by_first.size)
    codes = rank[inverse.reshape(-1)].astype(np.int64)
    n_clusters = int(by_first.size)
    members = np.argsort(codes, kind="stable").astype(np.int64)
    offsets = np.r_[0, np.cumsum(np.bincount(codes, minlength=n_clusters))].astype(np.int64)
    strata = None
    if stratify is not None:
        y = np.asarray(stratify)
        if y.shape[0] != codes.size:
            raise ValueError(f"stratify has {y.shape[0]} rows, groups has {codes.size}")
        if y.ndim == 1:
            pos = as_binary(y, "stratify")
        else:
            pos = np.any(np.stack([as_binary(c, "stratify") for c in y.reshape(len(y), -1).T],
                                  axis=1), axis=1)
        strata = np.bincount(codes, weights=pos.astype(np.float64), minlength=n_clusters) > 0
    return Clusters(codes, n_clusters, strata, members, offsets)


def cluster_draws(clusters: Clusters, n_boot: int, seed: int,
                  max_width: int | None = None) -> Iterator[np.ndarray]:
    """Yield (chunk, n_clusters) matrices of drawn cluster codes, one row per resample.

    Unstratified: ``rng.integers(0, G, (chunk, G))`` from ``default_rng(seed)`` -- the same
    stream and shapes as :func:`resample_indices` with ``n = G``. Stratified: per chunk the
    positive clusters are drawn (with replacement, as many as there are), then the
    negative ones; a resample row is ``[positive draws..., negative draws...]``.
    ``max_width`` (default ``G``) sizes the chunks to bound memory.
    """
    rng = np.random.default_rng(seed)
    g = clusters.n_clusters
    chunk = max(1, _MAX_BOOT_ELEMENTS // max(g, max_width or 0, 1))
    strata = None if clusters.strata is None else (np.flatnonzero(clusters.strata),
                                                   np.flatnonzero(~clusters.strata))
    done = 0
    while done < n_boot:
        size = min(chunk, n_boot - done)
        if strata is None:
            yield rng.integers(0, g, size=(size, g))
        else:
            parts = [s[rng.integers(0, s.size, size=(size, s.size))] if s.size
                     else np.zeros((size, 0), dtype=np.int64) for s in strata]
            yield np.concatenate(parts, axis=1)
        done += size


def resample_rows(n: int, n_boot: int, seed: int, groups: ArrayLike | None = None,
                  stratify: ArrayLike | None = None) -> Iterator[np.ndarray]:
    """Yield the row indices of each of ``n_boot`` resamples (1-D arrays, one at a time).

    No ``groups`` and no ``stratify``: the image bootstrap of :func:`resample_indices`.
    Otherwise the cluster bootstrap of :func:`cluster_draws` (``stratify`` without
    ``groups``: every row its own cluster, stratified by class); a resample's length then
    varies with the sizes of the drawn clusters.
    """
    if groups is None and stratify is None:
        for block in resample_indices(n, n_boot, seed):
            yield from block
        return
    clusters = make_clusters(np.arange(n) if groups is None else groups, stratify)
    if clusters.codes.size != n:
        raise ValueError(f"groups has {clusters.codes.size} rows, the data has {n}")
    for block in cluster_draws(clusters, n_boot, seed):
        for draw in block:
            yield clusters.rows(draw)


def weighted_auc(weights: np.ndarray, y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC of each resample given as row weights (B, n) (integer counts: the
    AUC of the sample with row ``i`` repeated ``weights[b, i]`` times; ties count 1/2).
    nan where a resample lacks a class."""
    y = np.asarray(y, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if s.size == 0:
        return np.full(w.shape[0], np.nan)
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    starts = np.r_[0, np.flatnonzero(np.diff(s_sorted) != 0) + 1]
    ws, ys = w[:, order], y[order]
    pos = np.add.reduceat(np.where(ys, ws, 0.0), starts, axis=1)
    neg = np.add.reduceat(np.where(ys, 0.0, ws), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    num = np.sum(pos * (below + 0.5 * neg), axis=1)
    return safe_div(num, pos.sum(axis=1) * neg.sum(axis=1))


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
    groups: ArrayLike | None = None,
    stratify: ArrayLike | None = None,
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

    ``groups`` (cluster id per row, e.g. patient): resample clusters instead of rows, each
    drawn cluster bringing all its rows; ``stratify`` (0/1 per row): resample positive and
    negative patients separately (module docstring; :func:`resample_rows`).
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
    for i, idx in enumerate(resample_rows(n, n_boot, seed, groups, stratify)):
        values[i] = float(stat_fn(*(a[idx] for a in arrs)))
    return percentile_interval(values, alpha)


def bootstrap_mean_ci(
    values: ArrayLike, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
    groups: ArrayLike | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of per-image values, vectorised.

    Same definition, resamples and result as ``bootstrap_ci(np.mean, values, ...)`` (Efron &
    Tibshirani 1993), computed as one gather per chunk of resamples instead of a Python call
    per resample. ``values`` must be finite (drop undefined per-image values first).

    With ``groups`` (patient per value): the cluster bootstrap, same resamples as
    ``bootstrap_ci(np.mean, values, groups=groups)``; a resample's mean is the sum of the
    drawn patients' values over their number of images (computed from per-patient sums).
    """
    check_boot_args(n_boot, alpha)
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    n = arr.shape[0]
    if n == 0 or n_boot == 0:
        return float("nan"), float("nan")
    if groups is None:
        means = np.concatenate([arr[idx].mean(axis=1)
                                for idx in resample_indices(n, n_boot, seed)])
        return percentile_interval(means, alpha)
    clusters = make_clusters(groups)
    if clusters.codes.size != n:
        raise ValueError(f"groups has {clusters.codes.size} rows, values has {n}")
    sums = np.bincount(clusters.codes, weights=arr, minlength=clusters.n_clusters)
    sizes = clusters.sizes.astype(np.float64)
    means = np.concatenate([sums[d].sum(axis=1) / sizes[d].sum(axis=1)
                            for d in cluster_draws(clusters, n_boot, seed)])
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
