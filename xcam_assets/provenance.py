"""Who/what/where facts recorded beside every model and table."""

from __future__ import annotations

import getpass
import platform
import socket
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

PACKAGES = ("xcam", "dagster", "torch", "timm", "grad-cam", "pydicom", "polars",
            "great-expectations", "numpy", "opencv-python-headless")


@lru_cache(maxsize=4)
def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def environment() -> dict[str, str]:
    return {"host": socket.gethostname(), "user": getpass.getuser(),
            "python": platform.python_version(), "platform": platform.platform()}
