"""Ingest stage: arrival batch -> immutable raw copy -> inventory -> findings -> splits."""

import os
import shutil
import time
from pathlib import Path

import dagster as dg
import polars as pl

from xcam_assets.hashing import (
    atomic_path,
    atomic_write_parquet,
    dvc_data_version,
    exclusive_lock,
    sha256_file,
)
from xcam_assets.ingest.cohorts import balanced_subset, patient_split, split_summary
from xcam_assets.ingest.deid import pseudonym_key
from xcam_assets.ingest.inventory import IngestPolicy, KnownImages, inventory_rows
from xcam_assets.ingest.labels import BOX_DTYPE, screen_batch_labels
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
    file with other content is reported, not copied. A symbolic link is never
    followed (reported, not copied): an upload must not pull files from elsewhere on
    the machine (a key, another site's data) into the store and its DVC remote."""
    s = xcam.settings()
    batch = context.partition_key
    src, dst = s.incoming_dir / batch, s.raw_dir / batch
    if not src.is_dir() and not dst.is_dir():
        raise dg.Failure(f"batch {batch!r}: neither {src} nor {dst} exists")
    copied, unchanged, conflicts, links = 0, 0, [], []
    if src.is_dir():
        for path in sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith(".")):
            rel = path.relative_to(src)
            if any((src / Path(*rel.parts[:i])).is_symlink() for i in range(1, len(rel.parts) + 1)):
                links.append(rel.as_posix())
                continue
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
    if links:
        context.log.warning(f"{len(links)} symbolic link(s) in the batch were not followed "
                            f"or copied: {links[:5]}")
    return dg.MaterializeResult(
        metadata={"n_files": len(listing), "copied": copied, "unchanged": unchanged,
                  "conflicts": conflicts, "symlinks_not_copied": links,
                  "path": dg.MetadataValue.path(str(dst)),
                  "bytes": sum((dst / f).stat().st_size for f, _ in listing)},
        data_version=dg.DataVersion(dvc_data_version(dst)),
    )


def ingest_policy(s) -> IngestPolicy:
    """The cohort's admission rules from resources/params.yaml (`cohort:`)."""
    return IngestPolicy.from_params(s.params["cohort"])


@dg.asset(partitions_def=batch_partitions, group_name=GROUP, code_version="2",
          deps=[raw_dicoms], kinds={"polars"}, pool="ingest")
def dicom_inventory(context: dg.AssetExecutionContext, xcam: XcamConfig) -> dg.MaterializeResult:
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
    home = Path(os.environ.get("DAGSTER_HOME", s.root / "dagster_home"))
    with exclusive_lock(home / "locks" / "inventory.flock") as waited:
        if waited > 1:
            context.log.info(f"waited {waited:.1f}s for another batch's inventory")
        others = [pl.read_parquet(p, columns=["image_key", "batch", "file", "sha256", "status"])
                  for p in sorted(s.inventory_dir.glob("*.parquet")) if p.stem != batch]
        started = time.perf_counter()
        frame = inventory_rows(s.raw_dir / batch, batch, pseudonym_key(s.root),
                               ingest_policy(s), known=KnownImages.from_inventories(others))
        seconds = time.perf_counter() - started
        atomic_write_parquet(out, frame)
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


FINDINGS_SCHEMA: dict[str, pl.DataType] = {
    "file": pl.String(), "finding": pl.String(), "present": pl.Boolean(),
    "boxes": pl.List(BOX_DTYPE), "mask_file": pl.String(), "label_rows": pl.List(pl.Int64()),
    "image_key": pl.String(), "status": pl.String(), "reason": pl.String(),
    "batch": pl.String(),
}
"""Columns of data/findings/<batch>.parquet: one row per (file, finding) of labels.csv,
plus one per rejected label row. `label_rows`: the labels.csv data rows behind it."""


