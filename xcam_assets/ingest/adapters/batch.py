"""Adapter rows -> a batch's canonical `labels.csv` (+ SIIM masks as PNG).

Matching: an adapter row's `file` (the dataset's native name) names the batch file
with the same stem anywhere under the batch folder (`<ImageId>.dcm` matches
`study/series/<ImageId>.dcm`; NIH `00000001_000.png` matches `00000001_000.dcm`).
Rows of images not in the batch are left out and counted. Boxes drawn in another
pixel space (`coord_width/height`) are scaled to the stored image's Columns/Rows
(read from its header); RLE masks are decoded in their space, resized by nearest
neighbour and written to `masks/<stem>.png` (atomically, before labels.csv).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import polars as pl

from xcam_assets.hashing import atomic_write_bytes
from xcam_assets.ingest.adapters.siim import union_mask
from xcam_assets.ingest.dicom import read_header
from xcam_assets.ingest.inventory import candidate_files
from xcam_assets.ingest.labels import write_batch_labels


def _scale_box(box: dict[str, float], sx: float, sy: float) -> dict[str, float]:
    return {"x_min": round(box["x_min"] * sx, 3), "y_min": round(box["y_min"] * sy, 3),
            "x_max": round(box["x_max"] * sx, 3), "y_max": round(box["y_max"] * sy, 3)}


def write_batch_labels_for(rows: pl.DataFrame, batch_dir: Path) -> dict[str, Any]:
    """Write `batch_dir/labels.csv` for the batch's files; returns counts for the log."""
    batch_dir = Path(batch_dir)
    by_stem: dict[str, Path] = {}
    for p in candidate_files(batch_dir):
        if p.stem in by_stem:
            raise ValueError(f"two files with stem {p.stem!r} in {batch_dir}: "
                             f"{by_stem[p.stem]} and {p}")
        by_stem[p.stem] = p
    rows = rows.with_columns(
        pl.col("file").map_elements(lambda f: Path(f).stem, return_dtype=pl.String)
        .alias("_stem"))
    matched = rows.filter(pl.col("_stem").is_in(list(by_stem)))
    sizes: dict[str, tuple[int, int]] = {}
    out: list[dict[str, Any]] = []
    for row in matched.iter_rows(named=True):
        path = by_stem[row["_stem"]]
        rel = path.relative_to(batch_dir).as_posix()
        boxes = row["boxes"] or []
        mask_file = None
        if row["coord_width"] or row["mask_rle"]:
            if rel not in sizes:
                header = read_header(path)
                sizes[rel] = (int(header["columns"] or 0), int(header["rows"] or 0))
            cols, nrows = sizes[rel]
            cw = row["coord_width"] or cols
            ch = row["coord_height"] or nrows
            boxes = [_scale_box(b, cols / cw, nrows / ch) for b in boxes]
            if row["present"] and row["mask_rle"]:
                mask = union_mask(row["mask_rle"], int(cw), int(ch)).astype(np.uint8) * 255
                if mask.shape != (nrows, cols):
                    mask = cv2.resize(mask, (cols, nrows), interpolation=cv2.INTER_NEAREST)
                mask_file = f"masks/{row['_stem']}.png"
                ok, png = cv2.imencode(".png", mask)
                if not ok:
                    raise RuntimeError(f"PNG encoding of {mask_file} failed")
                atomic_write_bytes(batch_dir / mask_file, png.tobytes())
        out.append({"file": rel, "finding": row["finding"], "present": bool(row["present"]),
                    "boxes": boxes, "mask_file": mask_file})
    if not out:
        raise ValueError(f"no label row matches a file of {batch_dir}")
    write_batch_labels(out, batch_dir / "labels.csv")
    n_images = len({r["file"] for r in out})
    return {"rows": len(out), "images": n_images,
            "images_in_batch_without_labels": len(by_stem) - n_images,
            "label_images_not_in_batch": rows["_stem"].n_unique() - n_images}
