"""Content hashes and atomic writes: the one place both come from.

Dagster data versions and the provenance records use these hashes, and every
artifact under `data/` is written to a temporary name and renamed into place,
so a killed run never leaves a half-written file under its final name. A temporary
name says whose it is (`.<final name>.<pid>.<random>.tmp`): `remove_stale_temps` clears
those of dead writers (each asset calls it on its output folder before writing), and
`dvc_tree` skips them, as `.dvcignore` (`.*.tmp`) makes DVC do, so a live writer's temp
file never enters a hash and a killed one's never reaches the DVC cache.

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
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHUNK = 1 << 20
#: a temporary file of `temp_path`: `.<final name>.<writer pid>.<random>[suffix].tmp`
TEMP_NAME = re.compile(r"^\.(?P<final>.+)\.(?P<pid>\d+)\.[a-z0-9_]{8}(\.[A-Za-z0-9]+)?\.tmp$")


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
            if is_temp_name(name):
                continue  # a writer's temporary file (.dvcignore: `.*.tmp`)
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


def tree_hash(root: Path, pattern: str = "**/*") -> str:
    """Digest of every file below `root` (relative names + contents)."""
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    return combine_hashes((p.relative_to(root).as_posix(), sha256_file(p)) for p in files)


def is_temp_name(name: str) -> bool:
    """A temporary file name (`.*.tmp`, the pattern in `.dvcignore`)."""
    return len(name) > 4 and name.startswith(".") and name.endswith(".tmp")


def temp_path(final: Path, suffix: str = "") -> Path:
    """A new empty temporary file beside `final`, named for its writer:
    `.<final name>.<pid>.<random><suffix>.tmp` (renamed over `final` when complete)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.{os.getpid()}.",
                               suffix=f"{suffix}.tmp", dir=final.parent)
    os.close(fd)
    return Path(tmp)


def process_alive(pid: int, start_ticks: str | None = None) -> bool:
    """Whether process `pid` runs on this host (a zombie counts as gone). With
    `start_ticks` (field 22 of /proc/<pid>/stat, see `process_start_ticks`) a later
    process that reuses the number does not count either."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (not Linux): the signal test is all there is
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return False
    return start_ticks is None or fields[19] == start_ticks


def process_started_at(pid: int) -> float | None:
    """When process `pid` started, in seconds since the epoch (Linux; None elsewhere)."""
    ticks = process_start_ticks(pid)
    try:
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
    except (OSError, StopIteration):
        return None
    return None if ticks is None else btime + int(ticks) / os.sysconf("SC_CLK_TCK")


def process_start_ticks(pid: int | None = None) -> str | None:
    """When process `pid` (default: this one) started, in clock ticks after boot (Linux)."""
    try:
        stat = Path(f"/proc/{pid or os.getpid()}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def remove_stale_temps(folder: Path, recursive: bool = True) -> list[Path]:
    """Delete the temporary files below `folder` whose writer process is gone (a run
    killed mid-write leaves them); a live writer's are kept. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    paths = folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")
    for path in sorted(paths):
        match = TEMP_NAME.match(path.name)
        if match and path.is_file() and not process_alive(int(match["pid"])):
            try:
                path.unlink()
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


@contextmanager
def exclusive_lock(path: Path) -> Iterator[float]:
    """Hold an exclusive `flock` on `path` (created) for the block; yields the seconds
    waited for it. Processes on one host queue; a killed holder releases it."""
    import fcntl
    import time

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield time.monotonic() - started
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextmanager
def atomic_path(final: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside `final` (`temp_path`); rename it over `final` on success
    only, after an fsync, so a crash leaves the old file or the new one, never a part."""
    final = Path(final)
    tmp_path = temp_path(final, suffix)
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
