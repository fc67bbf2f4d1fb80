"""Pseudonymisation: keyed hashes instead of patient identifiers.

The key comes from XCAM_PSEUDONYM_KEY, else the file named by
XCAM_PSEUDONYM_KEY_FILE, else a random key created once in `.xcam/pseudonym.key`
(git-ignored, mode 0600): never from the repository. Every inventory row
records `key_id`, a keyed fingerprint of the key (not the key), so a batch
pseudonymised with another key is detected before its patient keys fail to
link with the other batches' (which would let one patient into two splits).

What never leaves the inventory step: patient name/ID/birth date, institution,
physicians, accession number, dates and the DICOM UIDs. Downstream artifacts
carry only `I…` (SOP Instance UID), `P…` (Patient ID) and `S…` (Study Instance
UID) pseudonyms. `data/raw/` is the untouched source copy and does hold PHI:
it must live on access-controlled storage (as `data/incoming/` does).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from functools import lru_cache
from pathlib import Path

PHI_KEYWORDS: tuple[str, ...] = (
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames",
    "PatientAddress", "PatientTelephoneNumbers", "InstitutionName", "InstitutionAddress",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "AccessionNumber",
    "StudyID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
)
"""Header attributes whose values must never appear in an artifact (the PHI test greps them)."""


def pseudonym_key(root: Path) -> bytes:
    """The HMAC key: environment, then a key file, then `<root>/.xcam/pseudonym.key`."""
    env = os.environ.get("XCAM_PSEUDONYM_KEY")
    if env:
        return env.encode()
    key_file = os.environ.get("XCAM_PSEUDONYM_KEY_FILE")
    path = Path(key_file) if key_file else root / ".xcam" / "pseudonym.key"
    if key_file and not path.exists():
        raise FileNotFoundError(f"XCAM_PSEUDONYM_KEY_FILE={key_file} does not exist")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(secrets.token_hex(32))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    return path.read_text().strip().encode()


def pseudonymise(value: str | None, key: bytes, prefix: str = "P") -> str | None:
    """HMAC-SHA256 of an identifier, shortened: stable per key, not reversible."""
    if value is None or value == "":
        return None
    return prefix + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:20]


@lru_cache(maxsize=8)
def key_id(key: bytes) -> str:
    """A fingerprint of the key that reveals nothing of it (an HMAC of a constant)."""
    return "K" + hmac.new(key, b"xcam pseudonym key id", hashlib.sha256).hexdigest()[:12]
