"""Blocking check of heatmap_sets: finite, in [0, 1], input size, one per test image."""

import dagster as dg
import numpy as np
import polars as pl

from xcam_assets.explain.assets import heatmap_sets, method_file
from xcam_assets.resources import XcamConfig
from xcam_assets.train.assets import arch_partitions


@dg.asset_check(asset=heatmap_sets, blocking=True, partitions_def=arch_partitions)
def heatmaps_are_valid(context: dg.AssetCheckExecutionContext,
                       xcam: XcamConfig) -> dg.AssetCheckResult:
    s = xcam.settings()
    out = s.heatmaps_dir / context.partition_key
    n_test = pl.read_parquet(s.splits_path).filter(pl.col("split") == "test").height
    problems = []
    for method in s.profile["cam_methods"]:
        maps = np.load(out / method_file(method)).astype(np.float32)
        expected = (n_test, len(s.findings), s.image_size, s.image_size)
        if maps.shape != expected:
            problems.append(f"{method}: shape {maps.shape} != {expected}")
        if not np.isfinite(maps).all():
            problems.append(f"{method}: non-finite values")
        elif maps.size and (maps.min() < 0 or maps.max() > 1):
            problems.append(f"{method}: values outside [0, 1] ({maps.min()}..{maps.max()})")
    return dg.AssetCheckResult(passed=not problems,
                               description="; ".join(problems) or "all heatmaps valid",
                               metadata={"problems": problems})
