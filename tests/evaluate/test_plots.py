"""Tests for xcam_assets.evaluate.plots: ROC points and bands (hand-computed), PNG output."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from xcam_assets.evaluate.plots import (
    plot_heatmap_montage,
    plot_metric_bars,
    plot_roc,
    roc_band,
    roc_points,
    tpr_at,
)
from xcam_assets.evaluate.tables import mean_rows, to_frame
from xcam_assets.stats import roc_auc

Y = np.array([1, 0, 1, 0])
S = np.array([0.9, 0.8, 0.8, 0.1])


def test_roc_points_hand_computed_and_area_equals_auc() -> None:
    fpr, tpr = roc_points(Y, S)
    # thresholds 0.9, 0.8 (a tie: one positive, one negative -> diagonal), 0.1
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.5, 1.0])
    np.testing.assert_allclose(tpr, [0.0, 0.5, 1.0, 1.0])
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.875) == roc_auc(Y, S)
    with pytest.raises(ValueError):
        roc_points([1, 1], [0.1, 0.2])


def test_tpr_at_vertical_averaging() -> None:
    fpr, tpr = roc_points(Y, S)
    np.testing.assert_allclose(tpr_at(fpr, tpr, np.array([0.0, 0.25, 0.5, 1.0])),
                               [0.5, 0.75, 1.0, 1.0])


def test_roc_band_brackets_and_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    s = y * 0.4 + rng.random(60) * 0.6
    grid = np.linspace(0, 1, 11)
    lo, hi = roc_band(y, s, grid, n_boot=200, seed=1)
    assert np.all(lo <= hi + 1e-12) and lo.shape == (11,)
    mid = tpr_at(*roc_points(y, s), grid)
    assert np.mean((lo <= mid + 1e-12) & (mid <= hi + 1e-12)) >= 0.9
    lo2, hi2 = roc_band(y, s, grid, n_boot=200, seed=1)
    np.testing.assert_array_equal(lo, lo2)
    np.testing.assert_array_equal(hi, hi2)


def test_plots_are_png() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 30)
    roc = plot_roc({"a": (y, rng.random(30)), "b": (y, y * 0.5 + rng.random(30) * 0.5)},
                   "t", n_boot=50)
    long = to_frame(mean_rows("net", "gradcam", "f", {"aopc": [0.1, 0.3], "ehr_auc": [0.5]},
                              20, 0) + mean_rows("net", "eigencam", "f", {"aopc": [-0.2]}, 20, 0))
    bars = plot_metric_bars(long, "f", ["aopc", "ehr_auc", "deletion_auc"])
    empty = plot_metric_bars(long.filter(pl.col("metric") == "none"), "f", ["aopc"])
    img = rng.integers(0, 256, (2, 16, 16), dtype=np.uint8)
    montage = plot_heatmap_montage(img, {"gradcam": rng.random((2, 16, 16))}, ["x", "y"], "t",
                                   boxes=[[(1, 1, 5, 5)], []])
    for png in (roc, bars, empty, montage):
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_plots_with_several_series_have_a_legend_naming_each(monkeypatch) -> None:
    """ROC: a legend entry per curve and the chance line; bars: one entry per CAM method,
    also for a method absent from the first panel."""
    import xcam_assets.evaluate.plots as plots

    figures = []
    real_png = plots._png
    monkeypatch.setattr(plots, "_png", lambda fig: figures.append(fig) or real_png(fig))
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 30)
    plot_roc({"a": (y, rng.random(30)), "b": (y, rng.random(30))}, "t", n_boot=20)
    texts = [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()]
    assert [t.split(" (")[0] for t in texts] == ["a", "b", "chance"]
    long = to_frame(mean_rows("net", "gradcam", "f", {"aopc": [0.1, 0.3]}, 20, 0)
                    + mean_rows("net", "eigencam", "f", {"ehr_auc": [0.5]}, 20, 0))
    plot_metric_bars(long, "f", ["aopc", "ehr_auc"])
    legend = figures[-1].legends[0]
    assert sorted(t.get_text() for t in legend.get_texts()) == ["eigencam", "gradcam"]
    assert legend.get_title().get_text() == "CAM method"
