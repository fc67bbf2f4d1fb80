"""TBX11K: Pascal-VOC XML (original resolution) -> canonical rows.

Reuses `xcam_assets.ingest.importers.tbx11k_png` (the PNG -> DICOM importer): the same VOC
reading and box convention (1-based inclusive max -> 0-based exclusive max). Boxes
stay in the XML's `<size>` space (coord_width/height), so they scale to whatever
the stored image is. Every image gets a row for `finding` (present when it has >= 1
box of that class) and a present row for each other class that has boxes; a healthy
image (`h*`, no XML) is negative. Images are those under `images/*.png`.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from PIL import Image

from xcam_assets.ingest.adapters import conform
from xcam_assets.ingest.importers.tbx11k_png import DEFAULT_FINDING, parse_voc, voc_box_to_pixels


def read_tbx11k(source_dir: Path, finding: str = DEFAULT_FINDING) -> pl.DataFrame:
    """Canonical rows for every PNG of `source_dir/images` (files named `<stem>.png`)."""
    rows = []
    for png in sorted(Path(source_dir, "images").glob("*.png")):
        xml = Path(source_dir, "annotations", f"{png.stem}.xml")
        if xml.exists():
            voc = parse_voc(xml)
            size = (voc["width"], voc["height"])
            objects = voc["objects"]
        else:
            with Image.open(png) as im:
                size = (float(im.width), float(im.height))
            objects = []
        by_class: dict[str, list[dict[str, float]]] = {finding: []}
        for name, *box in objects:
            px = voc_box_to_pixels(tuple(box), size, (int(size[0]), int(size[1])))
            by_class.setdefault(name, []).extend([px] if px else [])
        named = {name for name, *_ in objects}
        for name, boxes in by_class.items():
            rows.append({"file": png.name, "finding": name, "present": name in named,
                         "boxes": boxes, "coord_width": size[0], "coord_height": size[1]})
    return conform(pl.DataFrame(rows, schema_overrides={"coord_width": pl.Float64,
                                                        "coord_height": pl.Float64}))
