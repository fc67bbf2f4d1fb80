"""One inventory row per file of an arrival batch: header facts, hash, status.

A file that cannot serve as a chest radiograph is not dropped: it gets
`status="quarantined"` and a reason a person understands, and the batch goes on.

Each file is read from disk **once**: the bytes are hashed and parsed from memory,
and the pixels are decoded once (`dicom.check_pixels`), so every decode-level
problem (truncation, a broken or unsupported codec stream, a lying photometric
tag, a blank image) is caught here and `clahe_tensors` never meets an
undecodable file. Checks run cheapest first; the first failing one is the reason.

Duplicates: a SOP Instance UID seen earlier in the batch (files in path order) or
in another batch's inventory (as an `ok` row) is quarantined, naming the other
copy and whether its bytes are identical. Two batches' inventories computed at the
same moment could not see each other; `dicom_inventory` computes them one after the
other, whatever runs they belong to (the `ingest` pool and a file lock).

PHI: rows carry only HMAC pseudonyms (image, patient, study) and technical header
facts; reasons never quote a header value other than modality, body part, view,
photometric interpretation, sizes and transfer syntax, and those only when they are
short code strings / UIDs (`sanitise_header`: a value that swallowed its neighbours
through a lying VR or length is withheld and the file quarantined); parser and
decoder messages have their quoted literals withheld (`dicom.withhold_values`).
File names are kept (they locate the raw copy): an uploader must not put patient
names in file names.

Hostile files: `scan_file` never raises for a file; whatever goes wrong becomes the
row's reason. tests/ingest/test_fuzz.py holds that (and "admitted means `decode_u8`
decodes it") over thousands of hand-encoded hostile files on every test run.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from xcam_assets.ingest.deid import key_id, pseudonymise
from xcam_assets.ingest.demographics import DEMOGRAPHIC_COLUMNS, demographics
from xcam_assets.ingest.dicom import (
    check_pixels,
    header_from_dataset,
    parse_header,
    transfer_syntax_problem,
    withhold_values,
)

NON_IMAGE_NAMES = {"labels.csv", "demo_cohort.json", "README.md", ".complete", "batch.yaml"}

INVENTORY_SCHEMA = {
    "batch": pl.String, "file": pl.String, "image_key": pl.String, "patient_key": pl.String,
    "study_key": pl.String, "modality": pl.String, "body_part": pl.String,
    "view_position": pl.String, "photometric_interpretation": pl.String,
    "bits_allocated": pl.Int64, "bits_stored": pl.Int64, "rows": pl.Int64, "columns": pl.Int64,
    "transfer_syntax_uid": pl.String, "sha256": pl.String, "size_bytes": pl.Int64,
    "photometric_score": pl.Float64, "key_id": pl.String,
    "status": pl.String, "reason": pl.String,
    # coarse facts for subgroup analyses (`demographics.py`): M/F/O, age band, device maker
    "patient_sex": pl.String, "age_band": pl.String, "manufacturer": pl.String,
}
_HEADER_COLUMNS = ("modality", "body_part", "view_position", "photometric_interpretation",
                   "bits_allocated", "bits_stored", "rows", "columns", "transfer_syntax_uid")
_REASON_MAX = 300


@dataclass(frozen=True)
class IngestPolicy:
    """What the cohort admits (resources/params.yaml `cohort:`); everything else is quarantined.

    `exclude_views`: ViewPosition values refused (lateral and decubitus by default: a
    frontal-view classifier and the photometric heuristic assume PA/AP); a file without
    ViewPosition is admitted (many exports omit it). Sizes are inclusive pixel limits."""

    modalities: frozenset[str] = frozenset({"DX", "CR"})
    body_parts: frozenset[str] = frozenset({"CHEST"})
    exclude_views: frozenset[str] = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"})
    min_size: int = 64
    max_size: int = 16384
    photometric_check: bool = True
    decode: bool = True

    @classmethod
    def from_params(cls, cohort: Mapping[str, Any], **overrides: Any) -> IngestPolicy:
        """The policy of a `cohort:` section; absent keys keep the defaults above."""
        kw: dict[str, Any] = {
            "modalities": frozenset(cohort.get("modalities", cls.modalities)),
            "body_parts": frozenset(b.upper() for b in cohort.get("body_parts",
                                                                  cls.body_parts)),
            "exclude_views": frozenset(v.upper() for v in cohort.get("exclude_views",
                                                                     cls.exclude_views)),
            "min_size": int(cohort.get("min_size", cls.min_size)),
            "max_size": int(cohort.get("max_size", cls.max_size)),
            "photometric_check": bool(cohort.get("photometric_check", cls.photometric_check)),
        }
        kw.update(overrides)
        return cls(**kw)


@dataclass
class KnownImages:
    """Images already ingested elsewhere: image_key -> (where, sha256). Grows as a batch goes."""

    where: dict[str, tuple[str, str]] = field(default_factory=dict)

    @classmethod
    def from_inventories(cls, frames: Iterable[pl.DataFrame]) -> KnownImages:
        known = cls()
        for frame in frames:
            ok = frame.filter(pl.col("status") == "ok")
            for key, batch, file, sha in ok.select("image_key", "batch", "file",
                                                   "sha256").iter_rows():
                known.where.setdefault(key, (f"{batch}/{file}", sha))
        return known


def candidate_files(batch_dir: Path) -> list[Path]:
    """Every file of a batch that should be an image (labels and masks excluded)."""
    return sorted(
        p for p in batch_dir.rglob("*")
        if p.is_file() and p.name not in NON_IMAGE_NAMES and not p.name.startswith(".")
        and "masks" not in p.relative_to(batch_dir).parts[:-1]
    )


def _parse(data: bytes, decode: bool) -> tuple[Dataset, dict[str, Any]]:
    """Dataset and header facts of a file's bytes (without `decode`: stop before pixels)."""
    if decode:
        ds = pydicom.dcmread(io.BytesIO(data))
        return ds, header_from_dataset(ds)
    return parse_header(io.BytesIO(data))


