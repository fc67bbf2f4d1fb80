"""Run the lineage stage by stage against the project's Dagster instance.

The `xcam` CLI and the DVC stages (dvc.yaml) call these, so every
materialization - from the UI, the CLI or `dvc repro` - lands in the same
event log, tagged with where, by whom and with what it ran (xcam_assets.provenance). Each stage is one in-process Dagster run per partition (`materialize_all`
joins a batch's ingest and preprocessing, and an architecture's training and heatmaps,
in one run); a failed blocking check fails its run and stops the stages after it.

A run whose process died (kill -9, OOM, power cut) stays STARTED in the instance and
keeps the concurrency-pool slots it held (the `ingest` pool: every later raw copy would
wait for ever; the nightly automation would take the asset as still in progress).
Each run is tagged with its process (`xcam/pid`, `xcam/pid_start`, `xcam/host`), and
every stage first marks the runs of dead processes on this host failed and gives back
their slots (`reap_dead_runs`); with the UI up, the daemon's run monitoring does it too.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
from dagster._core.definitions.data_version import get_input_event_pointer_tag
from dagster._core.event_api import AssetRecordsFilter, PartitionKeyFilter
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.storage.dagster_run import FINISHED_STATUSES

from xcam_assets.atomic import exclusive_lock
from xcam_assets.automation import complete_batches
from xcam_assets.config import Settings, load_settings
from xcam_assets.definitions import ASSETS, CHECKS, defs
from xcam_assets.hashing import dvc_relpaths, load_manifest, md5_file
from xcam_assets.ingest.deid import key_id, pseudonym_key
from xcam_assets.ingest.stage import (
    INCOMING_STAT_KEY,
    INCOMING_VERSION_KEY,
    incoming_stat,
    incoming_version,
)
from xcam_assets.procs import process_start_ticks
from xcam_assets.project import XcamProject, batch_partitions
from xcam_assets.provenance import TAG_PARAMS, TAG_PID, TAG_PID_START, execution_tags
from xcam_assets.provenance.audit import (
    CODE_VERSION_TAG,
    DATA_VERSION_TAG,
    Auditor,
    step_id,
    write_outputs,
)
from xcam_assets.provenance.launcher import run_worker, worker_alive
from xcam_assets.sqlite_pins import pinned_sqlite

STAGES: dict[str, list[str]] = {
    "ingest": ["raw_dicoms", "dicom_inventory", "findings"],
    "preprocess": ["clahe_tensors"],
    "splits": ["cohort_splits", "external_cohort"],
    "train": ["checkpoints"],
    "explain": ["heatmap_sets"],
    "evaluate": ["metric_tables", "external_scores"],
}
ORDER = ["ingest", "preprocess", "splits", "train", "explain", "evaluate"]


class StageFailed(RuntimeError):
    pass


def project_instance(settings: Settings) -> dg.DagsterInstance:
    """The persistent instance under DAGSTER_HOME (default: <project>/dagster_home).

    Opened under an exclusive lock (`<home>/.xcam-instance.lock`): the first opening of a
    fresh SQLite instance creates its tables, and two processes doing that at once fail
    ("table run_tags already exists"). The assets' concurrency pools are given their
    slots then too (`init_pools`)."""
    home = os.environ.setdefault("DAGSTER_HOME", str(settings.root / "dagster_home"))
    os.makedirs(home, exist_ok=True)
    with exclusive_lock(Path(home) / ".xcam-instance.lock"):
        instance = dg.DagsterInstance.get()
        init_pools(instance)
        return instance


def init_pools(instance: dg.DagsterInstance) -> list[str]:
    """Create the slots of the assets' pools that the instance has never used, at the
    instance's default limit (`concurrency.pools.default_limit`).

    Dagster creates them lazily, at a pool's first claim. A pool already there (a limit
    set in the UI included) is left alone. NB: on SQLite a pool is no mutex for claims
    made at the same moment (the slot row is read, then updated, with no row lock: two
    steps can both get the one slot); what must never run twice at once also takes a
    file lock (dicom_inventory)."""
    storage = instance.event_log_storage
    if (not storage.supports_global_concurrency_limits
            or instance.global_op_concurrency_default_limit is None):
        return []
    pools = {a.op.pool for a in ASSETS if a.op.pool}
    missing = sorted(pools - set(storage.get_concurrency_keys()))
    for pool in missing:
        storage.initialize_concurrency_limit_to_default(pool)
    return missing


def known_batches(settings: Settings) -> list[str]:
    """Complete incoming batches plus batches already in the raw store."""
    batches = set(complete_batches(settings.incoming_dir))
    if settings.raw_dir.is_dir():
        batches |= {d.name for d in settings.raw_dir.iterdir() if d.is_dir()}
    return sorted(batches)


def register_batches(instance: dg.DagsterInstance, batches: list[str]) -> None:
    existing = set(instance.get_dynamic_partitions(batch_partitions.name))
    new = [b for b in batches if b not in existing]
    if new:
        instance.add_dynamic_partitions(batch_partitions.name, new)


def _latest_materialization(instance: dg.DagsterInstance, key: dg.AssetKey,
                            partition: str) -> Any:
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1).records
    return records[0] if records else None


def _file_version(path: Path) -> str | None:
    return md5_file(path) if path.is_file() else None


def ingest_stale_reason(instance: dg.DagsterInstance, settings: Settings,
                        batch: str) -> str | None:
    """Why the ingest stage (raw_dicoms, dicom_inventory, findings) must run for `batch`,
    or None when a run would give what the instance already records: every asset
    materialized by the code of today, each on its upstream's latest data version,
    every check of those materializations passed, under today's `cohort` parameters and
    pseudonym key, outputs on disk as recorded, and the arrival batch
    (`data/incoming/<batch>`) as `raw_dicoms` copied it (by name, size and mtime first,
    then by content)."""
    graph = defs.resolve_asset_graph()
    keys = [dg.AssetKey(name) for name in STAGES["ingest"]]
    latest = {}
    for key in keys:
        record = _latest_materialization(instance, key, batch)
        if record is None:
            return f"{key.to_user_string()} never materialized"
        latest[key] = record

    def tags(key: dg.AssetKey) -> dict[str, str]:
        return dict(latest[key].event_log_entry.asset_materialization.tags or {})

    def metadata(key: dg.AssetKey, name: str) -> Any:
        value = latest[key].event_log_entry.asset_materialization.metadata.get(name)
        return getattr(value, "value", value)

    for key in keys:
        if tags(key).get(CODE_VERSION_TAG) != graph.get(key).code_version:
            return f"{key.to_user_string()}'s code version changed"
    for up, down in zip(keys, keys[1:], strict=False):  # made from the latest upstream
        if tags(down).get(get_input_event_pointer_tag(up)) != str(latest[up].storage_id):
            return f"{down.to_user_string()} was made from another {up.to_user_string()}"
    for check in sorted(graph.asset_check_keys, key=lambda c: c.name):
        if check.asset_key not in latest:
            continue
        history = instance.event_log_storage.get_asset_check_execution_history(
            check, limit=1, partition_filter=PartitionKeyFilter(key=batch))
        target = None
        if history and history[0].event is not None:
            data = history[0].event.dagster_event.event_specific_data
            if data is not None and data.passed:
                target = data.target_materialization_data
        if (not history or history[0].status != AssetCheckExecutionRecordStatus.SUCCEEDED
                or target is None or target.storage_id != latest[check.asset_key].storage_id):
            return f"check {check.name} did not pass on the latest materialization"
    cohort = json.dumps(settings.params.get("cohort"), sort_keys=True, default=str)
    for key in keys[1:]:
        run = instance.get_run_by_id(latest[key].run_id)
        params = json.loads((run.tags if run else {}).get(TAG_PARAMS, "null") or "null")
        if params is None or json.dumps(params["params"].get("cohort"), sort_keys=True,
                                        default=str) != cohort:
            return f"the cohort parameters changed since {key.to_user_string()} ran"
    recorded_key = metadata(dg.AssetKey("dicom_inventory"), "key_id")
    if recorded_key and recorded_key != key_id(pseudonym_key(settings.root)):
        return "another pseudonym key"
    # the outputs, as DVC may have removed or checked out others (`dvc repro`)
    for key, path in ((dg.AssetKey("dicom_inventory"), settings.inventory_dir),
                      (dg.AssetKey("findings"), settings.findings_dir)):
        if _file_version(path / f"{batch}.parquet") != tags(key).get(DATA_VERSION_TAG):
            return f"{key.to_user_string()}'s file is missing or not the recorded version"
    raw = settings.raw_dir / batch
    manifest = load_manifest(tags(keys[0]).get(DATA_VERSION_TAG, ""),
                             os.environ.get("DAGSTER_HOME") or settings.root / "dagster_home")
    if not raw.is_dir() or (manifest is not None and {e["relpath"] for e in manifest}
                            != dvc_relpaths(raw)):
        return f"data/raw/{batch} is not the copy recorded"
    # the arrival batch (gone once ingested is fine: the raw copy is what counts)
    src = settings.incoming_dir / batch
    stat, version = (metadata(keys[0], INCOMING_STAT_KEY),
                     metadata(keys[0], INCOMING_VERSION_KEY))
    if stat is None or version is None:
        return "raw_dicoms recorded no version of the arrival batch (an older xcam)"
    if src.is_dir() and incoming_stat(src) != stat and incoming_version(src) != version:
        return f"data/incoming/{batch} changed"
    return None


def run_tags(resource: XcamProject) -> dict[str, str]:
    """Provenance tags of an in-process run: host, user, git commit, packages, params;
    `xcam/launched_by` is `dvc` (and `xcam/dvc_stage`) when `dvc repro` runs the stage."""
    stage = os.environ.get("DVC_STAGE")
    tags = execution_tags(resource.settings(), launched_by="dvc" if stage else "cli")
    if stage:
        tags["xcam/dvc_stage"] = stage
    tags[TAG_PID] = str(os.getpid())
    tags[TAG_PID_START] = process_start_ticks() or ""
    return tags


#: statuses of a run whose process may still be working on it
_UNFINISHED = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
               dg.DagsterRunStatus.STARTED]


def reap_dead_runs(instance: dg.DagsterInstance,
                   log: Callable[[str], None] = print) -> list[str]:
    """Mark failed the unfinished runs on this host whose process is gone (in-process
    `xcam` runs and runs the UI or daemon launched alike, `worker_alive`), and free
    the concurrency slots of every finished run that still holds some. Returns the run
    ids marked failed. The daemon does the same on its own (`run_monitoring`)."""
    host = socket.gethostname()
    reaped = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=_UNFINISHED,
                                                       tags={"xcam/host": host})):
        worker = run_worker(instance, run)
        if worker_alive(worker) is not False:
            continue
        pid = worker[0]
        instance.report_run_failed(run, message=(
            f"xcam: the process that ran this run (pid {pid} on {host}) is gone (killed?); "
            "marked failed by a later xcam run, its pool slots freed"))
        reaped.append(run.run_id)
        log(f"run {run.run_id[:8]} of dead process {pid} marked failed")
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        holders = list(storage.get_concurrency_run_ids())
        if holders:
            finished = instance.get_runs(filters=dg.RunsFilter(
                run_ids=holders, statuses=list(FINISHED_STATUSES)))
            for run in finished:
                storage.free_concurrency_slots_for_run(run.run_id)
    return reaped


def _run(keys: list[str], instance: dg.DagsterInstance, resource: XcamProject,
         partition_key: str | None, log: Callable[[str], None]) -> dg.ExecuteInProcessResult:
    selection = dg.AssetSelection.assets(*keys)
    result = dg.materialize([*ASSETS, *CHECKS], selection=selection,
                            partition_key=partition_key, instance=instance,
                            resources={"xcam": resource}, raise_on_error=False,
                            run_config={"loggers": {"console": {"config": {
                                "log_level": os.environ.get("XCAM_LOG_LEVEL", "INFO")}}}},
                            tags={"xcam/stage": ",".join(keys), **run_tags(resource)})
    failed_checks = [
        f"{e.asset_check_evaluation_data.asset_check_key.name}"
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
        and not e.event_specific_data.passed
    ]
    where = f"[{partition_key}]" if partition_key else ""
    if not result.success or failed_checks:
        raise StageFailed(f"{'+'.join(keys)}{where} failed (run {result.run_id}); "
                          f"failed checks: {failed_checks or 'none'}; see the run in the UI")
    log(f"materialized {'+'.join(keys)}{where} (run {result.run_id[:8]})")
    return result


def stale_batches(instance: dg.DagsterInstance, settings: Settings, batches: list[str],
                  log: Callable[[str], None] = print) -> list[str]:
    """The batches whose ingest must run (`ingest_stale_reason`), each logged with why;
    the others are logged as up to date."""
    stale = []
    for batch in batches:
        reason = ingest_stale_reason(instance, settings, batch)
        if reason is None:
            log(f"{'+'.join(STAGES['ingest'])}[{batch}] is up to date: not re-run")
        else:
            log(f"{'+'.join(STAGES['ingest'])}[{batch}]: {reason}")
            stale.append(batch)
    return stale


@pinned_sqlite()  # the instance's SQLite files held open: 1 fsync per write, not 3
def materialize_stage(stage: str, settings: Settings | None = None,
                      resource: XcamProject | None = None,
                      instance: dg.DagsterInstance | None = None,
                      log: Callable[[str], None] = print, force: bool = False) -> None:
    """One stage. `ingest` materializes only the batches that are new or changed (see
    `ingest_stale_reason`; `force`: every batch); the other stages run in full."""
    settings = settings or load_settings()
    resource = resource or XcamProject()
    instance = instance or project_instance(settings)
    reap_dead_runs(instance, log)
    keys = STAGES[stage]
    if stage in ("ingest", "preprocess"):
        batches = known_batches(settings)
        if not batches:
            raise StageFailed(f"no complete batch under {settings.incoming_dir} "
                              "(a folder with labels.csv and a .complete marker)")
        register_batches(instance, batches)
        if stage == "ingest" and not force:
            batches = stale_batches(instance, settings, batches, log)
        for batch in batches:
            _run(keys, instance, resource, batch, log)
    elif stage in ("train", "explain"):
        for arch in settings.architectures:
            _run(keys, instance, resource, arch, log)
    else:
        _run(keys, instance, resource, None, log)


@pinned_sqlite()
def materialize_all(settings: Settings | None = None, resource: XcamProject | None = None,
                    instance: dg.DagsterInstance | None = None,
                    log: Callable[[str], None] = print, force: bool = False) -> None:
    """Every stage in order; a batch's ingest and preprocessing share one run so a
    failed blocking check of its labels stops its tensors. A batch whose ingest is up
    to date (`ingest_stale_reason`; `force`: none is) is preprocessed alone. Likewise an
    architecture's training and heatmaps share one run (a failed check of the model
    stops its heatmaps; one run less per architecture: each costs about 0.5-1 s of
    run creation and event-log writes, tests/benchmarks/bench_demo.py)."""
    settings = settings or load_settings()
    resource = resource or XcamProject()
    instance = instance or project_instance(settings)
    reap_dead_runs(instance, log)
    batches = known_batches(settings)
    if not batches:
        raise StageFailed(f"no complete batch under {settings.incoming_dir}")
    register_batches(instance, batches)
    stale = set(batches if force else stale_batches(instance, settings, batches, log))
    for batch in batches:
        _run((STAGES["ingest"] if batch in stale else []) + STAGES["preprocess"], instance,
             resource, batch, log)
    materialize_stage("splits", settings, resource, instance, log)
    reap_dead_runs(instance, log)
    for arch in settings.architectures:
        _run(STAGES["train"] + STAGES["explain"], instance, resource, arch, log)
    materialize_stage("evaluate", settings, resource, instance, log)


def run_audit(asset: str, partition: str | None = None, out_dir: Path | None = None,
              settings: Settings | None = None, instance: dg.DagsterInstance | None = None,
              log: Any = print) -> int:
    """The `xcam audit` command: 0 when the lineage verifies, 1 otherwise. Lives here, above
    the definitions, so the audit itself receives them and imports nothing of the lineage."""
    settings = settings or load_settings()
    instance = instance or project_instance(settings)
    report = Auditor(settings, instance, defs).audit(asset, partition)
    out_dir = out_dir or settings.root / "reports" / "audit"
    paths = write_outputs(report, out_dir)
    n_ok = sum(1 for s in report.steps if s.get("output", {}).get("verified"))
    log(f"xcam audit {step_id(asset, partition)}: {len(report.steps)} steps "
        f"({n_ok} outputs verified), {len(report.raw_files)} raw DICOM files")
    for p in report.problems:
        log(f"  {p['severity'].upper()} {p['step']}: {p['message']}")
    for kind, path in paths.items():
        log(f"  {kind}: {path}")
    log("PASS: every recorded hash matches the files on disk" if report.passed else
        "FAIL: see the problems above")
    return 0 if report.passed else 1
