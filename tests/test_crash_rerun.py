"""Crash safety per stage: SIGKILL in the middle of an asset's work, then re-run.

Two projects share one synthetic demo cohort (40 images, 2 batches, tiny profile): `clean`
runs the whole lineage uninterrupted (in-process), `killed` runs the same stages one by
one, each of the five under test as a real `xcam materialize <stage>` process
(`metric_tables` under `xcam dvc repro -s evaluate`: DVC, its locks and xcam's DVC lock
are killed too) that gets SIGKILL, as a process group, at a moment chosen by what it has
written (kill_harness.Frozen: the group is stopped while the files are inspected, so the
state seen is the state killed):

- raw_dicoms: a batch's raw copy is incomplete;
- clahe_tensors: a batch's temporary shards exist (images being computed);
- checkpoints: an epoch's resume state is saved, the checkpoint is not;
- heatmap_sets: the first CAM method's heatmaps are saved, the sidecar is not;
- metric_tables: the metric table is saved, the plots are not all.

At that moment every final-named file under data/ must be complete and valid for its
kind (kill_harness.invalid_files; temporary names allowed), and every materialization the
killed run recorded must describe a complete output. The killed run is left STARTED;
killed in raw_dicoms it still holds the `ingest` pool's only slot (every later raw copy
would wait for ever): the next xcam run marks it failed and frees its slots
(orchestrate.reap_dead_runs). The re-run (`materialize_stage`, in-process) must then
succeed, leave no temporary file, and give the outputs of the uninterrupted run: byte-identical
files for every deterministic output (training resumes from the saved epoch to the same
weights on the CPU, one thread; only timings, hosts and `resumed_from_epoch` differ in
the sidecars), with the latest materialization's data version = the DVC hash of what is
on disk. Finally `xcam dvc commit -f` + `xcam dvc status` of the stages so far succeed,
without a lock error, and report them up to date.

The stages run in lineage order on the shared `killed` project; a test run alone (-k)
first materializes the stages before its own, uninterrupted. About 2 minutes on 2 cores
(the clean lineage ~20 s, each kill + re-run 12-30 s, most of it the killed process's
imports). A quick unit test checks the temporary-file rules (removed when their writer
is dead, kept while it lives, never hashed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import pytest
import torch
from automation.harness import BIN, DVC, dvc, make_project, project_env, xcam
from kill_harness import Frozen, digests, environment, invalid_files, temp_files

from xcam_assets.atomic import remove_stale_temps, temp_path
from xcam_assets.config import load_settings
from xcam_assets.demo import write_demo_cohort
from xcam_assets.hashing import dvc_md5, dvc_tree
from xcam_assets.orchestrate import ORDER, materialize_all, materialize_stage, reap_dead_runs
from xcam_assets.provenance.dvc import ASSET_OUTS, asset_output

ARCH = "resnet18"
#: asset under test -> its stage
STAGE_OF = {"raw_dicoms": "ingest", "clahe_tensors": "preprocess", "checkpoints": "train",
            "heatmap_sets": "explain", "metric_tables": "evaluate"}
#: seconds the stage runs between two looks: short where the moment is short (a raw
#: copy of 21 files takes ~0.1 s; an epoch ~1 s)
QUANTUM = {"ingest": 0.002, "preprocess": 0.005, "train": 0.05, "explain": 0.01,
           "evaluate": 0.02}
#: per stage, the data folders it writes
OUTPUTS = {"ingest": ["raw", "inventory", "findings"], "preprocess": ["tensors"],
           "splits": ["splits"], "train": ["checkpoints"], "explain": ["heatmaps"],
           "evaluate": ["metrics"]}
#: sidecars that record timings, host or resumption: compared field by field instead
SIDECARS = {f"checkpoints/{ARCH}/model.json", f"heatmaps/{ARCH}/heatmaps.json"}
TIMING_KEYS = {"seconds", "images_per_s", "train_cpu_s", "heatmaps_per_s"}


def _moment(stage: str, data: Path):
    """The predicate that says the stage is in the middle of its asset's work."""
    if stage == "ingest":
        def raw_copy_incomplete() -> bool:
            for batch in sorted((data / "raw").glob("*")):
                source = [p for p in (data / "incoming" / batch.name).rglob("*")
                          if p.is_file() and not p.name.startswith(".")]
                copied = [p for p in batch.rglob("*") if p.is_file()
                          and not p.name.startswith(".")]
                if len(copied) < len(source):
                    return True
            return False
        return raw_copy_incomplete
    if stage == "preprocess":
        return lambda: any((data / "tensors").glob("*/.images.npy.*.tmp"))
    if stage == "train":
        out = data / "checkpoints" / ARCH
        return lambda: any(out.glob("_resume/seed-*.pt")) and not (out / "model.json").exists()
    if stage == "explain":
        out = data / "heatmaps" / ARCH
        return lambda: (out / "gradcam.npy").exists() and not (out / "heatmaps.json").exists()
    if stage == "evaluate":
        out = data / "metrics"
        return lambda: ((out / "metric_table.parquet").exists()
                        and not (out / "plots" / f"montage_{ARCH}.png").exists())
    raise ValueError(stage)


