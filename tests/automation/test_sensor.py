"""The incoming-batch sensor, evaluated in process against a real SQLite instance:
complete batches only, idempotent across restarts (cursor), a touched marker re-runs,
and the scan lists only the batch folders (fast on 10,000 files)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import dagster as dg
import pytest

from xcam_assets.automation import incoming_batch_sensor, scan_incoming
from xcam_assets.config import load_settings
from xcam_assets.demo import write_demo_cohort


def _evaluate(instance: dg.DagsterInstance, cursor: str | None) -> dg.SensorResult:
    with dg.build_sensor_context(instance=instance, cursor=cursor) as ctx:
        return incoming_batch_sensor(ctx)


def test_sensor_requests_each_complete_batch_once_across_restarts(project: Path) -> None:
    s = load_settings()
    batches = write_demo_cohort(s.incoming_dir, n_images=12, n_batches=3, size=64, seed=1)
    for b in batches[:2]:
        (b / ".complete").touch()
    # batch 3 has no marker yet: the upload is not finished
    instance = dg.DagsterInstance.get()
    first = _evaluate(instance, None)
    assert [r.partition_key for r in first.run_requests] == [b.name for b in batches[:2]]
    assert first.dynamic_partitions_requests[0].partition_keys == [b.name for b in batches[:2]]
    assert len({r.run_key for r in first.run_requests}) == 2
    instance.add_dynamic_partitions("batches", [b.name for b in batches[:2]])

    # the same cursor (a restarted daemon reads it back from storage): nothing new
    again = _evaluate(instance, first.cursor)
    assert again.run_requests == [] and again.dynamic_partitions_requests == []

    # the uploader finishes batch 3: only batch 3 runs
    (batches[2] / ".complete").touch()
    third = _evaluate(instance, again.cursor)
    assert [r.partition_key for r in third.run_requests] == [batches[2].name]

    # more files arrive in batch 1 and its marker is touched again: batch 1 re-runs
    marker = batches[0] / ".complete"
    st = marker.stat()
    os.utime(marker, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    fourth = _evaluate(instance, third.cursor)
    assert [r.partition_key for r in fourth.run_requests] == [batches[0].name]
    assert fourth.run_requests[0].run_key not in {r.run_key for r in first.run_requests}
    assert fourth.dynamic_partitions_requests == []  # already a partition
    assert _evaluate(instance, fourth.cursor).run_requests == []


def test_sensor_skips_batches_registered_before_it_ran(project: Path) -> None:
    """`xcam materialize` (or the UI) registered the batch: the sensor's first tick does
    not ingest it a second time; a cursor of the first version is read too."""
    s = load_settings()
    batches = write_demo_cohort(s.incoming_dir, n_images=4, n_batches=2, size=64, seed=2)
    for b in batches:
        (b / ".complete").touch()
    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions("batches", [batches[0].name])
    result = _evaluate(instance, None)
    assert [r.partition_key for r in result.run_requests] == [batches[1].name]
    legacy = _evaluate(instance, json.dumps([b.name for b in batches]))
    assert legacy.run_requests == []


def test_scan_lists_only_batch_folders_and_is_fast(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    incoming = tmp_path / "incoming"
    big = incoming / "site-a-big"
    big.mkdir(parents=True)
    for i in range(10_000):
        (big / f"img_{i:05d}.dcm").touch()
    (big / "labels.csv").touch()
    (big / ".complete").touch()
    for i in range(500):
        d = incoming / f"batch-{i:04d}"
        d.mkdir()
        (d / "labels.csv").touch()
        if i % 2:
            (d / ".complete").touch()
    (incoming / "stray-file.txt").touch()
    calls: list[str] = []
    real_scandir = os.scandir

    def counting_scandir(path):  # noqa: ANN001, ANN202 - os.scandir's signature
        calls.append(str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", counting_scandir)
    started = time.perf_counter()
    ready = scan_incoming(incoming)
    seconds = time.perf_counter() - started
    assert calls == [str(incoming)], "the scan must not list the files inside a batch"
    assert len(ready) == 251 and "site-a-big" in ready and "batch-0000" not in ready
    assert seconds < 1.0, f"scan took {seconds:.2f}s"
    print(f"scan of 500 batch folders + one of 10,000 files: {seconds * 1000:.1f} ms")