def header_reason(header: Mapping[str, Any], policy: IngestPolicy) -> str | None:
    """Why a file's header disqualifies it (None when it does not): cheap, no pixels."""
    if not header.get("has_pixel_data"):
        if header.get("rows") and header.get("columns"):
            return (f"no pixel data although the header describes a {header['rows']}x"
                    f"{header['columns']} image: a truncated copy or stripped pixels")
        return "no pixel data: not an image (e.g. a report, a DICOMDIR or a presentation state)"
    if (problem := transfer_syntax_problem(header.get("transfer_syntax_uid"))) is not None:
        return problem
    modality = header.get("modality")
    if modality not in policy.modalities:
        return f"wrong modality {modality!r}: the cohort admits {sorted(policy.modalities)}"
    body = (header.get("body_part") or "").upper()
    if policy.body_parts and body not in policy.body_parts:
        return (f"wrong body part {header.get('body_part')!r}: the cohort admits "
                f"{sorted(policy.body_parts)}")
    view = (header.get("view_position") or "").upper()
    if view and view in policy.exclude_views:
        return f"excluded view {view!r} (lateral/decubitus); the cohort is frontal views only"
    photometric = header.get("photometric_interpretation")
    spp = header.get("samples_per_pixel") or 1
    if spp != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return (f"not a grayscale image (photometric {photometric!r}, {spp} samples per "
                "pixel): colour or palette images are not radiographs")
    frames = header.get("number_of_frames") or 1
    if frames > 1:
        return f"multi-frame image ({frames} frames): one radiograph per file expected"
    allocated, stored = header.get("bits_allocated"), header.get("bits_stored")
    if allocated not in (8, 16) or not stored or not 1 <= stored <= allocated:
        return (f"unsupported bit depth (BitsAllocated {allocated}, BitsStored {stored}): "
                "expected 8 or 16 bits allocated and 1..BitsAllocated stored")
    rows, cols = header.get("rows") or 0, header.get("columns") or 0
    if not (policy.min_size <= rows <= policy.max_size
            and policy.min_size <= cols <= policy.max_size):
        return (f"absurd image size {rows}x{cols} (expected {policy.min_size}.."
                f"{policy.max_size} pixels per side)")
    if not header.get("sop_instance_uid"):
        return "no SOP Instance UID: the image cannot be identified"
    if not header.get("patient_id"):
        return "no Patient ID: the image cannot be split by patient"
    return None


# Header text the inventory may store and quote: a DICOM code string (PS3.5: at most 16
# characters; lower case and '-' tolerated, as real exports write them) or a UID.
_CODE_STRING = re.compile(r"[A-Za-z0-9_ -]{1,16}")
_UID_TEXT = re.compile(r"[0-9.]{1,64}")
_CODE_FIELDS = (("modality", "Modality"), ("body_part", "BodyPartExamined"),
                ("view_position", "ViewPosition"),
                ("photometric_interpretation", "PhotometricInterpretation"))


