"""Two metric tables side by side: which figures moved by more than their CI.

Used for a before/after of a code or configuration change on fixed inputs (a statistics
fix re-scoring the same checkpoints; bf16 vs fp32 training, the parity of
`precision: auto`), through ``xcam compare-tables OLD NEW``. Rows are matched on
(architecture, cam_method, finding, metric, split); a figure **moved** when the new value
lies outside the old row's CI or the old value outside the new row's CI (either interval
excludes the other's point estimate). Rows without a CI (counts, settings such as
``pointing_tolerance_px``) are compared for equality only. Written by hand: no library
compares two long-format metric tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl

from xcam_assets.evaluate.scorecard import Cell

KEYS = ("architecture", "cam_method", "finding", "metric", "split")


def _keyed(table: pl.DataFrame) -> pl.DataFrame:
    if "split" not in table.columns:
        table = table.with_columns(pl.lit("test").alias("split"))
    return table.with_columns([pl.col(k).cast(pl.Utf8).fill_null("") for k in KEYS])


def compare_tables(old: pl.DataFrame, new: pl.DataFrame,
                   metrics: Sequence[str] | None = None) -> pl.DataFrame:
    """One row per figure in both tables: old and new value, CI and n, the difference and
    whether it moved beyond a CI (``moved``); rows only one table has are listed with
    ``status`` `only_old` / `only_new` instead of being dropped silently."""
    cols = [*KEYS, "value", "ci_low", "ci_high", "n"]
    a, b = _keyed(old).select(cols), _keyed(new).select(cols)
    if metrics:
        a = a.filter(pl.col("metric").is_in(list(metrics)))
        b = b.filter(pl.col("metric").is_in(list(metrics)))
    both = a.join(b, on=list(KEYS), how="full", suffix="_new", coalesce=True)
    both = both.rename({"value": "value_old", "ci_low": "ci_low_old", "ci_high": "ci_high_old",
                        "n": "n_old"})
    has_old, has_new = pl.col("value_old").is_not_null(), pl.col("value_new").is_not_null()
    old_ci = pl.col("ci_low_old").is_not_null() & pl.col("ci_high_old").is_not_null()
    new_ci = pl.col("ci_low_new").is_not_null() & pl.col("ci_high_new").is_not_null()
    outside_old = old_ci & ((pl.col("value_new") < pl.col("ci_low_old"))
                            | (pl.col("value_new") > pl.col("ci_high_old")))
    outside_new = new_ci & ((pl.col("value_old") < pl.col("ci_low_new"))
                            | (pl.col("value_old") > pl.col("ci_high_new")))
    no_ci_changed = ~old_ci & ~new_ci & (pl.col("value_old") != pl.col("value_new"))
    return both.with_columns(
        (pl.col("value_new") - pl.col("value_old")).alias("delta"),
        pl.when(has_old & has_new).then(outside_old | outside_new | no_ci_changed)
        .otherwise(None).alias("moved"),
        pl.when(has_old & has_new).then(pl.lit("both"))
        .when(has_old).then(pl.lit("only_old")).otherwise(pl.lit("only_new")).alias("status"),
    ).sort(list(KEYS))


def _cell(v: float | None, lo: float | None, hi: float | None, n: int | None) -> str:
    return "-" if v is None else Cell(v, lo, hi, n).text()


def format_comparison(table: pl.DataFrame, moved_only: bool = False) -> str:
    """A markdown table (old | new | delta | moved) for a closing note or the terminal."""
    rows = table.filter(pl.col("moved").fill_null(False)) if moved_only else table
    lines = ["| architecture | method | finding | metric | split | old | new | delta | moved |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows.iter_rows(named=True):
        delta = "-" if r["delta"] is None else f"{r['delta']:+.3f}"
        moved = {True: "**yes**", False: "no", None: r["status"]}[r["moved"]]
        lines.append(
            f"| {r['architecture']} | {r['cam_method'] or '-'} | {r['finding']} | {r['metric']} "
            f"| {r['split']} | {_cell(r['value_old'], r['ci_low_old'], r['ci_high_old'], r['n_old'])} "
            f"| {_cell(r['value_new'], r['ci_low_new'], r['ci_high_new'], r['n_new'])} "
            f"| {delta} | {moved} |")
    return "\n".join(lines)


def read_metric_table(path: Path) -> pl.DataFrame:
    """A metric table from its parquet file, or from the `metrics` folder holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / "metric_table.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"no metric table at {path}")
    return pl.read_parquet(path)
