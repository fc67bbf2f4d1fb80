"""Shared fixtures: a throw-away xcam project (tiny profile) on the synthetic demo cohort."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from real_data import REPO

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("XCAM_PROFILE", "tiny")
os.environ.setdefault("XCAM_PSEUDONYM_KEY", "test-only-key-not-a-secret")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the repo's resources/ in tmp, with its own data dir and Dagster home."""
    root = tmp_path / "project"
    shutil.copytree(REPO / "resources", root / "resources")
    (root / "dagster_home").mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", root / "dagster_home" / "dagster.yaml")
    monkeypatch.setenv("XCAM_ROOT", str(root))
    monkeypatch.setenv("XCAM_DATA_DIR", str(root / "data"))
    monkeypatch.setenv("DAGSTER_HOME", str(root / "dagster_home"))
    monkeypatch.setenv("XCAM_PROFILE", "tiny")
    return root
