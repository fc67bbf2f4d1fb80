"""The audit as a W3C PROV document (the `prov` package; serialised as PROV-JSON).

- entity `xcam:<asset>/<partition>/<data version>` per step output (its DVC hash, path,
  verification result); entity `dicom:<sha256>` per raw DICOM, member of its batch's
  raw_dicoms entity; entity `check:<run>/<check>` per check result.
- activity `run:<run id>/<step>` per materialization (start/end, code version, git
  commit, host), which `used` the input entities and generated the output entity.
- agents: the user@host who ran it (prov:Person, acting for nobody else) and the
  software `xcam@<git commit>` (prov:SoftwareAgent) it was associated with.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from prov.model import ProvDocument

NAMESPACES = {"xcam": "urn:xcam:asset:", "run": "urn:xcam:run:", "dicom": "urn:xcam:dicom:",
              "check": "urn:xcam:check:", "agent": "urn:xcam:agent:"}


def _ident(text: str) -> str:
    """A QName-safe local part."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _time(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def _entity_id(step: dict[str, Any]) -> str:
    version = (step.get("data_version") or "none").replace(".dir", "")
    return f"xcam:{_ident(step['id'])}_{version}"


def prov_document(audit: dict[str, Any]) -> ProvDocument:
    """PROV document of an audit (`AuditReport.as_dict()`)."""
    doc = ProvDocument()
    for prefix, uri in NAMESPACES.items():
        doc.add_namespace(prefix, uri)
    steps = {s["id"]: s for s in audit["steps"]}
    entities: dict[str, Any] = {}
    for sid, step in steps.items():
        if step.get("status") != "materialized":
            continue
        out = step.get("output", {})
        entities[sid] = doc.entity(_entity_id(step), {
            "prov:type": "xcam:AssetMaterialization", "prov:label": sid,
            "xcam:asset": step["asset"], "xcam:partition": step.get("partition") or "",
            "xcam:data_version": step.get("data_version") or "",
            "xcam:dvc_md5_on_disk": out.get("on_disk") or "",
            "xcam:path": out.get("path") or "", "xcam:verified": bool(out.get("verified")),
        })
    agents: dict[str, Any] = {}
    for sid, step in steps.items():
        if sid not in entities:
            continue
        run = step["run"]
        activity = doc.activity(
            f"run:{_ident(run['run_id'])}_{_ident(sid)}", _time(run.get("start")),
            _time(run.get("end")),
            {"prov:label": f"materialize {sid}", "xcam:run_id": run["run_id"],
             "xcam:job": run.get("job") or "", "xcam:code_version": step.get("code_version") or "",
             "xcam:git_commit": step.get("git_commit") or "",
             "xcam:host": step.get("host") or "", "xcam:launched_by": run.get("launched_by") or ""})
        doc.wasGeneratedBy(entities[sid], activity, _time(step.get("materialized_at")))
        who = f"{step.get('user') or 'unknown'}@{step.get('host') or 'unknown'}"
        if who not in agents:
            agents[who] = doc.agent(f"agent:{_ident(who)}", {"prov:type": "prov:Person",
                                                             "prov:label": who})
        doc.wasAssociatedWith(activity, agents[who])
        software = f"xcam@{step.get('git_commit') or 'unknown'}"
        if software not in agents:
            agents[software] = doc.agent(f"agent:{_ident(software)}", {
                "prov:type": "prov:SoftwareAgent", "prov:label": software})
        doc.wasAssociatedWith(activity, agents[software])
        for inp in step.get("inputs", []):
            if inp["step"] in entities:
                doc.used(activity, entities[inp["step"]])
                doc.wasDerivedFrom(entities[sid], entities[inp["step"]])
        for check in step.get("checks", []):
            if "run_id" not in check:
                continue
            result = doc.entity(f"check:{_ident(check['run_id'])}_{_ident(sid)}_{check['check']}", {
                "prov:type": "xcam:CheckResult", "prov:label": f"{check['check']} on {sid}",
                "xcam:status": check["status"], "xcam:blocking": check["blocking"],
                "xcam:description": check.get("description") or ""})
            doc.wasDerivedFrom(result, entities[sid])
    for raw in audit.get("raw_dicoms", []):
        sid = f"raw_dicoms[{raw['batch']}]"
        digest = raw.get("sha256_recorded") or "unknown"
        dicom = doc.entity(f"dicom:{_ident(raw['batch'])}_{_ident(raw['file'])}_{digest[:16]}", {
            "prov:type": "xcam:DicomFile", "prov:label": raw["path"],
            "xcam:sha256": digest, "xcam:sha256_on_disk": raw.get("sha256_on_disk") or "",
            "xcam:status": raw.get("status") or "", "xcam:verified": bool(raw["verified"])})
        if sid in entities:
            doc.hadMember(entities[sid], dicom)
    return doc
