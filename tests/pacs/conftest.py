"""Fixtures of the PACS tests: a real Orthanc with the DICOMweb plugin on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pacs.harness import Orthanc, dicomweb_plugin, orthanc_binary


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """Orthanc of the test's own (storage in tmp, free HTTP and DICOM ports, basic auth);
    skips, saying why, only when Debian's orthanc / orthanc-dicomweb are not installed
    (`make orthanc` installs them as root)."""
    binary, plugin = orthanc_binary(), dicomweb_plugin()
    if binary is None:
        pytest.skip("Orthanc is not installed (Debian package `orthanc`; `make orthanc` "
                    "installs it when run as root)")
    if plugin is None:
        pytest.skip("Orthanc's DICOMweb plugin is not installed (Debian package "
                    "`orthanc-dicomweb`; `make orthanc` installs it when run as root)")
    server = Orthanc(tmp_path / "orthanc", binary, plugin).start()
    try:
        yield server
    finally:
        server.stop()
