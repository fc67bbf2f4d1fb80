"""xcam_assets.sqlite_pins: the instance's SQLite files held open during a lineage."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import dagster as dg
import pytest
from real_data import REPO

from xcam_assets.sqlite_pins import pinned_sqlite


@dg.asset
def first() -> dg.MaterializeResult:
    return dg.MaterializeResult()


@dg.asset(deps=[first])
def second() -> dg.MaterializeResult:
    return dg.MaterializeResult()


@dg.asset_check(asset=second, blocking=True)
def second_is_fine() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=True)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.delenv("XCAM_SQLITE_PINS", raising=False)
    return home


def test_runs_are_recorded_alike_with_the_pins(home: Path) -> None:
    instance = dg.DagsterInstance.get()
    dg.materialize([first, second, second_is_fine], instance=instance)  # creates the instance
    with pinned_sqlite() as pins:
        with pinned_sqlite() as inner:  # re-entrant: the stages inside materialize_all
            assert inner is pins
            result = dg.materialize([first, second, second_is_fine], instance=instance)
        assert result.success
        pinned = {Path(p).name for p in pins.pins}
        # the cross-run index, the runs table and the new run's own event-log shard
        assert {"index.db", "runs.db", f"{result.run_id}.db"} <= pinned
        for path in pins.pins:
            assert Path(path).is_relative_to(home.resolve())
        # the run's shard was created in WAL mode, and another connection (another
        # process: the UI, the daemon) reads and writes beside the idle pins
        shard = next(Path(p) for p in pins.pins if Path(p).name == f"{result.run_id}.db")
        other = sqlite3.connect(shard, timeout=1)
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        other.execute("CREATE TABLE t (x INTEGER)")
        other.execute("INSERT INTO t VALUES (1)")
        other.commit()
        other.close()
    assert not pins.pins  # all closed at the end of the block
    # every event of the run is there, as without pins
    with_pins = [e.dagster_event.event_type_value
                 for e in instance.all_logs(result.run_id) if e.dagster_event]
    plain = dg.materialize([first, second, second_is_fine], instance=instance)
    without = [e.dagster_event.event_type_value
               for e in instance.all_logs(plain.run_id) if e.dagster_event]
    assert sorted(with_pins) == sorted(without)
    assert instance.get_latest_materialization_event(second.key).run_id == plain.run_id


def test_the_pins_can_be_turned_off(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XCAM_SQLITE_PINS", "0")
    instance = dg.DagsterInstance.get()
    with pinned_sqlite() as pins:
        assert dg.materialize([first, second], instance=instance).success
        assert not pins.pins


def test_databases_outside_the_root_and_in_memory_are_left_alone(
        home: Path, tmp_path: Path) -> None:
    from sqlalchemy import create_engine, text

    outside = tmp_path / "elsewhere.db"
    with pinned_sqlite() as pins:
        for url in (f"sqlite:///{outside}", "sqlite://"):
            engine = create_engine(url)
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            engine.dispose()
        assert not pins.pins
