"""The DICOMweb puller against a real Orthanc (DICOMweb plugin, basic auth from the
environment): the sensor's pull becomes a complete batch that the batch sensor and ingest
take over; more studies make exactly one new batch of only the new instances; a PACS
outage mid-pull and a kill -9 of the puller resume where they stopped, nothing lost or
fetched twice."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import polars as pl
import pydicom
import pytest
import requests
import yaml
from pacs.harness import XCAM, Orthanc, batch_contents, incoming_batches, restamp, wait_for

from xcam_assets.automation import INGEST_ASSETS, incoming_batch_sensor, pacs_dicomweb_sensor
from xcam_assets.config import load_settings
from xcam_assets.demo import write_demo_cohort
from xcam_assets.ingest.labels import LABEL_COLUMNS
from xcam_assets.ingest.pacs.dicomweb import pull_lock
from xcam_assets.ingest.pacs.ledger import Ledger
from xcam_assets.ingest.pacs.staging import AREA, PacsArea


def _configure(project: Path, orthanc: Orthanc, monkeypatch: pytest.MonkeyPatch,
               **extra: object) -> None:
    """Point the project's params.yaml at the test's Orthanc; the credentials go into
    the environment only (never into the file)."""
    path = project / "resources" / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["pacs"]["dicomweb"].update(url=orthanc.dicomweb_url, **extra)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    assert orthanc.auth[1] not in path.read_text()
    monkeypatch.setenv("XCAM_DICOMWEB_USER", orthanc.auth[0])
    monkeypatch.setenv("XCAM_DICOMWEB_PASSWORD", orthanc.auth[1])


def _tick(instance: dg.DagsterInstance, cursor: str | None) -> dg.SensorResult:
    with dg.build_sensor_context(instance=instance, cursor=cursor) as ctx:
        result = pacs_dicomweb_sensor(ctx)
    assert isinstance(result, dg.SensorResult), result
    return result


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _dcm_shas(folder: Path) -> list[str]:
    return sorted(_sha(p.read_bytes()) for p in folder.glob("*.dcm"))


@pytest.mark.slow  # ingests the pulled batch through Dagster (minutes on 2 CPU cores)
def test_sensor_pulls_new_studies_into_one_batch_each_time(
        project: Path, orthanc: Orthanc, monkeypatch: pytest.MonkeyPatch) -> None:
    _configure(project, orthanc, monkeypatch)
    s = load_settings()
    first, second = write_demo_cohort(project / "pacs-source", n_images=12, n_batches=2,
                                      size=64, seed=5)
    first_files = sorted(first.glob("*.dcm"))
    orthanc.upload(first_files)
    # a hand radiograph in the PACS: not chest, the query leaves it there
    hand = restamp(sorted(second.glob("*.dcm"))[0], BodyPartExamined="HAND",
                   StudyInstanceUID=pydicom.uid.generate_uid(),
                   SeriesInstanceUID=pydicom.uid.generate_uid(),
                   SOPInstanceUID=pydicom.uid.generate_uid())
    orthanc.upload([hand])
    instance = dg.DagsterInstance.get()

    tick = _tick(instance, None)
    cursor = json.loads(tick.cursor)
    poll = cursor["last_poll"]
    studies = {pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in first_files}
    assert (poll["pacs_studies"], poll["pacs_instances"], poll["already_had"],
            poll["fetched"], poll["pending"]) == (len(studies), 6, 0, 6, 0)
    week_ago = (datetime.now(UTC) - timedelta(days=7)).strftime("%Y%m%d")
    assert cursor["study_date_from"] == week_ago and cursor["batches"] == 1
    batches = incoming_batches(s.incoming_dir)
    assert [b.name for b in batches] == [poll["batch"]]
    batch = batches[0]
    # the instances as the PACS holds them, byte for byte, named by their image pseudonym
    assert _dcm_shas(batch) == sorted(_sha(f.read_bytes()) for f in first_files)
    assert all(p.name.startswith("I") and "." not in p.stem for p in batch.glob("*.dcm"))
    assert (batch / "labels.csv").read_text() == ",".join(LABEL_COLUMNS) + "\n"
    assert (batch / ".complete").exists()
    assert not list((s.incoming_dir / AREA / "staging").iterdir())

    # the existing batch sensor takes it over as any batch
    with dg.build_sensor_context(instance=instance, cursor=None) as ctx:
        requested = incoming_batch_sensor(ctx)
    assert [r.partition_key for r in requested.run_requests] == [batch.name]
    instance.add_dynamic_partitions("batches", [batch.name])
    from xcam_assets.definitions import ASSETS, CHECKS
    from xcam_assets.project import XcamProject

    result = dg.materialize([*ASSETS, *CHECKS],
                            selection=dg.AssetSelection.assets(*INGEST_ASSETS),
                            partition_key=batch.name, instance=instance,
                            resources={"xcam": XcamProject()}, raise_on_error=False)
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    checks = {e.asset_check_evaluation_data.asset_check_key.name: e.asset_check_evaluation_data
              for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"}
    assert materialized == {"raw_dicoms", "dicom_inventory", "findings"}
    inventory = pl.read_parquet(s.inventory_dir / f"{batch.name}.parquet")
    assert inventory["status"].to_list() == ["ok"] * 6
    assert checks["raw_copy_is_faithful"].passed and checks["inventory_is_usable"].passed
    # no labels yet: the blocking check says so and nothing downstream runs on the batch
    labels = checks["labels_match_images"]
    assert not labels.passed
    assert "every ingested image has a label row" in json.dumps(
        {k: v.value for k, v in labels.metadata.items()}, default=str)
    assert "clahe_tensors" not in materialized

    # new studies arrive: exactly one new batch, of only them
    today = datetime.now(UTC).strftime("%Y%m%d")
    new = [restamp(f, StudyDate=today) for f in sorted(second.glob("*.dcm"))]
    orthanc.upload(new)
    tick2 = _tick(instance, tick.cursor)
    poll2 = json.loads(tick2.cursor)["last_poll"]
    assert (poll2["pacs_instances"], poll2["already_had"], poll2["fetched"]) == (6, 0, 6)
    after = incoming_batches(s.incoming_dir)
    assert len(after) == 2 and batch in after
    added = next(b for b in after if b != batch)
    assert _dcm_shas(added) == sorted(_sha(d) for d in new)
    assert _dcm_shas(batch) == sorted(_sha(f.read_bytes()) for f in first_files)

    # nothing new: no batch, nothing fetched
    tick3 = _tick(instance, tick2.cursor)
    poll3 = json.loads(tick3.cursor)["last_poll"]
    assert (poll3["pacs_instances"], poll3["already_had"], poll3["fetched"]) == (6, 6, 0)
    assert poll3["batch"] is None and len(incoming_batches(s.incoming_dir)) == 2
    ledger = Ledger(s.incoming_dir / AREA / "ledger.sqlite")
    assert ledger.count(state="committed") == 12 and ledger.count() == 12


def test_pacs_outage_mid_pull_resumes_into_the_same_batch(
        project: Path, orthanc: Orthanc, monkeypatch: pytest.MonkeyPatch) -> None:
    """At most 4 instances a tick; Orthanc goes down after the first tick and comes back:
    the staged instances stay, the next ticks fetch only the rest, one batch of all 10."""
    _configure(project, orthanc, monkeypatch, max_instances_per_poll=4)
    s = load_settings()
    (source,) = write_demo_cohort(project / "pacs-source", n_images=10, n_batches=1,
                                  size=64, seed=6)
    files = sorted(source.glob("*.dcm"))
    orthanc.upload(files)
    instance = dg.DagsterInstance.get()
    staging_root = s.incoming_dir / AREA / "staging"

    t1 = _tick(instance, None)
    assert json.loads(t1.cursor)["last_poll"]["fetched"] == 4
    (staging,) = list(staging_root.iterdir())
    assert len(list(staging.glob("*.dcm"))) == 4 and incoming_batches(s.incoming_dir) == []

    # a second puller at the same time (`xcam pacs-pull` during a tick) is skipped, not run
    with pull_lock(PacsArea.from_settings(s)):
        with dg.build_sensor_context(instance=instance, cursor=t1.cursor) as ctx:
            busy = pacs_dicomweb_sensor(ctx)
    assert isinstance(busy, dg.SkipReason) and "another PACS pull" in busy.skip_message

    orthanc.stop()
    t2 = _tick(instance, t1.cursor)
    assert "PACS pull failed" in t2.skip_reason.skip_message and "last_error" in json.loads(t2.cursor)
    assert len(list(staging.glob("*.dcm"))) == 4

    orthanc.start()  # same storage and ports
    t3 = _tick(instance, t2.cursor)
    p3 = json.loads(t3.cursor)["last_poll"]
    assert (p3["already_had"], p3["fetched"], p3["pending"], p3["batch"]) == (4, 4, 2, None)
    t4 = _tick(instance, t3.cursor)
    p4 = json.loads(t4.cursor)["last_poll"]
    assert (p4["already_had"], p4["fetched"], p4["pending"]) == (8, 2, 0)
    (batch,) = incoming_batches(s.incoming_dir)
    assert batch.name == staging.name == p4["batch"]
    assert _dcm_shas(batch) == sorted(_sha(f.read_bytes()) for f in files)


def test_a_staged_batch_is_handed_over_when_nothing_is_left_to_fetch(
        project: Path, orthanc: Orthanc, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two of three instances staged, then the third deleted from the PACS: the next tick
    has nothing to fetch and hands the staged two over (never stranded in staging)."""
    _configure(project, orthanc, monkeypatch, max_instances_per_poll=2)
    s = load_settings()
    (source,) = write_demo_cohort(project / "pacs-source", n_images=3, n_batches=1,
                                  size=64, seed=10)
    files = sorted(source.glob("*.dcm"))
    ids = orthanc.upload(files)
    instance = dg.DagsterInstance.get()
    t1 = _tick(instance, None)
    assert json.loads(t1.cursor)["last_poll"]["pending"] == 1
    staged = sorted(_sha(p.read_bytes())
                    for p in (s.incoming_dir / AREA / "staging").glob("*/*.dcm"))
    assert len(staged) == 2
    fetched = {_sha(f.read_bytes()): i for f, i in zip(files, ids, strict=True)}
    (left,) = [i for sha, i in fetched.items() if sha not in staged]
    requests.delete(f"{orthanc.url}/instances/{left}", auth=orthanc.auth,
                    timeout=30).raise_for_status()
    t2 = _tick(instance, t1.cursor)
    p2 = json.loads(t2.cursor)["last_poll"]
    assert (p2["pacs_instances"], p2["already_had"], p2["fetched"]) == (2, 2, 0)
    (batch,) = incoming_batches(s.incoming_dir)
    assert batch.name == p2["batch"] and _dcm_shas(batch) == staged


