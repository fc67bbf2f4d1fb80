"""Patient-level train/val/test splits, stratified, seeded.

No patient's images ever land in two splits: splitting images instead of
patients leaks a patient into test and inflates every metric.
"""

from __future__ import annotations

import numpy as np
import polars as pl


def patient_split(images: pl.DataFrame, val: float, test: float, seed: int) -> pl.DataFrame:
    """Assign each patient to train/val/test; `images` has image_key, patient_key, stratum.

    Patients are grouped by their stratum (any positive finding, else 0), shuffled
    with `seed`, and cut by cumulative fractions within each stratum so every split
    sees both classes.
    """
    patients = (images.group_by("patient_key")
                .agg(pl.col("stratum").max().alias("stratum"))
                .sort("patient_key"))
    rng = np.random.default_rng(seed)
    assign: dict[str, str] = {}
    for stratum in sorted(patients["stratum"].unique().to_list()):
        keys = patients.filter(pl.col("stratum") == stratum)["patient_key"].to_list()
        order = rng.permutation(len(keys))
        n = len(keys)
        n_test = int(round(n * test))
        n_val = int(round(n * val))
        if n >= 3:  # every split gets at least one patient of each stratum when possible
            n_test, n_val = max(n_test, 1), max(n_val, 1)
        for rank, idx in enumerate(order):
            split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
            assign[keys[idx]] = split
    return images.with_columns(
        pl.col("patient_key").replace_strict(assign, return_dtype=pl.String).alias("split")
    )


def leaking_patients(splits: pl.DataFrame) -> list[str]:
    """Patients found in more than one split (must be empty)."""
    per = splits.group_by("patient_key").agg(pl.col("split").n_unique().alias("n"))
    return sorted(per.filter(pl.col("n") > 1)["patient_key"].to_list())