def _partitions(instance: dg.DagsterInstance, asset: str) -> list[str | None]:
    parts = instance.get_materialized_partitions(dg.AssetKey(asset))
    return sorted(parts) if parts else [None]


def _versions(instance: dg.DagsterInstance, assets: list[str]) -> dict:
    """(asset, partition) -> data version of its latest materialization."""
    out = {}
    for asset in assets:
        for part in _partitions(instance, asset):
            rec = instance.fetch_materializations(dg.AssetRecordsFilter(
                asset_key=dg.AssetKey(asset), asset_partitions=[part] if part else None),
                limit=1).records
            if rec:
                out[(asset, part)] = rec[0].asset_materialization.tags["dagster/data_version"]
    return out


def _comparable(rel: str, path: Path) -> object:
    """A sidecar without what may differ between two equal runs (timings, host, commit,
    packages, resumption); the sha256 of any other file."""
    if rel not in SIDECARS:
        return None
    data = json.loads(path.read_text())
    for key in ("environment", "git_commit", "packages", "resumed_from_epoch", "device"):
        data.pop(key, None)
    for run in data.get("seed_runs", []):
        run.pop("resumed_from_epoch", None)
    for entry in data.get("history", []):
        for key in TIMING_KEYS:
            entry.pop(key, None)
    for entry in data.get("methods", {}).values():
        for key in TIMING_KEYS:
            entry.pop(key, None)
    return data


@dataclass
class Pair:
    clean: Path
    killed: Path
    clean_digests: dict[str, str] = field(default_factory=dict)
    clean_versions: dict = field(default_factory=dict)
    done: list[str] = field(default_factory=list)  # stages materialized in `killed`
    timings: dict[str, float] = field(default_factory=dict)

    def env(self, root: Path, **extra: str) -> dict[str, str]:
        return project_env(root, OMP_NUM_THREADS="1", **extra)

    def materialize(self, stage: str) -> None:
        with environment(self.env(self.killed)):
            materialize_stage(stage, load_settings(), log=lambda m: None)
        self.done.append(stage)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    if not DVC.exists():
        pytest.skip(f"DVC is not installed at {DVC} (make setup)")
    started = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed processes (OMP_NUM_THREADS=1): same float order
    base = tmp_path_factory.mktemp("crash")
    p = Pair(make_project(base / "clean", with_code=True),
             make_project(base / "killed", with_code=True))
    try:
        with environment(p.env(p.clean)):
            s = load_settings()
            for batch in write_demo_cohort(s.incoming_dir, n_images=40, n_batches=2, size=96,
                                           seed=s.seed, finding=s.findings[0]):
                (batch / ".complete").touch()
            materialize_all(s, log=lambda m: None)
            p.clean_versions = _versions(dg.DagsterInstance.get(), list(ASSET_OUTS))
        shutil.copytree(p.clean / "data" / "incoming", p.killed / "data" / "incoming")
        p.clean_digests = digests(p.clean / "data")
        dvc(p.killed, "init", "--no-scm", "-q")
        dvc(p.killed, "config", "core.analytics", "false")
        p.timings["clean lineage"] = time.monotonic() - started
        yield p
    finally:
        torch.set_num_threads(threads)
        print("\ncrash/re-run timings (s): "
              + ", ".join(f"{k} {v:.0f}" for k, v in p.timings.items()))


