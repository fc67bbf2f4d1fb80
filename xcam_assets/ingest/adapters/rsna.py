"""RSNA Pneumonia Detection: `stage_2_train_labels.csv` (or its .zip) -> canonical rows.

Columns `patientId,x,y,width,height,Target`: one row per box for `Target=1`, one
row without a box for `Target=0`. Despite the name, `patientId` identifies an
image (one image per patient in this dataset), so it is both `file`
(`<patientId>.dcm`) and `patient_id`. Boxes are in the 1024 x 1024 pixel space.
The finding is called `Pneumonia` by default (Kaggle's "Lung Opacity" class).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import polars as pl

from xcam_assets.ingest.adapters import conform, numeric_columns, xywh_boxes
from xcam_assets.ingest.labels import LabelError

RSNA_SIZE = 1024.0
DEFAULT_FINDING = "Pneumonia"


def read_rsna_table(path: Path) -> pl.DataFrame:
    """The raw table (a .zip holding one CSV is read in place)."""
    path = Path(path)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith(".csv")]
            if len(names) != 1:
                raise ValueError(f"{path}: expected one CSV inside, found {names}")
            data = zf.read(names[0])
        raw = pl.read_csv(io.BytesIO(data), infer_schema=False)
    else:
        raw = pl.read_csv(path, infer_schema=False)
    need = {"patientId", "x", "y", "width", "height", "Target"}
    if not need <= set(raw.columns):
        raise ValueError(f"{path}: not an RSNA pneumonia table (columns {raw.columns})")
    bad = [(i + 1, f"Target {t!r} must be 0 or 1") for i, t in enumerate(raw["Target"])
           if (t or "").strip() not in ("0", "1")]
    if bad:
        raise LabelError(path, bad)
    raw = numeric_columns(raw, ("x", "y", "width", "height"), path)
    return raw.with_columns(pl.col("Target").str.strip_chars().cast(pl.Int8))


def read_rsna(path: Path, finding: str = DEFAULT_FINDING) -> pl.DataFrame:
    """One canonical row per image: present = any Target 1, its boxes (x+w, y+h exclusive)."""
    raw = read_rsna_table(path)
    per = (raw.with_columns(pl.when(pl.col("Target") == 1)
                            .then(xywh_boxes("x", "y", "width", "height")).alias("box"))
           .group_by("patientId", maintain_order=True)
           .agg(pl.col("Target").max().alias("target"), pl.col("box").drop_nulls().alias("boxes")))
    bad = per.filter((pl.col("target") == 1) & (pl.col("boxes").list.len() == 0))
    if bad.height:
        raise ValueError(f"{path}: {bad.height} Target=1 image(s) without a box, "
                         f"e.g. {bad['patientId'][0]}")
    return conform(per.select(
        (pl.col("patientId") + ".dcm").alias("file"), pl.lit(finding).alias("finding"),
        (pl.col("target") == 1).alias("present"), pl.col("boxes"),
        pl.col("patientId").alias("patient_id"),
        pl.lit(RSNA_SIZE).alias("coord_width"), pl.lit(RSNA_SIZE).alias("coord_height")))
