"""SIIM-ACR Pneumothorax: `train-rle.csv` -> canonical rows with RLE masks.

The Kaggle table has the columns `ImageId` and `" EncodedPixels"` (a leading space
in the header; both names are stripped here). `-1` marks an image without
pneumothorax; a positive image has one row per annotated region, each a Kaggle
**relative** run-length string over the 1024 x 1024 image in **column-major**
order: pairs (gap since the end of the previous run, run length), the first gap
counted from pixel 0. An image is present when it has at least one non `-1` row;
its mask is the union of its rows' masks (`mask_rle` keeps every string).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from xcam_assets.ingest.adapters import conform
from xcam_assets.ingest.labels import LabelError

SIIM_SIZE = 1024
DEFAULT_FINDING = "Pneumothorax"


def rle_problem(rle: str, width: int = SIIM_SIZE, height: int = SIIM_SIZE) -> str | None:
    """Why `rle` is not a valid relative RLE string over a width x height image (or None)."""
    tokens = rle.split()
    if not tokens:
        return "RLE is empty (write -1 for an image without the finding)"
    for t in tokens:
        if not t.lstrip("-").isdigit():
            return f"RLE value {t[:20]!r} is not an integer"
    nums = [int(t) for t in tokens]
    if len(nums) % 2:
        return f"RLE has an odd number of values ({len(nums)}): pairs of gap and length expected"
    if any(n < 0 for n in nums):
        return "RLE has a negative gap or length"
    end = sum(nums)  # relative runs: the last run ends at the sum of all gaps and lengths
    if end > width * height:
        return (f"RLE runs past the {width}x{height} image (ends at pixel {end}, "
                f"the image has {width * height})")
    return None


def rle_decode(rle: str, width: int = SIIM_SIZE, height: int = SIIM_SIZE) -> np.ndarray:
    """One Kaggle relative, column-major RLE string -> bool mask (height, width).

    Raises ValueError with `rle_problem`'s message for a malformed string."""
    if (problem := rle_problem(rle, width, height)) is not None:
        raise ValueError(problem)
    nums = np.asarray(rle.split(), dtype=np.int64)
    gaps, lengths = nums[0::2], nums[1::2]
    starts = np.cumsum(gaps + np.concatenate([[0], lengths[:-1]]))
    ends = starts + lengths
    edges = np.zeros(width * height + 1, dtype=np.int32)
    np.add.at(edges, starts, 1)
    np.add.at(edges, ends, -1)
    flat = np.cumsum(edges[:-1]) > 0
    return flat.reshape(width, height).T  # column-major: pixel k is (k % height, k // height)


def union_mask(rles: list[str], width: int = SIIM_SIZE, height: int = SIIM_SIZE) -> np.ndarray:
    """The union of several regions' masks of one image."""
    mask = np.zeros((height, width), dtype=bool)
    for rle in rles:
        mask |= rle_decode(rle, width, height)
    return mask


def read_siim_table(path: Path) -> pl.DataFrame:
    """The raw table with stripped column names and values: ImageId, EncodedPixels."""
    raw = pl.read_csv(path, infer_schema=False)
    raw = raw.rename({c: c.strip() for c in raw.columns})
    missing = {"ImageId", "EncodedPixels"} - set(raw.columns)
    if missing:
        raise ValueError(f"{path}: not a SIIM-ACR RLE table (missing {sorted(missing)}; "
                         f"columns {raw.columns})")
    return raw.select(pl.col("ImageId").str.strip_chars(),
                      pl.col("EncodedPixels").str.strip_chars())


def check_siim_table(raw: pl.DataFrame, path: Path) -> None:
    """Raise LabelError naming every row with no ImageId or a malformed RLE string
    (`-1` or an empty cell: no finding)."""
    errors = []
    for row, (image_id, rle) in enumerate(raw.select("ImageId", "EncodedPixels").iter_rows(),
                                          start=1):
        if not image_id:
            errors.append((row, "ImageId is empty"))
        if rle not in (None, "", "-1") and (problem := rle_problem(rle)) is not None:
            errors.append((row, f"{image_id}: {problem}"))
    if errors:
        raise LabelError(path, errors)


def read_siim(path: Path, finding: str = DEFAULT_FINDING) -> pl.DataFrame:
    """One canonical row per ImageId: present, mask_file `masks/<ImageId>.png`, mask_rle.

    Every RLE string is validated first (`check_siim_table`): a malformed one raises
    LabelError naming the table, the row and the problem, and nothing is imported."""
    raw = read_siim_table(path)
    check_siim_table(raw, path)
    rle = pl.col("EncodedPixels")
    per = (raw.group_by("ImageId", maintain_order=True)
           .agg(rle.filter((rle != "-1") & (rle != "")).alias("mask_rle")))
    return conform(per.select(
        (pl.col("ImageId") + ".dcm").alias("file"),
        pl.lit(finding).alias("finding"),
        (pl.col("mask_rle").list.len() > 0).alias("present"),
        pl.when(pl.col("mask_rle").list.len() > 0)
        .then(pl.lit("masks/") + pl.col("ImageId") + ".png").alias("mask_file"),
        pl.lit(float(SIIM_SIZE)).alias("coord_width"),
        pl.lit(float(SIIM_SIZE)).alias("coord_height"),
        pl.col("mask_rle")))
