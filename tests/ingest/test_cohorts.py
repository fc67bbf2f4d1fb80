"""Patient-level splits: hand-made cases, real NIH patients (many images each), the
blocking check on a deliberately leaky split, and the asset's metadata."""

from __future__ import annotations

import dagster as dg
import numpy as np
import polars as pl
import pytest
from real_data import shared_data

from xcam_assets.atomic import atomic_write_parquet
from xcam_assets.config import load_settings
from xcam_assets.demo import write_demo_cohort
from xcam_assets.ingest.adapters.nih import read_nih
from xcam_assets.ingest.adapters.rsna import read_rsna
from xcam_assets.ingest.adapters.vindr import read_vindr
from xcam_assets.ingest.checks import splits_do_not_leak
from xcam_assets.ingest.cohorts import (
    balanced_subset,
    leaking_patients,
    patient_split,
    patient_strata,
    split_problems,
)
from xcam_assets.orchestrate import STAGES, _run, register_batches
from xcam_assets.project import XcamProject


def _images(n_patients: int, per: int, pos_every: int) -> pl.DataFrame:
    rows = [{"image_key": f"I{p:04d}_{k}", "patient_key": f"P{p:04d}",
             "y_a": int(p % pos_every == 0 and k == 0), "y_b": int(p % 7 == 0)}
            for p in range(n_patients) for k in range(per)]
    return pl.DataFrame(rows)


def test_strata_pick_the_rarest_finding() -> None:
    frame = pl.DataFrame({"patient_key": ["P1", "P1", "P2", "P3", "P4"],
                          "y_a": [1, 0, 1, 1, 0], "y_b": [0, 1, 0, 0, 0]})
    strata = dict(patient_strata(frame, ["y_a", "y_b"]).iter_rows())
    assert strata == {"P1": "y_b", "P2": "y_a", "P3": "y_a", "P4": "negative"}


def test_split_is_patient_level_stratified_and_seeded() -> None:
    images = _images(200, 3, pos_every=4)
    a = patient_split(images, 0.15, 0.2, seed=1, ycols=["y_a", "y_b"])
    b = patient_split(images, 0.15, 0.2, seed=1, ycols=["y_a", "y_b"])
    c = patient_split(images, 0.15, 0.2, seed=2, ycols=["y_a", "y_b"])
    assert a.equals(b) and not a.equals(c)
    assert leaking_patients(a) == []
    per = a.group_by("split").agg(pl.col("patient_key").n_unique()).sort("split")
    # strata: y_b (p % 7 == 0) 29 patients, y_a only 42, negative 129;
    # test round(.2n) = 6 + 8 + 26 = 40, val round(.15n) = 4 + 6 + 19 = 29, train 131
    assert dict(per.iter_rows()) == {"test": 40, "train": 131, "val": 29}
    assert split_problems(a, ["y_a", "y_b"], max_ratio_gap=0.1) == []


def test_balanced_subset() -> None:
    images = _images(100, 2, pos_every=4)  # 25 positive images of 200
    sub = balanced_subset(images, "y_a", seed=3)
    assert sub.height == 50 and sub["y_a"].sum() == 25
    assert balanced_subset(images, "y_a", seed=3).equals(sub)
    capped = balanced_subset(images, "y_a", seed=3, max_images=20)
    assert capped.height == 20 and capped["y_a"].sum() == 10


def test_split_problems_name_what_is_wrong() -> None:
    images = _images(60, 2, pos_every=3)
    split = patient_split(images, 0.15, 0.2, seed=0, ycols=["y_a"])
    leaky = split.with_columns(
        pl.when((pl.col("patient_key") == split["patient_key"][0])
                & (pl.col("image_key").str.ends_with("_1")))
        .then(pl.lit("test" if split["split"][0] != "test" else "train"))
        .otherwise(pl.col("split")).alias("split"))
    problems = split_problems(leaky, ["y_a"], 1.0)
    assert problems[0]["expectation"] == "no patient in two splits"
    assert problems[0]["examples"] == [split["patient_key"][0]]
    skewed = split.with_columns(pl.when(pl.col("split") == "train").then(1)
                                .otherwise(pl.col("y_a")).alias("y_a"))
    kinds = {p["expectation"] for p in split_problems(skewed, ["y_a"], 0.1)}
    assert kinds == {"both classes present", "class ratio close to the cohort's"}
    gaps = split_problems(split, ["y_a"], 1.0, coverage={"a": ["batch/x.dcm"]})
    assert gaps == [{"expectation": "every image has a label for a", "column": "y_a",
                     "unexpected_count": 1, "examples": ["batch/x.dcm"]}]


