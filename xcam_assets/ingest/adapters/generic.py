"""Generic formats: the canonical labels.csv and COCO object-detection JSON.

**Canonical CSV** (`labels.csv` of a batch; see `xcam_assets.ingest.labels` for every
rule): columns `file,finding,present,x_min,y_min,x_max,y_max,mask_file`, one row per
(image, finding, box); pixels of the stored image, x_max/y_max exclusive; `present`
0/1; `mask_file` a PNG relative to the batch folder. Any dataset can be brought in by
writing this file.

**COCO** (`instances*.json`): `images` (id, file_name, width, height), `categories`
(id, name), `annotations` (image_id, category_id, bbox `[x, y, w, h]`). Each image gets a
row per category (or per name in `findings`): present when it has an annotation of
that category, with the boxes `[x, y, x+w, y+h)` in the image's own pixels.
Segmentations and `iscrowd` are not used (boxes only).
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from xcam_assets.ingest.adapters import conform
from xcam_assets.ingest.labels import read_batch_labels


def read_canonical_csv(path: Path) -> pl.DataFrame:
    """The canonical labels.csv as adapter rows (strict reader; boxes in stored pixels)."""
    return conform(read_batch_labels(Path(path)))


def read_coco(path: Path, findings: tuple[str, ...] | None = None) -> pl.DataFrame:
    """Canonical rows from a COCO detection file (see the module docstring)."""
    doc = json.loads(Path(path).read_text())
    for key in ("images", "annotations", "categories"):
        if key not in doc:
            raise ValueError(f"{path}: not a COCO file (no {key!r})")
    names = {c["id"]: c["name"] for c in doc["categories"]}
    wanted = list(findings or sorted(set(names.values())))
    boxes: dict[tuple[int, str], list[dict[str, float]]] = {}
    for ann in doc["annotations"]:
        name = names.get(ann["category_id"])
        if name is None:
            raise ValueError(f"{path}: annotation {ann.get('id')} has unknown category "
                             f"{ann['category_id']}")
        x, y, w, h = (float(v) for v in ann["bbox"])
        boxes.setdefault((ann["image_id"], name), []).append(
            {"x_min": x, "y_min": y, "x_max": x + w, "y_max": y + h})
    rows = []
    for image in doc["images"]:
        for name in wanted:
            found = boxes.get((image["id"], name), [])
            rows.append({"file": image["file_name"], "finding": name, "present": bool(found),
                         "boxes": found})
    return conform(pl.DataFrame(rows))
