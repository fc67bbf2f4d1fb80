"""The checkpoints asset through Dagster: kill -9 and resume, the blocking check, studies.

Each lineage test builds a small synthetic demo cohort in the isolated `project` and runs
at 32 px. The PYLON study runs with 2 seeds instead of 5 (the t-interval code is the
same for any n >= 2; 5 is asserted on the shipped profile).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import torch
import yaml

from xcam_assets.config import _deep_merge, load_settings
from xcam_assets.demo import write_demo_cohort
from xcam_assets.orchestrate import StageFailed, _run, materialize_stage
from xcam_assets.project import XcamProject
from xcam_assets.stats import t_confidence_interval
from xcam_assets.train.checkpoint import load_model
from xcam_assets.train.zoo import state_dict_hash

NINE = ["vgg16", "vgg19", "resnet18", "resnet34", "resnet50", "resnet101", "vit_small",
        "vit_base", "vit_large"]


def _edit_yaml(path: Path, top: dict) -> None:
    path.write_text(yaml.safe_dump(_deep_merge(yaml.safe_load(path.read_text()), top)))


def _cohort(n_images: int = 40):
    s = load_settings()
    for b in write_demo_cohort(s.incoming_dir, n_images=n_images, n_batches=2, size=96,
                               seed=s.seed, finding=s.findings[0]):
        (b / ".complete").touch()
    return s


def _prepare(project: Path, tiny: dict, n_images: int = 40):
    """Tiny profile overrides, a demo cohort, then ingest + preprocess + splits in-process."""
    _edit_yaml(project / "resources" / "params.yaml", {"profiles": {"tiny": tiny}})
    s = _cohort(n_images)
    for stage in ("ingest", "preprocess", "splits"):
        materialize_stage(stage, s, log=lambda m: None)
    return load_settings()


def kill_cli_materialize_after_two_epochs(project: Path, state: Path,
                                          timeout_s: float = 300) -> subprocess.Popen:
    """`dagster asset materialize` of checkpoints[resnet18] (the CLI's multiprocess
    executor: the step runs in a child process), SIGKILLed as a whole process group once
    the resume state `state` has been written twice (a second epoch completed)."""
    log_file = project / "train.log"
    with open(log_file, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "dagster"), "asset",
                                 "materialize", "-m", "xcam_assets.definitions", "--select",
                                 "checkpoints", "--partition", "resnet18"],
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=project)
    try:
        deadline, first = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline and proc.poll() is None:
            if state.exists():
                first = first or state.stat().st_mtime_ns
                if state.stat().st_mtime_ns != first:  # a second epoch was saved
                    break
            time.sleep(0.02)
        assert proc.poll() is None, "training ended before it could be killed:\n" + \
            log_file.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    return proc


@pytest.mark.slow
def test_kill_9_mid_training_then_rerun_resumes_from_the_last_epoch(project: Path) -> None:
    """Training starts under the Dagster CLI (multiprocess executor), the whole process
    group gets SIGKILL after the second epoch's resume state is written; `xcam materialize
    train` (in-process) then resumes after that epoch and finishes."""
    s = _prepare(project, {"image_size": 32, "epochs": 6, "batch_size": 8,
                           "architectures": ["resnet18"]})
    state = s.checkpoints_dir / "resnet18" / "_resume" / f"seed-{s.seed}.pt"
    proc = kill_cli_materialize_after_two_epochs(project, state)
    assert proc.returncode == -signal.SIGKILL
    killed_run = dg.DagsterInstance.get().get_runs(limit=1)[0]  # the CLI's, left STARTED
    assert killed_run.asset_selection == {dg.AssetKey("checkpoints")}
    engine = [e.message for e in dg.DagsterInstance.get().all_logs(killed_run.run_id)]
    assert any("using multiprocess executor" in m for m in engine), engine[:5]
    done = torch.load(state, weights_only=True)["global_epoch"]
    assert 2 <= done < 6
    assert not (s.checkpoints_dir / "resnet18" / "model.json").exists()

    materialize_stage("train", s, log=lambda m: None)  # the re-run
    sidecar = json.loads((s.checkpoints_dir / "resnet18" / "model.json").read_text())
    assert sidecar["resumed_from_epoch"] == done
    assert [r["epoch"] for r in sidecar["history"]] == list(range(1, 7))
    assert not state.parent.exists()  # the resume state is gone once the checkpoint is saved
    model, _ = load_model(s.checkpoints_dir / "resnet18", s.zoo)
    assert state_dict_hash(model) == sidecar["weights_sha256"]

    # the blocking check: an AUC margin no model meets fails it, heatmap_sets never runs
    _edit_yaml(project / "resources" / "params.yaml",
               {"profiles": {"tiny": {"min_auc_margin": 0.5, "epochs": 1}}})
    instance = dg.DagsterInstance.get()
    with pytest.raises(StageFailed, match="model_is_sound"):
        _run(["checkpoints", "heatmap_sets"], instance, XcamProject(), "resnet18",
             log=lambda m: None)
    assert instance.get_latest_materialization_event(dg.AssetKey("heatmap_sets")) is None
    rec = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(dg.AssetKey("checkpoints"), "model_is_sound"), limit=1)
    assert rec[0].status.value == "FAILED"


def test_study_profiles_encode_the_protocols() -> None:
    """As shipped (GPU `study` profile): what the papers did, by configuration only."""
    depth = load_settings(study="pneumothorax_depth", profile="study")
    assert depth.architectures == NINE and depth.findings == ["Pneumothorax"]
    assert depth.params["splits"]["balanced"] is True and depth.clahe["clip_limit"] == 2.0
    assert depth.profile["augment"] == {"rotation_deg": 15, "hflip": True, "vflip": False,
                                        "noise_std": 0.05}
    assert depth.profile["pretrained"] is True and depth.profile["cam_methods"] == ["gradcam"]
    pylon = load_settings(study="pylon", profile="study")
    assert pylon.architectures == ["pylon_resnet50", "resnet50"]
    prof = pylon.profile
    assert (prof["recipe"], prof["two_phase_base"], prof["lr"], prof["weight_decay"]) == (
        "two_phase", "pylon", 0.0001, 0.0)
    assert (prof["plateau_patience"], prof["plateau_factor"], prof["stop_after_reductions"],
            prof["seeds"]) == (2, 0.2, 2, 5)
    assert "pylon" in prof["cam_methods"] and pylon.image_size == 256
    for study in ("pneumothorax_depth", "pylon"):  # every profile scale resolves
        for profile in ("tiny", "demo", "study"):
            load_settings(study=study, profile=profile)


def _study(project: Path, monkeypatch: pytest.MonkeyPatch, name: str, tiny: dict,
           stages: tuple[str, ...]) -> object:
    """The real study file with the demo cohort's finding and smaller sizes layered on."""
    path = project / "resources" / "studies" / f"{name}.yaml"
    _edit_yaml(path, {"cohort": {"findings": ["lesion"]}, "profiles": {"tiny": tiny}})
    monkeypatch.setenv("XCAM_STUDY", name)
    s = _cohort()
    for stage in stages:
        materialize_stage(stage, s, log=lambda m: None)
    return load_settings()


@pytest.mark.slow
def test_pneumothorax_depth_study_at_tiny_size(project: Path, monkeypatch) -> None:
    s = _study(project, monkeypatch, "pneumothorax_depth",
               {"image_size": 32, "epochs": 1, "batch_size": 8, "resume": False},
               ("ingest", "preprocess", "splits", "train", "explain"))
    assert s.architectures == NINE
    splits = pl.read_parquet(s.splits_path)
    assert splits["y_lesion"].sum() * 2 == splits.height  # the balanced subset
    for arch in NINE:
        sidecar = json.loads((s.checkpoints_dir / arch / "model.json").read_text())
        assert sidecar["recipe"]["name"] == "adamw" and sidecar["recipe"]["balance"] == "none"
        assert sidecar["recipe"]["augment"]["rotation_deg"] == 15
        assert sidecar["image_size"] == 32 and sidecar["pretrained"] is None
        assert (s.heatmaps_dir / arch / "gradcam.npy").exists()


@pytest.mark.slow
def test_pylon_study_at_tiny_size(project: Path, monkeypatch) -> None:
    s = _study(project, monkeypatch, "pylon",
               {"image_size": 32, "epochs": 1, "phase1_epochs": 1, "batch_size": 8,
                "seeds": 2}, ("ingest", "preprocess", "splits", "train", "explain", "evaluate"))
    assert s.architectures == ["pylon_resnet50", "resnet50"]
    for arch in s.architectures:
        out = s.checkpoints_dir / arch
        sidecar = json.loads((out / "model.json").read_text())
        recipe = sidecar["recipe"]
        assert [p["name"] for p in recipe["phases"]] == ["frozen", "all"]
        assert {(p["optimizer"], p["lr"], p["weight_decay"], p["schedule"])
                for p in recipe["phases"]} == {("adam", 0.001, 0.0, "plateau")}
        runs = sidecar["seed_runs"]
        assert [r["seed"] for r in runs] == [s.seed + k for k in range(2)]
        aucs = [np.nan if r["val_auc"] is None else r["val_auc"] for r in runs]
        mean, low, high = t_confidence_interval(aucs)
        summary = sidecar["seed_summary"]["val_auc"]
        assert summary["n"] == 2 and summary["mean"] == pytest.approx(mean, nan_ok=True)
        assert summary["ci_low"] == pytest.approx(low, nan_ok=True)
        assert summary["ci_high"] == pytest.approx(high, nan_ok=True)
        best = min(runs, key=lambda r: r["val_loss"])
        assert sidecar["seed"] == best["seed"]
        assert sidecar["weights_sha256"] == best["weights_sha256"]
        assert len(list((out / "seeds").glob("seed-*/model.safetensors"))) == 2
        assert [h["phase"] for h in sidecar["history"]] == ["frozen", "all"]
    assert sidecar["class_maps"] is False
    pylon_side = json.loads((s.checkpoints_dir / "pylon_resnet50" / "model.json").read_text())
    assert pylon_side["class_maps"] is True
    assert (s.heatmaps_dir / "pylon_resnet50" / "pylon.npy").exists()
    table = pl.read_parquet(s.metrics_dir / "metric_table.parquet")
    assert set(table["architecture"].unique()) == {"pylon_resnet50", "resnet50"}
