"""Bring TBX11K (8-bit PNG + Pascal VOC boxes) into the DICOM lineage as an arrival batch.

The platform ingests DICOM only, so each PNG becomes a Secondary Capture DICOM
whose pixels are the PNG's, byte for byte, and whose header says where it came
from (source name + sha256), and the radiologists' VOC boxes become the
canonical `labels.csv` (see `xcam_assets.ingest.labels`).

Decisions callers must know:

* **One patient per image.** TBX11K publishes no patient ids, so each image
  gets `PatientID = TBX11K-<stem>` (and its own study and series). Patient-level
  splits therefore cannot guard against the same person appearing in two
  splits: leakage across TBX11K images is possible and cannot be ruled out.
* **Box geometry.** VOC boxes are 1-based with inclusive max in the original
  resolution given by `<size>`. Pixel i covers [i, i+1), so the 0-based box
  with exclusive max is `[xmin - 1, xmax) x [ymin - 1, ymax)`; its edges are then
  scaled by `png_width / xml_width` (x) and `png_height / xml_height` (y), clipped
  to the image, and rounded to 1/1000 pixel.
* **Labels.** `finding` (default ActiveTuberculosis) is present when the XML
  has >= 1 box of that class, else a present=0 row is written. Boxes of every
  other class (ObsoletePulmonaryTuberculosis) are kept as present=1 rows of a
  finding with that class name, so no radiologist label is lost.
* **Skips.** An image is left out (with a message in `problems` and the log),
  never half-imported: a PNG that cannot be read or is not 8-bit grayscale, a
  non-healthy (`tb*`) PNG without readable XML. A healthy `h*` PNG has no XML
  and is negative. A `tb*` image whose XML has no box at all is imported as
  negative with a message (README: tb1199).
* **Determinism.** No dates, UIDs derived from the PNG's sha256: re-importing the
  same PNG gives the same bytes, so data versions do not churn.
* The source folder is only read. Every file is written to a temporary name and
  renamed; labels.csv is written last (the caller adds the `.complete` marker).
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from xcam_assets.atomic import atomic_path
from xcam_assets.ingest.importers.png import (
    is_within,
    read_gray_png,
    refuse_stale_batch,
    secondary_capture,
)
from xcam_assets.ingest.labels import write_batch_labels

log = logging.getLogger(__name__)

TBX11K_CITATION = (
    "Liu Y, Wu Y-H, Ban Y, Wang H, Cheng M-M. Rethinking Computer-aided Tuberculosis "
    "Diagnosis. In: IEEE/CVF Conference on Computer Vision and Pattern Recognition "
    "(CVPR), 2020, pp. 2646-2655."
)
"""TBX11K's terms ask for this citation wherever its data is used."""

DEFAULT_FINDING = "ActiveTuberculosis"
_BOX_DECIMALS = 3


