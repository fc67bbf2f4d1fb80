"""Blocking checks of the ingest stage: they fail only on what would poison training."""

import dagster as dg
import polars as pl

from xcam_assets.expectations import ge_result, suite, validate_frame
from xcam_assets.hashing import sha256_file
from xcam_assets.ingest.assets import (
    cohort_splits,
    dicom_inventory,
    external_cohort,
    findings,
    raw_dicoms,
)
from xcam_assets.ingest.cohorts import leaking_patients, split_problems, split_summary
from xcam_assets.ingest.stage import image_labels
from xcam_assets.project import XcamProject, batch_partitions


@dg.asset_check(asset=raw_dicoms, blocking=True, partitions_def=batch_partitions)
def raw_copy_is_faithful(context: dg.AssetCheckExecutionContext,
                         xcam: XcamProject) -> dg.AssetCheckResult:
    """Every incoming file has a byte-identical copy in data/raw (nothing lost or altered);
    symbolic links are not files of the batch (never followed)."""
    s = xcam.settings()
    batch = context.partition_key
    src, dst = s.incoming_dir / batch, s.raw_dir / batch
    files = sorted(p for p in dst.rglob("*") if p.is_file()) if dst.is_dir() else []
    differing = []
    if src.is_dir():
        for p in sorted(q for q in src.rglob("*") if q.is_file() and not q.name.startswith(".")):
            rel = p.relative_to(src)
            if any(src.joinpath(*rel.parts[:i]).is_symlink() for i in range(1, len(rel.parts) + 1)):
                continue  # never followed or copied (raw_dicoms reports them)
            target = dst / rel
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
                        xcam: XcamProject) -> dg.AssetCheckResult:
    """GE suite `inventory` + what would poison training, naming the files: no good file
    at all, a study whose images name two patients (patient IDs cannot be trusted for
    the patient-level split), a pseudonym key other than the other batches' (patient
    keys would not link across batches). Quarantined files alone never fail it."""
    s = xcam.settings()
    batch = context.partition_key
    frame = pl.read_parquet(s.inventory_dir / f"{batch}.parquet")
    outcome = validate_frame(frame, suite(s, "inventory"))
    ok = frame.filter(pl.col("status") == "ok")
    if ok.height == 0:
        outcome.success = False
        outcome.failures.append({"expectation": "at least one ingestible file", "column": "status",
                                 "unexpected_count": frame.height,
                                 "examples": [f"{r['file']}: {r['reason']}"
                                              for r in frame.head(5).iter_rows(named=True)]})
    mixed = (ok.filter(pl.col("study_key").is_not_null())
             .group_by("study_key").agg(pl.col("patient_key").n_unique().alias("n"),
                                        pl.col("file").sort())
             .filter(pl.col("n") > 1).sort("study_key"))
    if mixed.height:
        outcome.success = False
        outcome.failures.append({"expectation": "one patient per study", "column": "patient_key",
                                 "unexpected_count": mixed.height,
                                 "examples": [f"one study, {r['n']} Patient IDs: {r['file'][:5]}"
                                              for r in mixed.head(5).iter_rows(named=True)]})
    keys = set(frame["key_id"].drop_nulls().to_list())
    other_keys = set()
    for p in sorted(s.inventory_dir.glob("*.parquet")):
        if p.stem != batch and "key_id" in pl.read_parquet_schema(p):
            other_keys |= set(pl.read_parquet(p, columns=["key_id"])["key_id"].drop_nulls()
                              .to_list())
    if len(keys) > 1 or (keys and other_keys and keys != other_keys):
        outcome.success = False
        outcome.failures.append({
            "expectation": "one pseudonym key for every batch", "column": "key_id",
            "unexpected_count": frame.height,
            "examples": [f"batch {batch} key {sorted(keys)}, other batches {sorted(other_keys)}: "
                         "set XCAM_PSEUDONYM_KEY (or the key file) back and re-run"]})
    return ge_result(outcome, n_ok=ok.height, n_quarantined=frame.height - ok.height)