def _outside_boxes(labels: pl.DataFrame, sizes: dict[str, tuple[int, int]],
                   name: str) -> tuple[pl.DataFrame, list[dict]]:
    """Labels without the boxes that do not lie inside their (ingested) image, and one
    rejected-row record per such box, naming its row."""
    kept, rejected = [], []
    for row in labels.iter_rows(named=True):
        w, h = sizes.get(row["file"], (None, None))
        boxes, box_rows = [], []
        for box, n in zip(row["boxes"], row["box_rows"], strict=True):
            if w is not None and h is not None and (box["x_max"] > w or box["y_max"] > h):
                rejected.append({
                    "label_row": n, "file": row["file"], "finding": row["finding"],
                    "reason": (f"{name}: row {n}: box x {box['x_min']:g}..{box['x_max']:g}, "
                               f"y {box['y_min']:g}..{box['y_max']:g} lies outside the "
                               f"{w}x{h} image (x_max <= columns, y_max <= rows)")})
            else:
                boxes.append(box)
                box_rows.append(n)
        dropped = set(row["box_rows"]) - set(box_rows)  # a box row holds one box: it is out
        rows = [n for n in row["label_rows"] if n not in dropped]
        if rows:  # else every row of this (file, finding) was rejected
            kept.append({**row, "boxes": boxes, "box_rows": box_rows, "label_rows": rows})
    return pl.DataFrame(kept, schema=labels.schema), rejected


@dg.asset(partitions_def=batch_partitions, group_name=GROUP, code_version="2",
          deps=[dicom_inventory], kinds={"polars"})
def findings(context: dg.AssetExecutionContext, xcam: XcamConfig) -> dg.MaterializeResult:
    """Canonical labels of the batch: image_key, finding, present, boxes, mask file.

    `status` says whether the labelled file is an ingested image (`ok`), a
    quarantined one, missing from the batch, or whether the label row itself was
    rejected (`rejected_label`: malformed values, an unsafe path, a box outside its
    image, a contradiction; `reason` names the row). The blocking check
    `labels_match_images` fails on missing images and rejected rows, naming each;
    good rows are kept, so every problem of the file shows at once."""
    s = xcam.settings()
    batch = context.partition_key
    labels_path = s.raw_dir / batch / "labels.csv"
    if not labels_path.exists():
        raise dg.Failure(f"batch {batch!r} has no labels.csv at {labels_path}")
    name = f"{batch}/labels.csv"
    labels, rejected = screen_batch_labels(labels_path, name)
    inv = pl.read_parquet(s.inventory_dir / f"{batch}.parquet",
                          columns=["file", "image_key", "status", "rows", "columns"])
    sizes = {f: (c, r) for f, st, r, c in inv.select("file", "status", "rows", "columns")
             .iter_rows() if st == "ok" and r is not None and c is not None}
    labels, outside = _outside_boxes(labels, sizes, name)
    bad = pl.concat([rejected, pl.DataFrame(outside, schema=rejected.schema)])
    good = (labels.join(inv.select("file", "image_key", pl.col("status").alias("image_status")),
                        on="file", how="left")
            .with_columns(
                pl.when(pl.col("image_status").is_null()).then(pl.lit("missing_image"))
                .when(pl.col("image_status") == "quarantined").then(pl.lit("quarantined_image"))
                .otherwise(pl.lit("ok")).alias("status"),
                pl.when(pl.col("image_status").is_null()).then(pl.concat_str(
                    pl.lit(f"{name}: "),
                    pl.when(pl.col("label_rows").list.len() > 1).then(pl.lit("rows "))
                    .otherwise(pl.lit("row ")),
                    pl.col("label_rows").cast(pl.List(pl.String)).list.join(", "),
                    pl.lit(": names "), pl.col("file"),
                    pl.lit(f", which is not a file of batch {batch}")))
                .alias("reason")))
    bad_rows = bad.select(
        "file", "finding", pl.lit(None, pl.Boolean).alias("present"),
        pl.lit([], pl.List(BOX_DTYPE)).alias("boxes"), pl.lit(None, pl.String).alias("mask_file"),
        pl.concat_list("label_row").alias("label_rows"), pl.lit(None, pl.String).alias("image_key"),
        pl.lit("rejected_label").alias("status"), "reason")
    frame = (pl.concat([good.select([c for c in FINDINGS_SCHEMA if c != "batch"]), bad_rows])
             .with_columns(pl.lit(batch).alias("batch"))
             .sort("file", "finding", pl.col("label_rows").list.first())
             .select([pl.col(c).cast(t) for c, t in FINDINGS_SCHEMA.items()]))
    out = s.findings_dir / f"{batch}.parquet"
    atomic_write_parquet(out, frame)
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


