"""Blocking check of metric_tables: per-metric ranges, known metrics, one row per key
(GE suite `resources/expectations/metric_table.yaml`), and the expected coverage."""

import dagster as dg
import polars as pl

from xcam_assets.evaluate.assets import external_scores, metric_tables
from xcam_assets.expectations import suite, validate_frame
from xcam_assets.project import XcamProject

KEY = ["architecture", "cam_method", "finding", "metric"]


@dg.asset_check(asset=metric_tables, blocking=True)
def metrics_in_range(xcam: XcamProject) -> dg.AssetCheckResult:
    s = xcam.settings()
    frame = pl.read_parquet(s.metrics_dir / "metric_table.parquet").with_columns(
        pl.col("cam_method").fill_null("-"))
    bounded = frame.filter(pl.col("value").is_not_nan())
    outcome = validate_frame(bounded, suite(s, "metric_table"))
    problems = [] if outcome.success else [outcome.summary()]
    duplicated = frame.group_by(KEY).len().filter(pl.col("len") > 1)
    if duplicated.height:
        problems.append(f"{duplicated.height} duplicated (architecture, method, finding, metric) "
                        f"keys, e.g. {duplicated.row(0)}")
    have = set(frame["architecture"].unique().to_list())
    missing = [a for a in s.architectures if a not in have]
    if missing:
        problems.append(f"no rows for architecture(s) {missing}")
    bad_nan = frame.filter(pl.col("value").is_nan() & pl.col("cam_method").ne("-"))
    if bad_nan.height:
        problems.append(f"{bad_nan.height} heatmap metric rows with a nan value")
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) or outcome.summary(),
        metadata={"suite": outcome.suite, "n_rows": frame.height,
                  "failures": dg.MetadataValue.json(outcome.failures),
                  "n_nan_values": frame.height - bounded.height,
                  "metrics": sorted(frame["metric"].unique().to_list())})


@dg.asset_check(asset=external_scores, blocking=True)
def external_metrics_in_range(xcam: XcamProject) -> dg.AssetCheckResult:
    """The external table passes the metric-table suite, holds only `split = external`
    rows, one per key, and (with external images) rows for every profile architecture."""
    s = xcam.settings()
    frame = pl.read_parquet(s.external_scores_dir / "metric_table.parquet").with_columns(
        pl.col("cam_method").fill_null("-"))
    outcome = validate_frame(frame.filter(pl.col("value").is_not_nan()),
                             suite(s, "metric_table"))
    problems = [] if outcome.success else [outcome.summary()]
    if frame.filter(pl.col("split") != "external").height:
        problems.append("rows whose split is not external")
    if frame.group_by(KEY).len().filter(pl.col("len") > 1).height:
        problems.append("duplicated (architecture, method, finding, metric) keys")
    ext = pl.read_parquet(s.external_path)
    missing = [a for a in s.architectures if ext.height
               and a not in set(frame["architecture"].to_list())]
    if missing:
        problems.append(f"no rows for architecture(s) {missing}")
    return dg.AssetCheckResult(
        passed=not problems, description="; ".join(problems) or outcome.summary(),
        metadata={"n_rows": frame.height, "n_images": ext.height})
