"""Tensor shards: one memory-mappable .npy per batch plus a parquet manifest.

A batch folder `tensors/<batch>/` holds `images.npy` (N, H, W) uint8,
`regions.npy` (N, F, H, W) uint8 ground-truth masks per finding, and
`manifest.parquet` (one row per image: key, row, source sha256, params hash,
transformed boxes). The manifest is written last and records each shard's
size and sha256, so a shard without a matching manifest is never read as valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from xcam_assets.config import Settings
from xcam_assets.hashing import combine_hashes, sha256_file


@dataclass
class TensorSet:
    """All stored tensors (across batches) for a set of image keys, in key order."""

    keys: list[str]
    images: np.ndarray  # (N, H, W) uint8
    regions: np.ndarray  # (N, F, H, W) uint8
    manifest: pl.DataFrame


def read_manifests(tensors_dir: Path) -> pl.DataFrame:
    frames = [
        pl.read_parquet(p).with_columns(pl.lit(p.parent.name).alias("tensor_batch"))
        for p in sorted(tensors_dir.glob("*/manifest.parquet"))
    ]
    if not frames:
        raise FileNotFoundError(f"no tensor manifests under {tensors_dir}: materialize clahe_tensors")
    return pl.concat(frames, how="diagonal_relaxed")


def verify_batch(batch_dir: Path) -> list[str]:
    """Problems with a batch's shards vs its manifest (empty list = consistent)."""
    manifest_path = batch_dir / "manifest.parquet"
    if not manifest_path.exists():
        return [f"{manifest_path} missing"]
    manifest = pl.read_parquet(manifest_path)
    problems = []
    for name, col in (("images.npy", "images_sha256"), ("regions.npy", "regions_sha256")):
        shard = batch_dir / name
        if not shard.exists():
            problems.append(f"{shard} missing")
        elif manifest.height and sha256_file(shard) != manifest[col][0]:
            problems.append(f"{shard} does not match the sha256 recorded in {manifest_path}")
    return problems


def load_tensor_set(tensors_dir: Path, keys: list[str] | None = None) -> TensorSet:
    """Gather images/regions for `keys` (all when None) from the batch shards."""
    manifest = read_manifests(tensors_dir)
    if keys is not None:
        order = pl.DataFrame({"image_key": keys, "_order": range(len(keys))})
        missing = set(keys) - set(manifest["image_key"].to_list())
        if missing:
            raise KeyError(f"{len(missing)} image(s) have no tensors, e.g. {sorted(missing)[:3]}")
        manifest = order.join(manifest, on="image_key", how="left").sort("_order").drop("_order")
    images, regions = [], []
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for batch, row in zip(manifest["tensor_batch"], manifest["row"], strict=True):
        if batch not in cache:
            d = tensors_dir / batch
            cache[batch] = (np.load(d / "images.npy", mmap_mode="r"),
                            np.load(d / "regions.npy", mmap_mode="r"))
        images.append(cache[batch][0][row])
        regions.append(cache[batch][1][row])
    return TensorSet(
        keys=manifest["image_key"].to_list(),
        images=np.stack(images) if images else np.zeros((0, 0, 0), np.uint8),
        regions=np.stack(regions) if regions else np.zeros((0, 0, 0, 0), np.uint8),
        manifest=manifest,
    )


def split_arrays(settings: Settings, split: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(keys, images uint8 (N,S,S), labels (N,F), regions (N,F,S,S)) for one split."""
    frame = pl.read_parquet(settings.splits_path).filter(pl.col("split") == split).sort("image_key")
    keys = frame["image_key"].to_list()
    ts = load_tensor_set(settings.tensors_dir, keys)
    y = frame.select([f"y_{f}" for f in settings.findings]).to_numpy().astype(np.float32)
    return keys, ts.images, y, ts.regions


def tensors_version(settings: Settings, keys: list[str] | None = None) -> str:
    """The tensors' version: with `keys`, a digest of those images' manifest rows (source
    and labels sha256, preprocessing parameters), so a batch that adds other images (an
    external site) leaves the training data's version as it was; without, a digest of
    every batch's manifest."""
    if keys is None:
        return combine_hashes((p.parent.name, sha256_file(p))
                              for p in settings.tensors_dir.glob("*/manifest.parquet"))
    rows = (read_manifests(settings.tensors_dir)
            .filter(pl.col("image_key").is_in(list(keys)))
            .select("image_key", "source_sha256", "labels_sha256", "params_hash"))
    if rows.height != len(set(keys)):
        raise KeyError(f"{len(set(keys)) - rows.height} image(s) have no tensors")
    return combine_hashes((k, f"{s}:{lab}:{prm}") for k, s, lab, prm in rows.iter_rows())
