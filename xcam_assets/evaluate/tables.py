"""Assemble the long metric table from predictions, heatmaps and ground truth.

Pure functions over arrays/frames (no Dagster): the asset and the tests call
the same code. Long format: architecture, cam_method, finding, metric, value,
ci_low, ci_high, n (cam_method null for diagnostic metrics).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from xcam_assets.evaluate.diagnostic import bootstrap_ci, diagnostic_rows, gmean_threshold
from xcam_assets.evaluate.localization import ehr_auc, energy_pointing_game, pointing_game_hit

SCHEMA = {"architecture": pl.String, "cam_method": pl.String, "finding": pl.String,
          "metric": pl.String, "value": pl.Float64, "ci_low": pl.Float64,
          "ci_high": pl.Float64, "n": pl.Int64}


def diagnostic_table(arch: str, predictions: pl.DataFrame, n_boot: int, seed: int) -> list[dict]:
    """Threshold chosen on val (max geometric mean of sens/spec), metrics on test."""
    rows = []
    for finding in predictions["finding"].unique().sort().to_list():
        p = predictions.filter(pl.col("finding") == finding)
        val, test = p.filter(pl.col("split") == "val"), p.filter(pl.col("split") == "test")
        threshold = gmean_threshold(val["label"].to_numpy(), val["probability"].to_numpy())
        for r in diagnostic_rows(test["label"].to_numpy(), test["probability"].to_numpy(),
                                 threshold, n_boot=n_boot, seed=seed):
            rows.append({"architecture": arch, "cam_method": None, "finding": finding, **r})
        rows.append({"architecture": arch, "cam_method": None, "finding": finding,
                     "metric": "threshold", "value": float(threshold), "ci_low": None,
                     "ci_high": None, "n": val.height})
    return rows


def localization_table(arch: str, method: str, findings: list[str], maps: np.ndarray,
                       regions: np.ndarray, n_boot: int, seed: int,
                       tolerance_px: int = 15) -> list[dict]:
    """Pointing game (strict and with tolerance), energy pointing game and EHR AUC over
    test images that have a non-empty ground-truth region of the finding."""
    rows = []
    for k, finding in enumerate(findings):
        idx = [i for i in range(len(maps)) if regions[i, k].any()]
        if not idx:
            continue
        per_metric = {
            "pointing_game": [float(pointing_game_hit(maps[i, k], regions[i, k] > 0))
                              for i in idx],
            f"pointing_game_tol{tolerance_px}px": [
                float(pointing_game_hit(maps[i, k], regions[i, k] > 0, tolerance_px=tolerance_px))
                for i in idx],
            "energy_pointing_game": [energy_pointing_game(maps[i, k], regions[i, k] > 0)
                                     for i in idx],
            "ehr_auc": [ehr_auc(maps[i, k], regions[i, k] > 0) for i in idx],
        }
        for metric, values in per_metric.items():
            arr = np.asarray(values, dtype=np.float64)
            arr = arr[np.isfinite(arr)]
            if not len(arr):
                continue
            lo, hi = bootstrap_ci(np.mean, arr, n_boot=n_boot, seed=seed)
            rows.append({"architecture": arch, "cam_method": method, "finding": finding,
                         "metric": metric, "value": float(arr.mean()), "ci_low": lo,
                         "ci_high": hi, "n": len(arr)})
    return rows


def to_frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=SCHEMA).sort(
        "architecture", "cam_method", "finding", "metric", nulls_last=False)


def wide_table(long: pl.DataFrame) -> pl.DataFrame:
    """One row per (architecture, cam_method, finding), one column per metric ('v [lo, hi]')."""
    fmt = long.with_columns(
        pl.col("cam_method").fill_null("-"),
        pl.when(pl.col("ci_low").is_not_null())
        .then(pl.format("{} [{}, {}]", pl.col("value").round(3), pl.col("ci_low").round(3),
                        pl.col("ci_high").round(3)))
        .otherwise(pl.col("value").round(3).cast(pl.String)).alias("cell"))
    return fmt.pivot(on="metric", index=["architecture", "cam_method", "finding"],
                     values="cell").sort("architecture", "cam_method", "finding")
