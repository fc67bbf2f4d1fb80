"""Benchmark: AOPC via batched perturbations vs one forward pass per perturbation step.

N test-like images (random CLAHE-like uint8 at 224 px), random heatmaps, timm resnet18
(1 channel, random weights, sigmoid probability of logit 0). The AOPC study's setting:
34x34 px regions (7 x 7 = 49 tiles at 224 px, L = 49 steps), additive Gaussian noise
N(0, 0.1). `morf_aopc` builds every image's path lazily and sends it in batches of B rows;
`morf_aopc_stepwise` perturbs one region at a time and runs one forward per (image, step).
Acceptance: same per-image AOPC (max |diff| <= 1e-4) and batched forward calls
<= ceil(N * (L + 1) / B).

    .venv/bin/python tests/benchmarks/bench_aopc.py [--images 16] [--batch 64]

Last line: RESULT bench_aopc ...
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch

from xcam_assets.evaluate.faithfulness import (
    CountingPredictor,
    morf_aopc,
    region_size_px,
    torch_predictor,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: aopc_reference
from aopc_reference import morf_aopc_stepwise  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=1, in_chans=1).eval()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.images, args.size, args.size)).astype(np.float32) / 255.0
    h = rng.random((args.images, args.size, args.size))
    region = region_size_px(args.size)
    n_steps = math.ceil(args.size / region) ** 2
    predict = torch_predictor(model, 0)
    predict(x[:2])  # warm-up

    batched_counter = CountingPredictor(predict)
    t0 = time.perf_counter()
    batched = morf_aopc(batched_counter, x, h, region=region, batch_size=args.batch, seed=1)
    t_batched = time.perf_counter() - t0

    step_counter = CountingPredictor(predict)
    t0 = time.perf_counter()
    step = morf_aopc_stepwise(step_counter, x, h, region=region, seed=1)
    t_step = time.perf_counter() - t0

    bound = math.ceil(args.images * (n_steps + 1) / args.batch)
    diff = float(np.abs(batched.values - step.values).max())
    ok = diff <= 1e-4 and batched_counter.calls <= bound
    print(f"images={args.images} size={args.size} region={region}px steps={n_steps} "
          f"batch={args.batch} threads={torch.get_num_threads()}")
    print(f"AOPC mean batched={batched.values.mean():.6f} stepwise={step.values.mean():.6f}")
    print(f"RESULT bench_aopc batched_calls={batched_counter.calls} bound={bound} "
          f"stepwise_calls={step_counter.calls} batched_s={t_batched:.2f} "
          f"stepwise_s={t_step:.2f} speedup={t_step / t_batched:.2f} "
          f"max_abs_diff={diff:.2e} pass={ok}")


if __name__ == "__main__":
    main()
