"""Where the real radiographs and label tables are: ../shared/data beside the repo, read
in place. Tests that need them skip, saying what is missing, when they are absent.

Its own module, not conftest.py: `from conftest import ...` binds to whichever
conftest.py pytest imported last under that name (tests/train/ has one too), so running
two test folders together failed at collection."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (../shared/data beside the repo)")
    return path
