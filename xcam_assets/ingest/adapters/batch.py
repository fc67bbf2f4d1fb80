"""Adapter rows -> a batch's canonical `labels.csv` (+ SIIM masks as PNG).

Matching: an adapter row's `file` (the dataset's native name) names the batch file
with the same stem anywhere under the batch folder (`<ImageId>.dcm` matches
`study/series/<ImageId>.dcm`; NIH `00000001_000.png` matches `00000001_000.dcm`).
Rows of images not in the batch are left out and counted. Boxes drawn in another
pixel space (`coord_width/height`) are scaled to the stored image's Columns/Rows
(read from its header); RLE masks are decoded in their space, resized by nearest
neighbour and written to `masks/<stem>.png` (atomically, before labels.csv).

Hostile tables: a row whose name is not a safe relative path (absolute, `..`, a
backslash, a control character such as NUL) or whose box does not lie inside its
image after scaling is refused with a message naming it, before anything is
written. The only names written are `labels.csv` and `masks/<stem>.png` where
`<stem>` is the stem of a file **of the batch** (never text from the table), so
nothing can be written outside the batch folder.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import cv2
import numpy as np
import polars as pl

from xcam_assets.atomic import atomic_write_bytes
from xcam_assets.ingest.adapters.siim import union_mask
from xcam_assets.ingest.dicom import read_header
from xcam_assets.ingest.inventory import candidate_files
from xcam_assets.ingest.labels import path_problem, write_batch_labels


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
    unsafe = sorted({p for f in rows["file"].to_list()
                     if (p := ("file is empty" if not f else path_problem(f, "file")))})
    if unsafe:
        raise ValueError(f"label table rows with unsafe image names, nothing written to "
                         f"{batch_dir}: " + "; ".join(unsafe[:10])
                         + (f" (and {len(unsafe) - 10} more)" if len(unsafe) > 10 else ""))
    rows = rows.with_columns(
        pl.col("file").map_elements(lambda f: PurePosixPath(f).stem, return_dtype=pl.String)
        .alias("_stem"))
    matched = rows.filter(pl.col("_stem").is_in(list(by_stem)))
    sizes: dict[str, tuple[int, int]] = {}

    def size_of(path: Path, rel: str) -> tuple[int, int]:
        if rel not in sizes:
            header = read_header(path)
            sizes[rel] = (int(header["columns"] or 0), int(header["rows"] or 0))
        return sizes[rel]

    out: list[dict[str, Any]] = []
    masks: list[tuple[str, list[str], int, int, int, int]] = []
    outside: list[str] = []
    for row in matched.iter_rows(named=True):
        path = by_stem[row["_stem"]]
        rel = path.relative_to(batch_dir).as_posix()
        boxes = row["boxes"] or []
        mask_file = None
        if row["coord_width"] or row["mask_rle"] or boxes:
            cols, nrows = size_of(path, rel)
            cw = row["coord_width"] or cols
            ch = row["coord_height"] or nrows
            boxes = [_scale_box(b, cols / cw, nrows / ch) for b in boxes]
            for b in boxes:
                if not (0 <= b["x_min"] < b["x_max"] <= cols
                        and 0 <= b["y_min"] < b["y_max"] <= nrows):
                    outside.append(f"{row['file']} {row['finding']}: box x {b['x_min']:g}.."
                                   f"{b['x_max']:g}, y {b['y_min']:g}..{b['y_max']:g} does "
                                   f"not lie inside the {cols}x{nrows} image {rel}")
            if row["present"] and row["mask_rle"]:
                mask_file = f"masks/{row['_stem']}.png"  # the batch file's stem, not table text
                masks.append((mask_file, row["mask_rle"], int(cw), int(ch), cols, nrows))
        out.append({"file": rel, "finding": row["finding"], "present": bool(row["present"]),
                    "boxes": boxes, "mask_file": mask_file})
    if outside:
        raise ValueError(f"{len(outside)} box(es) outside their image, nothing written to "
                         f"{batch_dir}: " + "; ".join(outside[:10]))
    if not out:
        raise ValueError(f"no label row matches a file of {batch_dir}")
    for mask_file, rles, cw, ch, cols, nrows in masks:
        mask = union_mask(rles, cw, ch).astype(np.uint8) * 255
        if mask.shape != (nrows, cols):
            mask = cv2.resize(mask, (cols, nrows), interpolation=cv2.INTER_NEAREST)
        ok, png = cv2.imencode(".png", mask)
        if not ok:
            raise RuntimeError(f"PNG encoding of {mask_file} failed")
        atomic_write_bytes(batch_dir / mask_file, png.tobytes())
    write_batch_labels(out, batch_dir / "labels.csv")
    n_images = len({r["file"] for r in out})
    return {"rows": len(out), "images": n_images,
            "images_in_batch_without_labels": len(by_stem) - n_images,
            "label_images_not_in_batch": rows["_stem"].n_unique() - n_images}
