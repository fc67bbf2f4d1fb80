"""Content hashes and atomic writes: the one place both come from.

Dagster data versions and the provenance records use these hashes, and every
artifact under `data/` is written to a temporary name and renamed into place,
so a killed run never leaves a half-written file under its final name.

DVC agreement: an asset's Dagster data version is `dvc_md5(output)`, computed the
way DVC 3 computes the hash it writes to `dvc.lock` (`hash: md5`): a file's md5 of
its bytes; a directory's `<md5>.dir`, the md5 of the JSON list
`[{"md5": <file md5>, "relpath": <posix path>}, ...]` sorted by relpath and dumped
with `json.dumps(..., sort_keys=True)` (dvc_data.hashfile.tree.Tree.as_bytes). Every
file below the directory counts (symlinks followed, empty folders not); outputs hold
no file that `.dvcignore` would hide. tests/automation/test_dvc_agreement.py checks
this against `dvc` itself.
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


def md5_file(path: Path) -> str:
    """md5 of a file's bytes: DVC 3's per-file hash (not a security hash here)."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def dvc_tree(root: Path) -> list[dict[str, str]]:
    """DVC's `.dir` manifest of a folder: [{"md5", "relpath"}] sorted by relpath."""
    root = Path(root)
    entries = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath) / name
            entries.append({"md5": md5_file(path),
                            "relpath": path.relative_to(root).as_posix()})
    return sorted(entries, key=lambda e: e["relpath"])


def dvc_tree_md5(entries: Iterable[dict[str, str]]) -> str:
    """The `<md5>.dir` hash DVC gives a folder with these manifest entries."""
    rows = sorted(({"md5": e["md5"], "relpath": e["relpath"]} for e in entries),
                  key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(rows, sort_keys=True).encode(),
                       usedforsecurity=False).hexdigest() + ".dir"


def dvc_md5(path: Path) -> str:
    """The hash DVC records for `path` in dvc.lock: md5 of a file, `<md5>.dir` of a folder."""
    path = Path(path)
    if path.is_dir():
        return dvc_tree_md5(dvc_tree(path))
    return md5_file(path)


def subtree(entries: Iterable[dict[str, str]], prefix: str) -> list[dict[str, str]]:
    """The entries of a parent's manifest below `prefix/`, relative to it (a partition's
    own folder inside a DVC-tracked parent such as data/tensors/<batch>/)."""
    prefix = prefix.rstrip("/") + "/"
    return [{"md5": e["md5"], "relpath": e["relpath"][len(prefix):]}
            for e in entries if e["relpath"].startswith(prefix)]


MANIFESTS_DIR = "manifests"


def dvc_data_version(path: Path, manifest_home: Path | str | None = None) -> str:
    """`dvc_md5(path)`, the data version of an asset whose output is `path`.

    For a folder the `.dir` manifest is also kept, content-addressed, under
    `<manifest_home>/manifests/<md5[:2]>/<md5[2:]>` (default: $DAGSTER_HOME, beside
    the event log), so that `xcam audit` can name the file that changed later."""
    path = Path(path)
    if not path.is_dir():
        return md5_file(path)
    entries = dvc_tree(path)
    digest = dvc_tree_md5(entries)
    home = manifest_home or os.environ.get("DAGSTER_HOME")
    if home:
        store = Path(home) / MANIFESTS_DIR / digest[:2] / digest[2:]
        if not store.exists():
            atomic_write_text(store, json.dumps(entries, sort_keys=True))
    return digest


def load_manifest(digest: str, manifest_home: Path | str) -> list[dict[str, str]] | None:
    """A folder manifest kept by `dvc_data_version`, or None."""
    store = Path(manifest_home) / MANIFESTS_DIR / digest[:2] / digest[2:]
    return json.loads(store.read_text()) if store.exists() else None


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