@dg.asset_check(asset=findings, blocking=True, partitions_def=batch_partitions)
def labels_match_images(context: dg.AssetCheckExecutionContext,
                        xcam: XcamProject) -> dg.AssetCheckResult:
    """GE suite `findings` + every label row valid (rejected rows named by file, row and
    reason: malformed values, unsafe paths, boxes outside the image), no label for a
    missing image (named with its row), every ingested image has a label, boxes lie
    inside their image."""
    s = xcam.settings()
    batch = context.partition_key
    frame = pl.read_parquet(s.findings_dir / f"{batch}.parquet")
    outcome = validate_frame(frame.drop("boxes", "label_rows", strict=False),
                             suite(s, "findings"))
    if "reason" in frame.columns:
        rejected = frame.filter(pl.col("status") == "rejected_label").sort(
            pl.col("label_rows").list.first())["reason"].to_list()
        if rejected:
            outcome.success = False
            outcome.failures.append({"expectation": "every label row is valid",
                                     "column": "file", "unexpected_count": len(rejected),
                                     "examples": rejected[:10]})
    missing = frame.filter(pl.col("status") == "missing_image")
    if missing.height:
        outcome.success = False
        examples = (missing["reason"].to_list() if "reason" in missing.columns else
                    [f"labels.csv names {f}, not in batch {batch}"
                     for f in missing["file"].unique().sort().to_list()])
        outcome.failures.append({"expectation": "every label names an image of the batch",
                                 "column": "file", "unexpected_count": missing.height,
                                 "examples": examples[:10]})
    inv = pl.read_parquet(s.inventory_dir / f"{batch}.parquet").filter(pl.col("status") == "ok")
    labelled = frame.filter(pl.col("status") != "rejected_label")["file"].to_list()
    unlabelled = sorted(set(inv["file"].to_list()) - set(labelled))
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
def splits_do_not_leak(xcam: XcamProject) -> dg.AssetCheckResult:
    """GE suite `cohort_splits` + zero patients in two splits + every image labelled for
    every finding + both classes in train and test and each split's class ratio within
    `splits.max_ratio_gap` of the cohort's (see cohorts.split_problems)."""
    s = xcam.settings()
    frame = pl.read_parquet(s.splits_path)
    outcome = validate_frame(frame, suite(s, "cohort_splits"))
    labels, missing = image_labels(s)
    where = {k: f"{b}/{f}" for k, b, f in labels.select("image_key", "batch", "file").iter_rows()}
    keys = set(frame["image_key"].to_list())
    coverage = {f: [where.get(k, k) for k in ks if k in keys] for f, ks in missing.items()}
    ycols = [f"y_{f}" for f in s.findings]
    problems = split_problems(frame, ycols, float(s.params["splits"].get("max_ratio_gap", 1.0)),
                              coverage)
    if problems:
        outcome.success = False
        outcome.failures.extend(problems)
    return ge_result(outcome, leaking_patients=len(leaking_patients(frame)),
                     splits=dg.MetadataValue.json(
                         {r["split"]: r["images"] for r in
                          split_summary(frame, ycols).iter_rows(named=True)}))


@dg.asset_check(asset=external_cohort, blocking=True)
def external_is_unseen(xcam: XcamProject) -> dg.AssetCheckResult:
    """No patient of the external cohort is in the train/val/test split (else its figures
    would not be external)."""
    s = xcam.settings()
    ext = pl.read_parquet(s.external_path)
    internal = set(pl.read_parquet(s.splits_path)["patient_key"].to_list())
    shared = sorted(set(ext["patient_key"].to_list()) & internal)
    return dg.AssetCheckResult(
        passed=not shared,
        description=(f"{len(shared)} external patient(s) are also in cohort_splits"
                     if shared else f"{ext.height} external image(s), none of a split patient"),
        metadata={"n_images": ext.height, "patients_in_both": len(shared)})
