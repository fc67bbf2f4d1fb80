"""Blocking check of metric_tables: ranges and one row per key (GE suite)."""

import dagster as dg
import polars as pl

from xcam_assets.evaluate.assets import metric_tables
from xcam_assets.expectations import validate_frame
from xcam_assets.ingest.checks import ge_result, suite
from xcam_assets.resources import XcamConfig


@dg.asset_check(asset=metric_tables, blocking=True)
def metrics_in_range(xcam: XcamConfig) -> dg.AssetCheckResult:
    s = xcam.settings()
    frame = pl.read_parquet(s.metrics_dir / "metric_table.parquet")
    bounded = frame.with_columns(pl.col("cam_method").fill_null("-")).filter(
        pl.col("value").is_not_nan())
    outcome = validate_frame(bounded, suite(s, "metric_table"))
    n_nan = frame.height - bounded.height
    return ge_result(outcome, n_nan_values=n_nan)
