"""Sensors and declarative automation: new arrival batches ingest themselves, and the
downstream lineage re-evaluates on a nightly tick, only when something upstream changed,
and never past a failed blocking check.

- `incoming_batch_sensor` (every XCAM_SENSOR_INTERVAL_S, default 30 s): a folder
  `data/incoming/<batch>/` holding `labels.csv` and the `.complete` marker becomes a
  `batches` partition and an `ingest_batch` run (raw copy, inventory, findings, CLAHE
  tensors). It lists only the top level of data/incoming (one `scandir` + two `stat`s per
  batch folder, never the files inside a batch). Its cursor maps each batch to the
  marker's mtime, so a restarted daemon requests nothing twice; touching `.complete`
  again (new files added to the batch) requests a new run.
- `pacs_dicomweb_sensor` (every `pacs.dicomweb.interval_s`): pulls new chest radiographs
  from the PACS over DICOMweb into a new batch folder, which the sensor above then ingests.
- `NIGHTLY_ASSETS` carry `nightly_condition()`: on the first evaluation after the cron
  tick (XCAM_NIGHTLY_CRON, default `0 2 * * *`, XCAM_NIGHTLY_TZ, default UTC) an asset is
  due when a dependency was updated or its own code version changed since it was last
  requested/updated, or when a nightly parent is due at that tick; the due assets then run
  one after the other in dependency order (a manual materialization in the day is picked
  up at the next tick, it does not cascade at once); it waits while a dependency is missing, in progress or itself still due, and is
  never requested while any partition of a dependency has a failed blocking check, across
  runs (Dagster's blocking checks only stop the rest of the same run). Architecture
  partitions outside the active profile are neither requested nor waited for.
  `nightly_reevaluation` is the automation sensor that evaluates it.
- `dvc_commit_after_run`: after a successful run the DVC stages of the assets it
  materialized are committed to the DVC cache (`dvc commit --force <stages>`, serialised
  by the DVC lock), when the project is a DVC project.
"""

import json
import os
import warnings
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

from xcam_assets.config import load_settings
from xcam_assets.ingest.pacs.dicomweb import DicomwebConfig, PullBusy, next_since, pull_once
from xcam_assets.ingest.pacs.staging import PacsArea
from xcam_assets.project import batch_partitions

MARKER = ".complete"
LABELS = "labels.csv"
SENSOR_INTERVAL_S = int(os.environ.get("XCAM_SENSOR_INTERVAL_S", "30"))
NIGHTLY_CRON = os.environ.get("XCAM_NIGHTLY_CRON", "0 2 * * *")
NIGHTLY_TZ = os.environ.get("XCAM_NIGHTLY_TZ", "UTC")
AUTOMATION_INTERVAL_S = int(os.environ.get("XCAM_AUTOMATION_INTERVAL_S", "30"))
#: what a new batch runs at once (sensor) and what re-evaluates on the nightly tick
INGEST_ASSETS = ["raw_dicoms", "dicom_inventory", "findings", "clahe_tensors"]
NIGHTLY_ASSETS = ["cohort_splits", "external_cohort", "checkpoints", "heatmap_sets", "metric_tables",
                  "external_scores"]

ingest_batch_job = dg.define_asset_job(
    "ingest_batch",
    selection=dg.AssetSelection.assets(*INGEST_ASSETS),
    partitions_def=batch_partitions,
    description="One arrival batch: raw copy, inventory, findings, CLAHE tensors.",
    # one process for the run: a process per step would mostly re-import torch
    executor_def=dg.in_process_executor,
)


def scan_incoming(incoming: Path) -> dict[str, int]:
    """Complete batch folders -> mtime (ns) of their `.complete` marker.

    Complete = the folder holds `labels.csv` and `.complete` (written last by the
    uploader, or by `xcam demo` / `xcam import-tbx11k`). Cost: one directory listing of
    `incoming` and two stats per batch folder, whatever the number of files in a batch."""
    out: dict[str, int] = {}
    try:
        entries = list(os.scandir(incoming))
    except FileNotFoundError:
        return out
    for entry in entries:
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        try:
            marker = os.stat(os.path.join(entry.path, MARKER))
        except FileNotFoundError:
            continue
        if os.path.exists(os.path.join(entry.path, LABELS)):
            out[entry.name] = marker.st_mtime_ns
    return out


def complete_batches(incoming: Path) -> list[str]:
    """Names of the batch folders ready to ingest (see `scan_incoming`)."""
    return sorted(scan_incoming(Path(incoming)))


def read_cursor(cursor: str | None) -> dict[str, int | None]:
    """Batch -> marker mtime already handled (None: handled, mtime unknown: old cursor)."""
    if not cursor:
        return {}
    data = json.loads(cursor)
    if isinstance(data, list):  # cursor of the first version: a list of batch names
        return {name: None for name in data}
    return dict(data.get("batches", {}))


