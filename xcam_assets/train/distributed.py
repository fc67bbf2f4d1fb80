"""One model on several processes: DDP under torchrun, launched through Dagster Pipes.

A profile with `ddp_processes: N` makes the `checkpoints` asset run
`python -m xcam_assets.train.distributed torchrun --standalone --nproc_per_node N -m
xcam_assets.train.distributed <arch> ...` (torchrun, in a process that dies with the
Dagster step) through `dagster.PipesSubprocessClient`. Every
rank builds the same settings from the command line, joins the process group (NCCL with
one GPU per rank, `cuda:LOCAL_RANK`; gloo on the CPU), and runs the same
`train_and_save` as a one-process run: the training loop notices the group and shards the
batches (see `xcam_assets.train.loop`). Rank 0 writes the checkpoint and streams its log
lines to the Dagster run through Pipes; the asset then reads the checkpoint back.

A SIGKILLed step (OOM killer, a killed run worker) cannot forward its termination, and
torchrun starts its ranks in their own sessions: without help they would train on as
orphans and race the re-run's writes. So torchrun and every rank ask Linux for SIGKILL
when their parent dies (PR_SET_PDEATHSIG): the step's death takes the whole tree down.

On Kubernetes the same entry point runs in one pod with N GPUs
(`dagster_k8s.PipesK8sClient`, see resources/deploy/README.md). Nothing here is specific
to xcam's models: any torchrun-able entry point would do; this one is ours.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed as dist
from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes

from xcam_assets.config import Settings, load_settings
from xcam_assets.train.stage import train_and_save


def ddp_command(settings: Settings, arch: str, processes: int, study: str = "") -> list[str]:
    """The torchrun command line that trains `arch` for settings `s` on `processes` ranks."""
    cmd = [sys.executable, "-m", "xcam_assets.train.distributed", "torchrun", "--standalone",
           f"--nproc_per_node={processes}", "-m", "xcam_assets.train.distributed", arch,
           "--root", str(settings.root), "--data-dir", str(settings.data_dir), "--profile", settings.profile_name]
    study = study or os.environ.get("XCAM_STUDY", "")
    return cmd + (["--study", study] if study else [])


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def init_process_group() -> torch.device:
    """Join torchrun's group: NCCL and this rank's GPU when there is one, else gloo."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"ddp_processes asks for {os.environ.get('LOCAL_WORLD_SIZE')} processes on this "
                f"node but it has {torch.cuda.device_count()} GPU(s): one GPU per process")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        # the ranks share the cores: oversubscribed OpenMP threads wait on each other
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        dist.init_process_group("gloo")
    return device


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch")
    parser.add_argument("--root", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--profile", required=True)
    parser.add_argument("--study", default="")
    args = parser.parse_args(argv)


    die_with_parent()
    device = init_process_group()
    try:
        s = load_settings(root=Path(args.root), profile=args.profile,
                          study=args.study or None, data_dir=Path(args.data_dir))
        with ExitStack() as stack:
            rank0 = dist.get_rank() == 0
            log = print if rank0 else (lambda message: None)  # rank 0 speaks for the group
            if rank0 and os.environ.get(DAGSTER_PIPES_CONTEXT_ENV_VAR):
                log = stack.enter_context(open_dagster_pipes()).log.info
            train_and_save(s, args.arch, log, device)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1:2] == ["torchrun"]:
        from torch.distributed.run import main as torchrun

        die_with_parent()
        torchrun(sys.argv[2:])
    else:
        main()
