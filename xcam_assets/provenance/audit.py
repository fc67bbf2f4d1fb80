"""`xcam audit <asset>`: the provenance of an asset, down to each raw DICOM's sha256,
checked against the files on disk.

The walk starts at the asset's latest materialization (each partition, or the one
named) and follows its dependencies in the asset graph; for every dependency partition
it takes the materialization the consumer actually saw (the latest one recorded before
the consumer's). Per step it reports run id, time, host and user, code version, git
commit, parameters, package versions (run tags `xcam/...`, see xcam_assets.provenance),
input and output content hashes, check results with their metadata, the model card for
checkpoints, and the DVC view (dvc.lock + cache) of the same output.

Tamper evidence: every output is re-hashed the DVC way and compared with the data
version recorded in the event log; a folder's recorded manifest
($DAGSTER_HOME/manifests, or the DVC cache) names the file that differs. Each raw DICOM
is re-hashed (sha256) and compared with the sha256 the inventory recorded at ingest.
Errors (exit 1): a mismatch, a missing output, a failed blocking check, a step never
materialized. Warnings: a dependency re-materialized since with another data version
(stale; one re-materialized to the same version is noted in its step, not warned about),
a version DVC has not committed, a run without xcam provenance tags.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
from dagster._core.event_api import AssetRecordsFilter, PartitionKeyFilter

from xcam_assets.atomic import atomic_write_json, atomic_write_text
from xcam_assets.config import Settings
from xcam_assets.hashing import dvc_md5, dvc_tree, load_manifest, sha256_file
from xcam_assets.provenance import (
    TAG_GIT,
    TAG_HOST,
    TAG_LAUNCHED_BY,
    TAG_PACKAGES,
    TAG_PARAMS,
    TAG_USER,
    environment,
    package_versions,
    run_parameters,
)
from xcam_assets.provenance.dvc import ASSET_OUTS, asset_output, dvc_version_in_lock

DATA_VERSION_TAG = "dagster/data_version"
CODE_VERSION_TAG = "dagster/code_version"
INPUT_VERSION_PREFIX = "dagster/input_data_version/"


@dataclass
class AuditReport:
    """The audit of one asset: steps upstream-first, raw files, problems."""

    asset: str
    partition: str | None
    steps: list[dict[str, Any]] = field(default_factory=list)
    raw_files: list[dict[str, Any]] = field(default_factory=list)
    problems: list[dict[str, str]] = field(default_factory=list)
    header: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not any(p["severity"] == "error" for p in self.problems)

    def problem(self, severity: str, step: str, message: str, file: str = "") -> None:
        self.problems.append({"severity": severity, "step": step, "message": message,
                              "file": file})

    def as_dict(self) -> dict[str, Any]:
        return {"audit": {**self.header, "asset": self.asset, "partition": self.partition,
                          "verdict": "pass" if self.passed else "fail",
                          "n_errors": sum(p["severity"] == "error" for p in self.problems),
                          "n_warnings": sum(p["severity"] == "warning"
                                            for p in self.problems),
                          "problems": self.problems},
                "steps": self.steps, "raw_dicoms": self.raw_files}


def step_id(asset: str, partition: str | None) -> str:
    return f"{asset}[{partition}]" if partition else asset


def _iso(ts: float | None) -> str | None:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat() if ts else None


def metadata_json(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata values as JSON (inline images left out: the UI shows them)."""
    out: dict[str, Any] = {}
    for name, value in metadata.items():
        raw = getattr(value, "value", value)
        if isinstance(value, dg.MetadataValue) and type(value).__name__ == "PathMetadataValue":
            raw = str(raw)
        if isinstance(raw, str) and "data:image" in raw:
            raw = "[inline image: see the Dagster UI]"
        if isinstance(value, dg.TableMetadataValue):  # e.g. metric_tables' scorecard
            raw = {"columns": [c.name for c in value.schema.columns],
                   "records": [dict(r.data) for r in value.records]}
        try:
            json.dumps(raw)
        except Exception:  # noqa: BLE001 - TypeError, or a @record that refuses iteration
            raw = str(raw)
        out[name] = raw
    return out


