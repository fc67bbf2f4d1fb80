"""A study's standalone HTML report: one self-contained file (inline CSS, every image a
base64 PNG data URI, no script, no font, no request to anywhere) that opens offline.

What a reader sees, top to bottom: the title and a provenance header (git commit, code
version, profile, study, when), the verdict line of the blocking checks, the scorecard
(:mod:`xcam_assets.evaluate.scorecard`) with its notes and the external-validation table,
the plots (ROC curves, metric bars), the heatmap montages, every check's latest result,
the data versions of the lineage's assets and the full parameters.

:func:`build_report_html` is pure (tests call it on a hand-made table);
:func:`study_report` gathers the inputs from a project's files. Check results and data
versions come from the caller (the Dagster instance: :mod:`xcam_assets.provenance.records`)
as plain dicts; this module does not import Dagster.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import os
import shutil
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import polars as pl

from xcam_assets.atomic import atomic_write_text
from xcam_assets.config import Settings
from xcam_assets.evaluate.scorecard import scorecard, scorecard_notes, scorecard_text
from xcam_assets.provenance import code_root, git_commit, package_versions, run_parameters

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px;
color:#1b1f24;max-width:1500px}
h1{font-size:22px;margin:0 0 6px}h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid
#d0d7de;padding-bottom:4px}h3{font-size:14px;margin:14px 0 6px}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0}
th,td{border:1px solid #d0d7de;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f5f7}td.num{font-variant-numeric:tabular-nums;white-space:nowrap}
td.name{white-space:nowrap}.wide{overflow-x:auto}
.prov{font-size:12.5px;color:#3d4650}.prov span{margin-right:18px}
.ok{color:#116329;font-weight:600}.bad{color:#b3261e;font-weight:600}
.verdict{padding:8px 12px;border-radius:4px;margin:10px 0;font-size:14px}
.verdict.ok{background:#dafbe1}.verdict.bad{background:#ffebe9}.verdict.unknown{background:#fff8c5}
figure{display:inline-block;margin:6px 10px 10px 0;vertical-align:top}
figcaption{font-size:12px;color:#3d4650}
img{max-width:100%;height:auto;border:1px solid #e1e4e8}
ul.notes{font-size:12.5px;color:#3d4650;margin:4px 0 0 18px;padding:0}
pre{font-size:11.5px;background:#f6f8fa;padding:8px;overflow:auto}
"""

#: the widest an embedded montage is kept (pixels); wider ones are downscaled
MAX_IMAGE_WIDTH = 1000
#: montages are scaled to at most this many pixels and stored as JPEG: the NIH study's
#: report (4 models x 6 methods) is 12.7 MB instead of 132 MB of full-size PNGs
MONTAGE_PIXELS = 1_500_000


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def data_uri(image: bytes) -> str:
    """A ``data:`` URI for PNG or JPEG bytes (told apart by their magic number)."""
    kind = "jpeg" if image[:2] == b"\xff\xd8" else "png"
    return f"data:image/{kind};base64," + base64.b64encode(image).decode("ascii")


def downscale_png(png: bytes, max_width: int = MAX_IMAGE_WIDTH,
                  max_pixels: int | None = None, jpeg_quality: int | None = None) -> bytes:
    """`png` at most `max_width` pixels wide and `max_pixels` in area (area
    interpolation), re-encoded as JPEG at `jpeg_quality` when given (montages of
    radiographs: a tenth of the PNG's size), else as it is when it already fits."""
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        return png
    h, w = img.shape[:2]
    scale = min(1.0, max_width / w, (max_pixels / (w * h)) ** 0.5 if max_pixels else 1.0)
    if scale >= 1.0 and jpeg_quality is None:
        return png
    if scale < 1.0:
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))),
                         interpolation=cv2.INTER_AREA)
    if jpeg_quality is not None:
        if img.ndim == 3 and img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
    else:
        ok, buf = cv2.imencode(".png", img)
    return buf.tobytes() if ok else png


def _table(frame: pl.DataFrame, numeric_from: int = 2) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td class='num'>{_e(v)}</td>" if i >= numeric_from
                         else f"<td class='name'>{_e(v)}</td>" for i, v in enumerate(row))
        + "</tr>" for row in frame.rows())
    return (f"<div class='wide'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
            "</table></div>")


def _dict_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_e(r.get(c))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figures(images: Mapping[str, bytes]) -> str:
    return "".join(f"<figure><img src='{data_uri(png)}' alt='{_e(name)}'>"
                   f"<figcaption>{_e(name)}</figcaption></figure>"
                   for name, png in images.items())


