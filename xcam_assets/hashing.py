"""Content hashes: the one place they come from.

Dagster data versions and the provenance records use these hashes. `dvc_tree` skips
writers' temporary files (`xcam_assets.atomic`), as `.dvcignore` (`.*.tmp`) makes DVC
do, so a live writer's temp file never enters a hash and a killed one's never reaches
the DVC cache.

DVC agreement: an asset's Dagster data version is `dvc_md5(output)`, computed the
way DVC 3 computes the hash it writes to `dvc.lock` (`hash: md5`): a file's md5 of
its bytes; a directory's `<md5>.dir`, the md5 of the JSON list
`[{"md5": <file md5>, "relpath": <posix path>}, ...]` sorted by relpath and dumped
with `json.dumps(..., sort_keys=True)` (dvc_data.hashfile.tree.Tree.as_bytes). Every
file below the directory counts (symlinks followed, empty folders not); outputs hold
no file that `.dvcignore` would hide except temporary files (`.*.tmp`), which both skip.
tests/automation/test_dvc_agreement.py checks this against `dvc` itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from xcam_assets.atomic import atomic_write_text, is_temp_name, remove_stale_temps

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


def _tree_files(root: Path) -> Iterable[Path]:
    """The files a folder's DVC manifest lists (symlinks followed, temp files not)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in filenames:
            if not is_temp_name(name):  # a writer's temporary file (.dvcignore: `.*.tmp`)
                yield Path(dirpath) / name


def dvc_tree(root: Path) -> list[dict[str, str]]:
    """DVC's `.dir` manifest of a folder: [{"md5", "relpath"}] sorted by relpath."""
    root = Path(root)
    entries = [{"md5": md5_file(path), "relpath": path.relative_to(root).as_posix()}
               for path in _tree_files(root)]
    return sorted(entries, key=lambda e: e["relpath"])


def dvc_relpaths(root: Path) -> set[str]:
    """The relpaths of `dvc_tree(root)`, without reading a byte."""
    root = Path(root)
    return {path.relative_to(root).as_posix() for path in _tree_files(root)}


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
    the event log), so that `xcam audit` can name the file that changed later.

    Temporary files left below `path` (or beside the file) by a killed writer are
    removed first (`remove_stale_temps`); a live writer's are not hashed (`dvc_tree`)."""
    path = Path(path)
    remove_stale_temps(path if path.is_dir() else path.parent, recursive=path.is_dir())
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
