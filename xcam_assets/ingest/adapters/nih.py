"""NIH ChestX-ray14: `Data_Entry_2017*.csv` (+ `BBox_List_2017.csv`) -> canonical rows.

One row per (image, finding) for each of the 14 findings: present when the
finding is in the image's `|`-separated `Finding Labels` ("No Finding" is no
finding). Boxes come from BBox_List (`Bbox [x,y,w,h]` in the 1024 x 1024 space of
the released images; the header spreads them over unnamed columns), whose label
`Infiltrate` is Data_Entry's `Infiltration`. A boxed finding is always one of the
image's labels in the v2020 table (checked in the tests). `patient_id` is the
table's `Patient ID` (several images per patient: split by it).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from xcam_assets.ingest.adapters import conform, numeric_columns

NIH_FINDINGS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
)
BBOX_ALIASES = {"Infiltrate": "Infiltration"}
ABNORMAL = "Abnormal"
"""The derived finding `read_nih(..., abnormal=True)` adds: any finding vs "No Finding"."""
NIH_SIZE = 1024.0


def read_bbox_list(path: Path) -> pl.DataFrame:
    """BBox_List as (file, finding, boxes) with one list of boxes per (image, finding)."""
    raw = pl.read_csv(path, infer_schema=False)
    cols = raw.columns
    if cols[0] != "Image Index" or cols[1] != "Finding Label" or len(cols) < 6:
        raise ValueError(f"{path}: not a ChestX-ray14 BBox_List table (columns {cols})")
    raw = numeric_columns(raw, cols[2:6], path)
    xywh = [pl.col(c) for c in cols[2:6]]
    return (raw.select(pl.col(cols[0]).alias("file"),
                       pl.col(cols[1]).replace(BBOX_ALIASES).alias("finding"),
                       pl.struct(x_min=xywh[0], y_min=xywh[1], x_max=xywh[0] + xywh[2],
                                 y_max=xywh[1] + xywh[3]).alias("box"))
            .group_by("file", "finding", maintain_order=True)
            .agg(pl.col("box").alias("boxes")))


def read_nih(data_entry: Path, bbox_list: Path | None = None,
             findings: tuple[str, ...] = NIH_FINDINGS, abnormal: bool = False) -> pl.DataFrame:
    """Canonical rows for every image x finding of Data_Entry (boxes when given).

    `abnormal=True` adds one more finding per image, `Abnormal`: present when the image has
    any finding ("No Finding" absent), without boxes (the normal-vs-abnormal task)."""
    raw = pl.read_csv(data_entry, infer_schema=False)
    need = {"Image Index", "Finding Labels", "Patient ID"}
    if not need <= set(raw.columns):
        raise ValueError(f"{data_entry}: not a ChestX-ray14 Data_Entry table "
                         f"(missing {sorted(need - set(raw.columns))})")
    images = raw.select(pl.col("Image Index").alias("file"),
                        pl.col("Finding Labels").str.split("|").alias("labels"),
                        pl.col("Patient ID").alias("patient_id"))
    rows = (images.join(pl.DataFrame({"finding": list(findings)}), how="cross")
            .with_columns(pl.col("labels").list.contains(pl.col("finding")).alias("present"))
            .drop("labels"))
    if abnormal:
        flags = images.select("file", "patient_id", pl.lit(ABNORMAL).alias("finding"),
                              (~pl.col("labels").list.contains("No Finding")).alias("present"))
        rows = pl.concat([rows, flags.select(rows.columns)])
    if bbox_list is not None:
        rows = rows.join(read_bbox_list(bbox_list), on=["file", "finding"], how="left")
    return conform(rows.with_columns(pl.lit(NIH_SIZE).alias("coord_width"),
                                     pl.lit(NIH_SIZE).alias("coord_height")))
