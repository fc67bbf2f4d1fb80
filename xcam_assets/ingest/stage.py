"""The ingest stage's runs, without Dagster: copy an arrival batch into the immutable raw
store, inventory it, reconcile its labels with its images, split the cohort by patient."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from xcam_assets.atomic import atomic_path, atomic_write_parquet, exclusive_lock
from xcam_assets.config import Settings
from xcam_assets.hashing import combine_hashes, dvc_tree_md5, md5_file, sha256_file
from xcam_assets.ingest.batch_meta import external_batches, read_batch_meta
from xcam_assets.ingest.cohorts import balanced_subset, patient_split
from xcam_assets.ingest.deid import pseudonym_key
from xcam_assets.ingest.inventory import IngestPolicy, KnownImages, inventory_rows
from xcam_assets.ingest.labels import BOX_DTYPE, screen_batch_labels


def _file_listing(root) -> list[tuple[str, str]]:
    return sorted((p.relative_to(root).as_posix(), sha256_file(p))
                  for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


@dataclass
class CopyOutcome:
    """What `copy_batch` did: counts, and the files it would not copy (with why)."""

    copied: int = 0
    unchanged: int = 0
    conflicts: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    listing: list[tuple[str, str]] = field(default_factory=list)


def copy_batch(src: Path, dst: Path, batch: str) -> CopyOutcome:
    """Copy the batch's files into the immutable store `dst`. A file already there is
    never altered: a same-named file with other content is reported, not copied. A
    symbolic link is never followed (reported, not copied)."""
    if not src.is_dir() and not dst.is_dir():
        raise FileNotFoundError(f"batch {batch!r}: neither {src} nor {dst} exists")
    copied, unchanged, conflicts, links = 0, 0, [], []
    if src.is_dir():
        for path, linked in _batch_files(src):
            rel = path.relative_to(src)
            if linked:
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
    return CopyOutcome(copied, unchanged, conflicts, links, _file_listing(dst))


def _batch_files(src: Path) -> list[tuple[Path, bool]]:
    """The files of an arrival batch that `copy_batch` considers (dot-named files such as
    `.complete` left out), each with whether a symbolic link is on its path."""
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [(path, any((src / Path(*rel.parts[:i])).is_symlink()
                       for i in range(1, len(rel.parts) + 1)))
            for path in files for rel in [path.relative_to(src)]]


#: metadata of a `raw_dicoms` materialization: the arrival batch it copied, by content
#: (`incoming_version`) and by name, size and mtime (`incoming_stat`, cheap to compare)
INCOMING_VERSION_KEY = "incoming_version"
INCOMING_STAT_KEY = "incoming_stat"


def incoming_stat(src: Path) -> str:
    """A digest of the batch's file names, sizes and modification times: equal means
    unchanged without reading a byte ("" when the folder is absent)."""
    if not src.is_dir():
        return ""
    rows = []
    for path, linked in _batch_files(src):
        st = path.lstat()
        rows.append((path.relative_to(src).as_posix(),
                     f"{st.st_size}:{st.st_mtime_ns}:{'link' if linked else 'file'}"))
    return combine_hashes(rows)


def incoming_version(src: Path) -> str:
    """The content version of an arrival batch: the DVC-style md5 manifest hash of the
    files `copy_batch` copies (a linked path counts by name only; "" when absent)."""
    if not src.is_dir():
        return ""
    return dvc_tree_md5({"relpath": path.relative_to(src).as_posix(),
                         "md5": "symlink" if linked else md5_file(path)}
                        for path, linked in _batch_files(src))


def ingest_policy(settings) -> IngestPolicy:
    """The cohort's admission rules from resources/params.yaml (`cohort:`)."""
    return IngestPolicy.from_params(settings.params["cohort"])


def inventory_batch(settings: Settings, batch: str,
                    log: Callable[[str], None] = print) -> tuple[pl.DataFrame, float]:
    """The batch's inventory (written to `inventory/<batch>.parquet`) and the seconds its
    files took. Two batches' inventories never run at once (a file lock under
    $DAGSTER_HOME/locks), so a file in both is admitted once, never twice."""
    out = settings.inventory_dir / f"{batch}.parquet"
    home = Path(os.environ.get("DAGSTER_HOME", settings.root / "dagster_home"))
    with exclusive_lock(home / "locks" / "inventory.flock") as waited:
        if waited > 1:
            log(f"waited {waited:.1f}s for another batch's inventory")
        others = [pl.read_parquet(p, columns=["image_key", "batch", "file", "sha256", "status"])
                  for p in sorted(settings.inventory_dir.glob("*.parquet")) if p.stem != batch]
        started = time.perf_counter()
        frame = inventory_rows(settings.raw_dir / batch, batch, pseudonym_key(settings.root),
                               ingest_policy(settings), known=KnownImages.from_inventories(others))
        seconds = time.perf_counter() - started
        atomic_write_parquet(out, frame)
    return frame, seconds


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


