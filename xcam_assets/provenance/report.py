"""The audit as one self-contained HTML page a reviewer reads in a browser."""

from __future__ import annotations

import html
import json
from typing import Any

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1d2230;max-width:1400px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
table{border-collapse:collapse;width:100%;margin:6px 0}
th,td{border:1px solid #d5d9e2;padding:4px 7px;text-align:left;vertical-align:top}
th{background:#f1f3f8}code,.mono{font-family:ui-monospace,monospace;font-size:12px}
.verdict{display:inline-block;padding:6px 14px;border-radius:6px;font-weight:700;color:#fff}
.pass{background:#1f8a4c}.fail{background:#c0392b}.ok{color:#1f8a4c}.bad{color:#c0392b}
.warn{color:#a86b00}details{margin:6px 0 14px;border:1px solid #d5d9e2;border-radius:6px;
padding:6px 10px}summary{cursor:pointer;font-weight:600}pre{white-space:pre-wrap;
background:#f7f8fb;padding:8px;border-radius:4px;max-height:420px;overflow:auto}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _ok(flag: Any) -> str:
    if flag is None:
        return "<span class=warn>n/a</span>"
    return "<span class=ok>&#10003; verified</span>" if flag else "<span class=bad>&#10007; MISMATCH</span>"


def _kv(rows: dict[str, Any]) -> str:
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td class=mono>{_e(v)}</td></tr>"
                               for k, v in rows.items()) + "</table>"


def _step(step: dict[str, Any]) -> str:
    sid = step["id"]
    if step.get("status") != "materialized":
        return f"<details open><summary class=bad>{_e(sid)}: {_e(step.get('status'))}</summary></details>"
    run, out = step["run"], step.get("output", {})
    parts = [f"<details id='{_e(sid)}'><summary>{_e(sid)} &mdash; {_ok(out.get('verified'))}"
             f" &mdash; run <code>{_e(run['run_id'][:8])}</code></summary>"]
    parts.append(_kv({
        "run id": run["run_id"], "job": run.get("job"), "run status": run.get("status"),
        "started / ended": f"{run.get('start')} / {run.get('end')}",
        "materialized at": step.get("materialized_at"), "launched by": run.get("launched_by"),
        "host / user": f"{step.get('host')} / {step.get('user')}",
        "code version": step.get("code_version"), "git commit": step.get("git_commit"),
        "profile / study": f"{step.get('profile')} / {step.get('study')}",
        "data version (recorded)": step.get("data_version"),
        "DVC hash on disk now": out.get("on_disk"), "dvc.lock / cache": out.get("dvc_lock_md5"),
        "output": out.get("path"), "DVC stage / out": f"{out.get('dvc_stage')} / {out.get('dvc_out')}",
        "consumed by": ", ".join(step.get("consumers", [])),
    }))
    if step.get("inputs"):
        parts.append("<b>Inputs</b><table><tr><th>step</th><th>data version consumed</th></tr>"
                     + "".join(f"<tr><td><a href='#{_e(i['step'])}'>{_e(i['step'])}</a></td>"
                               f"<td class=mono>{_e(i['data_version'])}</td></tr>"
                               for i in step["inputs"]) + "</table>")
    if out.get("files"):
        parts.append("<b>Output files</b><table><tr><th>file</th><th>md5 on disk</th>"
                     "<th>md5 recorded</th></tr>" + "".join(
                         f"<tr><td class=mono>{_e(f['relpath'])}</td><td class=mono>{_e(f['md5'])}"
                         f"</td><td class=mono>{_e(f['recorded_md5'])} "
                         f"{'' if f['recorded_md5'] in (None, f['md5']) else _ok(False)}</td></tr>"
                         for f in out["files"]) + "</table>")
    if step.get("checks"):
        parts.append("<b>Checks</b><table><tr><th>check</th><th>blocking</th><th>status</th>"
                     "<th>description</th><th>metadata</th></tr>" + "".join(
                         f"<tr><td>{_e(c['check'])}</td><td>{_e(c['blocking'])}</td>"
                         f"<td class={'ok' if c.get('passed') else 'bad'}>{_e(c['status'])}</td>"
                         f"<td>{_e(c.get('description'))}</td><td><pre>"
                         f"{_e(json.dumps(c.get('metadata', {}), indent=1, default=str))}"
                         "</pre></td></tr>" for c in step["checks"]) + "</table>")
    if step.get("parameters") is not None:
        parts.append("<details><summary>Parameters</summary><pre>"
                     f"{_e(json.dumps(step['parameters'], indent=1, sort_keys=True))}</pre></details>")
    if step.get("packages"):
        parts.append("<details><summary>Package versions</summary>"
                     f"{_kv(step['packages'])}</details>")
    if step.get("metadata"):
        parts.append("<details><summary>Materialization metadata</summary><pre>"
                     f"{_e(json.dumps(step['metadata'], indent=1, default=str))}</pre></details>")
    card = step.get("model_card")
    if card:
        parts.append("<details open><summary>Model card</summary><pre>"
                     f"{_e(card.get('model_card_md'))}</pre></details>")
    parts.append("</details>")
    return "".join(parts)


def render_html(audit: dict[str, Any]) -> str:
    """The report page for `AuditReport.as_dict()`."""
    head = audit["audit"]
    target = head["asset"] + (f"[{head['partition']}]" if head.get("partition") else "")
    verdict = head["verdict"]
    problems = "".join(
        f"<tr><td class={'bad' if p['severity'] == 'error' else 'warn'}>{_e(p['severity'])}</td>"
        f"<td>{_e(p['step'])}</td><td>{_e(p['message'])}</td>"
        f"<td class=mono>{_e(p.get('file'))}</td></tr>" for p in head["problems"])
    overview = "".join(
        f"<tr><td><a href='#{_e(s['id'])}'>{_e(s['id'])}</a></td>"
        f"<td class=mono>{_e((s.get('run') or {}).get('run_id', '')[:8])}</td>"
        f"<td>{_e(s.get('materialized_at'))}</td><td>{_e(s.get('host'))} / {_e(s.get('user'))}</td>"
        f"<td>{_e(s.get('code_version'))}</td><td class=mono>{_e((s.get('git_commit') or '')[:12])}</td>"
        f"<td class=mono>{_e(s.get('data_version'))}</td>"
        f"<td>{_ok((s.get('output') or {}).get('verified'))}</td>"
        f"<td>{_e(', '.join(c['check'] + ':' + c['status'] for c in s.get('checks', [])))}</td></tr>"
        for s in audit["steps"])
    raw = audit.get("raw_dicoms", [])
    raw_rows = "".join(
        f"<tr><td>{_e(r['batch'])}</td><td class=mono>{_e(r['file'])}</td><td>{_e(r['status'])}</td>"
        f"<td class=mono>{_e(r['sha256_recorded'])}</td><td>{_ok(r['verified'])}</td></tr>"
        for r in raw)
    n_bad_raw = sum(1 for r in raw if not r["verified"])
    return f"""<!doctype html><html lang=en><head><meta charset=utf-8>
<title>xcam audit: {_e(target)}</title><style>{CSS}</style></head><body>
<h1>xcam provenance audit: {_e(target)}</h1>
<p><span class='verdict {verdict}'>{verdict.upper()}</span>
&nbsp;{head['n_errors']} error(s), {head['n_warnings']} warning(s); {len(audit['steps'])} lineage
steps; {len(raw)} raw DICOM files ({n_bad_raw} not matching). Generated {_e(head['generated_at'])}
by {_e(head['auditor_user'])}@{_e(head['auditor_host'])} from the instance in
<code>{_e(head['dagster_home'])}</code>, project <code>{_e(head['project_root'])}</code>.</p>
<p>Every output was re-hashed the way DVC hashes it and compared with the data version
the Dagster event log recorded; every raw DICOM was re-hashed (sha256) and compared with
the hash recorded at ingest.</p>
<h2>Problems</h2>
{"<table><tr><th>severity</th><th>step</th><th>message</th><th>file</th></tr>" + problems + "</table>"
 if problems else "<p class=ok>None.</p>"}
<h2>Lineage (upstream first)</h2>
<table><tr><th>step</th><th>run</th><th>materialized</th><th>host / user</th><th>code version</th>
<th>git commit</th><th>data version (DVC md5)</th><th>on disk</th><th>checks</th></tr>
{overview}</table>
<h2>Steps</h2>
{"".join(_step(s) for s in audit["steps"])}
<h2>Raw DICOM files</h2>
<table><tr><th>batch</th><th>file</th><th>status</th><th>sha256 (recorded at ingest)</th>
<th>on disk</th></tr>{raw_rows}</table>
</body></html>
"""
