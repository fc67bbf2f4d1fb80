"""Staging folders: how an instance from the PACS becomes part of an arrival batch.

An instance is written durably (temp file, fsync, rename, fsync of the folder) into a
staging folder `data/incoming/.xcam-pacs/staging/<batch>/` and recorded in the ledger;
only then is it acknowledged (C-STORE status 0x0000) or counted as fetched. When the
batch is done, `finalize` writes its `labels.csv` (header only: the PACS sends images,
not labels) and the `.complete` marker, then renames the whole folder to
`data/incoming/<batch>/` in one step: the batch sensor sees a complete batch or nothing,
exactly as for a hand-made one. A process killed at any point leaves either a staging
folder (resumed by the next start) or a complete batch (whose ledger rows `recover`
marks committed).

File names are `I<keyed hash of the SOP Instance UID>.dcm`, the same pseudonym the
inventory gives the image (`image_key`): no UID reaches a file name, and the same
instance always gets the same name, so a resumed transfer overwrites instead of adding.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from xcam_assets.atomic import remove_stale_temps, temp_path
from xcam_assets.ingest.deid import pseudonym_key, pseudonymise
from xcam_assets.ingest.pacs.ledger import Ledger

AREA = ".xcam-pacs"  # dot-named: the batch sensor never lists it as a batch
# spelled out, not imported: `xcam receive` must start fast, without Dagster or polars
# (tests/pacs/test_staging.py checks they equal xcam_assets.automation's and labels.py's)
MARKER = ".complete"
LABELS = "labels.csv"
LABEL_HEADER = "file,finding,present,x_min,y_min,x_max,y_max,mask_file\n"


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write(final: Path, data: bytes) -> None:
    """`final` holds `data` or its previous content, never a part, even after kill -9 or
    power loss (temp file + fsync + rename + fsync of the folder)."""
    tmp = temp_path(final)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(final.parent)


@dataclass(frozen=True)
class Stored:
    """What `PacsArea.store` did with one instance."""

    file: str
    sha256: str
    stored: bool  # False: the same UID and bytes were already taken in


class PacsArea:
    """The PACS corner of the drop zone: ledger, staging folders, the hand-over."""

    def __init__(self, incoming: Path, root: Path) -> None:
        self.incoming = Path(incoming)
        self.base = self.incoming / AREA
        self.staging_root = self.base / "staging"
        self.staging_root.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(self.base / "ledger.sqlite")
        self._key = pseudonym_key(Path(root))

    @classmethod
    def from_settings(cls, settings: object) -> PacsArea:
        return cls(settings.incoming_dir, settings.root)  # type: ignore[attr-defined]

    def recover(self) -> list[str]:
        """After a crash: batches renamed into data/incoming/ whose ledger rows were not yet
        committed get committed; staging folders lose dead writers' temp files."""
        done = []
        for batch in self.ledger.staged_batches():
            if (self.incoming / batch / MARKER).exists() and not (self.staging_root / batch).exists():
                self.ledger.commit_batch(batch)
                done.append(batch)
        remove_stale_temps(self.staging_root)
        return done

    def find_staging(self, prefix: str) -> Path | None:
        """The staging folder a previous run of `prefix` left (None: none)."""
        existing = sorted(p for p in self.staging_root.glob(f"{prefix}-*") if p.is_dir())
        return existing[0] if existing else None

    def open_staging(self, prefix: str) -> Path:
        """The staging folder of the batch being filled by `prefix` (a restart resumes
        the one it left), else a new one named `<prefix>-<UTC time>`."""
        existing = self.find_staging(prefix)
        if existing is not None:
            return existing
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        path = self.staging_root / f"{prefix}-{stamp}"
        path.mkdir(parents=True)
        fsync_dir(self.staging_root)
        return path

    def file_name(self, sop_uid: str, sha256: str) -> str:
        """`I<pseudonym>.dcm`; a second, different version of one UID gets its digest too
        (kept, never overwriting the first: ingest then quarantines it as a duplicate UID)."""
        name = pseudonymise(sop_uid, self._key, prefix="I")
        other = self.ledger.versions(sop_uid) - {sha256}
        return f"{name}-{sha256[:12]}.dcm" if other else f"{name}.dcm"

    def store(self, staging: Path, sop_uid: str, data: bytes, source: str) -> Stored:
        """Durably stage one instance and record it; an instance with the same UID and
        bytes already taken in (any batch) is not stored again."""
        sha = hashlib.sha256(data).hexdigest()
        known = self.ledger.get(sop_uid, sha)
        if known is not None:
            return Stored(known.file, sha, stored=False)
        name = self.file_name(sop_uid, sha)
        durable_write(staging / name, data)
        self.ledger.record_staged(sop_uid, sha, len(data), source, staging.name, name)
        return Stored(name, sha, stored=True)

    def staged_files(self, staging: Path) -> list[Path]:
        return sorted(p for p in staging.glob("*.dcm") if not p.name.startswith("."))

    def finalize(self, staging: Path) -> Path | None:
        """Hand the staged batch over: labels.csv (header only) and `.complete` written
        inside, then one rename into data/incoming/. An empty staging folder is removed."""
        if not self.staged_files(staging):
            shutil.rmtree(staging, ignore_errors=True)
            return None
        labels = staging / LABELS
        if not labels.exists():
            durable_write(labels, LABEL_HEADER.encode())
        durable_write(staging / MARKER, b"")
        final = self.incoming / staging.name
        if final.exists():
            raise FileExistsError(f"{final} exists: staging folder {staging} not handed over")
        os.rename(staging, final)
        fsync_dir(self.incoming)
        fsync_dir(self.staging_root)
        self.ledger.commit_batch(final.name)
        return final
