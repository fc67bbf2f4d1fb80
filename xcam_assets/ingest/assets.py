"""Ingest stage: arrival batch -> immutable raw copy -> inventory -> findings -> splits."""

import dagster as dg
import polars as pl

from xcam_assets.hashing import dvc_data_version
from xcam_assets.ingest.cohorts import split_summary
from xcam_assets.ingest.stage import (
    INCOMING_STAT_KEY,
    INCOMING_VERSION_KEY,
    batch_findings,
    copy_batch,
    incoming_stat,
    incoming_version,
    inventory_batch,
    split_cohort,
)
from xcam_assets.ingest.stage import external_cohort as external_cohort_frame
from xcam_assets.project import XcamProject, batch_partitions

GROUP = "ingest"


@dg.asset(partitions_def=batch_partitions, group_name=GROUP, code_version="1",
          kinds={"dicom"}, pool="ingest")
def raw_dicoms(context: dg.AssetExecutionContext, xcam: XcamProject) -> dg.MaterializeResult:
    """The DICOM files (and labels) of one arrival batch, copied into the immutable
    store `data/raw/<batch>/`. A file already there is never altered: a same-named
    file with other content is reported, not copied. A symbolic link is never
    followed (reported, not copied): an upload must not pull files from elsewhere on
    the machine (a key, another site's data) into the store and its DVC remote."""
    s = xcam.settings()
    batch = context.partition_key
    dst, src = s.raw_dir / batch, s.incoming_dir / batch
    # what arrived, taken before the copy: `xcam materialize ingest` re-runs the batch
    # only when it changed (xcam_assets.orchestrate.ingest_stale_reason)
    incoming = {INCOMING_STAT_KEY: incoming_stat(src),
                INCOMING_VERSION_KEY: incoming_version(src)}
    try:
        copy = copy_batch(src, dst, batch)
    except FileNotFoundError as exc:
        raise dg.Failure(str(exc)) from exc
    conflicts, links, listing = copy.conflicts, copy.links, copy.listing
    if conflicts:
        context.log.warning(f"{len(conflicts)} file(s) differ from the stored raw copy and were "
                            f"not copied: {conflicts[:5]}")
    if links:
        context.log.warning(f"{len(links)} symbolic link(s) in the batch were not followed "
                            f"or copied: {links[:5]}")
    return dg.MaterializeResult(
        metadata={"n_files": len(listing), "copied": copy.copied,
                  "unchanged": copy.unchanged,
                  "conflicts": conflicts, "symlinks_not_copied": links,
                  "path": dg.MetadataValue.path(str(dst)),
                  "bytes": sum((dst / f).stat().st_size for f, _ in listing), **incoming},
        data_version=dg.DataVersion(dvc_data_version(dst)),
    )


@dg.asset(partitions_def=batch_partitions, group_name=GROUP, code_version="3",
          deps=[raw_dicoms], kinds={"polars"}, pool="ingest")
def dicom_inventory(context: dg.AssetExecutionContext, xcam: XcamProject) -> dg.MaterializeResult:
    """One row per file of the batch: pseudonymous keys, header facts, sha256, status.

    Reads, hashes and decodes only this batch's files (once each); other batches are
    consulted through their inventory tables only (duplicate SOP Instance UIDs). Two
    batches' inventories never run at once (the `ingest` pool, and a file lock,
    `$DAGSTER_HOME/locks/inventory.flock` beside the pool it backs up, since a SQLite
    instance's pool can let two simultaneous claims through), so a file in both is admitted once, by whichever runs
    first, never twice."""
    s = xcam.settings()
    batch = context.partition_key
    out = s.inventory_dir / f"{batch}.parquet"
    frame, seconds = inventory_batch(s, batch, context.log.info)
    quarantined = frame.filter(pl.col("status") == "quarantined")
    for row in quarantined.iter_rows(named=True):
        context.log.warning(f"quarantined {batch}/{row['file']}: {row['reason']}")
    by_reason = (quarantined.with_columns(pl.col("reason").str.split(":").list.first()
                                          .alias("kind"))
                 .group_by("kind").len().sort("kind"))
    return dg.MaterializeResult(
        metadata={"n_files": frame.height, "n_ok": frame.height - quarantined.height,
                  "n_quarantined": quarantined.height,
                  "files_read_and_decoded": frame.height,
                  "seconds": round(seconds, 3),
                  "files_per_s": round(frame.height / max(seconds, 1e-9), 1),
                  "quarantine": dg.MetadataValue.md(
                      quarantined.select("file", "reason").to_pandas().to_markdown(index=False)
                      if quarantined.height else "none"),
                  "quarantine_kinds": dg.MetadataValue.json(
                      dict(zip(by_reason["kind"], by_reason["len"], strict=True))),
                  "key_id": frame["key_id"][0] if frame.height else None,
                  "path": dg.MetadataValue.path(str(out))},
        data_version=dg.DataVersion(dvc_data_version(out)),
    )


