"""Ingest stage: arrival batch -> immutable raw copy -> inventory -> findings -> splits."""

import shutil

import dagster as dg
import polars as pl

from xcam_assets.hashing import atomic_path, atomic_write_parquet, combine_hashes, sha256_file
from xcam_assets.ingest.cohorts import patient_split
from xcam_assets.ingest.deid import pseudonym_key
from xcam_assets.ingest.inventory import inventory_rows
from xcam_assets.ingest.labels import read_batch_labels
from xcam_assets.resources import XcamConfig, batch_partitions

GROUP = "ingest"


def _file_listing(root) -> list[tuple[str, str]]:
    return sorted((p.relative_to(root).as_posix(), sha256_file(p))
                  for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


@dg.asset(partitions_def=batch_partitions, group_name=GROUP, code_version="1",
          kinds={"dicom"}, pool="ingest")
def raw_dicoms(context: dg.AssetExecutionContext, xcam: XcamConfig) -> dg.MaterializeResult:
    """The DICOM files (and labels) of one arrival batch, copied into the immutable
    store `data/raw/<batch>/`. A file already there is never altered: a same-named
    file with other content is reported, not copied."""
    s = xcam.settings()
    batch = context.partition_key
    src, dst = s.incoming_dir / batch, s.raw_dir / batch
    if not src.is_dir() and not dst.is_dir():
        raise dg.Failure(f"batch {batch!r}: neither {src} nor {dst} exists")
    copied, unchanged, conflicts = 0, 0, []
    if src.is_dir():
        for path in sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith(".")):
            rel = path.relative_to(src)
            target = dst / rel
            if target.exists():
                if sha256_file(target) == sha256_file(path):
                    unchanged += 1
                else:
                    conflicts.append(rel.as_posix())
                continue
            with atomic_path(target) as tmp:
                shutil.copyfile(path, tmp)
            copied += 1
    listing = _file_listing(dst)
    if conflicts:
        context.log.warning(f"{len(conflicts)} file(s) differ from the stored raw copy and were "
                            f"not copied: {conflicts[:5]}")
    return dg.MaterializeResult(
        metadata={"n_files": len(listing), "copied": copied, "unchanged": unchanged,
                  "conflicts": conflicts, "path": dg.MetadataValue.path(str(dst)),
                  "bytes": sum((dst / f).stat().st_size for f, _ in listing)},
        data_version=dg.DataVersion(combine_hashes(listing)),
    )


@dg.asset(partitions_def=batch_partitions, group_name=GROUP, code_version="1",
          deps=[raw_dicoms], kinds={"polars"})
def dicom_inventory(context: dg.AssetExecutionContext, xcam: XcamConfig) -> dg.MaterializeResult:
    """One row per file of the batch: pseudonymous keys, header facts, sha256, status."""
    s = xcam.settings()
    batch = context.partition_key
    others = [p for p in s.inventory_dir.glob("*.parquet") if p.stem != batch]
    known = set()
    for p in others:
        known |= set(pl.read_parquet(p, columns=["image_key", "status"])
                     .filter(pl.col("status") == "ok")["image_key"].to_list())
    frame = inventory_rows(s.raw_dir / batch, batch, pseudonym_key(s.root),
                           s.params["cohort"]["modalities"], s.params["cohort"]["body_parts"],
                           known_sop_keys=known)
    out = s.inventory_dir / f"{batch}.parquet"
    atomic_write_parquet(out, frame)
    quarantined = frame.filter(pl.col("status") == "quarantined")
    for row in quarantined.iter_rows(named=True):
        context.log.warning(f"quarantined {batch}/{row['file']}: {row['reason']}")
    return dg.MaterializeResult(
        metadata={"n_files": frame.height, "n_ok": frame.height - quarantined.height,
                  "n_quarantined": quarantined.height,
                  "quarantine": dg.MetadataValue.md(
                      quarantined.select("file", "reason").to_pandas().to_markdown(index=False)
                      if quarantined.height else "none"),
                  "path": dg.MetadataValue.path(str(out))},
        data_version=dg.DataVersion(sha256_file(out)),
    )


@dg.asset(partitions_def=batch_partitions, group_name=GROUP, code_version="1",
          deps=[dicom_inventory], kinds={"polars"})