def union_inventory(s) -> pl.DataFrame:
    """The inventory of every batch (one parquet per batch partition), concatenated."""
    inv_paths = sorted(s.inventory_dir.glob("*.parquet"))
    if not inv_paths:
        raise FileNotFoundError(f"no inventory under {s.inventory_dir}")
    return pl.concat([pl.read_parquet(p) for p in inv_paths], how="diagonal_relaxed")


def image_labels(s) -> tuple[pl.DataFrame, dict[str, list[str]]]:
    """Every ingested image with a 0/1 label per configured finding (union of batches),
    and per finding the image keys that have **no** label row for it: an
    absent label is unknown, not negative. `labelled`: a label row for any finding."""
    inv = union_inventory(s).filter(pl.col("status") == "ok")
    fnd = pl.concat([pl.read_parquet(p) for p in sorted(s.findings_dir.glob("*.parquet"))],
                    how="diagonal_relaxed").filter(pl.col("status") == "ok")
    frame = inv.select("image_key", "patient_key", "batch", "file")
    missing: dict[str, list[str]] = {}
    for finding in s.findings:
        rows = fnd.filter(pl.col("finding") == finding)
        pos = (rows.filter(pl.col("present")).select("image_key").unique()
               .with_columns(pl.lit(1).alias(f"y_{finding}")))
        frame = frame.join(pos, on="image_key", how="left").with_columns(
            pl.col(f"y_{finding}").fill_null(0).cast(pl.Int8))
        has = set(rows["image_key"].to_list())
        missing[finding] = [k for k in frame["image_key"].to_list() if k not in has]
    labelled = set(fnd["image_key"].to_list())
    frame = frame.with_columns(pl.col("image_key").is_in(list(labelled)).alias("labelled"))
    return frame, missing


@dg.asset(group_name=GROUP, code_version="2",
          deps=[dg.AssetDep(findings, partition_mapping=dg.AllPartitionMapping())],
          kinds={"polars"})
def cohort_splits(context: dg.AssetExecutionContext, xcam: XcamConfig) -> dg.MaterializeResult:
    """Patient-level train/val/test split of every labelled, ingested image, stratified
    by finding and seeded; optionally a balanced subset first (`splits.balanced`)."""
    s = xcam.settings()
    frame, missing = image_labels(s)
    unlabelled = frame.filter(~pl.col("labelled")).height
    in_split = set(frame.filter(pl.col("labelled"))["image_key"].to_list())
    missing = {f: [k for k in keys if k in in_split] for f, keys in missing.items()}
    frame = frame.filter(pl.col("labelled")).drop("labelled")
    ycols = [f"y_{f}" for f in s.findings]
    sp = s.params["splits"]
    if sp.get("balanced"):
        before = frame.height
        frame = balanced_subset(frame, ycols[0], s.seed, sp.get("max_images"))
        context.log.info(f"balanced subset on {ycols[0]}: {frame.height} of {before} images")
    split = patient_split(frame, sp["val"], sp["test"], s.seed, ycols=ycols)
    split = split.drop("file").sort("image_key")
    atomic_write_parquet(s.splits_path, split)
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