@dg.asset(partitions_def=batch_partitions, group_name=GROUP, code_version="2",
          deps=[dicom_inventory], kinds={"polars"})
def findings(context: dg.AssetExecutionContext, xcam: XcamProject) -> dg.MaterializeResult:
    """Canonical labels of the batch: image_key, finding, present, boxes, mask file.

    `status` says whether the labelled file is an ingested image (`ok`), a
    quarantined one, missing from the batch, or whether the label row itself was
    rejected (`rejected_label`: malformed values, an unsafe path, a box outside its
    image, a contradiction; `reason` names the row). The blocking check
    `labels_match_images` fails on missing images and rejected rows, naming each;
    good rows are kept, so every problem of the file shows at once."""
    s = xcam.settings()
    batch = context.partition_key
    try:
        frame, bad = batch_findings(s, batch)
    except FileNotFoundError as exc:
        raise dg.Failure(str(exc)) from exc
    out = s.findings_dir / f"{batch}.parquet"
    problems = frame.filter(pl.col("status").is_in(["rejected_label", "missing_image"]))
    for row in problems.head(50).iter_rows(named=True):
        context.log.warning(f"label problem: {row['reason']}")
    counts = (frame.filter(pl.col("status") == "ok").group_by("finding")
              .agg(pl.col("present").sum().alias("positive"), pl.len().alias("images"))
              .sort("finding"))
    return dg.MaterializeResult(
        metadata={"n_rows": frame.height,
                  "per_finding": dg.MetadataValue.md(counts.to_pandas().to_markdown(index=False)),
                  "n_missing_image": frame.filter(pl.col("status") == "missing_image").height,
                  "n_rejected_rows": bad.height,
                  "label_problems": dg.MetadataValue.md(
                      problems.select("reason").head(50).to_pandas().to_markdown(index=False)
                      if problems.height else "none"),
                  "path": dg.MetadataValue.path(str(out))},
        data_version=dg.DataVersion(dvc_data_version(out)),
    )


@dg.asset(group_name=GROUP, code_version="2",
          deps=[dg.AssetDep(findings, partition_mapping=dg.AllPartitionMapping())],
          kinds={"polars"})
def cohort_splits(context: dg.AssetExecutionContext, xcam: XcamProject) -> dg.MaterializeResult:
    """Patient-level train/val/test split of every labelled, ingested image, stratified
    by finding and seeded; optionally a balanced subset first (`splits.balanced`)."""
    s = xcam.settings()
    split, missing, unlabelled = split_cohort(s, context.log.info)
    ycols = [f"y_{f}" for f in s.findings]
    sp = s.params["splits"]
    summary = split_summary(split, ycols)
    if unlabelled:
        context.log.warning(f"{unlabelled} ingested image(s) have no label row and are left out")
    counts = {r["split"]: {k: v for k, v in r.items() if k != "split"}
              for r in summary.iter_rows(named=True)}
    return dg.MaterializeResult(
        metadata={"summary": dg.MetadataValue.md(summary.to_pandas().to_markdown(index=False)),
                  "split_sizes": dg.MetadataValue.json(
                      {k: v["images"] for k, v in counts.items()}),
                  "class_counts": dg.MetadataValue.json(counts),
                  "n_images": split.height, "n_patients": split["patient_key"].n_unique(),
                  "unlabelled_left_out": unlabelled,
                  "images_without_label_for": dg.MetadataValue.json(
                      {f: len(v) for f, v in missing.items()}),
                  "balanced": bool(sp.get("balanced")),
                  "path": dg.MetadataValue.path(str(s.splits_path))},
        data_version=dg.DataVersion(dvc_data_version(s.splits_path.parent)),
    )


@dg.asset(group_name=GROUP, code_version="1",
          deps=[cohort_splits, dg.AssetDep(findings, partition_mapping=dg.AllPartitionMapping())],
          kinds={"polars"})
def external_cohort(context: dg.AssetExecutionContext, xcam: XcamProject) -> dg.MaterializeResult:
    """The images of batches declared external (`batch.yaml`: `role: external`): data of a
    site the models never saw. They never enter `cohort_splits`; the frozen checkpoints
    score them on their own (`external_scores`)."""
    s = xcam.settings()
    frame = external_cohort_frame(s)
    if frame.height:
        context.log.info(f"external cohort: {frame.height} image(s) of "
                         f"{frame['patient_key'].n_unique()} patient(s) in "
                         f"{frame['batch'].unique().sort().to_list()}")
    return dg.MaterializeResult(
        metadata={"n_images": frame.height,
                  "n_patients": frame["patient_key"].n_unique() if frame.height else 0,
                  "batches": frame["batch"].unique().sort().to_list(),
                  "sites": sorted(set(frame["site"].to_list())),
                  "positives": dg.MetadataValue.json(
                      {c[2:]: int(frame[c].sum()) for c in frame.columns
                       if c.startswith("y_")}),
                  "path": dg.MetadataValue.path(str(s.external_path))},
        data_version=dg.DataVersion(dvc_data_version(s.external_path.parent)),
    )
