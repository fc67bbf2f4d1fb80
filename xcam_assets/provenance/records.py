"""Facts read back from the Dagster instance for a study report, as plain data: the latest
evaluation of every asset check (per partition) and the latest data version of every
materialized asset (per partition).

Both read the event log by event type, so they need no definitions: the metric_tables
asset (inside a run) and `xcam report` (after it) call the same code.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import dagster as dg
from dagster._core.event_api import AssetRecordsFilter

DATA_VERSION_TAG = "dagster/data_version"
CODE_VERSION_TAG = "dagster/code_version"


def _iso(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if ts else ""


def latest_check_results(instance: dg.DagsterInstance, limit: int = 5000
                         ) -> list[dict[str, Any]]:
    """The latest evaluation of each (asset, check, partition), newest events first read:
    ``asset, partition, check, passed, blocking, description, time, run_id``; sorted by
    asset, check, partition."""
    records = instance.get_event_records(
        dg.EventRecordsFilter(event_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION),
        limit=limit, ascending=False)
    seen: dict[tuple[str, str, str], dict[str, Any]] = {}
    for rec in records:
        ev = rec.event_log_entry.dagster_event
        data = ev.event_specific_data if ev is not None else None
        if data is None:
            continue
        partition = getattr(data, "partition", None) or ev.partition or ""
        key = (data.asset_key.to_user_string(), data.check_name, partition)
        if key in seen:
            continue
        seen[key] = {"asset": key[0], "check": key[1], "partition": partition,
                     "passed": bool(data.passed), "blocking": bool(data.blocking),
                     "description": data.description or "",
                     "time": _iso(rec.event_log_entry.timestamp),
                     "run_id": rec.event_log_entry.run_id}
    return [seen[k] for k in sorted(seen)]


def latest_data_versions(instance: dg.DagsterInstance, per_asset: int = 1000
                         ) -> list[dict[str, Any]]:
    """The latest materialization of each (asset, partition): ``asset, partition,
    data_version, code_version, time, run_id``; sorted by asset and partition."""
    out = []
    for key in sorted(instance.get_asset_keys(), key=lambda k: k.to_user_string()):
        result = instance.fetch_materializations(AssetRecordsFilter(asset_key=key),
                                                 limit=per_asset)
        seen: set[str] = set()
        for rec in result.records:
            mat = rec.asset_materialization
            partition = rec.partition_key or ""
            if mat is None or partition in seen:
                continue
            seen.add(partition)
            tags = mat.tags or {}
            out.append({"asset": key.to_user_string(), "partition": partition,
                        "data_version": tags.get(DATA_VERSION_TAG, ""),
                        "code_version": tags.get(CODE_VERSION_TAG, ""),
                        "time": _iso(rec.timestamp), "run_id": rec.run_id})
    return sorted(out, key=lambda r: (r["asset"], r["partition"]))
