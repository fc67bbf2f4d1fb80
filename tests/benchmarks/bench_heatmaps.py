"""Benchmark: heatmaps/s of xcam's heatmap path vs a bare pytorch-grad-cam loop.

Same model (timm resnet18, 1 channel, random weights), same images (224 px), same batch
size, same method (Grad-CAM on layer4), measured in the same run, alternating rounds so
both see the same machine state. Our path is what `heatmap_sets` calls
(`xcam_assets.explain.cams.heatmap_stack`: uint8 -> input normalisation, CAM, nan/clip,
float16 storage). The maps must agree (max |diff| reported; float16 storage rounds to
~5e-4). Acceptance: ratio (ours / bare, both fp32) >= 0.9.

Precision (``--precision``, default auto: `xcam_assets.train.precision`'s rule for this
machine, bf16 autocast + channels_last for resnet18 on an avx512_bf16 CPU): our path runs
a third time in it, on its own copy of the model. ``ratio_vs_fp32`` = ours in that
precision / ours in fp32 (target >= 1.6); ``ratio_vs_pgc`` = ours in that precision /
pytorch-grad-cam's own fp32 loop (target >= 4.0). Its maps are compared with the fp32
maps: the share of maps whose argmax lands within 8 px of the fp32 argmax, and the mean
|diff|.

    .venv/bin/python tests/benchmarks/bench_heatmaps.py [--images 32] [--batch 16] [--rounds 3]

Last line: RESULT bench_heatmaps ours_hps=... bare_hps=... ratio=... max_abs_diff=...
ratio_vs_fp32=... ratio_vs_pgc=...
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import pytorch_grad_cam as pgc
import timm
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from xcam_assets.explain.cams import heatmap_stack
from xcam_assets.train.loop import to_input
from xcam_assets.train.precision import resolve_precision


def bare_loop(model: torch.nn.Module, images: np.ndarray, batch: int) -> np.ndarray:
    """The loop a pytorch-grad-cam user writes (README of jacobgil/pytorch-grad-cam)."""
    out = []
    with pgc.GradCAM(model=model, target_layers=[model.layer4]) as cam:
        for i in range(0, len(images), batch):
            x = to_input(images[i:i + batch])
            out.append(cam(input_tensor=x, targets=[ClassifierOutputTarget(0)] * len(x)))
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = ap.parse_args()
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=1, in_chans=1).eval()
    fast = copy.deepcopy(model)  # channels_last is set on the model: its own copy
    prec = resolve_precision(args.precision, fast, torch.device("cpu"))
    images = np.random.default_rng(0).integers(0, 256, (args.images, args.size, args.size),
                                               dtype=np.uint8)

    def ours_fast() -> np.ndarray:
        return heatmap_stack(fast, [fast.layer4], images, "gradcam", 1, batch_size=args.batch,
                             precision=prec)

    # warm-up (allocator, kernels)
    heatmap_stack(model, [model.layer4], images[:args.batch], "gradcam", 1,
                  batch_size=args.batch)
    heatmap_stack(fast, [fast.layer4], images[:args.batch], "gradcam", 1,
                  batch_size=args.batch, precision=prec)
    bare_loop(model, images[:args.batch], args.batch)
    ours_t, bare_t, fast_t = [], [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        ours = heatmap_stack(model, [model.layer4], images, "gradcam", 1, batch_size=args.batch)
        ours_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        bare = bare_loop(model, images, args.batch)
        bare_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        quick = ours_fast()
        fast_t.append(time.perf_counter() - t0)
    diff = float(np.abs(ours[:, 0].astype(np.float32) - np.clip(bare, 0, 1)).max())
    a, b = ours[:, 0].astype(np.float32), quick[:, 0].astype(np.float32)
    pa = np.stack(np.unravel_index(a.reshape(len(a), -1).argmax(1), a.shape[1:]), 1)
    pb = np.stack(np.unravel_index(b.reshape(len(b), -1).argmax(1), b.shape[1:]), 1)
    peak_agree = float((np.abs(pa - pb).max(axis=1) <= 8).mean())
    mean_diff = float(np.abs(a - b).mean())
    ours_hps = args.images / statistics.median(ours_t)
    bare_hps = args.images / statistics.median(bare_t)
    fast_hps = args.images / statistics.median(fast_t)
    print(f"images={args.images} size={args.size} batch={args.batch} rounds={args.rounds} "
          f"threads={torch.get_num_threads()} precision {args.precision} -> {prec.label}")
    print(f"ours fp32       s/round: {[round(t, 2) for t in ours_t]}")
    print(f"bare pgc fp32   s/round: {[round(t, 2) for t in bare_t]}")
    print(f"ours {prec.label:<11}s/round: {[round(t, 2) for t in fast_t]}")
    ratio = ours_hps / bare_hps
    print(f"RESULT bench_heatmaps ours_hps={ours_hps:.2f} bare_hps={bare_hps:.2f} "
          f"ratio={ratio:.2f} max_abs_diff={diff:.2e} pass={ratio >= 0.9 and diff < 1e-3} "
          f"precision={prec.label} ours_auto_hps={fast_hps:.2f} "
          f"ratio_vs_fp32={fast_hps / ours_hps:.2f} ratio_vs_pgc={fast_hps / bare_hps:.2f} "
          f"auto_peak_within_8px={peak_agree:.2f} auto_mean_abs_diff={mean_diff:.3f}")


if __name__ == "__main__":
    main()
