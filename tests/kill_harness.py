"""Kill a process group at a chosen moment of its work, and judge what it left on disk.

`Frozen` runs a command in its own session and lets it run in small slices (SIGCONT,
sleep, SIGSTOP, wait until every thread of every process of the group is stopped), so
the files it has written can be inspected while nothing moves: the state seen is
exactly the state at SIGKILL. No hook in the code under test; the moment is chosen by
its real side effects (files, log lines).

`invalid_files` opens every file under a data folder by its type (parquet, npy, json,
PNG, safetensors, torch, CSV, markdown, raw DICOM copies byte for byte against the
incoming batch) and lists what a reader would choke on; temporary names
(`.<name>.<pid>.<random>.tmp`) are allowed, anything else must be complete.

Imported as `kill_harness` (tests/ is on sys.path through tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from xcam_assets.atomic import is_temp_name

STOPPED = {"T", "t", "Z", "X"}


def _stat_fields(path: str) -> list[str] | None:
    try:
        stat = Path(path).read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()  # fields 3.. (state, ppid, pgrp, ...)


def group_pids(pgid: int) -> list[int]:
    """The live processes of process group `pgid` (from /proc)."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(f"/proc/{entry.name}/stat")
            if fields and int(fields[2]) == pgid:
                pids.append(int(entry.name))
    return pids


