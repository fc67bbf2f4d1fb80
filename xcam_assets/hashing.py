"""Content hashes and atomic writes: the one place both come from.

Dagster data versions and the provenance records use these hashes, and every
artifact under `data/` is written to a temporary name and renamed into place,
so a killed run never leaves a half-written file under its final name.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def combine_hashes(items: Iterable[tuple[str, str]]) -> str:
    """Order-independent digest of (name, hash) pairs: a folder's version."""
    h = hashlib.sha256()
    for name, digest in sorted(items):
        h.update(f"{name}\0{digest}\n".encode())
    return h.hexdigest()


def tree_hash(root: Path, pattern: str = "**/*") -> str:
    """Digest of every file below `root` (relative names + contents)."""
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    return combine_hashes((p.relative_to(root).as_posix(), sha256_file(p)) for p in files)


@contextmanager
def atomic_path(final: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside `final`; rename it over `final` on success only."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix or ".tmp",
                               dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(final: Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: Path, text: str) -> None:
    atomic_write_bytes(final, text.encode())


def atomic_write_json(final: Path, obj: Any) -> None:
    atomic_write_text(final, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_parquet(final: Path, frame: Any) -> None:
    """Write a polars DataFrame as parquet, atomically, deterministic bytes."""
    buf = io.BytesIO()
    frame.write_parquet(buf, compression="zstd", statistics=False)
    atomic_write_bytes(final, buf.getvalue())
