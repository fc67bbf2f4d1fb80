"""DVC and Dagster agree: every asset's data version in the event log is the hash DVC
gives its output (checked against `dvc` itself), `dvc push`/`pull` round-trip, `dvc repro`
on a fresh clone reproduces the deterministic stages' hashes, and DVC commands are
serialised by xcam's lock."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml
from automation.harness import DVC, dvc, full_tiny_run, make_project, project_env, xcam

from xcam_assets.config import load_settings
from xcam_assets.hashing import dvc_md5
from xcam_assets.provenance.dvc import (
    ASSET_OUTS,
    asset_output,
    dvc_lock,
    dvc_version_in_lock,
    lock_outs,
    run_dvc,
)

pytestmark = pytest.mark.slow
#: given the same demo cohort and pseudonym key, these stages' outputs are byte-identical
DETERMINISTIC_OUTS = ["data/raw", "data/inventory", "data/findings", "data/tensors",
                      "data/splits"]


@pytest.fixture
def full_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not DVC.exists():
        pytest.skip(f"DVC is not installed at {DVC} (make setup)")
    return full_tiny_run(request, tmp_path_factory)


def _versions(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict[tuple[str, str | None], str]:
    """(asset, partition) -> data version of its latest materialization in the instance."""
    for k, v in project_env(root).items():
        monkeypatch.setenv(k, v)
    instance = dg.DagsterInstance.from_config(str(root / "dagster_home"))
    out = {}
    for asset in ASSET_OUTS:
        key = dg.AssetKey(asset)
        parts = instance.get_materialized_partitions(key) or {None}
        for p in parts:
            ev = instance.fetch_materializations(dg.AssetRecordsFilter(
                asset_key=key, asset_partitions=[p] if p else None), limit=1).records[0]
            out[(asset, p)] = ev.event_log_entry.asset_materialization.tags[
                "dagster/data_version"]
    return out


def test_data_versions_equal_dvc_hashes(full_run: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    versions = _versions(full_run, monkeypatch)
    s = load_settings()
    assert {a for a, _ in versions} == set(ASSET_OUTS)
    # 1. what `dvc commit` (run by `xcam demo`) wrote: dvc.lock for whole outs, the cache's
    #    .dir manifest for a partition's file or sub-folder
    for (asset, part), version in sorted(versions.items(), key=str):
        assert dvc_version_in_lock(s, asset, part) == version, (asset, part)
        assert dvc_md5(asset_output(s, asset, part)) == version
    outs = lock_outs(full_run)
    assert outs["data/splits"] == versions[("cohort_splits", None)]
    assert outs["data/metrics"] == versions[("metric_tables", None)]

    # 2. DVC itself on each partition's output alone: `dvc add` in a scratch repo
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    targets = {}
    for (asset, part), version in versions.items():
        src = asset_output(s, asset, part)
        name = f"{asset}--{part or 'all'}" + (".parquet" if src.is_file() else "")
        (shutil.copytree if src.is_dir() else shutil.copy)(src, scratch / name)
        targets[name] = version
    dvc(scratch, "init", "--no-scm", "-q")
    dvc(scratch, "add", "-q", *sorted(targets))
    for name, version in targets.items():
        meta = yaml.safe_load((scratch / f"{name}.dvc").read_text())
        assert meta["outs"][0]["md5"] == version, name
    print(f"{len(targets)} asset outputs: Dagster data version == DVC md5")


def test_dvc_pull_round_trip_and_repro_on_a_fresh_clone(full_run: Path, tmp_path: Path) -> None:
    # push/pull: a fresh clone with the committed dvc.lock pulls the outputs back
    clone = make_project(tmp_path / "clone", with_code=True)
    shutil.copytree(full_run / ".dvc", clone / ".dvc",
                    ignore=shutil.ignore_patterns("cache", "tmp"))
    shutil.copy(full_run / "dvc.lock", clone / "dvc.lock")
    dvc(clone, "pull", "-q")
    for out, md5 in lock_outs(full_run).items():
        assert dvc_md5(clone / out) == md5, out

    # repro: another fresh clone, the same demo cohort and key, `dvc repro preprocess splits`
    fresh = make_project(tmp_path / "fresh", with_code=True)
    dvc(fresh, "init", "--no-scm", "-q")
    xcam(fresh, "demo-cohort")
    started = time.monotonic()
    dvc(fresh, "repro", "-q", "preprocess", "splits", timeout=900)
    print(f"dvc repro ingest+preprocess+splits: {time.monotonic() - started:.0f}s")
    ours, theirs = lock_outs(fresh), lock_outs(full_run)
    for out in DETERMINISTIC_OUTS:
        assert ours[out] == theirs[out], f"{out}: {ours[out]} vs {theirs[out]}"


def test_dvc_commands_are_serialised(full_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in project_env(full_run).items():
        monkeypatch.setenv(k, v)
    s = load_settings()
    # while the lock is held, another taker waits (and gives up after its timeout)
    with dvc_lock(s.root), pytest.raises(TimeoutError):
        monkeypatch.delenv("XCAM_DVC_LOCK_HELD", raising=False)
        with dvc_lock(s.root, timeout=0.5):
            pass
    # four DVC commands at once in one checkout: all succeed, one after the other
    codes: list[int] = []

    def status() -> None:
        codes.append(run_dvc(s, "status", "-q", check=False, capture=True).returncode)

    threads = [threading.Thread(target=status) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [0, 0, 0, 0]
