"""Who/what/where facts recorded beside every model, table and run.

`execution_tags()` are the run tags (`xcam/...`) that every xcam run carries: the
orchestrator (`xcam materialize`, `dvc repro`) sets them on its in-process runs, the
incoming-batch sensor on its run requests, and `ProvenanceRunLauncher`
(`dagster_home/dagster.yaml`) on every run the UI or the daemon launches. `xcam audit`
reads them back. Sub-modules: `dvc` (DVC calls, serialised), `audit` (lineage walk and
tamper check), `prov` (W3C PROV-JSON), `report` (HTML), `launcher`.
"""

from __future__ import annotations

import getpass
import json
import os
import platform
import socket
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("xcam", "dagster", "torch", "timm", "grad-cam", "pydicom", "polars",
            "great-expectations", "numpy", "opencv-python-headless")

#: run tags written by `execution_tags`
TAG_HOST, TAG_USER, TAG_GIT, TAG_PACKAGES = "xcam/host", "xcam/user", "xcam/git_commit", \
    "xcam/packages"
#: the process of an in-process run (`xcam materialize`): pid and its start ticks
TAG_PID, TAG_PID_START = "xcam/pid", "xcam/pid_start"
TAG_PARAMS, TAG_PROFILE, TAG_PYTHON, TAG_LAUNCHED_BY = "xcam/params", "xcam/profile", \
    "xcam/python", "xcam/launched_by"


def _git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@lru_cache(maxsize=4)
def git_commit(root: Path) -> str:
    """`git rev-parse HEAD` of the checkout (+dirty when tracked files changed); cached."""
    return _git_commit(root)


def code_root() -> Path:
    """The checkout the running xcam code comes from (its git commit is the code's)."""
    from xcam_assets.config import PACKAGE_ROOT

    return PACKAGE_ROOT


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


def run_parameters(settings: Any) -> dict[str, Any]:
    """The parameters a run works with: merged params.yaml (+ study), profile, study."""
    return {"profile": settings.profile_name, "study": os.environ.get("XCAM_STUDY") or None,
            "params": settings.params}


def execution_tags(settings: Any = None, launched_by: str = "") -> dict[str, str]:
    """Run tags naming where, by whom and with what a run executes (fresh, not cached:
    a long-running daemon sees new commits)."""
    if settings is None:
        from xcam_assets.config import load_settings

        settings = load_settings()
    env = environment()
    tags = {
        TAG_HOST: env["host"], TAG_USER: env["user"], TAG_PYTHON: env["python"],
        TAG_GIT: _git_commit(code_root()),
        TAG_PACKAGES: json.dumps(package_versions(), sort_keys=True, separators=(",", ":")),
        TAG_PARAMS: json.dumps(run_parameters(settings), sort_keys=True, separators=(",", ":"),
                               default=str),
        TAG_PROFILE: settings.profile_name,
    }
    if launched_by:
        tags[TAG_LAUNCHED_BY] = launched_by
    return tags
