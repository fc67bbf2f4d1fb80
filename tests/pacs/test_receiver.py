"""`xcam receive` (a real pynetdicom C-STORE SCP, as a subprocess) fed by pynetdicom's
C-STORE SCU: admitted instances become one complete batch after the quiet period; an
association from a calling AE title not allowed and an instance of a SOP class not
admitted are refused with their reasons logged; a resent instance is acknowledged but not
stored twice; kill -9 mid-transfer then a restart and a resend equals an uninterrupted
transfer."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
from pacs.harness import (
    SECONDARY_CAPTURE,
    ReceiverProcess,
    batch_contents,
    free_port,
    incoming_batches,
    store_scu,
    wait_for,
)

from xcam_assets.automation import scan_incoming
from xcam_assets.demo import write_demo_cohort
from xcam_assets.ingest.labels import LABEL_COLUMNS
from xcam_assets.ingest.pacs.ledger import Ledger
from xcam_assets.ingest.pacs.staging import AREA

SUCCESS, SOP_CLASS_NOT_SUPPORTED = 0x0000, 0x0122


def _env(project: Path, data: Path) -> dict[str, str]:
    return {**os.environ, "XCAM_ROOT": str(project), "XCAM_DATA_DIR": str(data)}


def _secondary_capture(path: Path) -> pydicom.Dataset:
    """A demo image as a Secondary Capture instance: a SOP class the receiver refuses."""
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    return ds


def _handed_over(incoming: Path, n: int) -> list[Path]:
    return wait_for(lambda: (b := incoming_batches(incoming)) and len(b) >= n and b, 60,
                    f"{n} batch(es) handed over")


def test_receiver_batches_admitted_instances_and_logs_each_refusal(project: Path) -> None:
    (source,) = write_demo_cohort(project / "sender", n_images=5, n_batches=1, size=64, seed=8)
    files = sorted(source.glob("*.dcm"))
    data = project / "data"
    incoming = data / "incoming"
    log = project / "receiver.out"
    receiver = ReceiverProcess(_env(project, data), free_port(), log, quiet_seconds=1.5).start()
    try:
        ok, statuses = store_scu(receiver.port, [*files, _secondary_capture(files[0])])
        assert ok and statuses == [SUCCESS] * 5 + [SOP_CLASS_NOT_SUPPORTED]
        refused, _ = store_scu(receiver.port, files[:1], calling="INTRUDER")
        assert not refused
        misdirected, _ = store_scu(receiver.port, files[:1], called="OTHERNODE")
        assert not misdirected
        (batch,) = _handed_over(incoming, 1)
        assert sorted(p.name for p in batch.iterdir()) == sorted(
            [*(p.name for p in batch.glob("*.dcm")), "labels.csv", ".complete"])
        assert len(list(batch.glob("*.dcm"))) == 5
        assert (batch / "labels.csv").read_text() == ",".join(LABEL_COLUMNS) + "\n"
        assert batch.name in scan_incoming(incoming)  # complete for the batch sensor
        received = {pydicom.dcmread(p).SOPInstanceUID for p in batch.glob("*.dcm")}
        assert received == {pydicom.dcmread(f).SOPInstanceUID for f in files}
        for sent in files:  # the data set as sent, under a file meta of the receiver's
            ds = pydicom.dcmread(sent)
            got = next(pydicom.dcmread(p) for p in batch.glob("*.dcm")
                       if pydicom.dcmread(p).SOPInstanceUID == ds.SOPInstanceUID)
            assert got == ds and got.PixelData == ds.PixelData

        # the PACS sends two of them again: acknowledged, not stored twice, no new batch
        ok, again = store_scu(receiver.port, files[:2])
        assert ok and again == [SUCCESS, SUCCESS]
        wait_for(lambda: "already had (not stored again)" in log.read_text(), 10, "resend log")
        staging = incoming / AREA / "staging"
        wait_for(lambda: not list(staging.iterdir()), 10, "the empty staging folder removed")
        assert incoming_batches(incoming) == [batch] and len(list(batch.glob("*.dcm"))) == 5
        ledger = Ledger(incoming / AREA / "ledger.sqlite")
        assert ledger.count() == 5 and ledger.count(state="committed") == 5
    finally:
        assert receiver.stop() == 0
    text = log.read_text()
    assert ("refused association from 127.0.0.1" in text and
            "calling AE title 'INTRUDER' is not in the allow-list ['XCAMTEST']" in text)
    assert (f"refused instance from XCAMTEST: SOP class {SECONDARY_CAPTURE} "
            "(Secondary Capture Image Storage) is not admitted" in text)
    assert "called AE title 'OTHERNODE' is not this receiver's 'XCAM'" in text
    assert text.count("refused") == 3
    assert text == (incoming / AREA / "receiver.log").read_text()


def test_receiver_refuses_to_start_without_an_allow_list(project: Path) -> None:
    import subprocess

    from pacs.harness import XCAM

    done = subprocess.run([str(XCAM), "receive", "--port", str(free_port())],
                          env=_env(project, project / "data"), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert "no calling AE title is allowed to send" in done.stderr


def test_kill_9_of_the_receiver_mid_transfer_then_resend_equals_uninterrupted(
        project: Path, tmp_path: Path) -> None:
    (source,) = write_demo_cohort(project / "sender", n_images=12, n_batches=1, size=64, seed=9)
    files = sorted(source.glob("*.dcm"))
    data = project / "data"
    log = project / "receiver.out"
    port = free_port()
    receiver = ReceiverProcess(_env(project, data), port, log, quiet_seconds=1.0).start()

    def kill_after_five(i: int, status: int) -> None:
        if i == 4:  # five acknowledged: the receiver dies mid-association
            receiver.kill9()

    ok, statuses = store_scu(port, files, after_each=kill_after_five)
    assert ok and statuses[:5] == [SUCCESS] * 5 and statuses[5:] == [None]
    staged = list((data / "incoming" / AREA / "staging").glob("*/*.dcm"))
    assert len(staged) == 5 and incoming_batches(data / "incoming") == []

    # restarted, the sender retries the whole study: the batch resumes, nothing twice (a
    # quiet period long enough for the sender to come back before the batch is handed over)
    receiver = ReceiverProcess(_env(project, data), port, log, quiet_seconds=5.0).start()
    try:
        ok, statuses = store_scu(port, files)
        assert ok and statuses == [SUCCESS] * 12
        (batch,) = _handed_over(data / "incoming", 1)
    finally:
        assert receiver.stop() == 0
    assert log.read_text().count("already had (not stored again)") == 5

    reference = tmp_path / "reference"
    other = ReceiverProcess(_env(project, reference), free_port(), tmp_path / "ref.out",
                            quiet_seconds=1.0).start()
    try:
        ok, statuses = store_scu(other.port, files)
        assert ok and statuses == [SUCCESS] * 12
        (ref_batch,) = _handed_over(reference / "incoming", 1)
    finally:
        assert other.stop() == 0
    assert batch_contents(batch) == batch_contents(ref_batch)
    assert len(list(batch.glob("*.dcm"))) == 12
    rows = Ledger(data / "incoming" / AREA / "ledger.sqlite").rows()
    assert len(rows) == len({r.sop_uid for r in rows}) == 12
    assert {r.state for r in rows} == {"committed"} and {r.batch for r in rows} == {batch.name}
