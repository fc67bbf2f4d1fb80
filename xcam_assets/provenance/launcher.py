"""A run launcher that stamps every launched run with xcam's provenance tags.

Configured in `dagster_home/dagster.yaml`; runs the UI, a sensor or the automation
daemon launch go through it (in-process runs of `xcam materialize` tag themselves).
With the default launcher the run executes on the launching host, so host and user
are those of the execution.

It also tells the daemon's run monitoring (`run_monitoring` in dagster.yaml) whether a
run's worker process is still there (`check_run_worker_health`); DefaultRunLauncher
cannot, so a run whose worker was killed (kill -9, OOM) would stay STARTED for ever,
holding its pool slots. Dagster has no such check for local processes; written here.
"""

import socket
from typing import Any

from dagster import DagsterEventType, DagsterInstance, DagsterRun
from dagster._core.launcher import CheckRunHealthResult, DefaultRunLauncher, WorkerStatus
from dagster._core.launcher.base import LaunchRunContext
from dagster._serdes import ConfigurableClassData

from xcam_assets.procs import process_alive, process_started_at
from xcam_assets.provenance import (
    TAG_HOST,
    TAG_LAUNCHED_BY,
    TAG_PID,
    TAG_PID_START,
    execution_tags,
)

#: the engine event a launched run's worker process reports first (dagster._grpc.impl)
WORKER_STARTED = "Started process for run"


def run_worker(instance: DagsterInstance, run: DagsterRun) -> tuple[int, str | None,
                                                                   float | None] | None:
    """The process executing `run` on this host: (pid, start ticks, time it was seen).

    An in-process run of `xcam` names its own process in tags (`xcam/pid`,
    `xcam/pid_start`); a run this launcher started (UI, sensor, daemon) is announced
    by its worker in an engine event ("Started process for run (pid: N)"). None when
    the run ran elsewhere or has no worker yet."""
    if run.tags.get(TAG_HOST) != socket.gethostname():
        return None
    if pid := run.tags.get(TAG_PID):
        return int(pid), run.tags.get(TAG_PID_START) or None, None
    for record in reversed(instance.all_logs(run.run_id,
                                             of_type=DagsterEventType.ENGINE_EVENT)):
        event = record.dagster_event
        if event is not None and (event.message or "").startswith(WORKER_STARTED):
            pid = event.engine_event_data.metadata.get("pid")
            if pid is not None:
                return int(pid.value), None, record.timestamp
    return None


def worker_alive(worker: tuple[int, str | None, float | None] | None) -> bool | None:
    """Whether a `run_worker` process still runs (None: cannot tell from here).

    A process that started after its worker was seen only reuses the number."""
    if worker is None:
        return None
    pid, ticks, seen_at = worker
    if not process_alive(pid, ticks):
        return False
    started = process_started_at(pid) if seen_at is not None else None
    return not (started is not None and started > seen_at + 2.0)


def run_worker_alive(instance: DagsterInstance, run: DagsterRun) -> bool | None:
    """`worker_alive(run_worker(instance, run))`."""
    return worker_alive(run_worker(instance, run))


class ProvenanceRunLauncher(DefaultRunLauncher):
    """DefaultRunLauncher + `xcam/...` tags (host, user, git commit, packages, params)."""

    def __init__(self, inst_data: ConfigurableClassData | None = None) -> None:
        super().__init__(inst_data=inst_data)

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData,
                          config_value: dict[str, Any]) -> "ProvenanceRunLauncher":
        return cls(inst_data=inst_data)

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        if TAG_HOST not in run.tags:
            tags = execution_tags(launched_by=run.tags.get(TAG_LAUNCHED_BY) or "dagster")
            self._instance.add_run_tags(run.run_id, tags)
        super().launch_run(context)

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        """FAILED when the worker process is gone; RUNNING otherwise, also when that
        cannot be told from this host (the monitor fails every other status)."""
        worker = run_worker(self._instance, run)
        if worker_alive(worker) is False:
            return CheckRunHealthResult(WorkerStatus.FAILED, (
                f"xcam: the process that ran this run (pid {worker[0]} on "
                f"{socket.gethostname()}) is gone (killed?); its pool slots are freed"))
        return CheckRunHealthResult(WorkerStatus.RUNNING)