def sanitise_header(header: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Header facts safe to store and quote, and why the header is malformed (or None).

    A value the inventory stores and may quote in a reason (modality, body part, view,
    photometric interpretation, transfer syntax) must be a short code string or a UID.
    Anything else (a value that swallowed its neighbours because a VR or length lies,
    control characters, an over-long text) is replaced by None and the file is
    quarantined without quoting it: such a value may hold patient data."""
    out = dict(header)
    problems = []
    for key, keyword in _CODE_FIELDS:
        value = out.get(key)
        if value is not None and not _CODE_STRING.fullmatch(value):
            out[key] = None
            problems.append(f"{keyword} is not a DICOM code string ({len(value)} characters)")
    tsyntax = out.get("transfer_syntax_uid")
    if tsyntax is not None and not _UID_TEXT.fullmatch(tsyntax):
        out["transfer_syntax_uid"] = None
        problems.append(f"TransferSyntaxUID is not a UID ({len(tsyntax)} characters)")
    if not problems:
        return out, None
    return out, ("malformed header: " + "; ".join(problems)
                 + " (values withheld: a malformed value may hold patient data)")


def _quarantine(row: dict[str, Any], reason: str) -> dict[str, Any]:
    row.update(status="quarantined", reason=reason[:_REASON_MAX])
    return row


def scan_file(path: Path, rel: str, batch: str, key: bytes,
              policy: IngestPolicy) -> dict[str, Any]:
    """One inventory row for one file (status/reason filled, duplicates not yet judged).

    Never raises for a bad file: a file that cannot be read, or that makes any check
    fail unexpectedly, is quarantined with the error as the reason (the fuzz tests in
    tests/ingest/test_fuzz.py hold this over thousands of hostile files)."""
    row: dict[str, Any] = dict.fromkeys(INVENTORY_SCHEMA)
    row.update(batch=batch, file=rel, status="ok", key_id=key_id(key))
    try:
        data = path.read_bytes()
    except OSError as exc:
        return _quarantine(row, f"unreadable file: {type(exc).__name__} "
                                f"(errno {exc.errno}: {exc.strerror})")
    row.update(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    try:
        return _scan_bytes(row, data, rel, key, policy)
    except Exception as exc:  # a check that choked on a value: still one quarantined row
        for k in (*_HEADER_COLUMNS, *DEMOGRAPHIC_COLUMNS, "image_key", "patient_key",
                  "study_key", "photometric_score"):
            row[k] = None
        return _quarantine(row, f"unreadable DICOM (a header or pixel value the reader "
                                f"cannot interpret): {type(exc).__name__}: "
                                f"{withhold_values(str(exc))}")


def _scan_bytes(row: dict[str, Any], data: bytes, rel: str, key: bytes,
                policy: IngestPolicy) -> dict[str, Any]:
    if not data:
        return _quarantine(row, "empty file (0 bytes): nothing was uploaded")
    try:
        ds, header = _parse(data, policy.decode)
        if len(ds) == 0:
            raise EOFError("no data element after the file meta information")
    except InvalidDicomError as exc:
        # pydicom's fixed text (it quotes no value of the file)
        return _quarantine(row, f"not a DICOM file (no DICM preamble/meta header): {exc}")
    except Exception as exc:  # any parser failure is a quarantine reason, not a crash
        return _quarantine(row, f"unreadable DICOM (truncated or corrupt header): "
                                f"{type(exc).__name__}: {withhold_values(str(exc))}")
    header, malformed = sanitise_header(header)
    facts = {k: header.get(k) for k in _HEADER_COLUMNS}
    for k in ("bits_allocated", "bits_stored", "rows", "columns"):
        if facts[k] is not None and not -(2**63) <= facts[k] < 2**63:
            facts[k] = None  # a 20-digit Rows must not break the table (Int64)
    row.update(image_key=pseudonymise(header.get("sop_instance_uid"), key, prefix="I"),
               patient_key=pseudonymise(header.get("patient_id"), key, prefix="P"),
               study_key=pseudonymise(header.get("study_instance_uid"), key, prefix="S"),
               **facts, **demographics(ds))
    reason = malformed or header_reason(header, policy)
    if reason is None and policy.decode:
        reason, score = check_pixels(ds, rel, photometric_check=policy.photometric_check,
                                     header=header)
        row["photometric_score"] = None if score is None else round(score, 4)
    if reason:
        return _quarantine(row, reason)
    return row


def _judge_duplicate(row: dict[str, Any], known: KnownImages, in_batch: str) -> None:
    key = row["image_key"]
    if row["status"] != "ok":
        return
    if key in known.where:
        where, sha = known.where[key]
        same = "identical bytes" if sha == row["sha256"] else "different bytes: a re-export " \
            "or a UID collision"
        scope = "in this batch" if where.startswith(f"{in_batch}/") else "already ingested"
        row.update(status="quarantined",
                   reason=f"duplicate SOP Instance UID: same image as {where} ({scope}; {same})")
    else:
        known.where[key] = (f"{in_batch}/{row['file']}", row["sha256"])


def inventory_rows(
    batch_dir: Path,
    batch: str,
    key: bytes,
    policy: IngestPolicy,
    known: KnownImages | None = None,
    files: list[Path] | None = None,
) -> pl.DataFrame:
    """Read, hash and decode every file of the batch once; never raises on a bad file.

    `known` holds the images other batches already hold (see `KnownImages`); it is
    not modified. Only this batch's files are opened: the cost is proportional to
    the batch, not to what was ingested before. `files` (default: `candidate_files`)
    restricts the scan to some of the batch's files."""
    known = KnownImages(dict(known.where)) if known else KnownImages()
    rows = []
    for path in candidate_files(batch_dir) if files is None else files:
        row = scan_file(path, path.relative_to(batch_dir).as_posix(), batch, key, policy)
        _judge_duplicate(row, known, batch)
        rows.append(row)
    return pl.DataFrame(rows, schema=INVENTORY_SCHEMA)


__all__ = ["INVENTORY_SCHEMA", "IngestPolicy", "KnownImages",
           "candidate_files", "header_reason", "inventory_rows", "sanitise_header",
           "scan_file"]
