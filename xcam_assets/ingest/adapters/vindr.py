"""VinDr-CXR (Kaggle `train.csv`): three radiologists' boxes -> one row per image and finding.

Each image was read independently by 3 of 17 radiologists (`rad_id`); a reader
writes one row per box of a finding, or a single `No finding` row. Merge rule
(decided here, parameters `min_votes`, `iou`):

1. **Presence**: a finding is present when at least `min_votes` distinct readers
   of the image marked it (default 2 = majority of 3; 1 = the union of readers;
   capped at the image's number of readers).
2. **Location**, for a present finding: all readers' boxes of that finding are
   clustered by single linkage at IoU >= `iou` (default 0.4); each cluster becomes
   the coordinate-wise mean of its boxes; clusters marked by >= `min_votes`
   distinct readers are kept. When the readers agree a finding is there but no
   cluster reaches the bar (they boxed different places), every cluster is kept:
   the finding is agreed, its place is not, and dropping all boxes would lose it.
3. `No finding` is not a finding; a finding below the bar is absent (present=0).

Coordinates are pixels of the original DICOM (no rescaling: coord_* null).
VinDr has no patient ids; `file` is `<image_id>.dicom`, the dataset's file name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from xcam_assets.ingest.adapters import conform, numeric_columns

NO_FINDING = "No finding"


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def fuse_boxes(boxes: np.ndarray, readers: list[str], min_votes: int,
               iou: float) -> list[dict[str, float]]:
    """Merged boxes of one (image, finding): see the module docstring, rule 2."""
    n = len(boxes)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if _iou(boxes[i], boxes[j]) >= iou:
                parent[find(i)] = find(j)
    clusters: dict[int, list[int]] = {}
    for i in range(n):
        clusters.setdefault(find(i), []).append(i)
    fused = []
    for members in sorted(clusters.values()):
        mean = boxes[members].mean(axis=0)
        votes = len({readers[i] for i in members})
        fused.append((votes, {k: round(float(v), 3) for k, v in
                              zip(("x_min", "y_min", "x_max", "y_max"), mean, strict=True)}))
    agreed = [b for v, b in fused if v >= min_votes]
    return agreed or [b for _, b in fused]


def read_vindr_table(path: Path) -> pl.DataFrame:
    raw = pl.read_csv(path, infer_schema=False)
    need = {"image_id", "class_name", "rad_id", "x_min", "y_min", "x_max", "y_max"}
    if not need <= set(raw.columns):
        raise ValueError(f"{path}: not a VinDr-CXR table (columns {raw.columns})")
    return numeric_columns(raw, ("x_min", "y_min", "x_max", "y_max"), path)


def read_vindr(path: Path, min_votes: int = 2, iou: float = 0.4,
               findings: tuple[str, ...] | None = None) -> pl.DataFrame:
    """One canonical row per image x finding (all classes but `No finding` by default)."""
    raw = read_vindr_table(path)
    classes = findings or tuple(sorted(c for c in raw["class_name"].unique().to_list()
                                       if c != NO_FINDING))
    readers = raw.group_by("image_id").agg(pl.col("rad_id").n_unique().alias("n_readers"))
    marks = raw.filter(pl.col("class_name") != NO_FINDING)
    votes = (marks.group_by("image_id", "class_name")
             .agg(pl.col("rad_id").n_unique().alias("votes"),
                  pl.col("rad_id"), pl.concat_arr("x_min", "y_min", "x_max", "y_max")
                  .alias("coords"))
             .join(readers, on="image_id")
             .filter(pl.col("votes") >= pl.min_horizontal(pl.lit(min_votes),
                                                          pl.col("n_readers"))))
    box_rows = []
    for image_id, name, rads, coords, n_readers in votes.select(
            "image_id", "class_name", "rad_id", "coords", "n_readers").iter_rows():
        arr = np.asarray([c for c in coords if c is not None and None not in c], dtype=float)
        keep = [r for r, c in zip(rads, coords, strict=True) if c is not None and None not in c]
        boxes = fuse_boxes(arr, keep, min(min_votes, n_readers), iou) if len(arr) else []
        box_rows.append({"image_id": image_id, "finding": name, "present": True,
                         "boxes": boxes})
    present = pl.DataFrame(box_rows, schema={
        "image_id": pl.String, "finding": pl.String, "present": pl.Boolean,
        "boxes": pl.List(pl.Struct({k: pl.Float64 for k in
                                    ("x_min", "y_min", "x_max", "y_max")}))})
    grid = readers.select("image_id").join(pl.DataFrame({"finding": list(classes)}),
                                           how="cross")
    rows = (grid.join(present, on=["image_id", "finding"], how="left")
            .with_columns(pl.col("present").fill_null(False),
                          (pl.col("image_id") + ".dicom").alias("file")))
    return conform(rows)
