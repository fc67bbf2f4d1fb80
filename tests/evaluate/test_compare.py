"""`xcam compare-tables`: figures matched by key, moved = outside the other run's CI."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from xcam_assets.cli import main
from xcam_assets.evaluate.compare import compare_tables, read_metric_table


def _table(rows: list[tuple]) -> pl.DataFrame:
    return pl.DataFrame(rows, orient="row", schema={
        "architecture": pl.Utf8, "cam_method": pl.Utf8, "finding": pl.Utf8, "metric": pl.Utf8,
        "value": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64, "n": pl.Int64,
        "split": pl.Utf8})


OLD = _table([
    ("r18", None, "A", "auc", 0.80, 0.70, 0.90, 100, "test"),
    ("r18", "gradcam", "A", "pointing_game", 0.50, 0.40, 0.60, 50, "test"),
    ("r18", "gradcam", "A", "pointing_tolerance_px", 15.0, None, None, None, "test"),
    ("r18", None, "A", "auc_view_PA", 0.7, 0.6, 0.8, 40, "test"),
])
NEW = _table([
    ("r18", None, "A", "auc", 0.85, 0.76, 0.93, 100, "test"),          # inside both CIs
    ("r18", "gradcam", "A", "pointing_game", 0.30, 0.22, 0.38, 50, "test"),  # outside old
    ("r18", "gradcam", "A", "pointing_tolerance_px", 8.57, None, None, None, "test"),
    ("r18", None, "A", "auc", 0.90, 0.80, 0.95, 40, "external"),      # a row only NEW has
])


def test_moved_means_outside_the_other_runs_ci() -> None:
    cmp = compare_tables(OLD, NEW)
    by = {(r["metric"], r["split"]): r for r in cmp.iter_rows(named=True)}
    auc = by[("auc", "test")]
    assert auc["delta"] == pytest.approx(0.05) and auc["moved"] is False
    pg = by[("pointing_game", "test")]
    assert pg["delta"] == pytest.approx(-0.20) and pg["moved"] is True
    tol = by[("pointing_tolerance_px", "test")]  # no CI: any change is a move
    assert tol["moved"] is True and tol["status"] == "both"
    assert by[("auc", "external")]["status"] == "only_new"
    assert by[("auc", "external")]["moved"] is None
    assert by[("auc_view_PA", "test")]["status"] == "only_old"
    assert cmp.height == 5


def test_old_value_outside_the_new_ci_is_a_move_too() -> None:
    new = _table([("r18", None, "A", "auc", 0.82, 0.81, 0.95, 100, "test")])  # 0.80 < 0.81
    cmp = compare_tables(OLD, new, metrics=["auc"])
    assert cmp.height == 1 and cmp["moved"].to_list() == [True]


def test_cli_prints_the_table_and_names_missing_files(tmp_path: Path, capsys) -> None:
    (tmp_path / "a").mkdir()
    OLD.write_parquet(tmp_path / "a" / "metric_table.parquet")
    NEW.write_parquet(tmp_path / "b.parquet")
    main(["compare-tables", str(tmp_path / "a"), str(tmp_path / "b.parquet"),
          "--metric", "pointing_game", "--csv", str(tmp_path / "c.csv")])
    out = capsys.readouterr().out
    assert "| r18 | gradcam | A | pointing_game | test | 0.500 [0.400, 0.600] n=50 " in out
    assert "| -0.200 | **yes** |" in out and "1 figures compared, 1 moved" in out
    assert pl.read_csv(tmp_path / "c.csv").height == 1
    with pytest.raises(SystemExit, match="no metric table at .*missing"):
        main(["compare-tables", str(tmp_path / "missing"), str(tmp_path / "b.parquet")])
    assert read_metric_table(tmp_path / "b.parquet").height == 4
