"""Evaluate stage: the metric table over every architecture and CAM method, and its plots."""

import dagster as dg
import polars as pl

from xcam_assets.config import Settings
from xcam_assets.evaluate.external import score_external
from xcam_assets.evaluate.report import report_path, write_study_report
from xcam_assets.evaluate.seeds import StaleSeeds
from xcam_assets.evaluate.stage import StaleHeatmaps, evaluate_lineage
from xcam_assets.explain.assets import heatmap_sets
from xcam_assets.explain.overlays import png_markdown
from xcam_assets.hashing import dvc_data_version
from xcam_assets.ingest.assets import external_cohort
from xcam_assets.project import XcamProject
from xcam_assets.provenance.records import latest_check_results, latest_data_versions

GROUP = "evaluate"
METRIC_TABLES_CODE_VERSION = "5"
REPORT_CHECKS_NOTE = ("metric_tables' own checks run after this report is written: "
                      "`xcam report` (or the UI) shows their result")


def scorecard_table_metadata(card: pl.DataFrame) -> dg.TableMetadataValue:
    """The scorecard as Dagster table metadata: every column a string column (cells
    `v [lo, hi] n=N`), one record per architecture x CAM method, in the scorecard's order."""
    return dg.MetadataValue.table(
        records=[dg.TableRecord(data=dict(row)) for row in card.iter_rows(named=True)],
        schema=dg.TableSchema(columns=[dg.TableColumn(name=c, type="string")
                                       for c in card.columns]))


def _write_report(context: dg.AssetExecutionContext, settings: Settings) -> str:
    """`reports/report.html` (:mod:`xcam_assets.evaluate.report`) with the checks and
    data versions the instance holds now; returns its path. Outside `data/`: it carries a
    timestamp and the instance's current check results, so two equal runs would otherwise
    give `metric_tables` different data versions."""
    path = report_path(settings)
    write_study_report(settings, path, checks=latest_check_results(context.instance),
                       data_versions=latest_data_versions(context.instance),
                       checks_note=REPORT_CHECKS_NOTE,
                       code_version=f"metric_tables {METRIC_TABLES_CODE_VERSION}")
    return str(path)


@dg.asset(group_name=GROUP, code_version=METRIC_TABLES_CODE_VERSION,
          deps=[dg.AssetDep(heatmap_sets, partition_mapping=dg.AllPartitionMapping())],
          kinds={"polars"})
def metric_tables(context: dg.AssetExecutionContext, xcam: XcamProject) -> dg.MaterializeResult:
    """Diagnostic metrics (bootstrap 95% CIs, threshold from val; macro rows for several
    findings), heatmap localization metrics (positive test images) and faithfulness metrics
    (true-positive test images, capped per profile) per architecture x CAM method x finding.

    Writes `metrics/metric_table.parquet` (long), `metrics/comparison.csv` (wide),
    `metrics/scorecard.csv` (headline metrics per architecture x method, also the
    `scorecard` table in the metadata), `reports/report.html` (the standalone study report, not versioned)
    and `metrics/plots/*.png` (ROC curves with CI bands, metric bars with CI whiskers,
    reliability diagrams, the randomization test, subgroup forest plot, stability and
    method agreement, heatmap montages). Every bootstrap CI resamples patients (stratified by class for diagnostic
    metrics); with several training seeds, `<metric>_seed_mean` rows add the mean and
    t-CI over seeds (diagnostic metrics, localization metrics from each seed model's own
    heatmaps, and AOPC on each seed model's own true positives); `metrics/metric_table.json`
    and the metadata say so (`ci_method`, `n_boot`)."""
    settings = xcam.settings()
    try:
        outcome = evaluate_lineage(settings, context.log.info)
    except (StaleHeatmaps, StaleSeeds) as exc:
        raise dg.Failure(str(exc)) from exc
    report = _write_report(context, settings)
    return dg.MaterializeResult(
        metadata={"scorecard": scorecard_table_metadata(outcome.scorecard),
                  "report": dg.MetadataValue.path(report),
                  "n_rows": outcome.long.height,
                  "ci_method": outcome.ci.get("ci_method", ""),
                  "n_boot": int(outcome.ci.get("n_boot", 0)),
                  "ci": dg.MetadataValue.json(outcome.ci),
                  "comparison": dg.MetadataValue.md(
                      outcome.wide.to_pandas().to_markdown(index=False)),
                  "timings_s": dg.MetadataValue.json(outcome.timings),
                  "localization": dg.MetadataValue.md(
                      outcome.localization.to_pandas().to_markdown(index=False)
                      if outcome.localization.height else "no boxed test image"),
                  **{f"plot_{name}": dg.MetadataValue.md(png_markdown(png, name))
                     for name, png in outcome.plots.items()},
                  "path": dg.MetadataValue.path(str(outcome.path))},
        data_version=dg.DataVersion(dvc_data_version(settings.metrics_dir)),
    )


@dg.asset(group_name=GROUP, code_version="1",
          deps=[external_cohort,
                dg.AssetDep(heatmap_sets, partition_mapping=dg.AllPartitionMapping())],
          kinds={"polars", "pytorch"})
def external_scores(context: dg.AssetExecutionContext, xcam: XcamProject) -> dg.MaterializeResult:
    """The frozen checkpoints on the external cohort (batches declared external): their
    predictions and diagnostic metrics with CIs, per finding and per view, at the threshold
    chosen on the internal validation split; rows with `split = external`
    (`external_scores/metric_table.parquet`). Training data and checkpoints are not
    touched: a newly arrived external batch is scored on its own."""
    s = xcam.settings()
    outcome = score_external(s, context.log.info)
    auc = outcome.long.filter(pl.col("metric") == "auc").select(
        "architecture", "finding", "value", "ci_low", "ci_high", "n")
    return dg.MaterializeResult(
        metadata={"n_images": outcome.n_images, "n_rows": outcome.long.height,
                  "ci_method": "percentile bootstrap, resampling patients (stratified by "
                               "class)",
                  "n_boot": int(s.profile["n_boot"]),
                  "auc": dg.MetadataValue.md(auc.to_pandas().to_markdown(index=False)
                                             if auc.height else "no external images"),
                  "weights_sha256": dg.MetadataValue.json(outcome.weights_sha256),
                  "path": dg.MetadataValue.path(str(outcome.path))},
        data_version=dg.DataVersion(dvc_data_version(outcome.path.parent)),
    )
