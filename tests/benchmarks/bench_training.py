"""Benchmark: xcam's training loop vs a bare PyTorch loop, same tensors, model, batch size.

    .venv/bin/python tests/benchmarks/bench_training.py [--arch resnet18 --size 224 ...]

Both sides run in this one process, alternately (bare, ours, bare, ours, ...), on the
same in-memory uint8 tensors, the same architecture from the zoo (same initial weights),
the same batch size and the same optimizer (AdamW, fused kernel; see loop.make_optimizer).
The bare loop is: uint8 -> float input, forward, BCE, backward, step. Ours is
`train_classifier` with the default recipe, i.e. it also draws and applies the
augmentation (flip, rotation, noise) and records history.

Precision (``--precision auto|fp32|bf16``, default auto: the rule of
`xcam_assets.train.precision` for this machine and architecture, as a profile's
``precision: auto`` gives): ours runs in it; the bare loop runs twice per repeat, once in
the same precision (autocast + memory format by hand, like for like) and once in plain
fp32 (contiguous, no autocast: what timm users run by default).

Reported:
* ``ratio``: our training throughput (images/s over the training steps of each epoch, the
  figure the run's logs show) / the bare loop's in the same precision, wall clock, medians
  over repeats. Target >= 0.9.
* ``ratio_vs_fp32``: ours / the bare fp32 loop (targets on this avx512_bf16 CPU: >= 1.8
  resnet18, >= 1.6 densenet121 at 224 px, >= 1.4 efficientnet_lite0).
* ``cpu_ratio``: the same per CPU second of this process (all its threads). On a machine
  that other jobs load, wall-clock rates swing by 2x between repeats; CPU time is what
  each side actually spent, and with ``--threads 1`` it is free of OpenMP spin-waiting.
* ``e2e_ratio``: the same with our whole `train_classifier` wall time, which adds the
  per-epoch validation pass (``--val-images``) and the atomic resume-state write
  (weights + optimizer: ~135 MB for resnet18). Those costs are per epoch, so their share
  shrinks with the epoch length (``--images``); at study scale (thousands of images per
  epoch) they are a few per cent.

Allocator: glibc returns freed memory to the OS on every step unless
MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ are set before the process starts
(../shared/ENVIRONMENT.md: 25-40 % faster CPU training, and the Makefile sets them). The
script re-executes itself with both set to 16 GiB unless they are already set or
``--glibc-defaults`` is given; both sides always share the same setting because they share
the process.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

TUNED = str(16 * 1024**3)
MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--images", type=int, default=96, help="training images per epoch")
    p.add_argument("--val-images", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2, help="epochs per measured repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--glibc-defaults", action="store_true",
                   help="do not set MALLOC_* (measure with glibc's defaults)")
    return p.parse_args()


def main() -> None:
    args = _parse()
    if not args.glibc_defaults and not all(os.environ.get(v) for v in MALLOC_VARS):
        env = {**os.environ, **{v: TUNED for v in MALLOC_VARS}}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    import tempfile

    import numpy as np
    import torch
    import torch.nn.functional as F
    import yaml

    from xcam_assets.train.loop import make_optimizer, to_input, train_classifier
    from xcam_assets.train.precision import LEGACY_CPU, Precision, resolve_precision
    from xcam_assets.train.recipes import recipe_from_profile
    from xcam_assets.train.zoo import build_model, head_prefixes

    if args.threads:
        torch.set_num_threads(args.threads)
    repo = Path(__file__).resolve().parents[2]
    zoo = yaml.safe_load((repo / "resources" / "models.yaml").read_text())
    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, (args.images, args.size, args.size), dtype=np.uint8)
    y_tr = (np.arange(args.images) % 2).astype(np.float32)[:, None]
    x_va = rng.integers(0, 256, (args.val_images, args.size, args.size), dtype=np.uint8)
    y_va = (np.arange(args.val_images) % 2).astype(np.float32)[:, None]
    torch.manual_seed(0)
    model0 = build_model(args.arch, zoo, n_classes=1, image_size=args.size)
    init = copy.deepcopy(model0.state_dict())
    cpu = torch.device("cpu")
    prec = resolve_precision(args.precision, model0, cpu)
    recipe = recipe_from_profile({"epochs": args.epochs, "lr": 1e-3})
    phase = recipe.phases[0]
    x_t, y_t = torch.as_tensor(x_tr), torch.as_tensor(y_tr)
    # batches of >= 2 images (BatchNorm), as in train_classifier
    starts = [i for i in range(0, args.images, args.batch) if min(args.batch, args.images - i) >= 2]
    per_epoch = sum(min(args.batch, args.images - i) for i in starts)

    def set_format(p: Precision) -> None:
        model0.to(memory_format=torch.channels_last if p.channels_last
                  else torch.contiguous_format)

    def bare(p: Precision) -> tuple[float, float]:
        """(images/s, images per CPU second) of the plain loop over `epochs` passes, in
        precision `p` (autocast dtype and memory format set by hand)."""
        set_format(p)
        model0.load_state_dict(init)
        model0.train()
        opt = make_optimizer(phase, list(model0.parameters()))
        gen = torch.Generator().manual_seed(0)
        seen, t0, c0 = 0, time.perf_counter(), time.process_time()
        for _ in range(args.epochs):
            order = torch.randperm(args.images, generator=gen)
            for i in starts:
                idx = order[i:i + args.batch]
                opt.zero_grad(set_to_none=True)
                xb = to_input(x_t[idx])
                if p.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=p.dtype == "bf16"):
                    logits = model0(xb)
                loss = F.binary_cross_entropy_with_logits(logits.float(), y_t[idx])
                loss.backward()
                opt.step()
                seen += len(idx)
        return seen / (time.perf_counter() - t0), seen / (time.process_time() - c0)

    def ours(resume_dir: Path) -> tuple[float, float, float]:
        """(training images/s from the history, training images per CPU second,
        end-to-end images/s)."""
        set_format(prec)
        model0.load_state_dict(init)
        t0 = time.perf_counter()
        result = train_classifier(model0, x_tr, y_tr, x_va, y_va, batch_size=args.batch,
                                  seed=0, recipe=recipe, precision=prec,
                                  heads=head_prefixes(model0, args.arch, zoo),
                                  resume_path=resume_dir / "resume.pt", fingerprint="bench",
                                  log=lambda m: None)
        wall = time.perf_counter() - t0
        (resume_dir / "resume.pt").unlink()
        assert len(result.history) == args.epochs
        train_s = sum(per_epoch / r["images_per_s"] for r in result.history)
        cpu_s = sum(r["train_cpu_s"] for r in result.history)
        n = per_epoch * args.epochs
        return n / train_s, n / cpu_s, n / wall

    print(f"bench_training: {args.arch} {args.size}px batch {args.batch}, {args.images} "
          f"train images x {args.epochs} epochs, {args.repeats} repeats, torch threads "
          f"{torch.get_num_threads()}, MALLOC tuned: "
          f"{all(os.environ.get(v) == TUNED for v in MALLOC_VARS)}, load average "
          f"{os.getloadavg()[0]:.2f}, precision {args.precision} -> {prec.label}", flush=True)
    # warm-up: first-call allocations and kernel selection, outside the measurement
    same_as_fp32 = prec == LEGACY_CPU
    for p in (LEGACY_CPU,) if same_as_fp32 else (LEGACY_CPU, prec):
        set_format(p)
        model0.train()
        warm = make_optimizer(phase, list(model0.parameters()))
        for _ in range(2):
            warm.zero_grad(set_to_none=True)
            xb = to_input(x_t[:args.batch])
            if p.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=p.dtype == "bf16"):
                logits = model0(xb)
            F.binary_cross_entropy_with_logits(logits.float(), y_t[:args.batch]).backward()
            warm.step()
    bare_ips, bare_cpu, fp32_ips, ours_ips, ours_cpu, e2e_ips = [], [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            f_w, _ = bare(LEGACY_CPU)
            b_w, b_c = (f_w, _) if same_as_fp32 else bare(prec)
            o_w, o_c, e = ours(Path(tmp))
            for lst, v in ((bare_ips, b_w), (bare_cpu, b_c), (fp32_ips, f_w), (ours_ips, o_w),
                           (ours_cpu, o_c), (e2e_ips, e)):
                lst.append(v)
            print(f"  repeat {r + 1}: bare fp32 {f_w:.2f} img/s, bare {prec.label} {b_w:.2f} "
                  f"img/s ({b_c:.2f} per CPU s), ours {o_w:.2f} img/s ({o_c:.2f} per CPU s) "
                  f"in training steps, ours end-to-end {e:.2f} img/s", flush=True)
    b, o, e, bc, oc, f = (statistics.median(v) for v in (bare_ips, ours_ips, e2e_ips, bare_cpu,
                                                          ours_cpu, fp32_ips))
    print(f"RESULT training arch={args.arch} size={args.size} batch={args.batch} "
          f"images={args.images} epochs={args.epochs} repeats={args.repeats} "
          f"threads={torch.get_num_threads()} "
          f"malloc_tuned={int(all(os.environ.get(v) == TUNED for v in MALLOC_VARS))} "
          f"load_avg={os.getloadavg()[0]:.2f} "
          f"bare_ips={b:.2f} ours_ips={o:.2f} ratio={o / b:.3f} "
          f"bare_cpu_ips={bc:.2f} ours_cpu_ips={oc:.2f} cpu_ratio={oc / bc:.3f} "
          f"ours_e2e_ips={e:.2f} e2e_ratio={e / b:.3f} precision={prec.label} "
          f"bare_fp32_ips={f:.2f} ratio_vs_fp32={o / f:.3f}")


if __name__ == "__main__":
    main()