@pytest.mark.parametrize("dataset", ["nih", "rsna", "vindr"])
def test_zero_leakage_on_real_datasets(dataset: str) -> None:
    labels = shared_data("labels")
    if dataset == "nih":
        rows = read_nih(labels / "Data_Entry_2017_v2020.csv.gz",
                        findings=("Pneumothorax", "Hernia"))
    elif dataset == "rsna":
        rows = read_rsna(labels / "kaggle_stage_2_train_labels.csv.zip")
    else:
        rows = read_vindr(labels / "vinbigdata-train.csv.gz", findings=("Pneumothorax",))
    wide = (rows.with_columns(pl.col("present").cast(pl.Int8),
                              pl.coalesce("patient_id", "file").alias("patient_key"))
            .pivot(on="finding", index=["file", "patient_key"], values="present")
            .rename({"file": "image_key"}))
    ycols = [c for c in wide.columns if c not in ("image_key", "patient_key")]
    split = patient_split(wide, 0.15, 0.2, seed=20261124, ycols=ycols)
    assert leaking_patients(split) == []
    assert split.height == wide.height
    for col in ycols:  # stratified: every split within 1.5 points of the cohort's ratio
        overall = wide[col].mean()
        for part in ("train", "val", "test"):
            ratio = split.filter(pl.col("split") == part)[col].mean()
            assert abs(ratio - overall) < 0.015, (dataset, col, part, ratio, overall)
    if dataset == "nih":  # many images per patient: a patient-level split matters here
        assert wide["patient_key"].n_unique() == 30805 < wide.height


def test_leakage_check_fails_a_leaky_split_through_dagster(project) -> None:
    s = load_settings()
    batches = write_demo_cohort(s.incoming_dir, n_images=40, n_batches=1, size=64,
                                seed=s.seed, finding=s.findings[0])
    (batches[0] / ".complete").touch()
    instance = dg.DagsterInstance.get()
    register_batches(instance, [batches[0].name])
    _run(STAGES["ingest"], instance, XcamProject(), batches[0].name, log=print)
    result = _run(STAGES["splits"], instance, XcamProject(), None, log=print)
    meta = next(e.event_specific_data.materialization.metadata for e in result.all_events
                if e.event_type_value == "ASSET_MATERIALIZATION")
    sizes = meta["split_sizes"].value
    assert sum(sizes.values()) == 40 and set(sizes) == {"train", "val", "test"}
    counts = meta["class_counts"].value
    assert sum(c["y_lesion"] for c in counts.values()) == 20
    assert splits_do_not_leak(xcam=XcamProject()).passed

    good = pl.read_parquet(s.splits_path)
    victim = good.filter(pl.col("split") == "train").group_by("patient_key").len().filter(
        pl.col("len") > 1)["patient_key"][0]
    first = good.filter(pl.col("patient_key") == victim)["image_key"][0]
    leaky = good.with_columns(pl.when(pl.col("image_key") == first).then(pl.lit("test"))
                              .otherwise(pl.col("split")).alias("split"))
    atomic_write_parquet(s.splits_path, leaky)
    outcome = splits_do_not_leak(xcam=XcamProject())
    assert not outcome.passed
    assert outcome.metadata["leaking_patients"].value == 1
    failures = outcome.metadata["failures"].value
    assert {"expectation": "no patient in two splits", "column": "patient_key",
            "unexpected_count": 1, "examples": [victim]} in failures
    assert np.isclose(sum(sizes.values()), leaky.height)