def plan_batches(ready: dict[str, int], seen: dict[str, int | None], known: set[str]
                 ) -> tuple[list[tuple[str, int]], dict[str, int | None]]:
    """(batches to run with their marker mtime, the new cursor state)."""
    todo: list[tuple[str, int]] = []
    state = dict(seen)
    for batch, mtime in sorted(ready.items()):
        if batch not in seen:
            if batch not in known:  # registered by `xcam materialize` or the UI: not new
                todo.append((batch, mtime))
        elif seen[batch] is not None and seen[batch] != mtime:
            todo.append((batch, mtime))  # marker touched again: more files arrived
        state[batch] = mtime
    return todo, state


@dg.sensor(job=ingest_batch_job, minimum_interval_seconds=SENSOR_INTERVAL_S,
           default_status=dg.DefaultSensorStatus.RUNNING)
def incoming_batch_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """A new complete folder under data/incoming/ becomes a `batches` partition and a run."""
    seen = read_cursor(context.cursor)
    ready = scan_incoming(load_settings().incoming_dir)
    known = set(context.instance.get_dynamic_partitions(batch_partitions.name))
    todo, state = plan_batches(ready, seen, known)
    new_partitions = sorted({b for b, _ in todo} - known)
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=b, run_key=f"ingest-{b}-{mtime}",
                                    tags={"xcam/launched_by": "incoming_batch_sensor"})
                      for b, mtime in todo],
        dynamic_partitions_requests=([batch_partitions.build_add_request(new_partitions)]
                                     if new_partitions else []),
        cursor=json.dumps({"v": 2, "batches": state}, sort_keys=True),
    )


class InActiveProfile(dg.AutomationCondition):
    """True for every partition except architectures the active profile does not train.

    `checkpoints`/`heatmap_sets` are partitioned over the whole model zoo; only the
    profile's `architectures` (resources/params.yaml, read at evaluation time) are
    re-evaluated or required upstream. Custom Python: evaluated in the code server."""

    @property
    def name(self) -> str:
        return "in_active_profile"

    @property
    def description(self) -> str:
        return "partition trained by the active profile"

    def evaluate(self, context: dg.AutomationContext) -> dg.AutomationResult:
        candidates = context.candidate_subset
        pdef = candidates.partitions_def
        if isinstance(pdef, dg.StaticPartitionsDefinition):
            active = set(load_settings().architectures) & set(pdef.get_partition_keys())
            candidates = candidates.compute_intersection_with_partition_keys(active)
        return dg.AutomationResult(context, true_subset=candidates)


def nightly_condition(cron: str = NIGHTLY_CRON, tz: str = NIGHTLY_TZ) -> dg.AutomationCondition:
    """Nightly re-evaluation of a downstream asset, only when something upstream changed,
    in dependency order, never past a failed blocking check (see the module docstring).

    At the tick an asset becomes *due* when a dependency updated or its code version
    changed since it was last requested/updated, or when a nightly parent becomes due at
    the same tick (spelled out to the depth of the nightly chain); it stays due until it is
    requested, and is requested once no nightly parent is still due or running."""
    ac = dg.AutomationCondition
    nightly = dg.AssetSelection.assets(*NIGHTLY_ASSETS)
    active = InActiveProfile()

    def changes_tonight(depth: int) -> dg.AutomationCondition:
        changed = (ac.any_deps_updated() | ac.code_version_changed()).since_last_handled()
        if depth:
            changed = changed | ac.any_deps_match(changes_tonight(depth - 1)).allow(nightly)
        return ac.cron_tick_passed(cron, tz) & changed

    due = (active & changes_tonight(len(NIGHTLY_ASSETS) - 1)).since_last_handled().with_label(
        "due: upstream changed before the tick")
    missing = ac.any_deps_match(ac.missing() & active).with_label(
        "a dependency (active partition) is missing")
    failed_check = ac.any_deps_match(
        active & ac.any_checks_match(ac.check_failed(), blocking_only=True)
    ).with_label("a dependency partition failed a blocking check")
    parent_due = ac.any_deps_match(due).allow(nightly).with_label("a nightly parent is due")
    return (due
            & active
            & ~ac.in_progress()
            & ~ac.any_deps_in_progress()
            & ~missing
            & ac.all_deps_blocking_checks_passed()
            & ~failed_check
            & ~parent_due).with_label(f"nightly ({cron} {tz}) if upstream changed")


with warnings.catch_warnings():  # use_user_code_server is "beta" in dagster 1.13
    warnings.simplefilter("ignore", dg.BetaWarning)
    nightly_reevaluation = dg.AutomationConditionSensorDefinition(
        "nightly_reevaluation",
        target=dg.AssetSelection.assets(*NIGHTLY_ASSETS),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=AUTOMATION_INTERVAL_S,
        run_tags={"xcam/launched_by": "nightly_reevaluation"},
        use_user_code_server=True,  # InActiveProfile is Python, evaluated with the code
        description="Evaluates the nightly condition of the downstream assets.",
    )


@dg.run_status_sensor(run_status=dg.DagsterRunStatus.SUCCESS, name="dvc_commit_after_run",
                      default_status=dg.DefaultSensorStatus.RUNNING,
                      minimum_interval_seconds=SENSOR_INTERVAL_S)