def _verdict(checks: Sequence[Mapping[str, Any]] | None, note: str) -> str:
    if checks is None:
        return ("<div class='verdict unknown'>Blocking checks: not available (no Dagster "
                f"instance was read). {_e(note)}</div>")
    blocking = [c for c in checks if c.get("blocking")]
    failed = [c for c in blocking if not c.get("passed")]
    cls = "bad" if failed else "ok"
    names = sorted({f"{c['asset']}/{c['check']}" for c in failed})
    text = (f"Blocking checks: {len(blocking) - len(failed)} of {len(blocking)} latest "
            "evaluations passed" + (f"; FAILED: {', '.join(names)}" if failed else ""))
    if note:
        text += f" ({note})"
    return f"<div class='verdict {cls}'>{_e(text)}</div>"


def build_report_html(*, title: str, card: pl.DataFrame, notes: Sequence[str],
                      plots: Mapping[str, bytes], montages: Mapping[str, bytes],
                      provenance: Mapping[str, Any],
                      checks: Sequence[Mapping[str, Any]] | None = None,
                      checks_note: str = "",
                      external: pl.DataFrame | None = None,
                      data_versions: Sequence[Mapping[str, Any]] = (),
                      extra_montages: Mapping[str, bytes] | None = None) -> str:
    """The report as one HTML string (see the module docstring for the order).
    ``provenance``: ``git_commit, code_version, xcam_version, profile, study, generated``
    shown in the header, ``parameters`` (any JSON) in the collapsed section at the end."""
    head_keys = ("study", "profile", "git_commit", "code_version", "xcam_version",
                 "generated", "metric_table")
    prov = "".join(f"<span><b>{_e(k)}</b> {_e(provenance.get(k))}</span>"
                   for k in head_keys if provenance.get(k) not in (None, ""))
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
        "img-src data:; style-src 'unsafe-inline'\">",
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1><div class='prov'>{prov}</div>",
        _verdict(checks, checks_note),
        "<h2>Scorecard (test split)</h2>",
        _table(card) if card.height else "<p>No metric rows.</p>",
        "<ul class='notes'>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>",
    ]
    if external is not None and external.height:
        parts += ["<h2>External validation (split = external)</h2>", _table(external)]
    if plots:
        parts += ["<h2>Plots</h2>", _figures(plots)]
    if montages:
        parts += ["<h2>Heatmap montages</h2>", _figures(montages)]
    if extra_montages:
        parts += ["<details><summary>Per-method montages (explain stage)</summary>",
                  _figures(extra_montages), "</details>"]
    parts.append("<h2>Checks (latest evaluation of each)</h2>")
    if checks is None:
        parts.append(f"<p>Not available. {_e(checks_note)}</p>")
    else:
        rows = [{**c, "result": "passed" if c.get("passed") else "FAILED"} for c in checks]
        parts.append(_dict_table(rows, ["asset", "partition", "check", "blocking", "result",
                                        "description", "time"])
                     if rows else "<p>No check evaluations recorded.</p>")
    if data_versions:
        parts += ["<h2>Data versions (latest materialization of each asset)</h2>",
                  _dict_table(data_versions, ["asset", "partition", "data_version",
                                              "code_version", "time"])]
    parts += ["<h2>Parameters</h2><details><summary>profile, study and every parameter "
              "(JSON)</summary><pre>",
              _e(json.dumps(provenance.get("parameters"), indent=2, sort_keys=True,
                            default=str)),
              "</pre></details></body></html>"]
    return "".join(parts)


# --------------------------------------------------------------------------- project
def report_images(settings: Settings) -> tuple[dict[str, bytes], dict[str, bytes],
                                                dict[str, bytes]]:
    """(plots, montages, per-method montages) of a project: every ``metrics/plots/*.png``
    but the montages (ROC curves first, then metric bars, then any other); the evaluate stage's ``montage_<arch>`` (every method side by side);
    the explain stage's ``heatmaps/<arch>/montage_*.png``. Montages are downscaled."""
    plots_dir = settings.metrics_dir / "plots"
    plots: dict[str, bytes] = {}
    montages: dict[str, bytes] = {}
    order = {"roc_": 0, "metrics_": 1}
    for p in sorted(plots_dir.glob("*.png"), key=lambda p: (
            next((v for k, v in order.items() if p.stem.startswith(k)), 2), p.stem)):
        if not p.stem.startswith("montage_"):
            plots[p.stem] = downscale_png(p.read_bytes())
    for arch in settings.architectures:
        p = plots_dir / f"montage_{arch}.png"
        if p.exists():
            montages[p.stem] = downscale_png(p.read_bytes(), max_pixels=MONTAGE_PIXELS,
                                             jpeg_quality=85)
    extra: dict[str, bytes] = {}
    for arch in settings.architectures:
        for p in sorted((settings.heatmaps_dir / arch).glob("montage_*.png")):
            extra[f"{arch}/{p.stem}"] = downscale_png(p.read_bytes(), max_pixels=MONTAGE_PIXELS,
                                                       jpeg_quality=80)
    return plots, montages, extra


