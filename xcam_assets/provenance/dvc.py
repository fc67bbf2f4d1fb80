"""DVC from xcam: one command at a time per checkout, and where each asset's output lies.

DVC takes a repo lock (`.dvc/tmp/rwlock`, `.dvc/tmp/lock`) for most commands; two at
once in one checkout fail. Every DVC call xcam makes (`xcam dvc ...`, `xcam demo`, the
commit-after-run sensor) goes through `run_dvc`, which holds an exclusive `flock` on
`.xcam/dvc.flock` for the whole command, so concurrent callers wait instead of failing.
A stage command that `dvc repro` runs (`xcam materialize <stage>`) sees DVC_STAGE in its
environment and never calls DVC back.

Hash agreement (see xcam_assets.hashing): each asset's Dagster data version is
`dvc_md5(asset_output(...))`. For an unpartitioned asset whose output is a whole DVC
out (`cohort_splits` -> data/splits, `metric_tables` -> data/metrics) it is the md5 in
dvc.lock. A partitioned asset's output is one entry or one sub-folder of a DVC out
(data/inventory/<batch>.parquet, data/tensors/<batch>/): its version is the md5 DVC
lists for that file in the out's `.dir` manifest, or the `.dir` hash of the sub-folder's
slice of that manifest, which `dvc_version_in_lock` derives from dvc.lock + the cache.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from xcam_assets.config import PACKAGE_ROOT
from xcam_assets.hashing import dvc_tree_md5, subtree

#: asset -> (dvc.yaml stage, DVC out relative to the data dir, kind of partition output)
ASSET_OUTS: dict[str, tuple[str, str, str]] = {
    "raw_dicoms": ("ingest", "raw", "dir"),
    "dicom_inventory": ("ingest", "inventory", "parquet"),
    "findings": ("ingest", "findings", "parquet"),
    "cohort_splits": ("splits", "splits", "whole"),
    "clahe_tensors": ("preprocess", "tensors", "dir"),
    "checkpoints": ("train", "checkpoints", "dir"),
    "heatmap_sets": ("explain", "heatmaps", "dir"),
    "metric_tables": ("evaluate", "metrics", "whole"),
    "external_cohort": ("splits", "external_cohort", "whole"),
    "external_scores": ("evaluate", "external_scores", "whole"),
}
LOCK_HELD_ENV = "XCAM_DVC_LOCK_HELD"


def asset_output(settings: Any, asset: str, partition: str | None) -> Path:
    """The file or folder whose DVC hash is the asset (partition)'s data version."""
    _, out, kind = ASSET_OUTS[asset]
    parent = settings.data_dir / out
    if kind == "whole":
        return parent
    if partition is None:
        raise ValueError(f"{asset} is partitioned: name a partition")
    return parent / (f"{partition}.parquet" if kind == "parquet" else partition)


def dvc_executable(settings: Any) -> Path:
    """XCAM_DVC, else the project's .venv-dvc, else that of the checkout xcam runs from."""
    if os.environ.get("XCAM_DVC"):
        return Path(os.environ["XCAM_DVC"])
    local = settings.root / ".venv-dvc" / "bin" / "dvc"
    return local if local.exists() else PACKAGE_ROOT / ".venv-dvc" / "bin" / "dvc"


def has_dvc(settings: Any) -> bool:
    """The checkout is a DVC project and DVC is installed."""
    return (settings.root / ".dvc").is_dir() and dvc_executable(settings).exists()


@contextmanager
def dvc_lock(root: Path, timeout: float | None = None) -> Iterator[None]:
    """Exclusive lock serialising DVC commands in one checkout (`.xcam/dvc.flock`).

    Re-entrant across processes through XCAM_DVC_LOCK_HELD (a child of a holder passes).
    Raises TimeoutError after `timeout` seconds (None: wait for ever)."""
    if os.environ.get(LOCK_HELD_ENV) == str(root):
        yield
        return
    path = root / ".xcam" / "dvc.flock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"another DVC command holds {path}") from None
                time.sleep(0.2)
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def run_dvc(settings: Any, *args: str, check: bool = True, timeout: float | None = None,
            capture: bool = False) -> subprocess.CompletedProcess:
    """Run `dvc <args>` from its own environment (.venv-dvc: its antlr pin clashes with
    dagster's), serialised by `dvc_lock`, with this environment's `xcam` on PATH for the
    stage commands."""
    root = settings.root
    dvc = dvc_executable(settings)
    if not dvc.exists():
        msg = f"xcam: DVC not found at {dvc}; run `make setup` (skipping `dvc {' '.join(args)}`)"
        print(msg)
        return subprocess.CompletedProcess([str(dvc), *args], 1 if check else 0, "", msg)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DAGSTER_HOME", str(root / "dagster_home"))
    env[LOCK_HELD_ENV] = str(root)
    with dvc_lock(root, timeout=timeout):
        proc = subprocess.run([str(dvc), *args], cwd=root, env=env, text=True,
                              capture_output=capture)
    if check and proc.returncode:
        detail = f": {proc.stderr.strip()[-2000:]}" if capture and proc.stderr else ""
        raise SystemExit(f"xcam: `dvc {' '.join(args)}` failed with exit code "
                         f"{proc.returncode}{detail}")
    return proc


def lock_outs(root: Path) -> dict[str, str]:
    """DVC out path (relative to the repo) -> md5 recorded in dvc.lock."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return {}
    data = yaml.safe_load(lock.read_text()) or {}
    return {o["path"]: o.get("md5", "") for st in data.get("stages", {}).values()
            for o in st.get("outs", [])}


def cache_manifest(root: Path, digest: str) -> list[dict[str, str]] | None:
    """A `.dir` manifest from the DVC cache (files/md5/xx/yyy.dir), or None."""
    path = root / ".dvc" / "cache" / "files" / "md5" / digest[:2] / digest[2:]
    return json.loads(path.read_text()) if path.exists() else None


def dvc_version_in_lock(settings: Any, asset: str, partition: str | None) -> str | None:
    """What dvc.lock (+ the DVC cache) says the asset (partition)'s hash is, or None when
    DVC has not committed it."""
    _, out, kind = ASSET_OUTS[asset]
    try:
        rel_out = (settings.data_dir / out).relative_to(settings.root).as_posix()
    except ValueError:
        return None
    recorded = lock_outs(settings.root).get(rel_out)
    if not recorded:
        return None
    if kind == "whole":
        return recorded
    manifest = cache_manifest(settings.root, recorded)
    if manifest is None:
        return None
    if kind == "parquet":
        name = f"{partition}.parquet"
        return next((e["md5"] for e in manifest if e["relpath"] == name), None)
    entries = subtree(manifest, partition or "")
    return dvc_tree_md5(entries) if entries else None
