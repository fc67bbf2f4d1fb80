"""One model on two processes: DDP (gloo on the CPU) under the real torchrun.

The loop test compares a 2-rank run with the 1-process run it must equal: a model
without BatchNorm, no augmentation, a global batch split in equal halves, so DDP's
averaged gradient is the one-process gradient and the weights agree to float rounding.
The asset test runs `checkpoints` with `ddp_processes: 2` through Dagster, which launches
torchrun through Pipes: rank 0's epoch lines reach the Dagster run, the checkpoint
reloads, and a kill of the whole torchrun group mid-training resumes from the last epoch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import torch
from kill_harness import live_pids_running
from test_train_stage import _prepare, kill_cli_materialize_after_two_epochs
from train_helpers import DDP_RECIPE, ZOO, ddp_arrays, small_net

from xcam_assets.orchestrate import _run
from xcam_assets.project import XcamProject
from xcam_assets.train.checkpoint import load_model
from xcam_assets.train.distributed import ddp_command
from xcam_assets.train.loop import train_classifier
from xcam_assets.train.zoo import state_dict_hash

WORKER = '''
import sys, torch, torch.distributed as dist
from xcam_assets.train.distributed import init_process_group
from xcam_assets.train.loop import train_classifier
sys.path.insert(0, sys.argv[1])
from train_helpers import DDP_RECIPE, ddp_arrays, small_net
device = init_process_group()
model = small_net()
seen = []  # images in this rank's training forward passes
model.register_forward_pre_hook(lambda m, inp: seen.append(len(inp[0])) if m.training else None)
x, y, xv, yv = ddp_arrays()
train_classifier(model, x, y, xv, yv, batch_size=8, seed=3, recipe=DDP_RECIPE, device=device,
                 log=lambda m: None)
torch.save({"state": model.state_dict(), "seen": sum(seen)}, f"{sys.argv[2]}.{dist.get_rank()}")
dist.destroy_process_group()
'''

ZOO_WORKER = '''
import sys, torch, torch.distributed as dist, torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from xcam_assets.train.distributed import init_process_group
from xcam_assets.train.zoo import build_model
sys.path.insert(0, sys.argv[1])
from train_helpers import ZOO
init_process_group()
for arch in ZOO:
    torch.manual_seed(0)
    model = build_model(arch, ZOO, 1, image_size=32)
    net = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for step in range(2):  # an unused parameter fails DDP at the second step
        loss = F.binary_cross_entropy_with_logits(net(torch.randn(2, 1, 32, 32)).float(),
                                                  torch.ones(2, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    if dist.get_rank() == 0:
        print("trained", arch, flush=True)
dist.destroy_process_group()
'''


def _torchrun(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script), *args],
                          capture_output=True, text=True, timeout=600)


def _ranks_alive(project: Path) -> list[int]:
    """Live xcam DDP processes (torchrun or ranks) of this project."""
    return live_pids_running("xcam_assets.train.distributed", str(project / "data"))


def test_two_ddp_ranks_train_the_weights_one_process_trains(tmp_path: Path) -> None:
    model = small_net()
    x, y, xv, yv = ddp_arrays()
    train_classifier(model, x, y, xv, yv, batch_size=8, seed=3, recipe=DDP_RECIPE,
                     log=lambda m: None)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "ddp.pt"
    proc = _torchrun(script, str(Path(__file__).parent), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1)]
    assert [r["seen"] for r in ranks] == [3 * 24 // 2] * 2  # each rank trained on its half
    start = small_net().state_dict()
    for name, weight in model.state_dict().items():
        assert not torch.equal(weight, start[name])  # it trained
        for r in ranks:
            torch.testing.assert_close(r["state"][name], weight, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_every_zoo_entry_trains_under_ddp(tmp_path: Path) -> None:
    """DDP needs every trainable parameter in the graph (no find_unused_parameters)."""
    script = tmp_path / "zoo_worker.py"
    script.write_text(ZOO_WORKER)
    proc = _torchrun(script, str(Path(__file__).parent))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [w for arch in ZOO for w in ("trained", arch)]


def test_ddp_command_carries_the_settings(project: Path) -> None:
    from xcam_assets.config import load_settings

    cmd = ddp_command(load_settings(), "resnet18", 4, study="pylon")
    assert cmd[:5] == [sys.executable, "-m", "xcam_assets.train.distributed", "torchrun",
                       "--standalone"]
    assert "--nproc_per_node=4" in cmd
    assert cmd[cmd.index("-m", 4) + 1:cmd.index("-m", 4) + 3] == [
        "xcam_assets.train.distributed", "resnet18"]
    assert cmd[cmd.index("--profile") + 1] == "tiny"
    assert cmd[cmd.index("--study") + 1] == "pylon"
    assert cmd[cmd.index("--data-dir") + 1] == str(project / "data")


@pytest.mark.slow
def test_checkpoints_train_on_two_ddp_processes_through_pipes_and_resume(project: Path) -> None:
    s = _prepare(project, {"image_size": 32, "epochs": 5, "batch_size": 8,
                           "architectures": ["resnet18"], "ddp_processes": 2})
    state = s.checkpoints_dir / "resnet18" / "_resume" / f"seed-{s.seed}.pt"
    kill_cli_materialize_after_two_epochs(project, state)  # CLI, step, torchrun, ranks
    # the ranks (torchrun starts them in their own sessions) died with their parents
    deadline = time.monotonic() + 5  # training on would take longer than that
    while time.monotonic() < deadline and _ranks_alive(project):
        time.sleep(0.1)
    assert not _ranks_alive(project)
    saved = torch.load(state, weights_only=True)
    done = saved["global_epoch"]
    assert 2 <= done < 5
    assert len(saved["rng"]["ranks"]) == 2  # both ranks' augmentation streams

    result = _run(["checkpoints"], dg.DagsterInstance.get(), XcamProject(), "resnet18",
                  log=lambda m: None)  # the re-run, in-process; checks included
    sidecar = json.loads((s.checkpoints_dir / "resnet18" / "model.json").read_text())
    assert sidecar["processes"] == 2
    assert sidecar["resumed_from_epoch"] == done
    assert [r["epoch"] for r in sidecar["history"]] == list(range(1, 6))
    assert not state.parent.exists()
    model, _ = load_model(s.checkpoints_dir / "resnet18", s.zoo)
    assert state_dict_hash(model) == sidecar["weights_sha256"]
    mat = result.asset_materializations_for_node("checkpoints")[0]
    assert mat.metadata["processes"].value == 2
    assert mat.metadata["weights_sha256"].value == sidecar["weights_sha256"]
    # rank 0's log lines came through Pipes into the Dagster run
    logs = [e.message for e in dg.DagsterInstance.get().all_logs(result.run_id)]
    assert any("x 2 processes (DDP)" in m for m in logs), logs[-10:]
    assert any(m.startswith("[resnet18 seed") and "epoch 5/5" in m for m in logs), logs[-10:]