def provenance_record(settings: Settings, code_version: str = "") -> dict[str, Any]:
    params = run_parameters(settings)
    ci = settings.metrics_dir / "metric_table.json"
    return {"study": params.get("study") or "(none: resources/params.yaml)",
            "profile": settings.profile_name,
            "git_commit": git_commit(code_root()),
            "code_version": code_version,
            "xcam_version": package_versions().get("xcam", ""),
            "generated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "metric_table": str(settings.metrics_dir / "metric_table.parquet"),
            "parameters": {**params, "findings": settings.findings,
                           "architectures": settings.architectures,
                           "ci": json.loads(ci.read_text()) if ci.exists() else None,
                           "packages": package_versions()}}


def study_report(settings: Settings, checks: Sequence[Mapping[str, Any]] | None = None,
                 data_versions: Sequence[Mapping[str, Any]] = (), checks_note: str = "",
                 code_version: str = "") -> str:
    """The report of the project's current files (metric table, plots, montages, the
    external table when there is one)."""
    long = pl.read_parquet(settings.metrics_dir / "metric_table.parquet")
    primary = settings.findings[0]
    external = None
    ext_path = settings.external_scores_dir / "metric_table.parquet"
    if ext_path.exists():
        external = scorecard(pl.read_parquet(ext_path), primary, split="external",
                             drop_empty_columns=True)
    plots, montages, extra = report_images(settings)
    study = os.environ.get("XCAM_STUDY") or "xcam"
    return build_report_html(
        title=f"xcam study report: {study} ({settings.profile_name} profile)",
        card=scorecard(long, primary), notes=scorecard_notes(long, primary), plots=plots,
        montages=montages, extra_montages=extra, provenance=provenance_record(settings,
                                                                              code_version),
        checks=checks, checks_note=checks_note, external=external,
        data_versions=data_versions)


def write_study_report(settings: Settings, path: Path, **kwargs: Any) -> Path:
    """:func:`study_report` written atomically to `path`."""
    atomic_write_text(Path(path), study_report(settings, **kwargs))
    return Path(path)


def terminal_summary(settings: Settings, width: int | None = None) -> str:
    """What `xcam materialize` and `xcam demo` print last: the scorecard as an aligned
    text table with its notes, the external table when there is one, then the paths of
    the full long table, the scorecard CSV and the HTML report."""
    path = settings.metrics_dir / "metric_table.parquet"
    if not path.exists():
        return f"xcam: no metric table yet ({path})"
    long = pl.read_parquet(path)
    primary = settings.findings[0]
    width = width or max(80, shutil.get_terminal_size((120, 24)).columns)
    notes = [line for n in scorecard_notes(long, primary)
             for line in textwrap.wrap(n, width, initial_indent="  * ",
                                       subsequent_indent="    ")]
    out = ["", "Scorecard (test split; value [95% CI], n below; sorted by PLA then PG):",
           scorecard_text(long, primary, width=width), *notes]
    ext_path = settings.external_scores_dir / "metric_table.parquet"
    if ext_path.exists():
        ext = pl.read_parquet(ext_path)
        if ext.height:
            out += ["", "External validation (split=external):",
                    scorecard_text(ext, primary, split="external", width=width,
                                   drop_empty_columns=True)]
    out += ["", f"full metric table (long): {path}"]
    for name, f in (("scorecard", settings.metrics_dir / "scorecard.csv"),
                    ("report", report_path(settings))):
        if f.exists():
            out.append(f"{name}: {f}")
    return "\n".join(out)


def report_path(settings: Settings) -> Path:
    """Where `metric_tables` and `xcam report` write the study report: `reports/` under
    the project root, outside the versioned `data/` (the report has a timestamp)."""
    return settings.root / "reports" / "report.html"
