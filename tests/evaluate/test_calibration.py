"""Calibration (xcam_assets.evaluate.calibration): ECE on calibrated and hand-computed
miscalibrated scores, Brier by hand, temperature scaling, rows and reliability PNG."""

from __future__ import annotations

import numpy as np
import pytest

from xcam_assets.evaluate.calibration import (
    bin_index,
    brier_score,
    calibration_rows,
    expected_calibration_error,
    fit_temperature,
    plot_reliability,
    temperature_scale,
)
from xcam_assets.stats import roc_auc


def test_perfectly_calibrated_scores_give_ece_zero() -> None:
    # in every bin the share of positives equals the (constant) probability of the bin
    p = np.repeat([0.1, 0.3, 0.5, 0.7, 0.9], 10)
    y = np.concatenate([[1] * k + [0] * (10 - k) for k in (1, 3, 5, 7, 9)])
    assert expected_calibration_error(y, p) == pytest.approx(0.0, abs=1e-12)
    # and drawn from the probabilities themselves: ECE ~ 0 (sampling noise only)
    rng = np.random.default_rng(0)
    q = rng.uniform(0, 1, 200_000)
    assert expected_calibration_error(rng.uniform(0, 1, q.size) < q, q) < 0.01


def test_known_miscalibration_hand_computed() -> None:
    # overconfident: p = 0.9 everywhere, half positive -> |0.5 - 0.9| = 0.4
    y = np.array([1, 0] * 10)
    assert expected_calibration_error(y, np.full(20, 0.9)) == pytest.approx(0.4)
    # two bins: 4 images at 0.2 (1 positive: gap 0.05), 6 at 0.8 (3 positive: gap 0.3)
    # ECE = 0.4 * 0.05 + 0.6 * 0.3 = 0.2
    p = np.array([0.2] * 4 + [0.8] * 6)
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0, 0, 0])
    assert expected_calibration_error(y, p) == pytest.approx(0.2)
    # Brier: 4 * ... by hand
    expect = (0.8**2 + 3 * 0.2**2 + 3 * 0.2**2 + 3 * 0.8**2) / 10
    assert brier_score(y, p) == pytest.approx(expect)
    assert brier_score([1, 0], [0.5, 0.5]) == pytest.approx(0.25)


def test_bins_are_equal_width_right_closed() -> None:
    assert bin_index(np.array([0.0, 1 / 15, 1 / 15 + 1e-9, 0.5, 1.0])).tolist() == [0, 0, 1, 7, 14]


def test_temperature_scaling_fixes_overconfidence() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, 5000)
    y = rng.uniform(size=z.size) < 1 / (1 + np.exp(-z))      # calibrated at T = 1
    over = 1 / (1 + np.exp(-3 * z))                           # logits x 3: overconfident
    t = fit_temperature(y, over)
    assert t == pytest.approx(3.0, rel=0.1)
    fixed = temperature_scale(over, t)
    assert expected_calibration_error(y, fixed) < expected_calibration_error(y, over) / 3
    # monotone: the ranking (hence the AUC) is unchanged
    assert roc_auc(y, fixed) == pytest.approx(roc_auc(y, over), abs=1e-4)  # clip ties only


def test_calibration_rows_patient_cis() -> None:
    rng = np.random.default_rng(2)
    p = rng.uniform(size=60)
    y = (rng.uniform(size=60) < p).astype(int)
    groups = np.repeat(np.arange(30), 2)
    rows = calibration_rows("net", "a", y, p, n_boot=200, seed=0, groups=groups,
                            y_val=y, p_val=p)
    by = {r["metric"]: r for r in rows}
    assert set(by) == {"ece", "brier", "ece_bins", "temperature", "ece_temperature_scaled",
                       "brier_temperature_scaled"}
    for m in ("ece", "brier", "ece_temperature_scaled"):
        assert by[m]["ci_low"] <= by[m]["value"] <= by[m]["ci_high"], m
    assert by["ece_bins"]["value"] == 15 and by["ece_bins"]["ci_low"] is None
    assert by["temperature"]["ci_low"] is None and by["temperature"]["value"] > 0


def test_reliability_png() -> None:
    png = plot_reliability({"net": (np.array([0, 1, 1]), np.array([0.1, 0.8, 0.6]))}, "a")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
