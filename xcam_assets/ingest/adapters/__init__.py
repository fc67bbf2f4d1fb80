"""Dataset adapters: each public dataset's label table -> canonical findings rows.

Every adapter returns a polars frame with `ADAPTER_SCHEMA`: the canonical label
columns of `xcam_assets.ingest.labels` (`file`, `finding`, `present`, `boxes`,
`mask_file`; one row per (image, finding)) plus

* `patient_id`: the dataset's own patient identifier when it has one (NIH), else
  null; it stays in this in-memory frame (the DICOM header is what ingest reads);
* `coord_width`, `coord_height`: the pixel space the boxes/masks are drawn in
  (1024 x 1024 for SIIM, NIH, RSNA; the XML `<size>` for TBX11K; null when they
  are pixels of the stored image already, as for VinDr-CXR and the canonical CSV);
* `mask_rle`: SIIM's run-length masks (one string per annotated region), else empty.

Boxes are 0-based pixels with exclusive max (`x_max = x + w`). A malformed row of a
table (a coordinate that is not a finite number, a bad RLE string) makes the adapter
raise `LabelError` naming the table and every bad row (data rows counted from 1, the
header is row 0): an import writes nothing until the table is fixed. `file` is the
dataset's native image name (`<ImageId>.dcm`, `00000001_000.png`, ...):
`batch.write_batch_labels_for` matches it to the files of a batch folder by stem,
scales boxes to each stored image, renders masks and writes `labels.csv`.

| adapter | reads | finding(s) |
| --- | --- | --- |
| `siim.read_siim` | train-rle.csv (`ImageId`, `" EncodedPixels"`) | Pneumothorax (mask) |
| `nih.read_nih` | Data_Entry_2017*.csv + BBox_List_2017.csv | 14 labels (+ 984 boxes) |
| `rsna.read_rsna` | stage_2_train_labels.csv(.zip) | Pneumonia (boxes) |
| `vindr.read_vindr` | train.csv (3 radiologists) | 14 classes, merged votes/boxes |
| `tbx11k.read_tbx11k` | annotations/*.xml (VOC) | ActiveTuberculosis, ObsoletePulmonaryTuberculosis |
| `generic.read_canonical_csv` | labels.csv (canonical) | any |
| `generic.read_coco` | COCO instances JSON | categories |
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from xcam_assets.ingest.labels import BOX_DTYPE, LabelError

ADAPTER_SCHEMA: dict[str, pl.DataType] = {
    "file": pl.String(), "finding": pl.String(), "present": pl.Boolean(),
    "boxes": pl.List(BOX_DTYPE), "mask_file": pl.String(), "patient_id": pl.String(),
    "coord_width": pl.Float64(), "coord_height": pl.Float64(), "mask_rle": pl.List(pl.String()),
}
"""Columns every adapter returns, in this order."""


def conform(frame: pl.DataFrame) -> pl.DataFrame:
    """Add missing adapter columns as nulls / empty lists, cast, order, sort by (file, finding)."""
    for name, dtype in ADAPTER_SCHEMA.items():
        if name not in frame.columns:
            default = [] if name in ("boxes", "mask_rle") else None
            frame = frame.with_columns(pl.lit(default, dtype=dtype).alias(name))
    frame = frame.select([pl.col(n).cast(t) for n, t in ADAPTER_SCHEMA.items()])
    return frame.with_columns(pl.col("boxes").fill_null([]), pl.col("mask_rle").fill_null([])
                              ).sort("file", "finding")


def xywh_boxes(x: str, y: str, w: str, h: str) -> pl.Expr:
    """A canonical box struct from x, y, width, height columns (exclusive max)."""
    return pl.struct(x_min=pl.col(x), y_min=pl.col(y), x_max=pl.col(x) + pl.col(w),
                     y_max=pl.col(y) + pl.col(h))


def numeric_columns(raw: pl.DataFrame, columns: list[str] | tuple[str, ...],
                    path: str | Path) -> pl.DataFrame:
    """`raw` with `columns` cast to Float64 (empty cells null); raises LabelError naming
    the table and each row whose value is not a finite number (polars' own cast error
    names neither)."""
    errors: list[tuple[int, str]] = []
    out = raw
    for c in columns:
        text = raw[c].cast(pl.String).str.strip_chars()
        values = text.cast(pl.Float64, strict=False)
        bad = (text.is_not_null() & (text != "")) & (values.is_null() | ~values.is_finite())
        errors += [(i + 1, f"{c} {v!r} is not a finite number")
                   for i, v in zip(bad.arg_true().to_list(), text.filter(bad).to_list(),
                                   strict=True)]
        out = out.with_columns(values.alias(c))
    if errors:
        raise LabelError(path, sorted(errors))
    return out
