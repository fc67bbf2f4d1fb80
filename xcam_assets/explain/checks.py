"""Blocking check of heatmap_sets: every configured method present (or skipped for a
stated reason), finite, in [0, 1], input size, one map per test image and finding, files
matching the hashes in the sidecar."""

import dagster as dg
import numpy as np
import polars as pl

from xcam_assets.explain.assets import heatmap_sets
from xcam_assets.explain.cams import parse_method
from xcam_assets.explain.stage import SIDECAR, read_sidecar
from xcam_assets.hashing import sha256_file
from xcam_assets.project import XcamProject
from xcam_assets.train.assets import arch_partitions


@dg.asset_check(asset=heatmap_sets, blocking=True, partitions_def=arch_partitions)
def heatmaps_are_valid(context: dg.AssetCheckExecutionContext,
                       xcam: XcamProject) -> dg.AssetCheckResult:
    s = xcam.settings()
    out = s.heatmaps_dir / context.partition_key
    test_keys = (pl.read_parquet(s.splits_path).filter(pl.col("split") == "test")
                 .sort("image_key")["image_key"].to_list())
    problems: list[str] = []
    if not (out / SIDECAR).exists():
        return dg.AssetCheckResult(passed=False, description=f"{out / SIDECAR} missing")
    sidecar = read_sidecar(out)
    manifest = pl.read_parquet(out / "heatmap_manifest.parquet")
    if manifest["image_key"].to_list() != test_keys:
        problems.append("heatmap_manifest.parquet rows are not the test split's images")
    expected = (len(test_keys), len(s.findings), s.image_size, s.image_size)
    stats = {}
    for method in s.profile["cam_methods"]:
        spec = parse_method(method)
        info = sidecar["methods"].get(spec.name)
        if info is None:
            problems.append(f"{spec.name}: not in {SIDECAR}")
            continue
        if info["status"] != "ok":
            if not spec.is_class_map:
                problems.append(f"{spec.name}: skipped ({info.get('reason')})")
            continue
        path = out / info["file"]
        if sha256_file(path) != info["sha256"]:
            problems.append(f"{spec.name}: {path.name} does not match its sha256")
        maps = np.load(path)
        if maps.dtype != np.float16:
            problems.append(f"{spec.name}: dtype {maps.dtype} != float16")
        maps = maps.astype(np.float32)
        if maps.shape != expected:
            problems.append(f"{spec.name}: shape {maps.shape} != {expected}")
        if not np.isfinite(maps).all():
            problems.append(f"{spec.name}: non-finite values")
        elif maps.size and (maps.min() < 0 or maps.max() > 1):
            problems.append(f"{spec.name}: values outside [0, 1] ({maps.min()}..{maps.max()})")
        if maps.size:
            blank = float(np.mean(maps.reshape(-1, maps.shape[-2] * maps.shape[-1]).max(1) == 0))
            stats[spec.name] = {"blank_fraction": round(blank, 4)}
    return dg.AssetCheckResult(passed=not problems,
                               description="; ".join(problems) or "all heatmaps valid",
                               metadata={"problems": problems,
                                         "methods": dg.MetadataValue.json(stats)})