def test_temporary_files_of_dead_writers_are_removed_and_never_hashed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.npy").write_bytes(b"final")
    before = dvc_tree(out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = out / "sub" / f".a.npy.{dead}.abcd1234.npy.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"half")
    live = temp_path(out / "a.npy")  # this process's: a writer still at work
    assert live.name.startswith(f".a.npy.{os.getpid()}.") and live.name.endswith(".tmp")
    assert dvc_tree(out) == before  # neither enters the hash (.dvcignore: `.*.tmp`)
    assert remove_stale_temps(out) == [stale]
    assert live.exists() and not stale.exists()


@pytest.mark.slow
@pytest.mark.parametrize("asset", list(STAGE_OF))
def test_kill_9_mid_asset_then_rerun_equals_an_uninterrupted_run(pair: Pair, asset: str,
                                                                  tmp_path: Path) -> None:
    stage = STAGE_OF[asset]
    started = time.monotonic()
    for before in ORDER[:ORDER.index(stage)]:
        if before not in pair.done:
            pair.materialize(before)
    root, data = pair.killed, pair.killed / "data"
    args = ([str(BIN / "xcam"), "dvc", "repro", "-s", stage] if stage == "evaluate"
            else [str(BIN / "xcam"), "materialize", stage])
    run = Frozen(args, root, pair.env(root, XCAM_LOG_LEVEL="DEBUG"), tmp_path / "killed.log")
    try:
        run.freeze_when(_moment(stage, data), after_log="RUN_START", quantum=QUANTUM[stage])
        # the state at the kill: every final-named file complete and valid
        problems = invalid_files(data)
        temps = temp_files(data)
        saved_epoch = (torch.load(next((data / "checkpoints" / ARCH).glob("_resume/seed-*.pt")),
                                  weights_only=True)["global_epoch"] if stage == "train" else None)
    finally:
        run.kill()
    print(f"{asset}: killed after {run.slices} slices; temporary files then: {temps}")
    assert not problems, f"partially written files under final names: {problems}"

    s = load_settings(root=root, data_dir=data)
    with environment(pair.env(root)):
        instance = dg.DagsterInstance.get()
        killed = [r for r in instance.get_runs()
                  if asset in r.tags.get("xcam/stage", "").split(",")
                  and r.status != dg.DagsterRunStatus.SUCCESS]
        assert len(killed) == 1 and killed[0].status == dg.DagsterRunStatus.STARTED, killed
        killed_run = killed[0]
        # what the killed run recorded describes complete outputs only
        for rec in instance.get_records_for_run(
                killed_run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records:
            mat = rec.event_log_entry.asset_materialization
            name, part = mat.asset_key.to_user_string(), mat.partition
            assert mat.tags["dagster/data_version"] == dvc_md5(asset_output(s, name, part)), \
                (name, part)

        # its pool slot (raw_dicoms: `ingest`, limit 1) would stall every later raw copy;
        # the next xcam run marks the run of the dead process failed and frees it
        held = instance.event_log_storage.get_concurrency_run_ids()
        assert (killed_run.run_id in held) == (asset == "raw_dicoms"), held
        assert reap_dead_runs(instance, log=lambda m: None) == [killed_run.run_id]
        assert not instance.event_log_storage.get_concurrency_run_ids(), "pool slots held"
        killed_run = instance.get_run_by_id(killed_run.run_id)
        assert killed_run.status == dg.DagsterRunStatus.FAILURE
        assert "is gone" in (instance.all_logs(killed_run.run_id)[-1].message or "")

        pair.materialize(stage)  # the re-run, to completion
        assert not instance.get_runs(filters=dg.RunsFilter(statuses=[
            dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.NOT_STARTED]))
        versions = _versions(instance, [a for a in ASSET_OUTS if ASSET_OUTS[a][0] == stage])
    pair.timings[asset] = time.monotonic() - started

    # no leftovers, every output valid, and equal to the uninterrupted run's
    assert not temp_files(data), temp_files(data)
    assert invalid_files(data) == []
    for folder in OUTPUTS[stage]:
        ours = digests(data / folder)
        theirs = {k[len(folder) + 1:]: v for k, v in pair.clean_digests.items()
                  if k.startswith(folder + "/")}
        assert sorted(ours) == sorted(theirs), folder
        for rel, digest in ours.items():
            full = f"{folder}/{rel}"
            if full in SIDECARS:
                assert _comparable(full, data / full) == _comparable(
                    full, pair.clean / "data" / full), full
            else:
                assert digest == theirs[rel], f"{full} differs from the uninterrupted run"
    if stage == "train":
        sidecar = json.loads((data / "checkpoints" / ARCH / "model.json").read_text())
        assert sidecar["resumed_from_epoch"] == saved_epoch >= 1  # resumed from the kill's epoch
    for (name, part), version in versions.items():
        assert version == dvc_md5(asset_output(s, name, part)), (name, part)
        if stage not in ("train", "explain"):  # else the sidecars' timings differ
            assert version == pair.clean_versions[(name, part)], (name, part)

    # DVC: commit and status of the stages so far, no lock error
    stages = [st for st in ORDER if st in pair.done]
    out = xcam(root, "dvc", "commit", "--force", "--quiet", *stages)
    status = xcam(root, "dvc", "status", *stages)
    assert "lock" not in (out + status).lower(), out + status
    assert "up to date" in status, status
