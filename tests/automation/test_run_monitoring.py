"""A launched run whose worker and code server die together is failed by the daemon, and
its pool slots are given back, with no xcam command run afterwards to reap it.

While the code server lives, it notices its run worker's death itself. When both go (the
OOM killer, a killed `xcam ui`), no process knows the run: DefaultRunLauncher cannot tell
whether a local worker exists, so Dagster's run monitoring skips the run and it stays
STARTED for ever, holding the `ingest` pool's only slot. xcam's launcher answers the
health check from the worker's own "Started process for run (pid: N)" engine event
(xcam_assets.provenance.launcher).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import dagster as dg
import pytest
from automation.harness import dagster_services, make_project, wait_for, xcam
from dagster import DagsterEventType
from dagster._core.events import DagsterEvent, EngineEventData
from dagster._core.events.log import EventLogEntry

from xcam_assets.demo import write_demo_cohort
from xcam_assets.procs import process_start_ticks
from xcam_assets.provenance import TAG_HOST, TAG_PID, TAG_PID_START
from xcam_assets.provenance.launcher import WORKER_STARTED, run_worker, run_worker_alive

pytestmark = pytest.mark.slow


def _descendants(pid: int) -> list[int]:
    """`pid` and every process below it (the run worker's step processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _signal_all(pids: list[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def test_worker_alive_from_the_engine_event_and_not_fooled_by_a_reused_pid() -> None:
    instance = dg.DagsterInstance.ephemeral()

    def launched_run(pid: int, seconds_ago: float = 0.0) -> dg.DagsterRun:
        """A run whose worker `pid` announced itself `seconds_ago`, as dagster's does."""
        run = instance.create_run_for_job(dg.GraphDefinition("g").to_job(),
                                          tags={TAG_HOST: socket.gethostname()})
        message = f"{WORKER_STARTED} (pid: {pid})."
        instance.handle_new_event(EventLogEntry(
            error_info=None, level=logging.DEBUG, user_message="", run_id=run.run_id,
            timestamp=time.time() - seconds_ago, dagster_event=DagsterEvent(
                DagsterEventType.ENGINE_EVENT.value, run.job_name, message=message,
                event_specific_data=EngineEventData.in_process(pid))))
        return run

    worker = subprocess.Popen(["sleep", "60"])
    try:
        time.sleep(0.2)
        run = launched_run(worker.pid)
        assert run_worker(instance, run)[0] == worker.pid
        assert run_worker_alive(instance, run) is True
        # the same number announced 10 s before this process was born: a reused pid
        assert run_worker_alive(instance, launched_run(worker.pid, seconds_ago=10)) is False
    finally:
        worker.kill()
        worker.wait()
    assert run_worker_alive(instance, run) is False  # killed: gone
    elsewhere = instance.create_run_for_job(dg.GraphDefinition("h").to_job(),
                                            tags={TAG_HOST: "another-host"})
    assert run_worker(instance, elsewhere) is None
    assert run_worker_alive(instance, elsewhere) is None  # cannot be told from here
    # an in-process `xcam` run names its own process in tags
    own = instance.create_run_for_job(dg.GraphDefinition("i").to_job(), tags={
        TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid()),
        TAG_PID_START: process_start_ticks() or ""})
    assert run_worker_alive(instance, own) is True


def test_daemon_fails_a_run_whose_worker_and_code_server_were_killed(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    root = make_project(tmp_path / "project")
    config = root / "dagster_home" / "dagster.yaml"
    text = config.read_text()
    assert "poll_interval_seconds: 30" in text and "free_slots_after_run_end_seconds: 60" in text
    config.write_text(text.replace("poll_interval_seconds: 30", "poll_interval_seconds: 2")
                      .replace("free_slots_after_run_end_seconds: 60",
                               "free_slots_after_run_end_seconds: 1"))
    for k, v in {"XCAM_ROOT": str(root), "XCAM_DATA_DIR": str(root / "data"),
                 "DAGSTER_HOME": str(root / "dagster_home")}.items():
        monkeypatch.setenv(k, v)
    (batch,) = write_demo_cohort(tmp_path / "upload", n_images=120, n_batches=1, size=128,
                                 seed=3)
    instance = dg.DagsterInstance.get()
    with dagster_services(root, tmp_path / "logs", XCAM_SENSOR_INTERVAL_S="2") as services:
        logs = services["logs"]
        wait_for("the sensor's first tick",
                 lambda: "incoming_batch_sensor" in logs[-1].read_text(errors="replace"),
                 120, logs=logs)
        incoming = root / "data" / "incoming"
        incoming.mkdir(parents=True)
        batch.rename(incoming / batch.name)
        (incoming / batch.name / ".complete").touch()

        def started_worker() -> tuple[dg.DagsterRun, int] | None:
            for run in instance.get_runs(dg.RunsFilter(
                    statuses=[dg.DagsterRunStatus.STARTED],
                    tags={"dagster/sensor_name": "incoming_batch_sensor"})):
                worker = run_worker(instance, run)
                if worker:
                    return run, worker[0]
            return None

        run, pid = wait_for("the sensor's run to start its worker", started_worker, 240,
                            interval=0.1, logs=logs)
        # the code server and the run worker it started die together (OOM killer, a
        # killed `xcam ui`): no process is left that knows the run
        code_server = services["procs"].procs[0].pid
        group = _descendants(code_server)
        assert pid in group
        _signal_all(group, signal.SIGSTOP)
        assert not instance.get_run_by_id(run.run_id).is_finished, "the run ended too soon"
        _signal_all(group, signal.SIGKILL)
        _signal_all(group, signal.SIGCONT)

        failed = wait_for("the daemon to fail the run",
                          lambda: (r := instance.get_run_by_id(run.run_id)).is_finished and r,
                          90, interval=1, logs=logs)
        assert failed.status == dg.DagsterRunStatus.FAILURE
        failure = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
        message = failure[-1].dagster_event.message if failure else ""
        assert f"pid {pid} " in message and "is gone" in message, message
        storage = instance.event_log_storage
        wait_for("the dead run's pool slots to be freed",
                 lambda: run.run_id not in storage.get_concurrency_run_ids(), 60,
                 interval=1, logs=logs)
    # nothing is stuck: the same batch ingests from the CLI, which the ingest pool admits
    out = xcam(root, "materialize", "ingest", timeout=300)
    assert f"materialized raw_dicoms+dicom_inventory+findings[{batch.name}]" in out, out
