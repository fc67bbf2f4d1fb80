"""Tests for xcam_assets.evaluate.diagnostic: hand-computed cases, edge cases, sklearn checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from xcam_assets.evaluate.diagnostic import (
    CONFUSION_METRICS,
    confusion_counts,
    confusion_metrics,
    diagnostic_rows,
    gmean_threshold,
)
from xcam_assets.stats import bootstrap_ci, roc_auc, t_confidence_interval

# 5 labels, one tie between a positive and a negative (0.4).
Y5 = np.array([0, 0, 1, 1, 1])
S5 = np.array([0.1, 0.4, 0.35, 0.8, 0.4])


# --------------------------------------------------------------------------- roc_auc
def test_roc_auc_hand_computed_with_tie() -> None:
    # pos 0.35 beats 0.1 only -> 1; pos 0.8 beats both -> 2; pos 0.4 beats 0.1, ties 0.4 -> 1.5
    # AUC = 4.5 / (3 * 2) = 0.75
    assert roc_auc(Y5, S5) == pytest.approx(0.75, abs=1e-15)


def test_roc_auc_perfect_inverted_and_all_tied() -> None:
    y = [0, 0, 1, 1]
    assert roc_auc(y, [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc(y, [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert roc_auc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_roc_auc_one_class_is_nan() -> None:
    assert math.isnan(roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(roc_auc([0, 0], [0.1, 0.2]))
    assert math.isnan(roc_auc([], []))


def test_roc_auc_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        roc_auc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        roc_auc([0, 1], [0.1])
    with pytest.raises(ValueError):
        roc_auc([0, 1], [0.1, np.nan])


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    # rounded scores -> many ties
    s = np.round(rng.normal(size=300) + 0.7 * y, 1)
    assert roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)


# --------------------------------------------------------------------------- gmean_threshold
def test_gmean_threshold_hand_computed() -> None:
    # candidates 0.1, 0.35, 0.4, 0.8 -> G = 0, sqrt(1*1/2)=.707, sqrt(2/3*1/2)=.577,
    # sqrt(1/3*1)=.577 -> 0.35
    assert gmean_threshold(Y5, S5) == 0.35


def test_gmean_threshold_tie_takes_smallest() -> None:
    # y=[0,1,0,1], s=[1,2,3,4]: t=2 -> sens 1, spec 1/2; t=4 -> sens 1/2, spec 1; both G=.707
    assert gmean_threshold([0, 1, 0, 1], [1.0, 2.0, 3.0, 4.0]) == 2.0


def test_gmean_threshold_perfect_separation() -> None:
    assert gmean_threshold([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9]) == 0.7


def test_gmean_threshold_needs_both_classes() -> None:
    with pytest.raises(ValueError):
        gmean_threshold([1, 1], [0.2, 0.3])


def test_gmean_threshold_is_argmax_of_bruteforce() -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200) + 0.3 * y, 2)
    best_t, best_g = None, -1.0
    for t in np.unique(s):
        m = confusion_metrics(y, s >= t)
        g = math.sqrt(m["sensitivity"] * m["specificity"])
        if g > best_g + 1e-12:
            best_t, best_g = t, g
    assert gmean_threshold(y, s) == best_t


# --------------------------------------------------------------------------- confusion
def test_confusion_metrics_hand_computed() -> None:
    # TP=2 FN=1 FP=1 TN=1
    y = [1, 1, 1, 0, 0]
    p = [1, 0, 1, 1, 0]
    assert confusion_counts(y, p) == {"tp": 2, "fp": 1, "tn": 1, "fn": 1}
    m = confusion_metrics(y, p)
    assert list(m) == list(CONFUSION_METRICS)
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(4 / 6)


def test_confusion_metrics_undefined_are_nan() -> None:
    m = confusion_metrics([1, 0], [0, 0])  # no predicted positives
    assert math.isnan(m["precision"])
    assert m["sensitivity"] == 0.0 and m["specificity"] == 1.0 and m["f1"] == 0.0
    m = confusion_metrics([0, 0], [0, 0])  # no positives at all
    assert math.isnan(m["sensitivity"]) and math.isnan(m["precision"]) and math.isnan(m["f1"])
    assert m["specificity"] == 1.0 and m["accuracy"] == 1.0
    assert all(math.isnan(v) for v in confusion_metrics([], []).values())


def test_confusion_metrics_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        confusion_metrics([0, 1], [0, 1, 1])


@pytest.mark.parametrize("seed", range(4))
def test_confusion_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 100)
    p = rng.integers(0, 2, 100)
    m = confusion_metrics(y, p)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    assert m["precision"] == pytest.approx(skm.precision_score(y, p))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, p))
    assert m["specificity"] == pytest.approx(skm.recall_score(y, p, pos_label=0))
    assert m["f1"] == pytest.approx(skm.f1_score(y, p))


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_ci_constant_statistic() -> None:
    assert bootstrap_ci(np.mean, np.full(10, 3.0), n_boot=50) == (3.0, 3.0)


def test_bootstrap_ci_contains_estimate_and_is_deterministic() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=80)
    lo, hi = bootstrap_ci(np.mean, x, n_boot=300, seed=3)
    assert lo < x.mean() < hi
    assert bootstrap_ci(np.mean, x, n_boot=300, seed=3) == (lo, hi)
    assert bootstrap_ci(np.mean, x, n_boot=300, seed=4) != (lo, hi)
    # a wider confidence level gives a wider interval
    lo90, hi90 = bootstrap_ci(np.mean, x, n_boot=300, seed=3, alpha=0.1)
    assert lo <= lo90 and hi90 <= hi


def test_bootstrap_ci_resamples_rows_jointly() -> None:
    # stat is always 0 only if the pairing of rows is preserved
    x = np.arange(20.0)
    lo, hi = bootstrap_ci(lambda a, b: float(np.sum(a - b)), x, x.copy(), n_boot=50)
    assert (lo, hi) == (0.0, 0.0)


def test_bootstrap_ci_drops_nan_resamples() -> None:
    y = np.array([0] * 3 + [1] * 3)
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    calls: list[float] = []

    def auc(yb: np.ndarray, sb: np.ndarray) -> float:
        v = roc_auc(yb, sb)
        calls.append(v)
        return v

    lo, hi = bootstrap_ci(auc, y, s, n_boot=200, seed=0)
    assert any(math.isnan(v) for v in calls)  # some resamples had one class
    assert (lo, hi) == (1.0, 1.0)  # the remaining ones are all perfectly separated
    lo, hi = bootstrap_ci(lambda a: float("nan"), y, n_boot=10)
    assert math.isnan(lo) and math.isnan(hi)


def test_bootstrap_ci_rejects_ragged_arrays() -> None:
    with pytest.raises(ValueError):
        bootstrap_ci(lambda a, b: 0.0, np.zeros(3), np.zeros(4))


# --------------------------------------------------------------------------- diagnostic_rows
def test_diagnostic_rows_hand_computed_values() -> None:
    rows = diagnostic_rows(Y5, S5, threshold=0.4, n_boot=20)
    by = {r["metric"]: r for r in rows}
    assert [r["metric"] for r in rows] == [*CONFUSION_METRICS, "auc"]
    # pred = s >= 0.4 -> [0,1,0,1,1]: TP=2 FP=1 TN=1 FN=1
    assert by["accuracy"]["value"] == pytest.approx(0.6)
    assert by["precision"]["value"] == pytest.approx(2 / 3)
    assert by["sensitivity"]["value"] == pytest.approx(2 / 3)
    assert by["specificity"]["value"] == pytest.approx(0.5)
    assert by["f1"]["value"] == pytest.approx(2 / 3)
    assert by["auc"]["value"] == pytest.approx(0.75)
    assert all(r["n"] == 5 for r in rows)
    assert set(rows[0]) == {"metric", "value", "ci_low", "ci_high", "n"}


def test_diagnostic_rows_ci_equals_generic_bootstrap() -> None:
    """The vectorised CI must equal bootstrap_ci with the same seed and statistic."""
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.random(60) + 0.4 * y, 2)
    thr = 0.7
    rows = diagnostic_rows(y, s, thr, n_boot=200, seed=5)
    for row in rows:
        metric = row["metric"]
        if metric == "auc":

            def fn(yb: np.ndarray, sb: np.ndarray) -> float:
                return roc_auc(yb, sb)
        else:

            def fn(yb: np.ndarray, sb: np.ndarray, m: str = metric) -> float:
                return confusion_metrics(yb, sb >= thr)[m]

        lo, hi = bootstrap_ci(fn, y, s, n_boot=200, seed=5)
        assert row["ci_low"] == pytest.approx(lo, abs=1e-12), metric
        assert row["ci_high"] == pytest.approx(hi, abs=1e-12), metric
        assert row["ci_low"] <= row["value"] <= row["ci_high"], metric


def test_diagnostic_rows_deterministic() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 40)
    s = rng.random(40)
    a = diagnostic_rows(y, s, 0.5, n_boot=100, seed=9)
    b = diagnostic_rows(y, s, 0.5, n_boot=100, seed=9)
    assert a == b


# --------------------------------------------------------------------------- t interval
def test_t_confidence_interval_hand_computed() -> None:
    # mean 2, sd 1, n 3: half width = t_{0.975,2} / sqrt(3) = 4.302652729749462 / 1.7320508...
    mean, lo, hi = t_confidence_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert lo == pytest.approx(-0.48413771175033027, abs=1e-9)
    assert hi == pytest.approx(4.48413771175033, abs=1e-9)


def test_t_confidence_interval_edge_cases() -> None:
    assert t_confidence_interval([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    mean, lo, hi = t_confidence_interval([0.4])
    assert mean == 0.4 and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(v) for v in t_confidence_interval([]))
    assert math.isnan(t_confidence_interval([0.1, np.nan])[0])
    with pytest.raises(ValueError):
        t_confidence_interval([1.0, 2.0], confidence=1.5)
