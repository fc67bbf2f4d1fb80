"""Plots for people: ROC curves with bootstrap CI bands, metric bars with CI whiskers,
heatmap montages. PNG bytes out (matplotlib's Agg canvas, no pyplot global state).

Pure functions, no Dagster; the metric_tables asset writes the bytes to disk atomically and
inlines them in its metadata.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import cv2
import numpy as np
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from xcam_assets.evaluate.tables import metric_info
from xcam_assets.explain.overlays import overlay
from xcam_assets.stats import resample_rows, roc_auc

__all__ = ["plot_heatmap_montage", "plot_metric_bars", "plot_roc", "roc_band", "roc_points",
           "tpr_at"]


# --------------------------------------------------------------------------- ROC
def roc_points(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Empirical ROC curve ``(fpr, tpr)`` from (0, 0) to (1, 1).

    Definition (Fawcett 2006, "An introduction to ROC analysis", Pattern Recogn. Lett.
    27:861, algorithm 2): one point per distinct score ``t`` (descending), predicting
    positive when ``score >= t``; tied scores move diagonally. Its trapezoidal area equals
    :func:`~xcam_assets.evaluate.diagnostic.roc_auc`. Needs both classes.
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("an ROC curve needs both classes")
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), len(s_sorted) - 1]
    tp = np.cumsum(y_sorted)[last]
    fp = np.cumsum(~y_sorted)[last]
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def tpr_at(fpr: np.ndarray, tpr: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """TPR of an ROC curve at the false-positive rates ``grid`` (vertical averaging,
    Fawcett 2006 sec. 8): linear interpolation between ROC points, where a vertical segment
    (several points at one FPR) counts with its highest TPR."""
    f = np.asarray(fpr, dtype=np.float64)
    t = np.asarray(tpr, dtype=np.float64)
    uniq = np.unique(f)
    top = np.array([t[f == u].max() for u in uniq])
    return np.interp(grid, uniq, top)


def roc_band(y_true: np.ndarray, scores: np.ndarray, grid: np.ndarray, n_boot: int = 1000,
             seed: int = 0, alpha: float = 0.05,
             groups: np.ndarray | Sequence | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise percentile-bootstrap band of the ROC curve's TPR at each FPR in ``grid``.

    Images are resampled with replacement (same seeded stream as the diagnostic CIs);
    resamples lacking a class are dropped; the band is the ``alpha/2`` and ``1 - alpha/2``
    quantiles of :func:`tpr_at` over resamples. Returns ``(low, high)``, nan if no resample
    has both classes. With ``groups`` (patient per image) patients are resampled instead,
    stratified by class as for the diagnostic CIs
    (:func:`~xcam_assets.stats.resample_rows`).
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    curves = []
    for idx in resample_rows(len(y), n_boot, seed, groups=groups,
                             stratify=None if groups is None else y):
        yb = y[idx]
        if yb.all() or not yb.any():
            continue
        curves.append(tpr_at(*roc_points(yb, s[idx]), grid))
    if not curves:
        nan = np.full(len(grid), np.nan)
        return nan, nan
    arr = np.stack(curves)
    return (np.quantile(arr, alpha / 2, axis=0), np.quantile(arr, 1 - alpha / 2, axis=0))


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight")
    return buf.getvalue()


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str,
             n_boot: int = 1000, seed: int = 0,
             groups: np.ndarray | Sequence | None = None) -> bytes:
    """ROC curves (one per label, e.g. architecture) with 95% bootstrap bands; PNG bytes.
    ``groups``: the patient of each image (every curve is on the same images, in the same
    order): the bands then resample patients (:func:`roc_band`)."""
    fig = Figure(figsize=(4.8, 4.4), dpi=90)
    ax = fig.add_subplot()
    grid = np.linspace(0.0, 1.0, 101)
    for label, (y, s) in curves.items():
        y = np.asarray(y).astype(bool)
        if y.all() or not y.any():
            continue
        fpr, tpr = roc_points(y, s)
        lo, hi = roc_band(y, s, grid, n_boot=n_boot, seed=seed, groups=groups)
        line, = ax.plot(fpr, tpr, lw=1.6, label=f"{label} (AUC {roc_auc(y, s):.3f})")
        ax.fill_between(grid, lo, hi, color=line.get_color(), alpha=0.18, lw=0)
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey", label="chance (AUC 0.5)")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity (FPR)",
           ylabel="sensitivity (TPR)", title=title)
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


# --------------------------------------------------------------------------- bars
def plot_metric_bars(long: pl.DataFrame, finding: str, metrics: Sequence[str]) -> bytes:
    """Bars per architecture x CAM method with 95% CI whiskers, one panel per metric."""
    rows = long.filter((pl.col("finding") == finding) & pl.col("cam_method").is_not_null()
                       & pl.col("metric").is_in(list(metrics)))
    present = [m for m in metrics if m in set(rows["metric"].to_list())]
    fig = Figure(figsize=(3.3 * min(max(len(present), 1), 4) + 0.5,
                          3.1 * max(1, -(-len(present) // 4)) + 0.6), dpi=90,
                 layout="constrained")
    if not present:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no heatmap metrics", ha="center", va="center")
        ax.set_axis_off()
        return _png(fig)
    archs = sorted(set(rows["architecture"].to_list()))
    methods = sorted(set(rows["cam_method"].to_list()))
    ncol = min(len(present), 4)
    nrow = -(-len(present) // ncol)
    width = 0.8 / max(len(methods), 1)
    labelled: set[str] = set()  # each method named once in the legend, whichever panel
    colors = {m: f"C{j % 10}" for j, m in enumerate(methods)}
    for p, metric in enumerate(present):
        ax = fig.add_subplot(nrow, ncol, p + 1)
        sub = rows.filter(pl.col("metric") == metric)
        for j, method in enumerate(methods):
            xs, vals, err_lo, err_hi = [], [], [], []
            for a, arch in enumerate(archs):
                r = sub.filter((pl.col("architecture") == arch) & (pl.col("cam_method") == method))
                if r.is_empty():
                    continue
                v = r["value"][0]
                lo = r["ci_low"][0] if r["ci_low"][0] is not None else v
                hi = r["ci_high"][0] if r["ci_high"][0] is not None else v
                xs.append(a + (j - (len(methods) - 1) / 2) * width)
                vals.append(v)
                err_lo.append(max(0.0, v - lo) if np.isfinite(lo) else 0.0)
                err_hi.append(max(0.0, hi - v) if np.isfinite(hi) else 0.0)
            if not xs:
                continue
            ax.bar(xs, vals, width=width, yerr=[err_lo, err_hi], capsize=2,
                   color=colors[method], label=None if method in labelled else method)
            labelled.add(method)
        lo_r, hi_r, better = metric_info(metric)
        ax.set_xticks(range(len(archs)), archs, rotation=20, fontsize=7)
        ax.set_title(f"{metric} ({better} better)" if better else metric, fontsize=8)
        ax.set_ylim(min(lo_r, 0.0) if lo_r < 0 else 0.0, hi_r)
        ax.axhline(0, color="black", lw=0.5)
        ax.tick_params(axis="y", labelsize=7)
    fig.legend(loc="outside lower center", ncol=min(len(methods), 6), fontsize=7,
               title="CAM method", title_fontsize=7)
    fig.suptitle(f"{finding}: heatmap metrics (95% bootstrap CI)", fontsize=9)
    return _png(fig)


# --------------------------------------------------------------------------- montage
def plot_heatmap_montage(images: Sequence[np.ndarray], maps: Mapping[str, np.ndarray],
                         row_labels: Sequence[str], title: str, alpha: float = 0.5,
                         boxes: Sequence[Sequence[Sequence[float]]] | None = None) -> bytes:
    """Rows = images, columns = the input then each method's heatmap overlaid (jet, alpha),
    ground-truth boxes drawn in white; PNG bytes."""
    cols = ["input", *maps]
    n = len(images)
    fig = Figure(figsize=(1.7 * len(cols), 1.75 * max(n, 1) + 0.3), dpi=90)
    for i in range(n):
        for j, col in enumerate(cols):
            ax = fig.add_subplot(max(n, 1), len(cols), i * len(cols) + j + 1)
            if col == "input":
                rgb = cv2.cvtColor(np.asarray(images[i], np.uint8), cv2.COLOR_GRAY2RGB)
            else:
                rgb = cv2.cvtColor(overlay(images[i], np.asarray(maps[col][i], np.float32),
                                           alpha), cv2.COLOR_BGR2RGB)
            ax.imshow(rgb)
            for b in (boxes[i] if boxes is not None else []):
                x0, y0, x1, y1 = b
                ax.add_patch(_rect(x0, y0, x1, y1))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col, fontsize=8)
            if j == 0:
                ax.set_ylabel(row_labels[i], fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _png(fig)


def _rect(x0: float, y0: float, x1: float, y1: float):  # noqa: ANN202
    from matplotlib.patches import Rectangle

    return Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="white", lw=0.8)
