"""Blocking checks of the ingest stage: they fail only on what would poison training."""

import dagster as dg
import polars as pl

from xcam_assets.expectations import validate_frame
from xcam_assets.hashing import sha256_file
from xcam_assets.ingest.assets import cohort_splits, dicom_inventory, findings, raw_dicoms
from xcam_assets.ingest.cohorts import leaking_patients
from xcam_assets.resources import XcamConfig, batch_partitions


def suite(s, name: str):
    return s.root / "resources" / "expectations" / f"{name}.yaml"


def ge_result(outcome, **metadata) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=outcome.success,
        description=outcome.summary(),
        metadata={"suite": outcome.suite, "n_rows": outcome.n_rows,
                  "failures": dg.MetadataValue.json(outcome.failures), **metadata},
    )


@dg.asset_check(asset=raw_dicoms, blocking=True, partitions_def=batch_partitions)
def raw_copy_is_faithful(context: dg.AssetCheckExecutionContext,
                         xcam: XcamConfig) -> dg.AssetCheckResult:
    """Every incoming file has a byte-identical copy in data/raw (nothing lost or altered)."""
    s = xcam.settings()
    batch = context.partition_key
    src, dst = s.incoming_dir / batch, s.raw_dir / batch
    files = sorted(p for p in dst.rglob("*") if p.is_file()) if dst.is_dir() else []
    differing = []
    if src.is_dir():
        for p in sorted(q for q in src.rglob("*") if q.is_file() and not q.name.startswith(".")):
            target = dst / p.relative_to(src)
            if not target.exists() or sha256_file(target) != sha256_file(p):
                differing.append(p.relative_to(src).as_posix())
    return dg.AssetCheckResult(
        passed=bool(files) and not differing,
        description=("raw copy identical to the incoming batch" if not differing else
                     f"{len(differing)} incoming file(s) have no identical raw copy: {differing[:10]}"),
        metadata={"n_files": len(files), "differing": differing[:50]},
    )


@dg.asset_check(asset=dicom_inventory, blocking=True, partitions_def=batch_partitions)
def inventory_is_usable(context: dg.AssetCheckExecutionContext,
                        xcam: XcamConfig) -> dg.AssetCheckResult:
    """GE suite `inventory` + at least one good file in the batch."""
    s = xcam.settings()
    frame = pl.read_parquet(s.inventory_dir / f"{context.partition_key}.parquet")
    outcome = validate_frame(frame, suite(s, "inventory"))
    n_ok = frame.filter(pl.col("status") == "ok").height
    if n_ok == 0:
        outcome.success = False
        outcome.failures.append({"expectation": "at least one ingestible file", "column": "status",
                                 "unexpected_count": frame.height,
                                 "examples": [f"{r['file']}: {r['reason']}"
                                              for r in frame.head(5).iter_rows(named=True)]})
    return ge_result(outcome, n_ok=n_ok)


@dg.asset_check(asset=findings, blocking=True, partitions_def=batch_partitions)
def labels_match_images(context: dg.AssetCheckExecutionContext,
                        xcam: XcamConfig) -> dg.AssetCheckResult:
    """GE suite `findings`: no label for a missing image, one row per (file, finding);
    every ingested image has a label; boxes lie inside their image."""
    s = xcam.settings()
    batch = context.partition_key
    frame = pl.read_parquet(s.findings_dir / f"{batch}.parquet")
    outcome = validate_frame(frame.drop("boxes"), suite(s, "findings"))
    missing = frame.filter(pl.col("status") == "missing_image")["file"].unique().sort().to_list()
    if missing:
        outcome.failures.append({"expectation": "every label names an image of the batch",
                                 "column": "file", "unexpected_count": len(missing),
                                 "examples": [f"labels.csv names {f}, not in batch {batch}"
                                              for f in missing[:5]]})
    inv = pl.read_parquet(s.inventory_dir / f"{batch}.parquet").filter(pl.col("status") == "ok")
    unlabelled = sorted(set(inv["file"].to_list()) - set(frame["file"].to_list()))
    if unlabelled:
        outcome.success = False
        outcome.failures.append({"expectation": "every ingested image has a label row",
                                 "column": "file", "unexpected_count": len(unlabelled),
                                 "examples": unlabelled[:5]})
    sizes = dict(zip(inv["file"], zip(inv["columns"], inv["rows"], strict=True), strict=True))
    outside = []
    for row in frame.filter(pl.col("status") == "ok").iter_rows(named=True):
        w, h = sizes.get(row["file"], (None, None))
        for b in row["boxes"] or []:
            if w is not None and (b["x_max"] > w or b["y_max"] > h):
                outside.append(f"{row['file']} {row['finding']} box {b} outside {w}x{h}")
    if outside:
        outcome.success = False
        outcome.failures.append({"expectation": "boxes inside the image", "column": "boxes",
                                 "unexpected_count": len(outside), "examples": outside[:5]})
    return ge_result(outcome)


@dg.asset_check(asset=cohort_splits, blocking=True)
def splits_do_not_leak(xcam: XcamConfig) -> dg.AssetCheckResult:
    """GE suite `cohort_splits` + zero patients in two splits + positives in train and test."""
    s = xcam.settings()
    frame = pl.read_parquet(s.splits_path)
    outcome = validate_frame(frame, suite(s, "cohort_splits"))
    leaks = leaking_patients(frame)
    if leaks:
        outcome.success = False
        outcome.failures.append({"expectation": "no patient in two splits", "column": "patient_key",
                                 "unexpected_count": len(leaks), "examples": leaks[:5]})
    for finding in s.findings:
        for split in ("train", "test"):
            part = frame.filter(pl.col("split") == split)[f"y_{finding}"]
            if part.len() and part.sum() in (0, part.len()):
                outcome.success = False
                outcome.failures.append({"expectation": "both classes present",
                                         "column": f"y_{finding}", "unexpected_count": part.len(),
                                         "examples": [f"{split} has one class only"]})
    return ge_result(outcome, leaking_patients=len(leaks))
