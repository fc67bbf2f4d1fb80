"""Pseudonymisation: keyed hashes instead of patient identifiers.

The key comes from XCAM_PSEUDONYM_KEY or, failing that, a random key created
once in `.xcam/pseudonym.key` (git-ignored): never from the repository.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path


def pseudonym_key(root: Path) -> bytes:
    env = os.environ.get("XCAM_PSEUDONYM_KEY")
    if env:
        return env.encode()
    path = root / ".xcam" / "pseudonym.key"
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
