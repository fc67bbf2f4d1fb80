"""Atomic writes and file locks: nothing half-written is ever visible.

Every artifact under `data/` is written to a temporary name and renamed into place, so
a killed run never leaves a half-written file under its final name. A temporary name
says whose it is (`.<final name>.<pid>.<random>.tmp`): `remove_stale_temps` clears those
of dead writers (each asset calls it on its output folder before writing).
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from xcam_assets.procs import process_alive

#: a temporary file of `temp_path`: `.<final name>.<writer pid>.<random>[suffix].tmp`
TEMP_NAME = re.compile(r"^\.(?P<final>.+)\.(?P<pid>\d+)\.[a-z0-9_]{8}(\.[A-Za-z0-9]+)?\.tmp$")


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