class Auditor:
    """Walks the lineage in one instance and checks it against one project's files."""

    def __init__(self, settings: Settings, instance: dg.DagsterInstance,
                 defs: dg.Definitions) -> None:
        self.s, self.instance = settings, instance
        self.graph = defs.resolve_asset_graph()
        self.home = Path(os.environ.get("DAGSTER_HOME") or settings.root / "dagster_home")

    # -- event log ------------------------------------------------------------------
    def partitions_of(self, key: dg.AssetKey) -> list[str | None]:
        pdef = self.graph.get(key).partitions_def
        if pdef is None:
            return [None]
        return list(pdef.get_partition_keys(dynamic_partitions_store=self.instance))

    def upstream(self, key: dg.AssetKey, partition: str | None
                 ) -> list[tuple[dg.AssetKey, str | None]]:
        node = self.graph.get(key)
        out = []
        for parent in sorted(node.parent_keys, key=lambda k: k.to_user_string()):
            pdef = self.graph.get(parent).partitions_def
            if pdef is None:
                out.append((parent, None))
            elif partition is not None and pdef == node.partitions_def:
                out.append((parent, partition))
            else:
                out += [(parent, p) for p in self.partitions_of(parent)]
        return out

    def materialization(self, key: dg.AssetKey, partition: str | None,
                        before_storage_id: int | None = None) -> Any:
        flt = AssetRecordsFilter(asset_key=key,
                                 asset_partitions=[partition] if partition else None,
                                 before_storage_id=before_storage_id)
        records = self.instance.fetch_materializations(flt, limit=1).records
        return records[0] if records else None

    def check_results(self, key: dg.AssetKey, partition: str | None,
                      mat_storage_id: int) -> list[dict[str, Any]]:
        results = []
        for ck in sorted((c for c in self.graph.asset_check_keys if c.asset_key == key),
                         key=lambda c: c.name):
            history = self.instance.event_log_storage.get_asset_check_execution_history(
                ck, limit=1, partition_filter=PartitionKeyFilter(key=partition))
            spec = self.graph.get(ck)
            row: dict[str, Any] = {"check": ck.name, "blocking": bool(spec.blocking),
                                   "status": "never executed"}
            if history:
                rec = history[0]
                row.update(status=rec.status.value, run_id=rec.run_id,
                           time=_iso(rec.create_timestamp))
                ev = rec.event.dagster_event.event_specific_data if rec.event else None
                if ev is not None:
                    target = ev.target_materialization_data
                    row.update(passed=bool(ev.passed), description=ev.description,
                               metadata=metadata_json(dict(ev.metadata)),
                               checked_storage_id=target.storage_id if target else None,
                               checks_this_version=(target is not None
                                                    and target.storage_id == mat_storage_id))
            results.append(row)
        return results

    # -- files ----------------------------------------------------------------------
    def rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.s.root).as_posix()
        except ValueError:
            return str(path)

    def verify_output(self, report: AuditReport, sid: str, asset: str,
                      partition: str | None, recorded: str | None) -> dict[str, Any]:
        path = asset_output(self.s, asset, partition)
        info: dict[str, Any] = {"path": self.rel(path), "dvc_stage": ASSET_OUTS[asset][0],
                                "dvc_out": self.rel(self.s.data_dir / ASSET_OUTS[asset][1])}
        if not path.exists():
            report.problem("error", sid, f"output {self.rel(path)} is missing", self.rel(path))
            info.update(on_disk=None, verified=False)
            return info
        now = dvc_md5(path)
        info.update(on_disk=now, verified=recorded == now)
        if path.is_dir():
            entries = dvc_tree(path)
            manifest = load_manifest(recorded, self.home) if recorded else None
            if manifest is None and recorded:
                from xcam_assets.provenance.dvc import cache_manifest

                manifest = cache_manifest(self.s.root, recorded)
            then = {e["relpath"]: e["md5"] for e in manifest} if manifest else {}
            info["files"] = [{"relpath": e["relpath"], "md5": e["md5"],
                              "recorded_md5": then.get(e["relpath"])} for e in entries]
            info["manifest_recorded"] = manifest is not None
        if recorded != now:
            named = False
            if path.is_dir() and info.get("manifest_recorded"):
                current = {e["relpath"]: e["md5"] for e in dvc_tree(path)}
                for relpath in sorted(set(then) | set(current)):
                    f = self.rel(path / relpath)
                    if relpath not in current:
                        report.problem("error", sid, f"{f} is missing (recorded md5 "
                                       f"{then[relpath]})", f)
                    elif relpath not in then:
                        report.problem("error", sid, f"{f} was not there when {sid} was "
                                       "materialized", f)
                    elif then[relpath] != current[relpath]:
                        report.problem("error", sid, f"{f} changed: md5 {current[relpath]} on "
                                       f"disk, {then[relpath]} recorded", f)
                    else:
                        continue
                    named = True
            if not named:
                report.problem("error", sid, f"{self.rel(path)} hashes to {now}, the event log "
                               f"recorded {recorded}", self.rel(path))
        in_lock = dvc_version_in_lock(self.s, asset, partition)
        info["dvc_lock_md5"] = in_lock
        if (self.s.root / "dvc.lock").exists() and in_lock != recorded:
            report.problem("warning", sid, f"dvc.lock/cache has {in_lock} for "
                           f"{self.rel(path)}, the event log {recorded}: run `xcam dvc commit`")
        return info

    def verify_raw(self, report: AuditReport, batch: str) -> None:
        """Each raw DICOM of the batch: sha256 now vs the sha256 the inventory recorded."""
        inv_path = self.s.inventory_dir / f"{batch}.parquet"
        if not inv_path.exists():
            report.problem("error", step_id("raw_dicoms", batch),
                           f"no inventory {self.rel(inv_path)} to check the raw files against")
            return
        inv = pl.read_parquet(inv_path)
        cols = [c for c in ("file", "image_key", "status", "reason", "sha256") if c in inv.columns]
        for row in inv.select(cols).sort("file").iter_rows(named=True):
            path = self.s.raw_dir / batch / row["file"]
            now = sha256_file(path) if path.exists() else None
            ok = now is not None and now == row.get("sha256")
            report.raw_files.append({"batch": batch, "file": row["file"],
                                     "path": self.rel(path),
                                     "image_key": row.get("image_key"),
                                     "status": row.get("status"), "reason": row.get("reason"),
                                     "sha256_recorded": row.get("sha256"),
                                     "sha256_on_disk": now, "verified": ok})
            if not ok:
                what = "is missing" if now is None else (
                    f"changed: sha256 {now} on disk, {row.get('sha256')} recorded at ingest")
                report.problem("error", step_id("raw_dicoms", batch),
                               f"{self.rel(path)} {what}", self.rel(path))

    # -- one step -------------------------------------------------------------------
    def step(self, report: AuditReport, key: dg.AssetKey, partition: str | None,
             record: Any) -> dict[str, Any]:
        asset = key.to_user_string()
        sid = step_id(asset, partition)
        node = self.graph.get(key)
        step: dict[str, Any] = {"id": sid, "asset": asset, "partition": partition,
                                "group": node.group_name, "description": node.description,
                                "code_version_defined": node.code_version}
        if record is None:
            report.problem("error", sid, f"{sid} was never materialized")
            step["status"] = "never materialized"
            return step
        entry = record.event_log_entry
        mat = entry.asset_materialization
        tags = dict(mat.tags or {})
        run_rec = self.instance.get_run_record_by_id(record.run_id)
        run = run_rec.dagster_run if run_rec else None
        rtags = dict(run.tags) if run else {}
        latest = self.materialization(key, partition)
        recorded = tags.get(DATA_VERSION_TAG)
        if not rtags.get(TAG_HOST):
            report.problem("warning", sid, f"run {record.run_id} has no xcam provenance tags")
        latest_version = (latest.event_log_entry.asset_materialization.tags or {}).get(
            DATA_VERSION_TAG) if latest is not None else recorded
        if latest is not None and latest.storage_id != record.storage_id:
            if latest_version != recorded:
                report.problem("warning", sid, f"{sid} was re-materialized (run "
                               f"{latest.run_id}, version {latest_version}) after its "
                               f"consumer used version {recorded}")
            else:  # the same data again: what the consumer used is still current
                step["rematerialized_same_version"] = {"run_id": latest.run_id,
                                                       "storage_id": latest.storage_id}
        params = json.loads(rtags[TAG_PARAMS]) if TAG_PARAMS in rtags else None
        step.update({
            "status": "materialized",
            "storage_id": record.storage_id,
            "materialized_at": _iso(entry.timestamp),
            "run": {"run_id": record.run_id, "job": run.job_name if run else None,
                    "status": run.status.value if run else None,
                    "start": _iso(run_rec.start_time) if run_rec else None,
                    "end": _iso(run_rec.end_time) if run_rec else None,
                    "launched_by": rtags.get(TAG_LAUNCHED_BY)
                    or rtags.get("dagster/sensor_name") or None,
                    "tags": {k: v for k, v in rtags.items()
                             if k not in (TAG_PARAMS, TAG_PACKAGES)}},
            "host": rtags.get(TAG_HOST), "user": rtags.get(TAG_USER),
            "git_commit": rtags.get(TAG_GIT),
            "code_version": tags.get(CODE_VERSION_TAG),
            "parameters": params["params"] if params else None,
            "profile": params["profile"] if params else None,
            "study": params["study"] if params else None,
            "packages": json.loads(rtags[TAG_PACKAGES]) if TAG_PACKAGES in rtags else None,
            "data_version": recorded,
            "recorded_input_versions": {k[len(INPUT_VERSION_PREFIX):]: v for k, v in tags.items()
                                        if k.startswith(INPUT_VERSION_PREFIX)},
            "metadata": metadata_json(dict(mat.metadata)),
        })
        # the latest materialization is what the files on disk must match
        disk_version = (latest or record).event_log_entry.asset_materialization.tags.get(
            DATA_VERSION_TAG)
        step["output"] = self.verify_output(report, sid, asset, partition, disk_version)
        step["checks"] = self.check_results(key, partition, record.storage_id)
        for c in step["checks"]:
            if c.get("passed") is False:
                report.problem("error" if c["blocking"] else "warning", sid,
                               f"check {c['check']} failed: {c.get('description')}")
            elif c["status"] == "never executed":
                report.problem("warning", sid, f"check {c['check']} never executed")
        if asset == "checkpoints" and partition:
            ckpt = self.s.checkpoints_dir / partition
            card = ckpt / "model_card.md"
            sidecar = ckpt / "model.json"
            step["model_card"] = {
                "model_card_md": card.read_text() if card.exists() else None,
                "model_json": json.loads(sidecar.read_text()) if sidecar.exists() else None}
        return step

    # -- the walk -------------------------------------------------------------------
    def audit(self, asset: str, partition: str | None = None) -> AuditReport:
        key = dg.AssetKey(asset)
        if not self.graph.has(key):
            raise KeyError(f"unknown asset {asset!r}")
        report = AuditReport(asset=asset, partition=partition)
        env = environment()
        report.header = {
            "generated_at": dt.datetime.now(dt.UTC).isoformat(), "auditor_host": env["host"],
            "auditor_user": env["user"], "project_root": str(self.s.root),
            "dagster_home": str(self.home), "auditor_packages": package_versions(),
            "current_parameters": run_parameters(self.s)}
        roots = [partition] if partition else self.partitions_of(key)
        queue: list[tuple[dg.AssetKey, str | None, int | None, str | None]] = [
            (key, p, None, None) for p in roots]
        seen: dict[str, dict[str, Any]] = {}
        while queue:
            k, p, before, consumer = queue.pop(0)
            sid = step_id(k.to_user_string(), p)
            if sid in seen:
                if consumer:
                    seen[sid].setdefault("consumers", []).append(consumer)
                continue
            record = self.materialization(k, p, before_storage_id=before)
            step = self.step(report, k, p, record)
            step["consumers"] = [consumer] if consumer else []
            seen[sid] = step
            if record is None:
                continue
            inputs, absent = [], []
            node = self.graph.get(k)
            for parent, pp in self.upstream(k, p):
                up = self.materialization(parent, pp, before_storage_id=record.storage_id)
                psid = step_id(parent.to_user_string(), pp)
                same = pp is not None and pp == p and \
                    self.graph.get(parent).partitions_def == node.partitions_def
                if up is None and pp is not None and not same:
                    # a partition of an all-partitions dependency that did not exist yet
                    # (another architecture, a rejected batch): not an input of this step
                    absent.append(psid)
                    continue
                inputs.append({"step": psid, "data_version": up.event_log_entry
                               .asset_materialization.tags.get(DATA_VERSION_TAG) if up else None})
                queue.append((parent, pp, record.storage_id, sid))
            step["inputs"] = inputs
            step["partitions_not_materialized_before"] = absent
            if k.to_user_string() == "raw_dicoms" and p:
                self.verify_raw(report, p)
        # upstream first: order by materialization (storage id), never-materialized last
        report.steps = sorted(seen.values(),
                              key=lambda s: (s.get("storage_id") is None,
                                             s.get("storage_id") or 0, s["id"]))
        return report


def write_outputs(report: AuditReport, out_dir: Path) -> dict[str, Path]:
    """JSON, HTML and PROV-JSON of the report in `out_dir`; returns their paths."""
    from xcam_assets.provenance.prov import prov_document
    from xcam_assets.provenance.report import render_html

    name = "audit-" + report.asset + (f"-{report.partition}" if report.partition else "")
    paths = {"json": out_dir / f"{name}.json", "html": out_dir / f"{name}.html",
             "prov": out_dir / f"{name}.prov.json"}
    data = report.as_dict()
    atomic_write_json(paths["json"], data)
    atomic_write_text(paths["html"], render_html(data))
    atomic_write_text(paths["prov"], prov_document(data).serialize(format="json", indent=2))
    return paths


