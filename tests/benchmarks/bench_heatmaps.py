"""Benchmark: heatmaps/s of xcam's heatmap path vs a bare pytorch-grad-cam loop.

Same model (timm resnet18, 1 channel, random weights), same images (224 px), same batch
size, same method (Grad-CAM on layer4), measured in the same run, alternating rounds so
both see the same machine state. Our path is what `heatmap_sets` calls
(`xcam_assets.explain.cams.heatmap_stack`: uint8 -> input normalisation, CAM, nan/clip,
float16 storage). The maps must agree (max |diff| reported; float16 storage rounds to
~5e-4). Acceptance: ratio (ours / bare) >= 0.9.

    .venv/bin/python tests/benchmarks/bench_heatmaps.py [--images 32] [--batch 16] [--rounds 3]

Last line: RESULT bench_heatmaps ours_hps=... bare_hps=... ratio=... max_abs_diff=...
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pytorch_grad_cam as pgc
import timm
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from xcam_assets.explain.cams import heatmap_stack
from xcam_assets.train.loop import to_input


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
    args = ap.parse_args()
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=1, in_chans=1).eval()
    images = np.random.default_rng(0).integers(0, 256, (args.images, args.size, args.size),
                                               dtype=np.uint8)
    # warm-up (allocator, kernels)
    heatmap_stack(model, [model.layer4], images[:args.batch], "gradcam", 1,
                  batch_size=args.batch)
    bare_loop(model, images[:args.batch], args.batch)
    ours_t, bare_t = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        ours = heatmap_stack(model, [model.layer4], images, "gradcam", 1, batch_size=args.batch)
        ours_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        bare = bare_loop(model, images, args.batch)
        bare_t.append(time.perf_counter() - t0)
    diff = float(np.abs(ours[:, 0].astype(np.float32) - np.clip(bare, 0, 1)).max())
    ours_hps = args.images / statistics.median(ours_t)
    bare_hps = args.images / statistics.median(bare_t)
    print(f"images={args.images} size={args.size} batch={args.batch} rounds={args.rounds} "
          f"threads={torch.get_num_threads()}")
    print(f"ours  s/round: {[round(t, 2) for t in ours_t]}")
    print(f"bare  s/round: {[round(t, 2) for t in bare_t]}")
    ratio = ours_hps / bare_hps
    print(f"RESULT bench_heatmaps ours_hps={ours_hps:.2f} bare_hps={bare_hps:.2f} "
          f"ratio={ratio:.2f} max_abs_diff={diff:.2e} pass={ratio >= 0.9 and diff < 1e-3}")


if __name__ == "__main__":
    main()
