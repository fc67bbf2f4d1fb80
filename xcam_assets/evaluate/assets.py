"""Evaluate stage: the metric table over every architecture and CAM method, and its plots."""

import dagster as dg
import polars as pl

from xcam_assets.evaluate.external import score_external
from xcam_assets.evaluate.stage import StaleHeatmaps, evaluate_lineage
from xcam_assets.explain.assets import heatmap_sets
from xcam_assets.explain.overlays import png_markdown
from xcam_assets.hashing import dvc_data_version
from xcam_assets.ingest.assets import external_cohort
from xcam_assets.project import XcamProject

GROUP = "evaluate"


@dg.asset(group_name=GROUP, code_version="2",
          deps=[dg.AssetDep(heatmap_sets, partition_mapping=dg.AllPartitionMapping())],
          kinds={"polars"})
def metric_tables(context: dg.AssetExecutionContext, xcam: XcamProject) -> dg.MaterializeResult:
    """Diagnostic metrics (bootstrap 95% CIs, threshold from val; macro rows for several
    findings), heatmap localization metrics (positive test images) and faithfulness metrics
    (true-positive test images, capped per profile) per architecture x CAM method x finding.

    Writes `metrics/metric_table.parquet` (long), `metrics/comparison.csv` (wide) and
    `metrics/plots/*.png` (ROC curves with CI bands, metric bars with CI whiskers, heatmap
    montages)."""
    settings = xcam.settings()
    try:
        outcome = evaluate_lineage(settings, context.log.info)
    except StaleHeatmaps as exc:
        raise dg.Failure(str(exc)) from exc
    return dg.MaterializeResult(
        metadata={"n_rows": outcome.long.height,
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
                  "auc": dg.MetadataValue.md(auc.to_pandas().to_markdown(index=False)
                                             if auc.height else "no external images"),
                  "weights_sha256": dg.MetadataValue.json(outcome.weights_sha256),
                  "path": dg.MetadataValue.path(str(outcome.path))},
        data_version=dg.DataVersion(dvc_data_version(outcome.path.parent)),
    )
