"""One inventory row per file of an arrival batch: header facts, hash, status.

A file that cannot serve as a chest radiograph is not dropped: it gets
`status="quarantined"` and a reason a person understands, and the batch goes on.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import polars as pl

from xcam_assets.hashing import sha256_file
from xcam_assets.ingest.deid import pseudonymise
from xcam_assets.ingest.dicom import read_header

NON_IMAGE_NAMES = {"labels.csv", "demo_cohort.json", "README.md", ".complete"}

INVENTORY_SCHEMA = {
    "batch": pl.String, "file": pl.String, "image_key": pl.String, "patient_key": pl.String,
    "study_key": pl.String, "modality": pl.String, "body_part": pl.String,
    "view_position": pl.String, "photometric_interpretation": pl.String,
    "bits_allocated": pl.Int64, "bits_stored": pl.Int64, "rows": pl.Int64, "columns": pl.Int64,
    "transfer_syntax_uid": pl.String, "sha256": pl.String, "size_bytes": pl.Int64,
    "status": pl.String, "reason": pl.String,
}


def candidate_files(batch_dir: Path) -> list[Path]:
    """Every file of a batch that should be an image (labels and masks excluded)."""
    return sorted(
        p for p in batch_dir.rglob("*")
        if p.is_file() and p.name not in NON_IMAGE_NAMES
        and "masks" not in p.relative_to(batch_dir).parts[:-1]
    )


def _reason(header: dict[str, Any], modalities: set[str], body_parts: set[str]) -> str | None:
    if not header.get("has_pixel_data"):
        return "no pixel data"
    if header.get("modality") not in modalities:
        return f"modality {header.get('modality')!r} is not one of {sorted(modalities)}"
    body = (header.get("body_part") or "").upper()
    if body_parts and body not in body_parts:
        return f"body part {header.get('body_part')!r} is not one of {sorted(body_parts)}"
    if (header.get("samples_per_pixel") or 1) != 1 or header.get(
        "photometric_interpretation"
    ) not in ("MONOCHROME1", "MONOCHROME2"):
        return (f"not grayscale (photometric {header.get('photometric_interpretation')!r}, "
                f"{header.get('samples_per_pixel')} samples per pixel)")
    rows, cols = header.get("rows") or 0, header.get("columns") or 0
    if not (64 <= rows <= 16384 and 64 <= cols <= 16384):
        return f"absurd image size {rows}x{cols}"
    return None


def inventory_rows(
    batch_dir: Path,
    batch: str,
    key: bytes,
    modalities: Iterable[str],
    body_parts: Iterable[str],
    known_sop_keys: set[str] | None = None,
) -> pl.DataFrame:
    """Read headers + sha256 of every file in the batch; never raises on a bad file."""
    mods, parts = set(modalities), {b.upper() for b in body_parts}
    seen = set(known_sop_keys or ())
    rows = []
    for path in candidate_files(batch_dir):
        rel = path.relative_to(batch_dir).as_posix()
        row: dict[str, Any] = {k: None for k in INVENTORY_SCHEMA}
        row.update(batch=batch, file=rel, sha256=sha256_file(path),
                   size_bytes=path.stat().st_size, status="ok")
        try:
            header = read_header(path)
        except Exception as exc:  # any parser failure is a quarantine reason, not a crash
            row.update(status="quarantined", reason=f"not a readable DICOM file: {exc}"[:300])
            rows.append(row)
            continue
        image_key = pseudonymise(header.get("sop_instance_uid"), key, prefix="I")
        row.update(
            image_key=image_key,
            patient_key=pseudonymise(header.get("patient_id"), key, prefix="P"),
            study_key=pseudonymise(header.get("study_instance_uid"), key, prefix="S"),
            **{k: header.get(k) for k in (
                "modality", "body_part", "view_position", "photometric_interpretation",
                "bits_allocated", "bits_stored", "rows", "columns", "transfer_syntax_uid")},
        )
        reason = _reason(header, mods, parts)
        if reason is None and image_key is None:
            reason = "no SOP Instance UID"
        if reason is None and row["patient_key"] is None:
            reason = "no Patient ID: the file cannot be split by patient"
        if reason is None and image_key in seen:
            reason = "duplicate SOP Instance UID (already ingested)"
        if reason:
            row.update(status="quarantined", reason=reason)
        else:
            seen.add(image_key)
        rows.append(row)
    return pl.DataFrame(rows, schema=INVENTORY_SCHEMA)
