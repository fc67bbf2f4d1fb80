"""Bring NIH ChestX-ray14 (8-bit PNG + NIH's own tables) into the DICOM lineage as a batch.

The platform ingests DICOM only, so each PNG becomes a Secondary Capture DICOM whose
pixels are the PNG's, byte for byte, and whose header carries what a hospital export
carries: NIH's Patient ID, sex, age and view, plus where it came from (source name and
sha256). The labels come from NIH's tables through the `nih` label adapter
(`xcam_assets.ingest.adapters.nih.read_nih`) and the batch writer
(`xcam_assets.ingest.adapters.batch.write_batch_labels_for`), which scales the boxes
from NIH's 1024 x 1024 space to each stored image's Columns x Rows.

Decisions callers must know:

* **Patients.** `PatientID = NIH-<Patient ID as 8 digits>` (`61` -> `NIH-00000061`, the
  prefix of NIH's file names). A patient keeps all their images (one study per image):
  ingest pseudonymises the ID and splits by patient. A table Patient ID that is not a
  number skips the image (a made-up ID would break the patient split).
* **Facts.** `Patient Gender` (or `Patient Sex`) M/F/O -> PatientSex; `Patient Age`
  (NIH: years, `58`; older tables `058Y`) -> PatientAge `058Y`; an age over 120 years
  (NIH's 2017 table had e.g. 412) or unparsable is dropped with a note, the image kept.
  `View Position` (PA/AP) -> ViewPosition; ingest decides what it admits.
* **Pixels.** Grayscale 8-bit ('L') is taken as is. Other PNG modes are converted only
  when nothing is lost, else the image is skipped: RGB/RGBA/LA/palette whose colour
  channels are all equal and whose alpha is fully opaque (some NIH downloads are RGBA)
  take that one channel; 16-bit grayscale takes its values when all are 0..255, or
  value / 257 when every value is an exact multiple of 257 (8-bit widened). Any other
  16-bit image would need rescaling (lossy, and the SC writer is 8-bit): skipped. A
  conversion is noted and written into the DICOM's DerivationDescription.
* **Skips.** An image is left out (a message naming it and the reason goes to the log
  and `problems`), never half-imported and never stopping the batch: an unreadable or
  truncated PNG, one not convertible as above, one without a Data_Entry row or with
  several. Its table rows are then simply not matched (labels only for written DICOMs).
  Two PNGs with the same bytes (NIH's 00002658_001 and _002 here) get the same UIDs:
  both are imported with a note, and ingest quarantines the second as a duplicate.
* **Subsets.** `images` (PNG names) imports part of the cohort, e.g. an external-site
  batch; `xcam import-nih` (`nih_cli`) builds it from `--patients-from FILE` /
  `--images-from FILE` (`--exclude-listed` for the complement), so patient-disjoint
  batches are one flag.
* **Determinism.** No dates, UIDs derived from the PNG's sha256: re-importing the same
  PNG with the same table row gives the same bytes, so data versions do not churn.
* The source folder is only read (an output inside it, or holding it, is refused).
  Every file is written to a temporary name and renamed; labels.csv is written last
  (the CLI adds the `.complete` marker after it).
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import polars as pl
from PIL import Image

from xcam_assets.atomic import atomic_path
from xcam_assets.hashing import sha256_bytes
from xcam_assets.ingest.adapters.batch import write_batch_labels_for
from xcam_assets.ingest.adapters.nih import read_nih
from xcam_assets.ingest.importers.png import is_within, refuse_stale_batch, secondary_capture

log = logging.getLogger(__name__)

NIH_CITATION = (
    "Wang X, Peng Y, Lu L, Lu Z, Bagheri M, Summers RM. ChestX-ray8: Hospital-scale Chest "
    "X-ray Database and Benchmarks on Weakly-Supervised Classification and Localization of "
    "Common Thorax Diseases. In: IEEE CVPR 2017, pp. 3462-3471. Data: NIH Clinical Center, "
    "https://nihcc.app.box.com/v/ChestXray-NIHCC"
)
"""NIH asks for this citation and for acknowledging the NIH Clinical Center as provider."""

DATA_ENTRY = "Data_Entry_2017_v2020.csv"
BBOX_LIST = "BBox_List_2017.csv"
MAX_AGE_YEARS = 120
_AGE = re.compile(r"(\d{1,3})\s*([DWMY]?)", re.IGNORECASE)
_CODE_STRING = re.compile(r"[A-Z0-9 _]{1,16}")
_SEX = {"M": "M", "F": "F", "O": "O"}


def find_table(source_dir: Path, name: str) -> Path | None:
    """`source_dir/<name>`, or the one `<stem>*.csv` there (NIH ships v2017 and v2020)."""
    path = source_dir / name
    if path.is_file():
        return path
    stem = name.split("_20")[0]
    found = sorted(source_dir.glob(f"{stem}*.csv"))
    return found[-1] if found else None


def dicom_age(text: str | None) -> str | None:
    """NIH's age (`58`, `058Y`, `7M`) as a DICOM AS string (`058Y`), or None when it is
    missing, unparsable or over `MAX_AGE_YEARS` years (NIH's 2017 table had ages > 400)."""
    match = _AGE.fullmatch((text or "").strip())
    if not match:
        return None
    value, unit = int(match.group(1)), (match.group(2) or "Y").upper()
    if unit == "Y" and value > MAX_AGE_YEARS:
        return None
    return f"{value:03d}{unit}"


def nih_patient_id(text: str | None) -> str | None:
    """`NIH-<8 digits>` from NIH's Patient ID (`61`, `00000061`, `NIH-00000061`), or None."""
    value = (text or "").strip()
    value = value[4:] if value.upper().startswith("NIH-") else value
    if not value.isdigit() or len(value) > 8:
        return None
    return f"NIH-{int(value):08d}"


def gray_pixels(im: Image.Image) -> tuple[np.ndarray, str | None]:
    """The image as 2-D uint8 and how it was converted (None for 8-bit grayscale).

    Converts only when lossless (see the module docstring); raises ValueError naming
    why otherwise."""
    mode = im.mode
    if mode == "L":
        return np.asarray(im, dtype=np.uint8).copy(), None
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(im).astype(np.int64)
        if values.min() >= 0 and values.max() <= 255:
            return values.astype(np.uint8), f"{mode} grayscale with values 0..255 taken as is"
        if values.min() >= 0 and values.max() <= 65535 and not (values % 257).any():
            return (values // 257).astype(np.uint8), f"{mode} grayscale = 8-bit x 257, divided"
        raise ValueError(f"mode {mode!r} with values {values.min()}..{values.max()}: making "
                         "it 8-bit would lose precision")
    if mode in ("P", "PA"):
        im, mode = im.convert("RGBA"), f"{mode} (palette)"
    if im.mode in ("LA", "RGB", "RGBA"):
        arr = np.asarray(im, dtype=np.uint8)
        colour = arr[..., :1] if im.mode == "LA" else arr[..., :3]
        if (colour != colour[..., :1]).any():
            raise ValueError(f"mode {mode!r} with unequal colour channels: a colour image, "
                             "not a radiograph's gray values")
        if im.mode in ("LA", "RGBA") and (arr[..., -1] != 255).any():
            raise ValueError(f"mode {mode!r} with transparent pixels: the gray values alone "
                             "are not the image")
        return colour[..., 0].copy(), f"{mode} with equal channels, opaque: one channel taken"
    raise ValueError(f"mode {mode!r} cannot be made 8-bit grayscale without loss")


def read_nih_png(path: Path) -> tuple[np.ndarray, str, str | None]:
    """(uint8 2-D pixels, sha256 of the file's bytes, conversion or None)."""
    raw = path.read_bytes()
    with Image.open(io.BytesIO(raw)) as im:
        if im.format != "PNG":
            raise ValueError(f"not a PNG (format {im.format})")
        im.load()
        pixels, how = gray_pixels(im)
    return pixels, sha256_bytes(raw), how


def _table_facts(data_entry: Path) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Data_Entry rows by image name, and the fact columns the table lacks."""
    table = pl.read_csv(data_entry, infer_schema=False)
    if not {"Image Index", "Patient ID"} <= set(table.columns):
        raise ValueError(f"{data_entry}: not a ChestX-ray14 Data_Entry table "
                         f"(columns {table.columns[:8]})")
    sex_col = next((c for c in ("Patient Gender", "Patient Sex") if c in table.columns),
                   "Patient Gender")
    wanted = ((sex_col, "sex"), ("Patient Age", "age"), ("View Position", "view"))
    missing = [c for c, _ in wanted if c not in table.columns]
    rows = table.select(
        pl.col("Image Index").str.strip_chars().alias("name"),
        pl.col("Patient ID").alias("patient_id"),
        *[pl.col(c).alias(k) if c in table.columns else pl.lit(None, pl.String).alias(k)
          for c, k in wanted])
    by_name: dict[str, list[dict[str, Any]]] = {}
    for row in rows.iter_rows(named=True):
        by_name.setdefault(row["name"], []).append(row)
    return by_name, missing


def wanted_names(images: Iterable[str]) -> list[str]:
    """PNG names from a user's list (`x.png`, `x`, `images/x.png`), in order, unique."""
    names = []
    for item in images:
        name = PurePosixPath(str(item).strip().replace("\\", "/")).name
        if name:
            names.append(name if name.lower().endswith(".png") else f"{name}.png")
    return list(dict.fromkeys(names))


def import_nih(
    source_dir: Path,
    out_batch_dir: Path,
    limit: int | None = None,
    images: Iterable[str] | None = None,
    problems: list[str] | None = None,
) -> Path:
    """Write `out_batch_dir/<stem>.dcm` per `source_dir/images/*.png` and its labels.csv.

    `images` keeps only those PNG names (a listed name without a PNG is noted);
    `limit` then keeps the first `limit` in name order (names sort by patient, so a
    limit cuts at most one patient). Skipped images and other notes are logged and
    appended to `problems` when given. Raises ValueError when nothing could be
    imported, the tables are missing, or `out_batch_dir` and the source overlap;
    FileExistsError when `out_batch_dir` holds DICOMs this import would not write (a
    stale larger import: pick a new batch name). Returns `out_batch_dir`."""
    source_dir, out_batch_dir = Path(source_dir).resolve(), Path(out_batch_dir).resolve()
    if is_within(out_batch_dir, source_dir) or is_within(source_dir, out_batch_dir):
        raise ValueError(f"{out_batch_dir} and the source {source_dir} overlap; "
                         "the source is never written to")
    notes: list[str] = problems if problems is not None else []

    def note(message: str) -> None:
        log.warning(message)
        notes.append(message)

    data_entry = find_table(source_dir, DATA_ENTRY)
    if data_entry is None:
        raise ValueError(f"no {DATA_ENTRY} in {source_dir}: the labels and patient ids "
                         "are in it")
    bbox_list = find_table(source_dir, BBOX_LIST)
    if bbox_list is None:
        note(f"no {BBOX_LIST} in {source_dir}: imported without boxes")
    facts, missing_cols = _table_facts(data_entry)
    for col in missing_cols:
        note(f"{data_entry.name} has no {col!r} column: that fact is left empty")

    pngs = sorted((source_dir / "images").glob("*.png"))
    if not pngs:
        raise ValueError(f"no PNG under {source_dir / 'images'}")
    if images is not None:
        wanted = wanted_names(images)
        present = {p.name for p in pngs}
        for name in wanted:
            if name not in present:
                note(f"listed image {name} has no PNG under {source_dir / 'images'}")
        keep = set(wanted)
        pngs = [p for p in pngs if p.name in keep]
    if limit is not None:
        pngs = pngs[:max(limit, 0)]
    planned = {f"{p.stem}.dcm" for p in pngs}
    refuse_stale_batch(out_batch_dir, planned)

    written: list[str] = []
    first_of: dict[str, str] = {}  # sha256 -> first image with those bytes
    for png in pngs:
        rel = f"images/{png.name}"
        rows = facts.get(png.name, [])
        if len(rows) != 1:
            note(f"skipped {rel}: " + (f"no row in {data_entry.name}, so its labels and "
                                       "patient are unknown" if not rows else
                                       f"{len(rows)} rows in {data_entry.name}; which one "
                                       "holds is unknown"))
            continue
        row = rows[0]
        patient_id = nih_patient_id(row["patient_id"])
        if patient_id is None:
            note(f"skipped {rel}: Patient ID {row['patient_id']!r} is not an NIH number")
            continue
        prefix = png.stem.split("_")[0]
        if prefix.isdigit() and int(prefix) != int(patient_id[4:]):
            note(f"{rel}: file name says patient {prefix}, {data_entry.name} says "
                 f"{row['patient_id']}; the table's is used")
        try:
            pixels, sha, how = read_nih_png(png)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            note(f"skipped {rel}: cannot read it as 8-bit grayscale ({exc})")
            continue
        if how:
            note(f"{rel}: converted without loss ({how})")
        if sha in first_of:
            note(f"{rel}: the same bytes as {first_of[sha]} (sha256 {sha[:12]}...), so the "
                 "same UIDs: imported, and ingest keeps only the first as a duplicate")
        first_of.setdefault(sha, rel)
        age = dicom_age(row["age"])
        if row["age"] not in (None, "") and age is None:
            note(f"{rel}: Patient Age {row['age']!r} is not a plausible age "
                 f"(0..{MAX_AGE_YEARS} years); PatientAge left out")
        sex = _SEX.get((row["sex"] or "").strip().upper(), "")
        if row["sex"] not in (None, "") and not sex:
            note(f"{rel}: Patient Gender {row['sex']!r} is not M/F/O; PatientSex left empty")
        view = (row["view"] or "").strip().upper()
        if view and not _CODE_STRING.fullmatch(view):
            note(f"{rel}: View Position {row['view'][:20]!r} is not a DICOM code; left empty")
            view = ""
        origin = f"converted from NIH ChestX-ray14 {rel} sha256={sha}"
        ds = secondary_capture(
            pixels, sha, origin=origin + (f"; {how}" if how else ""),
            patient_id=patient_id,
            deid_method="NIH ChestX-ray14, de-identified by the NIH Clinical Center",
            study_description="NIH ChestX-ray14 chest radiograph",
            series_description="NIH ChestX-ray14 (Wang et al., CVPR 2017)",
            patient_sex=sex, patient_age=age or "", view_position=view)
        file = f"{png.stem}.dcm"
        with atomic_path(out_batch_dir / file) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        written.append(file)

    if not written:
        raise ValueError(f"no image of {source_dir} could be imported: {notes[:5]}")
    done = set(written)
    kept = sorted(p.name for p in out_batch_dir.glob("*.dcm") if p.name not in done)
    if kept:
        note(f"{len(kept)} DICOM(s) of an earlier import kept although skipped now "
             f"(e.g. {kept[:3]}); their labels are written too")
    summary = write_batch_labels_for(read_nih(data_entry, bbox_list, abnormal=True),
                                     out_batch_dir)
    log.info(f"NIH import into {out_batch_dir}: {len(written)} image(s), "
             f"{len(notes)} note(s); labels {summary}")
    return out_batch_dir


# ---- subsets for the CLI (xcam_assets/ingest/importers/nih_cli.py) ----

def read_list(path: Path) -> list[str]:
    """One entry per line of a user's list file; blank lines and `#` comments ignored."""
    entries = []
    for line in Path(path).read_text().splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            entries.append(entry)
    return entries


def images_of_patients(data_entry: Path, patients: Iterable[str],
                       exclude: bool = False) -> tuple[list[str], list[str]]:
    """(image names of those patients, or of everyone else with `exclude`; listed
    patients without a row). Raises ValueError naming an entry that is no NIH id."""
    wanted: set[str] = set()
    for entry in patients:
        pid = nih_patient_id(entry)
        if pid is None:
            raise ValueError(f"{entry!r} is not an NIH Patient ID (e.g. 61, 00000061, "
                             "NIH-00000061)")
        wanted.add(pid)
    facts, _ = _table_facts(data_entry)
    of_patient = {name: nih_patient_id(rows[0]["patient_id"]) for name, rows in facts.items()}
    names = sorted(n for n, p in of_patient.items() if (p in wanted) != exclude)
    return names, sorted(wanted - set(of_patient.values()))
