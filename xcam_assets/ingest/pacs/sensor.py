"""The `pacs_dicomweb_sensor`: the DICOMweb puller (`dicomweb.pull_once`) on a Dagster
tick. Kept apart from `dicomweb` so that `xcam pacs-pull` starts without importing Dagster."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from datetime import UTC, datetime

import dagster as dg

from xcam_assets.config import load_settings
from xcam_assets.ingest.pacs.dicomweb import DicomwebConfig, PullBusy, next_since, pull_once
from xcam_assets.ingest.pacs.staging import PacsArea


def _default_status() -> dg.DefaultSensorStatus:
    """Running when a PACS URL is configured, so a site without one sees a stopped sensor."""
    try:
        configured = bool(DicomwebConfig.from_params(load_settings().params).url)
    except Exception:  # noqa: BLE001 - a broken params file must not break the code location
        configured = False
    return dg.DefaultSensorStatus.RUNNING if configured else dg.DefaultSensorStatus.STOPPED


def _interval_s() -> int:
    """`pacs.dicomweb.interval_s` (XCAM_PACS_INTERVAL_S overrides it), read at load time."""
    if os.environ.get("XCAM_PACS_INTERVAL_S"):
        return int(os.environ["XCAM_PACS_INTERVAL_S"])
    try:
        return int(DicomwebConfig.from_params(load_settings().params).interval_s)
    except Exception:  # noqa: BLE001 - a broken params file must not break the code location
        return 300


@dg.sensor(name="pacs_dicomweb_sensor", minimum_interval_seconds=_interval_s(),
           default_status=_default_status())
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