def _pull_env(project: Path, data_dir: Path, orthanc: Orthanc) -> dict[str, str]:
    return {**os.environ, "XCAM_ROOT": str(project), "XCAM_DATA_DIR": str(data_dir),
            "XCAM_DICOMWEB_USER": orthanc.auth[0], "XCAM_DICOMWEB_PASSWORD": orthanc.auth[1]}


def test_kill_9_of_the_puller_then_restart_equals_an_uninterrupted_pull(
        project: Path, orthanc: Orthanc, tmp_path: Path) -> None:
    (source,) = write_demo_cohort(project / "pacs-source", n_images=30, n_batches=1,
                                  size=384, seed=7)
    files = sorted(source.glob("*.dcm"))
    orthanc.upload(files)
    data = project / "data"
    command = [str(XCAM), "pacs-pull", "--url", orthanc.dicomweb_url]
    staging_root = data / "incoming" / AREA / "staging"

    proc = subprocess.Popen(command, env=_pull_env(project, data, orthanc),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    wait_for(lambda: len(list(staging_root.glob("*/*.dcm"))) >= 3 or proc.poll() is not None,
             180, "the puller to stage 3 instances", interval=0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    staged = len(list(staging_root.glob("*/*.dcm")))
    assert proc.returncode == -signal.SIGKILL, "the pull finished before it could be killed"
    assert 3 <= staged < len(files) and incoming_batches(data / "incoming") == []

    done = subprocess.run(command, env=_pull_env(project, data, orthanc), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert report["already_had"] >= staged - 1  # the one being written at the kill may redo
    assert report["already_had"] + report["fetched"] == len(files)
    (batch,) = incoming_batches(data / "incoming")

    reference = tmp_path / "reference-data"
    ref = subprocess.run(command, env=_pull_env(project, reference, orthanc),
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    (ref_batch,) = incoming_batches(reference / "incoming")
    assert batch_contents(batch) == batch_contents(ref_batch)
    assert _dcm_shas(batch) == sorted(_sha(f.read_bytes()) for f in files)
    rows = Ledger(data / "incoming" / AREA / "ledger.sqlite").rows()
    assert len(rows) == len({r.sop_uid for r in rows}) == len(files)
    assert {r.state for r in rows} == {"committed"} and {r.batch for r in rows} == {batch.name}
    assert not list(staging_root.iterdir())