def live_pids_running(*cmdline_parts: str) -> list[int]:
    """Live (not zombie) processes whose command line holds every one of `cmdline_parts`."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmdline = Path(f"{entry.path}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            fields = _stat_fields(f"{entry.path}/stat")
            if (fields and fields[0] != "Z"
                    and all(part.encode() in cmdline for part in cmdline_parts)):
                pids.append(int(entry.name))
    return pids


def _running_tasks(pgid: int) -> list[str]:
    """`pid/tid:state` of every thread of the group that is not stopped."""
    out = []
    for pid in group_pids(pgid):
        try:
            tasks = list(os.scandir(f"/proc/{pid}/task"))
        except OSError:
            continue
        for task in tasks:
            fields = _stat_fields(f"{task.path}/stat")
            if fields and fields[0] not in STOPPED and not _in_vfork(task.path, fields[0]):
                out.append(f"{pid}/{task.name}:{fields[0]}")
    return out


def _in_vfork(task: str, state: str) -> bool:
    """A parent in vfork() waits (state D, in kernel_clone) until its child execs or
    exits; with the child stopped it cannot move either (subprocess uses vfork)."""
    if state != "D":
        return False
    try:
        return "clone" in Path(f"{task}/wchan").read_text()
    except OSError:
        return False


class Frozen:
    """A command run in its own process group that can be stopped, inspected and killed."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        self.pgid = self.proc.pid
        self.slices = 0

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 20) -> None:
        """SIGSTOP the group and wait until every thread of it is stopped (re-sent while
        waiting: a process forked meanwhile is stopped too)."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGSTOP)
            running = _running_tasks(self.pgid)
            if not running:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"process group {self.pgid} did not stop: {running}")
            time.sleep(0.0005)

    def cont(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGCONT)

    def freeze_when(self, moment: Callable[[], bool], after_log: str | None = None,
                    quantum: float = 0.003, timeout: float = 300) -> None:
        """Run freely until `after_log` appears in the log, then in slices of `quantum`
        seconds until `moment()` holds while the group is stopped; return it stopped.
        Fails the test (with the log) if the command ends first."""
        deadline = time.monotonic() + timeout
        while after_log and after_log not in self.log_text():
            self._alive_or_fail(after_log, deadline)
            time.sleep(0.01)
        while True:
            self.stop()
            self._alive_or_fail("the moment to kill", deadline)
            if moment():
                return
            self.slices += 1
            self.cont()
            time.sleep(quantum)

    def _alive_or_fail(self, waiting_for: str, deadline: float) -> None:
        if self.proc.poll() is not None or time.monotonic() > deadline:
            self.kill()
            pytest.fail(f"the command ended (rc {self.proc.returncode}) or timed out before "
                        f"{waiting_for!r}:\n{self.log_text()[-4000:]}")

    def kill(self) -> None:
        """SIGKILL the whole group (a stopped group dies as well) and reap the leader."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while group_pids(self.pgid) and time.monotonic() < deadline:
            time.sleep(0.05)  # children reparented to init are reaped there


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digests(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file below `root` (temporary files left out)."""
    if not root.exists():
        return {}
    if root.is_file():
        return {root.name: sha256(root)}
    return {p.relative_to(root).as_posix(): sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and not is_temp_name(p.name)}


def temp_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and is_temp_name(p.name))


def _check_file(path: Path, data_dir: Path) -> None:
    """Raise when `path` is not a complete file of its kind."""
    rel = path.relative_to(data_dir)
    name = path.name
    if rel.parts[0] == "raw":  # byte-identical to its incoming original
        source = data_dir / "incoming" / Path(*rel.parts[1:])
        if sha256(path) != sha256(source):
            raise ValueError("differs from the incoming original")
    elif name.endswith(".parquet"):
        pl.read_parquet(path)
    elif name.endswith(".npy"):
        np.load(path)  # reads the whole array: a short file raises
    elif name.endswith(".json"):
        json.loads(path.read_text())
    elif name.endswith(".csv"):
        pl.read_csv(path)
    elif name.endswith(".png"):
        from PIL import Image

        with Image.open(path) as im:
            im.load()  # a truncated PNG raises
    elif name.endswith(".safetensors"):
        from safetensors.numpy import load_file

        load_file(str(path))
    elif name.endswith(".pt"):
        import torch

        torch.load(path, weights_only=True, map_location="cpu")
    elif name.endswith(".html"):  # the study report: complete when its document closes
        if not path.read_text().rstrip().endswith("</html>"):
            raise ValueError("truncated HTML (no closing </html>)")
    elif name.endswith(".md"):
        if not path.read_text().endswith("\n"):
            raise ValueError("markdown does not end with a newline (cut short?)")
    else:
        raise ValueError("unknown kind of output: teach kill_harness to check it")


def _check_shapes(data_dir: Path) -> list[str]:
    """Arrays whose shape disagrees with the manifest beside them."""
    problems = []
    for manifest_path in sorted(data_dir.glob("tensors/*/manifest.parquet")):
        manifest = pl.read_parquet(manifest_path)
        folder = manifest_path.parent
        n, size = manifest.height, manifest["height"][0] if manifest.height else 0
        for name, rank in (("images.npy", 3), ("regions.npy", 4)):
            arr = np.load(folder / name, mmap_mode="r")
            if arr.shape[0] != n or arr.ndim != rank or arr.shape[-2:] != (size, size):
                problems.append(f"{folder.name}/{name}: shape {arr.shape}, manifest {n} x "
                                f"{size}x{size}")
    for manifest_path in sorted(data_dir.glob("heatmaps/*/heatmap_manifest.parquet")):
        n = pl.read_parquet(manifest_path).height
        for npy in sorted(manifest_path.parent.glob("*.npy")):
            if not is_temp_name(npy.name) and np.load(npy, mmap_mode="r").shape[0] != n:
                problems.append(f"{npy}: {np.load(npy, mmap_mode='r').shape[0]} rows, "
                                f"manifest {n}")
    return problems


def invalid_files(data_dir: Path) -> list[str]:
    """Every final-named file below `data_dir` (incoming/ excepted) that is not complete
    and valid for its kind, with the reason; empty when all are."""
    problems = []
    for path in sorted(data_dir.rglob("*")):
        rel = path.relative_to(data_dir)
        if not path.is_file() or rel.parts[0] == "incoming" or is_temp_name(path.name):
            continue
        try:
            _check_file(path, data_dir)
        except Exception as exc:  # noqa: BLE001 - every failure is a finding
            problems.append(f"{rel}: {type(exc).__name__}: {exc}")
    if not problems:
        problems += _check_shapes(data_dir)
    return problems


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """os.environ replaced by `env` for the block (in-process runs on a project)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