def dvc_commit_after_run(context: dg.RunStatusSensorContext) -> dg.SkipReason | None:
    """Commit the DVC stages of the assets a successful run materialized."""
    from xcam_assets.provenance.dvc import ASSET_OUTS, has_dvc, run_dvc

    s = load_settings()
    if not has_dvc(s):
        return dg.SkipReason(f"{s.root} is not a DVC project with DVC installed")
    run = context.dagster_run
    if run.tags.get("xcam/launched_by") == "dvc":
        return dg.SkipReason("dvc repro records its own stages")
    records = context.instance.get_records_for_run(
        run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION, limit=1000).records
    keys = {r.event_log_entry.dagster_event.asset_key.to_user_string() for r in records}
    stages = sorted({ASSET_OUTS[k][0] for k in keys if k in ASSET_OUTS})
    if not stages:
        return dg.SkipReason(f"run {run.run_id[:8]} materialized no lineage asset")
    run_dvc(s, "commit", "--force", "--quiet", *stages, timeout=120)
    context.log.info(f"dvc commit {' '.join(stages)} after run {run.run_id[:8]}")
    return None


# --------------------------------------------------------------------------- the PACS
# The DICOMweb puller (`xcam_assets.ingest.pacs.dicomweb.pull_once`, which imports no
# Dagster, so that `xcam pacs-pull` starts fast) on a Dagster tick.

def _pacs_load_time_config() -> DicomwebConfig | None:
    """The DICOMweb settings as the code location loads (read once: the sensor's interval
    and default status come from it); None when params.yaml cannot be read, which must
    not break the code location."""
    try:
        return DicomwebConfig.from_params(load_settings().params)
    except Exception:  # noqa: BLE001 - a broken params file must not break the code location
        return None


_PACS_AT_LOAD = _pacs_load_time_config()
# `pacs.dicomweb.interval_s` (XCAM_PACS_INTERVAL_S overrides it); running by default only
# when a PACS URL is configured, so a site without one sees a stopped sensor
_PACS_INTERVAL_S = int(os.environ.get("XCAM_PACS_INTERVAL_S")
                       or (_PACS_AT_LOAD.interval_s if _PACS_AT_LOAD else 300))
_PACS_DEFAULT_STATUS = (dg.DefaultSensorStatus.RUNNING if _PACS_AT_LOAD and _PACS_AT_LOAD.url
                        else dg.DefaultSensorStatus.STOPPED)


@dg.sensor(name="pacs_dicomweb_sensor", minimum_interval_seconds=_PACS_INTERVAL_S,
           default_status=_PACS_DEFAULT_STATUS)
def pacs_dicomweb_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason | dg.SensorResult:
    """Polls the PACS (QIDO-RS) and fetches new chest radiographs (WADO-RS) into a new
    batch under data/incoming/, which `incoming_batch_sensor` then ingests. The cursor
    (shown in the UI) holds the StudyDate window and the last poll's counts: PACS studies
    and instances matching the query, how many xcam already had, fetched, handed over."""
    s = load_settings()
    cfg = DicomwebConfig.from_params(s.params)
    if not cfg.url:
        return dg.SkipReason("pacs.dicomweb.url is not set in resources/params.yaml")
    state = json.loads(context.cursor) if context.cursor else {}
    since = state.get("study_date_from", cfg.since)
    area = PacsArea.from_settings(s)
    try:
        report = pull_once(cfg, area, since, log=context.log.info)
    except PullBusy as exc:
        return dg.SkipReason(str(exc))
    except Exception as exc:  # noqa: BLE001 - a PACS outage: logged, retried next tick
        context.log.error(f"PACS pull from {cfg.url} stopped: {exc!r}; what was fetched stays "
                          "staged and the next tick resumes")
        state.update(last_error=f"{datetime.now(UTC).isoformat(timespec='seconds')} {exc!r}")
        return dg.SensorResult(cursor=json.dumps(state, sort_keys=True),
                               skip_reason=f"PACS pull failed: {exc!r}")
    counts = {k: v for k, v in asdict(report).items() if k != "recovered"}
    context.log.info(f"PACS {cfg.url}: {report.pacs_studies} studies, {report.pacs_instances} "
                     f"instances match; {report.already_had} already taken in, {report.fetched} "
                     f"fetched, {report.pending} left for the next tick; batch: {report.batch}")
    cursor = {"v": 1, "study_date_from": next_since(cfg, report, since), "last_poll": counts,
              "instances_taken_in": area.ledger.count(source=f"dicomweb:{cfg.url}"),
              "batches": state.get("batches", 0) + (1 if report.batch else 0)}
    return dg.SensorResult(
        cursor=json.dumps(cursor, sort_keys=True),
        skip_reason=None if report.batch else
        f"{report.pacs_instances} PACS instance(s) match, {report.already_had} already taken in, "
        f"{report.fetched} fetched, {report.pending} pending: no batch handed over")
