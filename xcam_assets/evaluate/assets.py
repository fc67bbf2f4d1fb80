"""Evaluate stage: the metric table over every architecture and CAM method."""

import dagster as dg
import numpy as np
import polars as pl

from xcam_assets.evaluate.tables import diagnostic_table, localization_table, to_frame, wide_table
from xcam_assets.explain.assets import heatmap_sets, method_file
from xcam_assets.hashing import atomic_write_bytes, atomic_write_parquet, sha256_file
from xcam_assets.resources import XcamConfig
from xcam_assets.train.assets import split_arrays

GROUP = "evaluate"


@dg.asset(group_name=GROUP, code_version="1",
          deps=[dg.AssetDep(heatmap_sets, partition_mapping=dg.AllPartitionMapping())],
          kinds={"polars"})
def metric_tables(context: dg.AssetExecutionContext, xcam: XcamConfig) -> dg.MaterializeResult:
    """Diagnostic metrics (bootstrap 95% CIs, threshold from val) and heatmap
    localization metrics per architecture x CAM method x finding.

    Writes `metrics/metric_table.parquet` (long) and `metrics/comparison.csv` (wide)."""
    s = xcam.settings()
    n_boot = int(s.profile["n_boot"])
    _, _, _, regions = split_arrays(s, "test")
    rows: list[dict] = []
    for arch in s.architectures:
        out = s.heatmaps_dir / arch
        if not (out / "predictions.parquet").exists():
            raise dg.Failure(f"no heatmap set for {arch}: materialize heatmap_sets[{arch}]")
        rows += diagnostic_table(arch, pl.read_parquet(out / "predictions.parquet"),
                                 n_boot=n_boot, seed=s.seed)
        for method in s.profile["cam_methods"]:
            maps = np.load(out / method_file(method)).astype(np.float32)
            rows += localization_table(arch, method, s.findings, maps, regions,
                                       n_boot=n_boot, seed=s.seed)
    long = to_frame(rows)
    path = s.metrics_dir / "metric_table.parquet"
    atomic_write_parquet(path, long)
    wide = wide_table(long)
    atomic_write_bytes(s.metrics_dir / "comparison.csv", wide.write_csv().encode())
    context.log.info("\n" + str(wide))
    return dg.MaterializeResult(
        metadata={"n_rows": long.height,
                  "comparison": dg.MetadataValue.md(wide.to_pandas().to_markdown(index=False)),
                  "path": dg.MetadataValue.path(str(path))},
        data_version=dg.DataVersion(sha256_file(path)),
    )
