"""The stepwise reference of `xcam_assets.evaluate.faithfulness.morf_aopc`, kept with the
tests: it perturbs one region at a time and runs one forward per image and step, the
definition read literally, so the batched implementation can be checked against it
(tests/evaluate/test_faithfulness.py, tests/test_lineage.py, tests/benchmarks/bench_aopc.py).
Imported as `aopc_reference` (tests/ is on sys.path through tests/conftest.py)."""

from __future__ import annotations

import numpy as np

from xcam_assets.evaluate.faithfulness import (
    CountingPredictor,
    PathResult,
    Predictor,
    _check_batch,
    _morf_end,
    aopc_from_curves,
    tile_order,
)


def morf_aopc_stepwise(
    predict: Predictor,
    images: np.ndarray,
    heatmaps: np.ndarray,
    region: int | None = None,
    steps: int | None = None,
    perturbation: str = "gaussian_noise",
    noise_mean: float = 0.0,
    noise_sd: float = 0.1,
    fill: float = 0.5,
    seed: int = 0,
    grid: int | None = None,
) -> PathResult:
    """Reference implementation of :func:`morf_aopc`: perturb one region at a time in
    place and run one forward pass per image and step (``N * (L + 1)`` calls of batch 1).
    Used to verify the batched version. Regions: tiles of side ``region`` px or a
    ``grid x grid`` block grid (give one), as in :func:`morf_aopc`."""
    x, h = _check_batch(images, heatmaps)
    counter = CountingPredictor(predict)
    end = _morf_end(x, perturbation, seed, noise_mean, noise_sd, fill)
    curves = []
    for i in range(len(x)):
        order = tile_order(h[i], region, grid)
        n_steps = len(order) if steps is None else min(int(steps), len(order))
        cur = x[i].copy()
        row = [float(counter(cur[None])[0])]
        for r0, r1, c0, c1 in order[:n_steps]:
            cur[r0:r1, c0:c1] = end[i, r0:r1, c0:c1]
            row.append(float(counter(cur[None])[0]))
        curves.append(row)
    arr = np.asarray(curves, dtype=np.float64).reshape(len(x), -1)
    return PathResult(aopc_from_curves(arr) if len(x) else np.zeros(0), arr, counter.calls)
