"""No PHI from any input header, and not the pseudonymisation key, anywhere under data/
(but the access-controlled source copies data/incoming and data/raw), in the Dagster
instance or in the captured logs after a full run; and no header value used as a path.

The SYNTHETIC demo cohort carries fake PHI on purpose (DEMO^PATIENT0007, Demo
General Hospital, birth dates, accession numbers, UIDs); two of its files get hostile
identifiers on top (a Patient ID and SOP Instance UID that look like paths, with `..`,
a leading `/` and a NUL). The scanner reads every file as bytes and also decodes what
is encoded or compressed: parquet is read as a table and serialised, gzip/zip opened,
every SQLite table dumped as text, string arrays in .npy loaded, PNG text chunks
inflated; each value is searched as UTF-8, UTF-16 and UTF-32. Positive controls
(tests/test_security.py and below) prove it finds the values where they are.
"""

from __future__ import annotations

import gzip
import io
import sqlite3
import struct
import zipfile
import zlib
from pathlib import Path

import dagster as dg
import numpy as np
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


def _png_text(raw: bytes) -> list[bytes]:
    """The inflated zTXt/iTXt chunks of a PNG (tEXt is plain in the raw bytes already)."""
    out, at = [], 8
    while at + 8 <= len(raw):
        (length,) = struct.unpack(">I", raw[at:at + 4])
        kind, body = raw[at + 4:at + 8], raw[at + 8:at + 8 + length]
        if kind == b"zTXt":
            out.append(zlib.decompress(body.split(b"\0", 1)[1][1:]))
        elif kind == b"iTXt":
            keyword, rest = body.split(b"\0", 1)
            compressed, text = rest[0], rest[2:].split(b"\0", 2)[-1]
            out.append(zlib.decompress(text) if compressed else text)
        at += 12 + length
    return out


def texts(path: Path) -> list[bytes]:
    """The byte views of one file to search: raw, plus its decoded/decompressed forms."""
    raw = path.read_bytes()
    out = [raw]
    if path.suffix == ".parquet":
        out.append(pl.read_parquet(path).write_ndjson().encode())
    elif raw[:6] == b"\x93NUMPY":
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
        if arr.dtype.kind in "USO":
            out.append("\n".join(map(str, arr.ravel().tolist())).encode())
    elif raw[:8] == b"\x89PNG\r\n\x1a\n":
        out.extend(_png_text(raw))
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


def encodings(value: str) -> list[bytes]:
    return [value.encode(), value.encode("utf-16-le"), value.encode("utf-32-le")]


def find_in_text(name: str, text: bytes | str, values: set[str]) -> list[str]:
    blob = text.encode() if isinstance(text, str) else text
    return [f"{name}: {v}" for v in sorted(values) if any(e in blob for e in encodings(v))]


def find_values(root: Path, values: set[str], skip: tuple[str, ...] = ()) -> list[str]:
    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel.split("/")[0] in skip:
            continue
        for blob in texts(path):
            hits += [h for h in find_in_text(rel, blob, values) if h not in hits]
    return hits


def hostile_identifiers(dicoms: list[Path]) -> dict[str, str]:
    """Give two files Patient IDs / SOP Instance UIDs that look like paths (`..`, a
    leading `/`, a NUL), each its own study; returns {file name: Patient ID}."""
    import warnings

    out = {}
    for i, path in enumerate(dicoms[:2]):
        ds = pydicom.dcmread(path)
        ds.PatientID = ["../../../../xcam-evil-patient", "/tmp/xcam-evil-abs\x00id"][i]
        ds.SOPInstanceUID = ["../../xcam-evil-sop/..", "/xcam-evil-sop\x00"][i] + str(i)
        ds.StudyInstanceUID = ds.SeriesInstanceUID = f"/xcam-evil-study/{i}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid UI characters, on purpose
            ds.save_as(path, enforce_file_format=True)
        out[path.name] = ds.PatientID
    return out


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.mark.slow
def test_no_phi_or_key_in_artifacts_event_log_or_logs(
        project: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    key = "phi-test-key-4f1c9e0a7b-KEEP-OUT"
    monkeypatch.setenv("XCAM_PSEUDONYM_KEY", key)
    s = load_settings()
    batches = write_demo_cohort(s.incoming_dir, n_images=40, n_batches=2, size=96,
                                seed=s.seed, finding=s.findings[0])
    hostile = hostile_identifiers(sorted(batches[0].glob("*.dcm")))
    for b in batches:
        (b / ".complete").touch()
    values = phi_values(sorted(s.incoming_dir.rglob("*.dcm")))
    assert {"DEMO^PATIENT0001", "Demo General Hospital", "DEMO^REFERRER^DR",
            "DEMOACC000001"} <= values
    assert any(v.startswith("DEMO00") for v in values)  # Patient IDs
    assert any(v.startswith("2.25.") for v in values)  # UIDs are searched too
    assert set(hostile.values()) <= values
    values.add(key)
    outside = tree(project.parent)

    logs: list[str] = []
    materialize_all(settings=s, instance=dg.DagsterInstance.get(), log=logs.append)
    assert (s.metrics_dir / "metric_table.parquet").exists()
    captured = capfd.readouterr()

    # the files with hostile identifiers were admitted and went all the way
    inv = pl.concat([pl.read_parquet(p) for p in s.inventory_dir.glob("*.parquet")])
    assert inv.filter(pl.col("file").is_in(list(hostile)))["status"].to_list() == ["ok", "ok"]
    # positive control: the scanner does see PHI where it legitimately is
    assert {h.split(": ", 1)[1] for h in find_values(s.data_dir / "raw", values)} >= set(
        hostile.values())
    hits = find_values(s.data_dir, values, skip=("incoming", "raw"))
    assert not hits, hits[:20]
    scanned = [p for p in s.data_dir.rglob("*") if p.is_file()
               and p.relative_to(s.data_dir).parts[0] not in ("incoming", "raw")]
    assert {".parquet", ".npy", ".png", ".json"} <= {p.suffix for p in scanned}
    home = Path(dg.DagsterInstance.get().root_directory)
    assert any(p.suffix == ".db" for p in home.rglob("*"))
    hits = find_values(home, values)
    assert not hits, hits[:20]
    # the run's own output: the orchestration log and everything printed (Dagster's
    # console logger included)
    assert "materialized" in "\n".join(logs) and " - dagster - INFO - " in captured.err
    hits = (find_in_text("log", "\n".join(logs), values)
            + find_in_text("stdout", captured.out, values)
            + find_in_text("stderr", captured.err, values))
    assert not hits, hits[:20]
    # no header value became a path: new files only under data/, the Dagster home and the
    # study report's folder (reports/, outside the versioned data); the report has no PHI
    new = tree(project.parent) - outside
    places = ("project/data/", "project/dagster_home/", "project/reports")
    assert all(n.startswith(places) for n in new), sorted(
        n for n in new if not n.startswith(places))[:10]
    report = project / "reports" / "report.html"
    assert not find_in_text("report", report.read_text(), values)
    assert not [p for p in project.parent.rglob("*xcam-evil*")]
    assert not list(Path("/tmp").glob("xcam-evil*"))
