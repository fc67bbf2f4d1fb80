"""The staging area's constants and crash recovery, without a server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from xcam_assets.automation import LABELS, MARKER
from xcam_assets.ingest.labels import LABEL_COLUMNS
from xcam_assets.ingest.pacs import staging
from xcam_assets.ingest.pacs.staging import PacsArea


def test_constants_match_the_batch_sensor_and_the_label_reader() -> None:
    assert (staging.MARKER, staging.LABELS) == (MARKER, LABELS)
    assert staging.LABEL_HEADER == ",".join(LABEL_COLUMNS) + "\n"


def test_receiver_and_puller_import_neither_dagster_nor_polars() -> None:
    """`xcam receive` / `xcam pacs-pull` start in seconds on a busy machine."""
    code = ("import sys, xcam_assets.cli, xcam_assets.ingest.pacs.receiver, "
            "xcam_assets.ingest.pacs.dicomweb, xcam_assets.ingest.pacs.commands; "
            "print(sorted(m for m in ('dagster', 'polars') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ})
    assert out.stdout.strip() == "[]"


def test_a_crash_after_the_rename_is_committed_at_the_next_start(tmp_path: Path) -> None:
    """Killed between the hand-over rename and the ledger update: `recover` commits it;
    a resent instance (same UID, same bytes) is not stored again; another version of
    the UID is kept beside the first, never over it."""
    area = PacsArea(tmp_path / "incoming", tmp_path)
    box = area.open_staging("recv")
    assert area.open_staging("recv") == box  # a restart resumes the same folder
    first = area.store(box, "1.2.3.4", b"DICM one", source="test")
    assert first.stored and area.store(box, "1.2.3.4", b"DICM one", source="test").stored is False
    second = area.store(box, "1.2.3.4", b"DICM two", source="test")
    assert second.stored and second.file != first.file and second.file.startswith(
        first.file.removesuffix(".dcm"))
    (box / MARKER).write_bytes(b"")  # finalize's last write inside the folder
    os.rename(box, area.incoming / box.name)  # the rename done, the process killed here
    assert area.ledger.count(state="staged") == 2
    assert area.recover() == [box.name]
    assert area.ledger.count(state="committed") == 2
    assert sorted(p.name for p in (area.incoming / box.name).iterdir()) == sorted(
        [first.file, second.file, MARKER])