def findings(context: dg.AssetExecutionContext, xcam: XcamConfig) -> dg.MaterializeResult:
    """Canonical labels of the batch: image_key, finding, present, boxes, mask file.

    `status` says whether the labelled file is an ingested image (`ok`), a
    quarantined one, or missing from the batch (the blocking check fails on that)."""
    s = xcam.settings()
    batch = context.partition_key
    labels_path = s.raw_dir / batch / "labels.csv"
    if not labels_path.exists():
        raise dg.Failure(f"batch {batch!r} has no labels.csv at {labels_path}")
    labels = read_batch_labels(labels_path)
    inv = pl.read_parquet(s.inventory_dir / f"{batch}.parquet",
                          columns=["file", "image_key", "status"])
    frame = (labels.join(inv.rename({"status": "image_status"}), on="file", how="left")
             .with_columns(
                 pl.when(pl.col("image_status").is_null()).then(pl.lit("missing_image"))
                 .when(pl.col("image_status") == "quarantined").then(pl.lit("quarantined_image"))
                 .otherwise(pl.lit("ok")).alias("status"),
                 pl.lit(batch).alias("batch"))
             .drop("image_status")
             .sort("file", "finding"))
    out = s.findings_dir / f"{batch}.parquet"
    atomic_write_parquet(out, frame)
    counts = (frame.filter(pl.col("status") == "ok").group_by("finding")
              .agg(pl.col("present").sum().alias("positive"), pl.len().alias("images"))
              .sort("finding"))
    return dg.MaterializeResult(
        metadata={"n_rows": frame.height,
                  "per_finding": dg.MetadataValue.md(counts.to_pandas().to_markdown(index=False)),
                  "n_missing_image": frame.filter(pl.col("status") == "missing_image").height,
                  "path": dg.MetadataValue.path(str(out))},
        data_version=dg.DataVersion(sha256_file(out)),
    )


def image_labels(s) -> pl.DataFrame:
    """Every ingested image with a 0/1 label per configured finding (union of batches)."""
    inv_paths = sorted(s.inventory_dir.glob("*.parquet"))
    if not inv_paths:
        raise FileNotFoundError(f"no inventory under {s.inventory_dir}")
    inv = pl.concat([pl.read_parquet(p) for p in inv_paths]).filter(pl.col("status") == "ok")
    fnd = pl.concat([pl.read_parquet(p) for p in sorted(s.findings_dir.glob("*.parquet"))],
                    how="diagonal_relaxed").filter(pl.col("status") == "ok")
    frame = inv.select("image_key", "patient_key", "batch")
    for finding in s.findings:
        pos = (fnd.filter((pl.col("finding") == finding) & pl.col("present"))
               .select("image_key").unique().with_columns(pl.lit(1).alias(f"y_{finding}")))
        frame = frame.join(pos, on="image_key", how="left").with_columns(
            pl.col(f"y_{finding}").fill_null(0).cast(pl.Int8))
    labelled = set(fnd["image_key"].to_list())
    return frame.with_columns(pl.col("image_key").is_in(list(labelled)).alias("labelled"))


@dg.asset(group_name=GROUP, code_version="1",
          deps=[dg.AssetDep(findings, partition_mapping=dg.AllPartitionMapping())],
          kinds={"polars"})
def cohort_splits(context: dg.AssetExecutionContext, xcam: XcamConfig) -> dg.MaterializeResult:
    """Patient-level train/val/test split of every labelled, ingested image."""
    s = xcam.settings()
    frame = image_labels(s)
    unlabelled = frame.filter(~pl.col("labelled")).height
    frame = frame.filter(pl.col("labelled")).drop("labelled")
    ycols = [f"y_{f}" for f in s.findings]
    frame = frame.with_columns(pl.max_horizontal(ycols).alias("stratum"))
    split = patient_split(frame, s.params["splits"]["val"], s.params["splits"]["test"], s.seed)
    split = split.drop("stratum").sort("image_key")
    atomic_write_parquet(s.splits_path, split)
    summary = (split.group_by("split").agg(pl.len().alias("images"),
                                           pl.col("patient_key").n_unique().alias("patients"),
                                           *[pl.col(c).sum().alias(c) for c in ycols])
               .sort("split"))
    if unlabelled:
        context.log.warning(f"{unlabelled} ingested image(s) have no label row and are left out")
    return dg.MaterializeResult(
        metadata={"summary": dg.MetadataValue.md(summary.to_pandas().to_markdown(index=False)),
                  "n_images": split.height, "unlabelled_left_out": unlabelled,
                  "path": dg.MetadataValue.path(str(s.splits_path))},
        data_version=dg.DataVersion(sha256_file(s.splits_path)),
    )