def batch_findings(settings: Settings, batch: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The batch's canonical label rows reconciled with its inventory (written to
    `findings/<batch>.parquet`), and the rejected label rows."""
    labels_path = settings.raw_dir / batch / "labels.csv"
    if not labels_path.exists():
        raise FileNotFoundError(f"batch {batch!r} has no labels.csv at {labels_path}")
    name = f"{batch}/labels.csv"
    labels, rejected = screen_batch_labels(labels_path, name)
    inv = pl.read_parquet(settings.inventory_dir / f"{batch}.parquet",
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
    out = settings.findings_dir / f"{batch}.parquet"
    atomic_write_parquet(out, frame)
    return frame, bad


def union_inventory(settings: Settings) -> pl.DataFrame:
    """The inventory of every batch (one parquet per batch partition), concatenated."""
    inv_paths = sorted(settings.inventory_dir.glob("*.parquet"))
    if not inv_paths:
        raise FileNotFoundError(f"no inventory under {settings.inventory_dir}")
    return pl.concat([pl.read_parquet(p) for p in inv_paths], how="diagonal_relaxed")


def image_labels(settings: Settings) -> tuple[pl.DataFrame, dict[str, list[str]]]:
    """Every ingested image with a 0/1 label per configured finding (union of batches),
    and per finding the image keys that have **no** label row for it: an
    absent label is unknown, not negative. `labelled`: a label row for any finding."""
    inv = union_inventory(settings).filter(pl.col("status") == "ok")
    fnd = pl.concat([pl.read_parquet(p) for p in sorted(settings.findings_dir.glob("*.parquet"))],
                    how="diagonal_relaxed").filter(pl.col("status") == "ok")
    frame = inv.select("image_key", "patient_key", "batch", "file")
    missing: dict[str, list[str]] = {}
    for finding in settings.findings:
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


def split_cohort(settings: Settings, log: Callable[[str], None] = print
                 ) -> tuple[pl.DataFrame, dict[str, list[str]], int]:
    """The patient-level split of every labelled, ingested image (written to the splits
    parquet), the images without a label per finding, and how many had no label row."""
    frame, missing = image_labels(settings)
    external = external_batches(settings.raw_dir, frame["batch"].unique().sort().to_list())
    if external:  # data of another site: scored by the frozen models, never split
        log(f"external batch(es) {external} left out of the split (external_cohort)")
        frame = frame.filter(~pl.col("batch").is_in(external))
    unlabelled = frame.filter(~pl.col("labelled")).height
    in_split = set(frame.filter(pl.col("labelled"))["image_key"].to_list())
    missing = {f: [k for k in keys if k in in_split] for f, keys in missing.items()}
    frame = frame.filter(pl.col("labelled")).drop("labelled")
    ycols = [f"y_{f}" for f in settings.findings]
    sp = settings.params["splits"]
    if sp.get("balanced"):
        before = frame.height
        frame = balanced_subset(frame, ycols[0], settings.seed, sp.get("max_images"))
        log(f"balanced subset on {ycols[0]}: {frame.height} of {before} images")
    split = patient_split(frame, sp["val"], sp["test"], settings.seed, ycols=ycols)
    split = split.drop("file").sort("image_key")
    atomic_write_parquet(settings.splits_path, split)
    return split, missing, unlabelled


def external_cohort(settings: Settings) -> pl.DataFrame:
    """The labelled images of the batches declared external (`batch.yaml`, role external),
    with their site, written to `external/external_cohort.parquet`: what the frozen
    checkpoints score on their own (`external_scores`)."""
    frame, _ = image_labels(settings)
    batches = frame["batch"].unique().sort().to_list()
    external = external_batches(settings.raw_dir, batches)
    sites = {b: read_batch_meta(settings.raw_dir / b).site for b in external}
    out = (frame.filter(pl.col("batch").is_in(external) & pl.col("labelled"))
           .drop("labelled", "file")
           .with_columns(pl.col("batch").replace_strict(sites, default="",
                                                        return_dtype=pl.String).alias("site"))
           .sort("image_key"))
    atomic_write_parquet(settings.external_path, out)
    return out