def parse_voc(xml_path: Path) -> dict[str, Any]:
    """The VOC file as written: `{"filename", "width", "height", "objects"}`.

    `objects` is a list of `(class name, xmin, ymin, xmax, ymax)` floats, in the
    ORIGINAL resolution and VOC's own convention (1-based, inclusive max): the
    conversion to pixels of the stored image is `voc_box_to_pixels`. Raises
    ValueError (with the path) when the file is not usable VOC."""
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise ValueError(f"{xml_path}: not readable VOC XML ({exc})") from exc
    try:
        width = float(root.findtext("size/width", ""))
        height = float(root.findtext("size/height", ""))
    except ValueError as exc:
        raise ValueError(f"{xml_path}: <size> has no numeric width/height") from exc
    if not (width > 0 and height > 0):
        raise ValueError(f"{xml_path}: <size> {width}x{height} is not positive")
    objects: list[tuple[str, float, float, float, float]] = []
    for i, obj in enumerate(root.findall("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        try:
            coords = [float(obj.findtext(f"bndbox/{k}", "")) for k in
                      ("xmin", "ymin", "xmax", "ymax")]
        except ValueError as exc:
            raise ValueError(f"{xml_path}: object {i} ({name!r}) has no numeric bndbox") from exc
        if not name:
            raise ValueError(f"{xml_path}: object {i} has no class name")
        xmin, ymin, xmax, ymax = coords
        objects.append((name, xmin, ymin, xmax, ymax))
    return {"filename": (root.findtext("filename") or "").strip(),
            "width": width, "height": height, "objects": objects}


def voc_box_to_pixels(
    box: tuple[float, float, float, float],
    xml_size: tuple[float, float],
    png_size: tuple[int, int],
) -> dict[str, float] | None:
    """A VOC box (1-based, inclusive max, original resolution) as a canonical box.

    Returns `{x_min, y_min, x_max, y_max}` in 0-based pixels of the PNG with
    exclusive max (see the module docstring), or None when nothing of it is left
    inside the image."""
    xmin, ymin, xmax, ymax = box
    (xml_w, xml_h), (png_w, png_h) = xml_size, png_size
    sx, sy = png_w / xml_w, png_h / xml_h
    x0 = round(min(max((xmin - 1) * sx, 0.0), png_w), _BOX_DECIMALS)
    y0 = round(min(max((ymin - 1) * sy, 0.0), png_h), _BOX_DECIMALS)
    x1 = round(min(max(xmax * sx, 0.0), png_w), _BOX_DECIMALS)
    y1 = round(min(max(ymax * sy, 0.0), png_h), _BOX_DECIMALS)
    if not (x0 < x1 and y0 < y1):
        return None
    return {"x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1}


def import_tbx11k(
    source_dir: Path,
    out_batch_dir: Path,
    finding: str = DEFAULT_FINDING,
    limit: int | None = None,
    patient_key_from: Literal["image"] = "image",
    problems: list[str] | None = None,
) -> Path:
    """Write `out_batch_dir/<stem>.dcm` per `source_dir/images/*.png` and its labels.csv.

    `limit` keeps the first `limit` PNGs in name order (`h*` sorts before `tb*`,
    so any limit >= 1 includes the healthy image h0001). Skipped images and
    other notes are logged and appended to `problems` when given. Raises
    ValueError when nothing could be imported or `out_batch_dir` lies inside
    the source, FileExistsError when `out_batch_dir` holds DICOMs this import
    would not write (a stale larger import: pick a new batch name). Returns
    `out_batch_dir`."""
    if patient_key_from != "image":
        raise ValueError(f"patient_key_from={patient_key_from!r}: TBX11K has no patient ids; "
                         "only 'image' (one patient per image) is possible")
    source_dir, out_batch_dir = Path(source_dir).resolve(), Path(out_batch_dir).resolve()
    if is_within(out_batch_dir, source_dir):
        raise ValueError(f"{out_batch_dir} lies inside the source {source_dir}; "
                         "the source is never written to")
    notes: list[str] = problems if problems is not None else []

    def note(message: str) -> None:
        log.warning(message)
        notes.append(message)

    pngs = sorted((source_dir / "images").glob("*.png"))
    if not pngs:
        raise ValueError(f"no PNG under {source_dir / 'images'}")
    if limit is not None:
        pngs = pngs[:max(limit, 0)]
    planned = {f"{p.stem}.dcm" for p in pngs}
    refuse_stale_batch(out_batch_dir, planned)

    rows: list[dict[str, Any]] = []
    for png in pngs:
        rel = f"images/{png.name}"
        try:
            pixels, sha = read_gray_png(png)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            note(f"skipped {rel}: cannot read it as an 8-bit grayscale PNG ({exc})")
            continue
        height, width = pixels.shape
        xml_path = source_dir / "annotations" / f"{png.stem}.xml"
        objects: list[tuple[str, float, float, float, float]] = []
        if xml_path.exists():
            try:
                voc = parse_voc(xml_path)
            except ValueError as exc:
                note(f"skipped {rel}: its annotation is unusable ({exc})")
                continue
            if voc["filename"] and Path(voc["filename"]).stem != png.stem:
                note(f"{xml_path.name} names {voc['filename']!r}, used for {png.name} anyway")
            objects = voc["objects"]
            xml_size = (voc["width"], voc["height"])
            if not objects:
                note(f"{rel}: annotation has no box; imported as {finding} present=0")
        elif png.stem.startswith("h"):
            xml_size = (width, height)  # healthy image: no annotation expected
        else:
            note(f"skipped {rel}: no annotations/{png.stem}.xml, so its label is unknown")
            continue

        file = f"{png.stem}.dcm"
        by_class: dict[str, list[dict[str, float]]] = {finding: []}
        positive: set[str] = set()
        for name, xmin, ymin, xmax, ymax in objects:
            positive.add(name)  # a radiologist drew it: present even if the box is dropped
            px = voc_box_to_pixels((xmin, ymin, xmax, ymax), xml_size, (width, height))
            if px is None:
                note(f"{rel}: {name} box {(xmin, ymin, xmax, ymax)} lies outside the "
                     f"{xml_size} image; kept as present without a box")
            by_class.setdefault(name, []).extend([px] if px is not None else [])
        for name, boxes in by_class.items():
            if not boxes:
                rows.append({"file": file, "finding": name, "present": int(name in positive)})
            rows.extend({"file": file, "finding": name, "present": 1, **b} for b in boxes)

        ds = secondary_capture(
            pixels, sha, origin=f"converted from TBX11K {rel} sha256={sha}",
            patient_id=f"TBX11K-{png.stem}",
            deid_method="public TBX11K dataset; PatientID is synthetic, one per image",
            study_description="TBX11K chest radiograph",
            series_description="TBX11K (Liu et al., CVPR 2020)")
        with atomic_path(out_batch_dir / file) as tmp:
            ds.save_as(tmp, enforce_file_format=True)

    if not rows:
        raise ValueError(f"no image of {source_dir} could be imported: {notes[:5]}")
    write_batch_labels(rows, out_batch_dir / "labels.csv")
    return out_batch_dir
