"""Blocking check of metric_tables: per-metric ranges, known metrics, one row per key
(GE suite `resources/expectations/metric_table.yaml`), and the expected coverage."""

import dagster as dg
import polars as pl

from xcam_assets.evaluate.assets import external_scores, metric_tables
from xcam_assets.evaluate.tables import CI_PATIENTS, CI_SEEDS, SEED_SUFFIX
from xcam_assets.expectations import suite, validate_frame
from xcam_assets.project import XcamProject

KEY = ["architecture", "cam_method", "finding", "metric"]


def ci_method_problems(frame: pl.DataFrame) -> list[str]:
    """Every row with a CI says how it was made (`ci_method`, tables.py): the evaluate
    stage's bootstrap CIs resample patients, and `<metric>_seed_mean` rows, and only they,
    are t-CIs over seeds."""
    if "ci_method" not in frame.columns:
        return ["no ci_method column"]
    problems = []
    seed = pl.col("metric").str.ends_with(SEED_SUFFIX)
    has_ci = pl.col("ci_low").is_not_null()
    wrong = frame.filter(has_ci & ((seed & (pl.col("ci_method") != CI_SEEDS))
                                   | (~seed & (pl.col("ci_method") != CI_PATIENTS))
                                   | pl.col("ci_method").is_null()))
    if wrong.height:
        problems.append(f"{wrong.height} rows whose ci_method is not {CI_PATIENTS} (bootstrap) "
                        f"or {CI_SEEDS} (`*{SEED_SUFFIX}` rows), e.g. {wrong.row(0)}")
    return problems


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
    problems += ci_method_problems(frame)
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) or outcome.summary(),
        metadata={"suite": outcome.suite, "n_rows": frame.height,
                  "failures": dg.MetadataValue.json(outcome.failures),
                  "n_nan_values": frame.height - bounded.height,
                  "metrics": sorted(frame["metric"].unique().to_list())})


def subgroup_gap_problems(frame: pl.DataFrame, limit: float | None) -> list[str]:
    """The `auc_gap@<attribute>=<a>_vs_<b>` rows (:mod:`xcam_assets.evaluate.subgroups`)
    whose gap is credibly above `limit`: the lower end of its 95% CI (the value when the row
    has no CI) exceeds it. A gap whose CI reaches below the limit passes (the data cannot
    tell it from an acceptable one). `limit` None: no limit."""
    if limit is None:
        return []
    gaps = frame.filter(pl.col("metric").str.starts_with("auc_gap@"))
    low = pl.when(pl.col("ci_low").is_not_null() & pl.col("ci_low").is_not_nan()) \
        .then(pl.col("ci_low")).otherwise(pl.col("value"))
    wide = gaps.filter(low > float(limit))
    return [f"{r['architecture']} {r['finding']} {r['metric']}: gap {r['value']:.3f} "
            f"[{r['ci_low']}, {r['ci_high']}] above max_subgroup_auc_gap {limit}"
            for r in wide.iter_rows(named=True)]


@dg.asset_check(asset=metric_tables, blocking=True)
def subgroup_auc_gap_is_bounded(xcam: XcamProject) -> dg.AssetCheckResult:
    """The profile's `max_subgroup_auc_gap` (off when absent or null): no model's AUC may
    differ between two subgroups of one attribute (sex, age band, view, manufacturer) by
    more than that, judged by the lower end of the gap's patient-bootstrap CI."""
    s = xcam.settings()
    limit = s.profile.get("max_subgroup_auc_gap")
    frame = pl.read_parquet(s.metrics_dir / "metric_table.parquet")
    problems = subgroup_gap_problems(frame, limit)
    n_gaps = frame.filter(pl.col("metric").str.starts_with("auc_gap@")).height
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) or (
            "no limit (max_subgroup_auc_gap not set)" if limit is None
            else f"{n_gaps} AUC gaps, none credibly above {limit}"),
        metadata={"max_subgroup_auc_gap": limit, "n_gap_rows": n_gaps})


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
    problems += ci_method_problems(frame)
    ext = pl.read_parquet(s.external_path)
    missing = [a for a in s.architectures if ext.height
               and a not in set(frame["architecture"].to_list())]
    if missing:
        problems.append(f"no rows for architecture(s) {missing}")
    return dg.AssetCheckResult(
        passed=not problems, description="; ".join(problems) or outcome.summary(),
        metadata={"n_rows": frame.height, "n_images": ext.height})
