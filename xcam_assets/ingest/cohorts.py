"""Patient-level train/val/test splits, stratified by finding, seeded; the checks that guard them.

No patient's images ever land in two splits: splitting images instead of
patients leaks a patient into test and inflates every metric.

Stratification: each patient gets one stratum, the **rarest** finding (fewest
positive patients in the cohort) that any of the patient's images is positive
for, or "negative". Patients are shuffled with the seed within each stratum and
cut by cumulative fractions, so every split sees every finding in about the
cohort's proportion (exact multi-label stratification is NP-hard; the rarest
label is the one that would otherwise go missing from a small split).

Balanced subset (the pneumothorax study balanced positives and negatives):
optional, image-level, taken **before** the split, so patient integrity is
still decided by the split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

NEGATIVE = "negative"


def patient_strata(images: pl.DataFrame, ycols: Sequence[str]) -> pl.DataFrame:
    """patient_key -> stratum (rarest positive finding column, else "negative")."""
    per = images.group_by("patient_key").agg([pl.col(c).max() for c in ycols])
    counts = {c: int(per[c].sum()) for c in ycols}
    order = sorted(ycols, key=lambda c: (counts[c], c))  # rarest first, ties by name
    expr: Any = pl.lit(NEGATIVE)
    for c in reversed(order):
        expr = pl.when(pl.col(c) > 0).then(pl.lit(c)).otherwise(expr)
    return per.select("patient_key", expr.alias("stratum")).sort("patient_key")


def patient_split(images: pl.DataFrame, val: float, test: float, seed: int,
                  ycols: Sequence[str] | None = None) -> pl.DataFrame:
    """Assign each patient to train/val/test; adds a `split` column to `images`.

    `images` has image_key, patient_key and either the label columns `ycols` or a
    ready `stratum` column. Within each stratum the patients are permuted with
    `seed` and the first round(n*test) go to test, the next round(n*val) to val;
    a stratum of >= 3 patients gives val and test at least one each."""
    if ycols:
        strata = patient_strata(images, ycols)
    else:
        strata = (images.group_by("patient_key").agg(pl.col("stratum").max())
                  .sort("patient_key"))
    rng = np.random.default_rng(seed)
    assign: dict[str, str] = {}
    for stratum in sorted(strata["stratum"].cast(pl.String).unique().to_list()):
        keys = strata.filter(pl.col("stratum").cast(pl.String) == stratum)[
            "patient_key"].to_list()
        order = rng.permutation(len(keys))
        n = len(keys)
        n_test, n_val = int(round(n * test)), int(round(n * val))
        if n >= 3:  # every split gets at least one patient of each stratum when possible
            n_test, n_val = max(n_test, 1), max(n_val, 1)
        for rank, idx in enumerate(order):
            assign[keys[idx]] = ("test" if rank < n_test else
                                 "val" if rank < n_test + n_val else "train")
    return images.with_columns(
        pl.col("patient_key").replace_strict(assign, return_dtype=pl.String).alias("split"))


def balanced_subset(images: pl.DataFrame, ycol: str, seed: int,
                    max_images: int | None = None) -> pl.DataFrame:
    """Equal numbers of positive and negative images for `ycol`, seeded.

    Takes min(#positives, #negatives, max_images // 2) of each class, sampled
    without replacement; order of the result: by image_key."""
    pos = images.filter(pl.col(ycol) > 0).sort("image_key")
    neg = images.filter(pl.col(ycol) == 0).sort("image_key")
    k = min(pos.height, neg.height)
    if max_images is not None:
        k = min(k, int(max_images) // 2)
    rng = np.random.default_rng(seed)
    take_pos = np.sort(rng.choice(pos.height, size=k, replace=False)) if k else []
    take_neg = np.sort(rng.choice(neg.height, size=k, replace=False)) if k else []
    return pl.concat([pos[list(take_pos)], neg[list(take_neg)]]).sort("image_key")


def leaking_patients(splits: pl.DataFrame) -> list[str]:
    """Patients found in more than one split (must be empty)."""
    per = splits.group_by("patient_key").agg(pl.col("split").n_unique().alias("n"))
    return sorted(per.filter(pl.col("n") > 1)["patient_key"].to_list())


def split_summary(splits: pl.DataFrame, ycols: Sequence[str]) -> pl.DataFrame:
    """Per split: images, patients, positives per finding."""
    return (splits.group_by("split")
            .agg(pl.len().alias("images"), pl.col("patient_key").n_unique().alias("patients"),
                 *[pl.col(c).sum().alias(c) for c in ycols])
            .sort("split"))


def split_problems(splits: pl.DataFrame, ycols: Sequence[str], max_ratio_gap: float,
                   coverage: dict[str, list[str]] | None = None) -> list[dict[str, Any]]:
    """What would poison training or evaluation, as GE-style failure records.

    * leakage: a patient in two splits (lists the patient keys);
    * label coverage: an image without a label row for a configured finding
      (`coverage` maps finding -> unlabelled files; absence is not a negative);
    * class ratio: a split without both classes of a finding (train and test), or
      whose positive fraction differs from the cohort's by more than `max_ratio_gap`
      (absolute) where the split has >= 20 images."""
    failures: list[dict[str, Any]] = []
    leaks = leaking_patients(splits)
    if leaks:
        failures.append({"expectation": "no patient in two splits", "column": "patient_key",
                         "unexpected_count": len(leaks), "examples": leaks[:10]})
    for finding, files in (coverage or {}).items():
        if files:
            failures.append({"expectation": f"every image has a label for {finding}",
                             "column": f"y_{finding}", "unexpected_count": len(files),
                             "examples": files[:10]})
    for col in ycols:
        overall = float(splits[col].mean()) if splits.height else 0.0
        for split in ("train", "val", "test"):
            part = splits.filter(pl.col("split") == split)[col]
            if not part.len():
                continue
            pos = int(part.sum())
            if split != "val" and pos in (0, part.len()):
                failures.append({"expectation": "both classes present", "column": col,
                                 "unexpected_count": part.len(),
                                 "examples": [f"{split} has {pos} positive of {part.len()}"]})
            elif part.len() >= 20 and abs(pos / part.len() - overall) > max_ratio_gap:
                failures.append({"expectation": "class ratio close to the cohort's",
                                 "column": col, "unexpected_count": part.len(),
                                 "examples": [f"{split}: {pos}/{part.len()} positive = "
                                              f"{pos / part.len():.3f}, cohort {overall:.3f}, "
                                              f"allowed gap {max_ratio_gap}"]})
    return failures
