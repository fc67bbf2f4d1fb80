"""The scorecard: the metric table cut down to what a reader compares first.

One row per architecture x CAM method (split ``test``), one column per headline metric,
each cell ``value [ci_low, ci_high] n=N`` from the long table (:mod:`tables`), ``—`` where
the row has no such metric. Pure functions over the long table (no Dagster); the evaluate
stage writes ``metrics/scorecard.csv``, the CLI prints :func:`scorecard_text`, the
metric table's materialization carries it as table metadata and the HTML report shows it.

Which row of the long table fills a cell (:data:`HEADLINE`):

* ``auc`` is the **model's** test AUC for the *primary finding*: the study's first
  finding (``cohort.findings[0]``; ``Abnormal`` on NIH, ``lesion`` in the demo). The
  primary finding is the question the study is built around (on NIH: abnormal vs no
  finding, the 0.85 target), while the macro average over NIH's boxed findings mixes in
  findings with 7-23 test positives. The diagnostic row has no CAM method: it repeats on
  every method row of its architecture.
* ``point_localization_accuracy`` (PYLON's headline) is the ``macro_average`` row (mean
  over the boxed findings, with its CI), where it exists.
* the other heatmap metrics (pointing game, energy pointing game, AOPC, blank-map rate)
  are the primary finding's row; when the primary finding has none (NIH's ``Abnormal`` has
  no boxes) the ``macro_average`` row, else the plain mean over the findings that have the
  metric, shown as ``v (mean of K findings)`` without a CI (the table has no joint CI
  for it).

Rows are sorted by point localization accuracy, then pointing game, descending (missing
last), then by name: the scorecard ranks heatmaps by how trustworthy they are; the model's
AUC is the same on every method row of an architecture. A row whose every cell is
missing is dropped. Metrics in :data:`OPTIONAL` (e.g. a sanity flag another module may
add) become columns only when the table has them.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl

from xcam_assets.evaluate.tables import BOX_WEIGHTED, MACRO

MISSING = "—"
NO_METHOD = "-"


@dataclass(frozen=True)
class Headline:
    """A scorecard column: the long table's ``metric``, a short label for narrow
    displays, and whether the summary over findings (``macro_average``) comes first."""

    metric: str
    label: str
    summary_first: bool = False
    higher_better: bool = True


#: the columns every scorecard has, in order
CORE: tuple[Headline, ...] = (
    Headline("auc", "AUC"),
    Headline("point_localization_accuracy", "PLA", summary_first=True),
    Headline("pointing_game", "PG"),
    Headline("energy_pointing_game", "EPG"),
    Headline("aopc", "AOPC"),
    Headline("blank_map_rate", "blank", higher_better=False),
)
#: columns shown only when some row of the table has the metric (exact metric names; the
#: subgroup gaps, named ``<metric>_gap@<attribute>=...``, are not headline columns)
OPTIONAL: tuple[Headline, ...] = (
    Headline("auc_seed_mean", "AUC seeds"),
    # heatmap metrics over the seed models' own heatmaps (issue #17 item 5, evaluate/seeds.py)
    Headline("point_localization_accuracy_seed_mean", "PLA seeds", summary_first=True),
    Headline("pointing_game_seed_mean", "PG seeds"),
    Headline("energy_pointing_game_seed_mean", "EPG seeds"),
    # faithfulness per seed model on its own true positives (seed_heatmaps.faithfulness)
    Headline("aopc_seed_mean", "AOPC seeds"),
    Headline("ece", "ECE", higher_better=False),
    Headline("randomization_test_failed", "sanity fail", higher_better=False),
    Headline("stability_spearman", "stability"),
    Headline("sanity_pass", "sanity"),
)
#: the configurable headline list: CORE then OPTIONAL
HEADLINE: tuple[Headline, ...] = CORE + OPTIONAL
#: sort keys (descending): point localization accuracy, then pointing game
SORT_BY: tuple[str, ...] = ("point_localization_accuracy", "pointing_game")


@dataclass(frozen=True)
class Cell:
    """One scorecard value: from one long-table row (CI and n), or a mean over
    ``k_findings`` findings (no CI, no n)."""

    value: float
    ci_low: float | None = None
    ci_high: float | None = None
    n: int | None = None
    k_findings: int = 0

    def text(self, digits: int = 3) -> str:
        v = _num(self.value, digits)
        if self.k_findings:
            return f"{v} (mean of {self.k_findings} findings)"
        ci = ""
        if _finite(self.ci_low) and _finite(self.ci_high):
            ci = f" [{_num(self.ci_low, digits)}, {_num(self.ci_high, digits)}]"
        return f"{v}{ci}" + (f" n={self.n}" if self.n is not None else "")

    def short(self, digits: int = 2) -> tuple[str, str]:
        """Two lines for a narrow column: value and CI, then n."""
        v = _num(self.value, digits)
        if self.k_findings:
            return v, f"mean of {self.k_findings}"
        ci = ""
        if _finite(self.ci_low) and _finite(self.ci_high):
            ci = f" [{_num(self.ci_low, digits)},{_num(self.ci_high, digits)}]"
        return f"{v}{ci}", (f"n={self.n}" if self.n is not None else "")


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def _num(x: float | None, digits: int) -> str:
    if not _finite(x):
        return "n/a"
    text = f"{x:.{digits}f}"
    return text.lstrip("-") if float(text) == 0 else text  # no "-0.000"


def primary_finding(long: pl.DataFrame) -> str | None:
    """The first finding in name order that is not a summary row (callers that know the
    study pass ``cohort.findings[0]`` instead)."""
    names = sorted(f for f in long["finding"].unique().to_list()
                   if f is not None and f not in (MACRO, BOX_WEIGHTED))
    return names[0] if names else None


def headline_columns(long: pl.DataFrame, headline: Sequence[Headline] = HEADLINE
                     ) -> list[Headline]:
    """CORE columns always; the others when the table has the metric."""
    present = set(long["metric"].unique().to_list()) if long.height else set()
    core = {h.metric for h in CORE}
    return [h for h in headline if h.metric in core or h.metric in present]


def _pick(rows: Mapping[str, dict], h: Headline, primary: str | None) -> Cell | None:
    """The cell of one metric from its rows by finding (module docstring)."""
    order = [MACRO, primary] if h.summary_first else [primary, MACRO]
    for finding in order:
        r = rows.get(finding) if finding is not None else None
        if r is not None:
            return Cell(r["value"], r["ci_low"], r["ci_high"], r["n"])
    plain = [r for f, r in rows.items() if f not in (MACRO, BOX_WEIGHTED)]
    if len(plain) == 1:
        r = plain[0]
        return Cell(r["value"], r["ci_low"], r["ci_high"], r["n"])
    values = [r["value"] for r in plain if _finite(r["value"])]
    if values:
        return Cell(sum(values) / len(values), k_findings=len(values))
    return None


def scorecard_cells(long: pl.DataFrame, primary: str | None = None, split: str = "test",
                    headline: Sequence[Headline] = HEADLINE
                    ) -> tuple[list[Headline], list[dict[str, Any]]]:
    """(columns, rows): each row ``{"architecture", "cam_method", metric: Cell | None}``,
    sorted (:data:`SORT_BY`). A method row none of whose own rows is a headline metric (only
    the model's AUC would fill it, e.g. a method-agreement pair) is dropped: no row is
    empty. ``cam_method`` is ``-`` for an architecture without heatmap rows."""
    if "split" in long.columns:
        long = long.filter(pl.col("split") == split)
    if primary is None and long.height:
        primary = primary_finding(long)
    cols = headline_columns(long, headline)
    wanted = {h.metric for h in cols}
    index: dict[tuple[str, str | None, str], dict[str, dict]] = {}
    for r in long.filter(pl.col("metric").is_in(list(wanted))).iter_rows(named=True):
        index.setdefault((r["architecture"], r["cam_method"], r["metric"]), {})[
            r["finding"]] = r
    pairs = sorted({(r["architecture"], r["cam_method"])
                    for r in long.select("architecture", "cam_method").unique()
                    .iter_rows(named=True) if r["cam_method"] is not None})
    with_methods = {a for a, _ in pairs}
    pairs += [(a, None) for a in sorted(set(long["architecture"].to_list()) - with_methods)]
    rows = []
    for arch, method in pairs:
        row: dict[str, Any] = {"architecture": arch, "cam_method": method or NO_METHOD}
        own = False  # a cell from this row's own rows (not only the model's AUC)
        for h in cols:
            found = index.get((arch, method, h.metric))
            own = own or found is not None
            found = found or index.get((arch, None, h.metric))
            row[h.metric] = _pick(found, h, primary) if found else None
        if own:
            rows.append(row)

    def key(row: dict[str, Any]) -> tuple:
        out: list[Any] = []
        for metric in SORT_BY:
            c = row.get(metric)
            v = c.value if c is not None and _finite(c.value) else None
            out += [v is None, -(v or 0.0)]
        return (*out, row["architecture"], row["cam_method"])

    return cols, sorted(rows, key=key)


def scorecard(long: pl.DataFrame, primary: str | None = None, split: str = "test",
              headline: Sequence[Headline] = HEADLINE, drop_empty_columns: bool = False
              ) -> pl.DataFrame:
    """The scorecard as strings: ``architecture, cam_method`` and one column per headline
    metric (named by the metric), cells ``v [lo, hi] n=N`` (3 decimals) or ``—``.
    ``drop_empty_columns``: leave out metrics no row has (the external table)."""
    cols, rows = scorecard_cells(long, primary, split, headline)
    if drop_empty_columns:
        cols = [h for h in cols if any(r[h.metric] is not None for r in rows)]
    schema = {"architecture": pl.String, "cam_method": pl.String,
              **{h.metric: pl.String for h in cols}}
    return pl.DataFrame([{"architecture": r["architecture"], "cam_method": r["cam_method"],
                          **{h.metric: r[h.metric].text() if r[h.metric] else MISSING
                             for h in cols}} for r in rows], schema=schema)


def scorecard_notes(long: pl.DataFrame, primary: str | None = None) -> list[str]:
    """What the columns are, for a reader of the printed table or the report."""
    if primary is None and long.height:
        primary = primary_finding(long)
    boxed = sorted({f for f in long.filter(pl.col("metric") == "point_localization_accuracy")
                    ["finding"].to_list() if f not in (MACRO, BOX_WEIGHTED)})
    return [
        f"AUC: the model's test AUC for {primary} (the primary finding: the study's first); "
        "the same on every CAM-method row of an architecture.",
        "PLA: point localization accuracy (PYLON), macro average over the "
        f"{len(boxed)} boxed finding(s) ({', '.join(boxed) or 'none'}).",
        f"PG pointing game, EPG energy pointing game, AOPC (MoRF), blank = blank-map rate "
        f"(lower is better): {primary}; where {primary} has no such row, the mean over the "
        "findings that have it (no CI).",
        "Cells: value [95% CI] n=images the value rests on; '—' = not computed for that row. "
        "Sorted by PLA, then PG, descending.",
    ]


# --------------------------------------------------------------------------- text
ABBREVIATIONS: dict[str, str] = {"efficientnet": "effnet"}


def shorten(name: str, width: int) -> str:
    """`name` in at most `width` characters: known abbreviations, then a middle cut."""
    for long_name, short in ABBREVIATIONS.items():
        if len(name) > width:
            name = name.replace(long_name, short)
    if len(name) <= width:
        return name
    head = (width - 1) // 2 + (width - 1) % 2
    return name[:head] + "…" + name[len(name) - (width - 1 - head):]


def scorecard_text(long: pl.DataFrame, primary: str | None = None, split: str = "test",
                   headline: Sequence[Headline] = HEADLINE, width: int | None = None,
                   drop_empty_columns: bool = True, arch_width: int = 22,
                   method_width: int = 16) -> str:
    """An aligned plain-text table: fixed column widths, two lines per row (value and
    CI to 2 decimals, then n), names shortened to ``arch_width`` / ``method_width``;
    metrics no row has are left out (``drop_empty_columns``; the CSV keeps them as ``—``).
    When the metric columns do not fit in ``width`` (default: the terminal's, at least 80)
    they continue in a second block that repeats the name columns, so no line wraps."""
    cols, rows = scorecard_cells(long, primary, split, headline)
    if drop_empty_columns:
        cols = [h for h in cols if any(r[h.metric] is not None for r in rows)]
    if not rows:
        return "(no rows)"
    width = width or max(80, shutil.get_terminal_size((120, 24)).columns)
    aw = min(arch_width, max(len("architecture"), *(len(r["architecture"]) for r in rows)))
    mw = min(method_width, max(len("method"), *(len(r["cam_method"]) for r in rows)))
    lines_of = {h.metric: [r[h.metric].short() if r[h.metric] else (MISSING, "")
                           for r in rows] for h in cols}
    cw = {h.metric: max(len(h.label), *(max(len(a), len(b)) for a, b in lines_of[h.metric]))
          for h in cols}
    blocks: list[list[Headline]] = [[]]
    used = aw + 2 + mw
    for h in cols:
        if blocks[-1] and used + 2 + cw[h.metric] > width:
            blocks.append([])
            used = aw + 2 + mw
        blocks[-1].append(h)
        used += 2 + cw[h.metric]
    out: list[str] = []
    for block in blocks:
        head = f"{'architecture':<{aw}}  {'method':<{mw}}" + "".join(
            f"  {h.label:<{cw[h.metric]}}" for h in block)
        out += [head.rstrip(), "-" * len(head.rstrip())]
        for i, r in enumerate(rows):
            first = f"{shorten(r['architecture'], aw):<{aw}}  {shorten(r['cam_method'], mw):<{mw}}"
            second = " " * (aw + 2 + mw)
            for h in block:
                a, b = lines_of[h.metric][i]
                first += f"  {a:<{cw[h.metric]}}"
                second += f"  {b:<{cw[h.metric]}}"
            out += [first.rstrip(), second.rstrip()]
        out.append("")
    return "\n".join(out).rstrip("\n")
