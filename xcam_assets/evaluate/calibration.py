"""Calibration of the classifiers' probabilities: ECE, Brier score, reliability diagrams and
temperature scaling. Pure numpy/scipy/matplotlib, no Dagster.

Definitions (per model and finding, on the test split; ``p`` the predicted probability of
the finding, ``y`` the 0/1 label, ``n`` images):

* **Expected calibration error** (Naeini et al. 2015, AAAI; Guo et al. 2017, ICML "On
  calibration of modern neural networks"), binary form: the probabilities are put in
  ``M = 15`` **equal-width** bins ``B_1 = [0, 1/M]``, ``B_m = ((m-1)/M, m/M]``;
  ``ECE = sum_m |B_m| / n * |mean(y in B_m) - mean(p in B_m)|``, i.e. the count-weighted
  gap between the observed frequency of the finding and the mean predicted probability.
  Empty bins contribute nothing. 0 = perfectly calibrated (on these bins), at most 1.
  (This is the calibration of the probability of the *finding*, the quantity a reader is
  shown, not the "top-label confidence" of a multi-class model.)
* **Brier score** (Brier 1950): ``mean((p - y)^2)``, in [0, 1], lower is better; 0.25 is
  what the constant prediction 0.5 scores.
* **Temperature scaling** (Guo et al. 2017), binary: ``p_T = sigmoid(logit(p) / T)`` with one
  ``T > 0`` per model and finding, fitted on the **validation** split by minimising the
  negative log-likelihood (bounded scalar search over ``log T`` in [-5, 5]; probabilities
  are clipped to ``[1e-7, 1 - 1e-7]`` before the logit). It is monotone, so AUC, sensitivity
  and specificity at the matching threshold are unchanged; only ECE and Brier move. Rows
  ``ece_temperature_scaled``, ``brier_temperature_scaled`` and the fitted ``temperature``
  (a parameter row, no CI).

CIs: percentile bootstrap resampling **patients** (``groups``), stratified by class like
the diagnostic metrics (:func:`xcam_assets.stats.bootstrap_ci`); ECE and Brier use the
same draws.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from scipy.optimize import minimize_scalar

from xcam_assets.stats import bootstrap_ci

__all__ = ["ECE_BINS", "brier_score", "calibration_rows", "expected_calibration_error",
           "fit_temperature", "plot_reliability", "reliability_bins", "temperature_scale"]

#: number of equal-width probability bins of the ECE and the reliability diagram
ECE_BINS = 15
_EPS = 1e-7


def _arrays(y_true: ArrayLike, probs: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values, probabilities {p.size}")
    if p.size and (not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1):
        raise ValueError("probabilities must be finite and in [0, 1]")
    if y.size and not np.all((y == 0) | (y == 1)):
        raise ValueError("y_true must be 0/1")
    return y, p


def bin_index(probs: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """Bin of each probability: ``B_1 = [0, 1/M]``, ``B_m = ((m-1)/M, m/M]`` (0-based)."""
    return np.clip(np.ceil(np.asarray(probs) * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def reliability_bins(y_true: ArrayLike, probs: ArrayLike, n_bins: int = ECE_BINS
                     ) -> dict[str, np.ndarray]:
    """Per bin: ``count``, ``confidence`` (mean probability) and ``frequency`` (share of
    positives); nan for empty bins."""
    y, p = _arrays(y_true, probs)
    idx = bin_index(p, n_bins)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(idx, weights=p, minlength=n_bins) / count
        freq = np.bincount(idx, weights=y, minlength=n_bins) / count
    return {"count": count, "confidence": conf, "frequency": freq}


def expected_calibration_error(y_true: ArrayLike, probs: ArrayLike,
                               n_bins: int = ECE_BINS) -> float:
    """ECE over ``n_bins`` equal-width bins (module docstring); nan without images."""
    y, p = _arrays(y_true, probs)
    if not y.size:
        return float("nan")
    b = reliability_bins(y, p, n_bins)
    ok = b["count"] > 0
    gaps = np.abs(b["frequency"][ok] - b["confidence"][ok])
    return float(np.sum(b["count"][ok] * gaps) / y.size)


def brier_score(y_true: ArrayLike, probs: ArrayLike) -> float:
    """Mean squared difference between probability and label; nan without images."""
    y, p = _arrays(y_true, probs)
    return float(np.mean((p - y) ** 2)) if y.size else float("nan")


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(q) - np.log1p(-q)


def temperature_scale(probs: ArrayLike, temperature: float) -> np.ndarray:
    """``sigmoid(logit(p) / T)``."""
    z = _logit(np.asarray(probs, dtype=np.float64)) / float(temperature)
    return 1.0 / (1.0 + np.exp(-z))


def fit_temperature(y_true: ArrayLike, probs: ArrayLike) -> float:
    """The ``T`` minimising the binary NLL of ``sigmoid(logit(p) / T)`` on (``y``, ``p``)
    (the validation split), searched over ``log T`` in [-5, 5]. 1.0 when the labels hold
    one class only (the NLL then has no interior minimum worth reporting)."""
    y, p = _arrays(y_true, probs)
    if not y.size or y.min() == y.max():
        return 1.0
    z = _logit(p)

    def nll(log_t: float) -> float:
        s = z / math.exp(log_t)
        # log(1 + exp(-s)) for y = 1, log(1 + exp(s)) for y = 0, stably
        return float(np.mean(np.logaddexp(0.0, np.where(y > 0, -s, s))))

    res = minimize_scalar(nll, bounds=(-5.0, 5.0), method="bounded",
                          options={"xatol": 1e-6})
    return float(math.exp(res.x))


def _row(arch: str, finding: str, metric: str, value: float,
         ci: tuple[float, float] | None, n: int) -> dict[str, Any]:
    lo, hi = ci if ci is not None else (None, None)
    return {"architecture": arch, "cam_method": None, "finding": finding, "metric": metric,
            "value": float(value), "ci_low": lo, "ci_high": hi, "n": int(n)}


def calibration_rows(arch: str, finding: str, y_test: ArrayLike, p_test: ArrayLike,
                     n_boot: int, seed: int, groups: ArrayLike | None = None,
                     n_bins: int = ECE_BINS, y_val: ArrayLike | None = None,
                     p_val: ArrayLike | None = None) -> list[dict[str, Any]]:
    """Rows ``ece``, ``brier`` (bootstrap CIs over ``groups`` = patients, stratified by
    class) and ``ece_bins`` (parameter row); with ``y_val``/``p_val``, the temperature
    fitted there (``temperature``) and ``ece_temperature_scaled`` /
    ``brier_temperature_scaled`` on the test split."""
    y, p = _arrays(y_test, p_test)
    if not y.size:
        return []
    strat = y.astype(np.int8) if groups is not None else None

    def ece(yy: np.ndarray, pp: np.ndarray) -> float:
        return expected_calibration_error(yy, pp, n_bins)

    def ci(fn: Any, pp: np.ndarray) -> tuple[float, float]:
        return bootstrap_ci(fn, y, pp, n_boot=n_boot, seed=seed, groups=groups,
                            stratify=strat)

    rows = [_row(arch, finding, "ece", ece(y, p), ci(ece, p), y.size),
            _row(arch, finding, "brier", brier_score(y, p), ci(brier_score, p), y.size),
            _row(arch, finding, "ece_bins", n_bins, None, y.size)]
    if y_val is not None and p_val is not None:
        yv, pv = _arrays(y_val, p_val)
        t = fit_temperature(yv, pv)
        q = temperature_scale(p, t)
        rows += [_row(arch, finding, "temperature", t, None, yv.size),
                 _row(arch, finding, "ece_temperature_scaled", ece(y, q), ci(ece, q), y.size),
                 _row(arch, finding, "brier_temperature_scaled", brier_score(y, q),
                      ci(brier_score, q), y.size)]
    return rows


def plot_reliability(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str,
                     n_bins: int = ECE_BINS) -> bytes:
    """Reliability diagram (one line per label, e.g. architecture: observed frequency of the
    finding against the mean predicted probability of each non-empty bin, ECE in the
    legend) above a histogram of the probabilities; PNG bytes."""
    fig = Figure(figsize=(4.8, 5.6), dpi=90)
    top = fig.add_axes((0.14, 0.36, 0.82, 0.56))
    bottom = fig.add_axes((0.14, 0.08, 0.82, 0.18), sharex=top)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    for label, (y, p) in curves.items():
        if not len(y):
            continue
        b = reliability_bins(y, p, n_bins)
        ok = b["count"] > 0
        line, = top.plot(b["confidence"][ok], b["frequency"][ok], marker="o", ms=3.5, lw=1.4,
                         label=f"{label} (ECE {expected_calibration_error(y, p, n_bins):.3f})")
        bottom.stairs(b["count"], edges, color=line.get_color(), lw=1.2)
    top.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
    top.set(xlim=(0, 1), ylim=(0, 1.01), ylabel="observed frequency",
            title=f"{title} ({n_bins} equal-width bins)")
    top.legend(loc="upper left", fontsize=8)
    bottom.set(xlabel="predicted probability", ylabel="images")
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return buf.getvalue()
