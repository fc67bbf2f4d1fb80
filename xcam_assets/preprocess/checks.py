"""Blocking checks of clahe_tensors: GE over per-image statistics + shard integrity."""

import dagster as dg
import numpy as np
import polars as pl

from xcam_assets.expectations import ge_result, suite, validate_frame
from xcam_assets.preprocess.assets import clahe_tensors
from xcam_assets.preprocess.store import verify_batch
from xcam_assets.project import XcamProject, batch_partitions


def tensor_stats(images: np.ndarray, regions: np.ndarray, keys: list[str]) -> pl.DataFrame:
    """Per-image statistics that the GE suite `tensor_stats` bounds."""
    flat = images.reshape(len(images), -1).astype(np.float64)
    finite = np.isfinite(flat).all(axis=1)
    return pl.DataFrame({
        "image_key": keys,
        "dtype": [str(images.dtype)] * len(images),
        "min": np.nan_to_num(flat.min(axis=1), nan=-1.0) if len(flat) else [],
        "max": np.nan_to_num(flat.max(axis=1), nan=-1.0) if len(flat) else [],
        "std": np.nan_to_num(flat.std(axis=1), nan=0.0) if len(flat) else [],
        "finite": finite.tolist(),
        "region_inside": [regions.shape[-2:] == images.shape[-2:]] * len(images),
    })


@dg.asset_check(asset=clahe_tensors, blocking=True, partitions_def=batch_partitions)
def tensors_are_sound(context: dg.AssetCheckExecutionContext,
                      xcam: XcamProject) -> dg.AssetCheckResult:
    """dtype, range, no NaN/Inf, no constant image, shards match the manifest, and one
    tensor per good inventory row."""
    s = xcam.settings()
    batch = context.partition_key
    d = s.tensors_dir / batch
    problems = verify_batch(d)
    manifest = pl.read_parquet(d / "manifest.parquet")
    images = np.load(d / "images.npy", mmap_mode="r")
    regions = np.load(d / "regions.npy", mmap_mode="r")
    stats = tensor_stats(np.asarray(images), np.asarray(regions), manifest["image_key"].to_list())
    outcome = validate_frame(stats, suite(s, "tensor_stats"))
    n_good = (pl.read_parquet(s.inventory_dir / f"{batch}.parquet")
              .filter(pl.col("status") == "ok").height)
    if n_good != manifest.height or images.shape[0] != manifest.height:
        problems.append(f"{manifest.height} tensors vs {n_good} good inventory rows "
                        f"vs {images.shape[0]} stored images")
    if images.shape[1:] != (s.image_size, s.image_size):
        problems.append(f"tensor shape {images.shape[1:]} != profile size {s.image_size}")
    if problems:
        outcome.success = False
        outcome.failures.append({"expectation": "shards consistent", "column": "",
                                 "unexpected_count": len(problems), "examples": problems[:5]})
    return ge_result(outcome, problems=problems)
