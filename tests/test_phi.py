"""No PHI from any input header anywhere under data/ (but the access-controlled source
copies data/incoming and data/raw) or in the Dagster instance after a full run.

The SYNTHETIC demo cohort carries fake PHI on purpose (DEMO^PATIENT0007, Demo
General Hospital, birth dates, accession numbers, UIDs). The scanner reads every
file as bytes, decompresses what is compressed (parquet is read as a table and
serialised, gzip/zip opened) and dumps every SQLite table as text; a positive
control proves it finds the values in data/raw.
"""

from __future__ import annotations

import gzip
import io
import sqlite3
import zipfile
from pathlib import Path

import dagster as dg
import polars as pl
import pydicom
import pytest

from xcam_assets.config import load_settings
from xcam_assets.demo import write_demo_cohort
from xcam_assets.ingest.deid import PHI_KEYWORDS
from xcam_assets.orchestrate import materialize_all


def phi_values(dicoms: list[Path]) -> set[str]:
    """Every PHI tag value of the inputs that is specific enough to grep for."""
    values: set[str] = set()
    for p in dicoms:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        for kw in (*PHI_KEYWORDS, "PatientBirthDate"):
            v = str(ds.get(kw, "") or "").strip()
            if len(v) >= 8 or (len(v) >= 6 and not v.isdigit()):
                values.add(v)
    return values


def texts(path: Path) -> list[bytes]:
    """The byte views of one file to search: raw, plus its decoded/decompressed forms."""
    raw = path.read_bytes()
    out = [raw]
    if path.suffix == ".parquet":
        out.append(pl.read_parquet(path).write_ndjson().encode())
    elif raw[:2] == b"\x1f\x8b":
        out.append(gzip.decompress(raw))
    elif raw[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            out.extend(zf.read(n) for n in zf.namelist())
    elif raw[:16] == b"SQLite format 3\x00":
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            out.append("\n".join(con.iterdump()).encode())
        finally:
            con.close()
    return out


def find_values(root: Path, values: set[str], skip: tuple[str, ...] = ()) -> list[str]:
    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel.split("/")[0] in skip:
            continue
        blobs = texts(path)
        for v in values:
            if any(v.encode() in b for b in blobs):
                hits.append(f"{rel}: {v}")
    return hits


@pytest.mark.slow
def test_no_phi_in_artifacts_or_event_log(project: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    key = "phi-test-key-4f1c9e0a7b"
    monkeypatch.setenv("XCAM_PSEUDONYM_KEY", key)
    s = load_settings()
    batches = write_demo_cohort(s.incoming_dir, n_images=40, n_batches=2, size=96,
                                seed=s.seed, finding=s.findings[0])
    for b in batches:
        (b / ".complete").touch()
    values = phi_values(sorted(s.incoming_dir.rglob("*.dcm")))
    assert {"DEMO^PATIENT0001", "DEMO0001", "Demo General Hospital",
            "DEMO^REFERRER^DR", "DEMOACC000001"} <= values
    assert any(v.startswith("2.25.") for v in values)  # UIDs are searched too
    values.add(key)

    materialize_all(settings=s, instance=dg.DagsterInstance.get(), log=lambda m: None)
    assert (s.metrics_dir / "metric_table.parquet").exists()

    # positive control: the scanner does see PHI where it legitimately is
    assert find_values(s.data_dir / "raw", values)
    hits = find_values(s.data_dir, values, skip=("incoming", "raw"))
    assert not hits, hits[:20]
    scanned = [p for p in s.data_dir.rglob("*") if p.is_file()
               and p.relative_to(s.data_dir).parts[0] not in ("incoming", "raw")]
    assert any(p.suffix == ".parquet" for p in scanned) and len(scanned) >= 10
    home = Path(dg.DagsterInstance.get().root_directory)
    assert any(p.suffix == ".db" for p in home.rglob("*"))
    hits = find_values(home, values)
    assert not hits, hits[:20]
