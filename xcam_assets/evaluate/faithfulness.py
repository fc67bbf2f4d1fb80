"""Faithfulness metrics: does the model depend on what the heatmap shows?

Pure functions, no Dagster. Implements the perturbation metrics of studies 4 and 5 in
MISSION.md and the two standard companions:

* AOPC with most-relevant-first (MoRF) region perturbation (Samek et al. 2017; the
  COVID-19 study's setting: 34x34 px regions, Gaussian noise N(0, 0.1));
* deletion and insertion AUC (RISE, Petsiuk et al. 2018);
* PYLON's masked-out area (Preechakul et al. 2022);
* ROAD (Rong et al. 2022), through ``pytorch_grad_cam.metrics.road``.

Conventions
-----------
* An **image** is a float array ``(H, W)`` of intensities in [0, 1] (``uint8 / 255``), the
  space the studies perturb in; a **batch** is ``(N, H, W)``.
* A **predictor** ``predict(batch) -> (B,)`` maps a float32 batch ``(B, H, W)`` to the
  probability of one finding (:func:`torch_predictor` wraps a model and its
  normalisation). All curves are in probability units, so AOPC and ROAD lie in [-1, 1] and
  deletion/insertion AUC and masked-out area in [0, 1].
* **Heatmap order**: pixels (or regions) sorted by relevance, highest first; ties keep
  row-major order (a stable sort), so every ordering is deterministic.
* **AOPC regions**: by default a ``grid x grid`` block grid, ``grid = 9``
  (:func:`grid_tiles`): the AOPC study (MISSION.md, study 5) perturbed 34x34 px regions of
  the COVID-19 Radiography Database's 299x299 px images, i.e. ``ceil(299 / 34) = 9`` blocks
  per side, 81 regions. A grid keeps that partition at every input size (224 px: blocks of
  24-25 px; 128 px: 14-15 px), where a fixed 34 px side scaled from 224 px gave a 7x7 grid
  (49 regions). ``L`` (the number of perturbation steps) defaults to every region; CPU
  profiles cap it. The table records the grid and ``L`` beside the value (rows
  ``aopc_grid`` and ``aopc_steps``, :func:`faithfulness_values`). Square tiles of a given
  side (``region``) remain available (``aopc: {grid: null, region_px: 34}``).
* Perturbation paths are evaluated **batched**: every point ``x_k`` of every image's path
  is one row of a flat list, cut into forward batches of ``batch_size`` rows across image
  boundaries, so ``N * P`` points cost ``ceil(N * P / batch_size)`` forward calls
  (:func:`path_predictions`).

"DiffGradCAM" (study 1) is **not computed**: no public definition exists (MISSION.md), and
a metric published under that name cannot be reproduced without one. Inventing a formula
and calling it "DiffGradCAM" would invite comparisons with the study's numbers that mean
nothing. Its apparent purpose (do heatmaps change where the model's evidence changes?) is
covered by the perturbation metrics here (AOPC, deletion/insertion, masked-out area, ROAD).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from torch import nn

from xcam_assets.train.loop import MEAN, STD
from xcam_assets.train.precision import LEGACY_CPU, Precision

__all__ = [
    "CountingPredictor",
    "PathResult",
    "aopc_from_curves",
    "curve_auc",
    "faithfulness_values",
    "deletion_scores",
    "grid_tiles",
    "insertion_scores",
    "masked_out_area",
    "masked_out_areas",
    "morf_aopc",
    "morf_noise",
    "path_predictions",
    "pixel_ranks",
    "region_size_px",
    "region_tiles",
    "road_scores",
    "tile_order",
    "tile_ranks",
    "torch_predictor",
]

Predictor = Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------- predictors
class CountingPredictor:
    """Wrap a predictor and count its calls (forward passes) and rows."""

    def __init__(self, predict: Predictor) -> None:
        self.predict = predict
        self.calls = 0
        self.rows = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.rows += len(batch)
        return self.predict(batch)


def torch_predictor(model: nn.Module, finding_index: int,
                    device: torch.device | None = None,
                    precision: Precision | None = None) -> Predictor:
    """Predictor for a classifier trained on ``(x - MEAN) / STD`` inputs (train/loop.py):
    ``batch (B, H, W) in [0, 1] -> sigmoid(logit of finding)`` as float64 ``(B,)``.
    ``precision``: the autocast dtype and memory format of the forwards (the model's own,
    :func:`xcam_assets.train.stage.precision_for`, so the perturbed images are scored as
    the model's predictions and heatmaps were made; default fp32, contiguous)."""
    device = device or next(model.parameters()).device
    precision = precision or LEGACY_CPU
    precision.prepare_model(model)
    model.eval()

    def predict(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        x = precision.prepare_input(((x - MEAN) / STD).unsqueeze(1).to(device))
        with torch.inference_mode(), precision.autocast(device):
            logits = model(x)[:, finding_index].float()
        return torch.sigmoid(logits).cpu().numpy().astype(np.float64)

    return predict


def _check_batch(images: np.ndarray, heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(images, dtype=np.float32)
    h = np.asarray(heatmaps, dtype=np.float64)
    if x.ndim != 3 or h.shape != x.shape:
        raise ValueError(f"images (N, H, W) and heatmaps of the same shape expected, "
                         f"got {x.shape} and {h.shape}")
    if not np.all(np.isfinite(h)):
        raise ValueError("heatmaps contain nan or inf")
    return x, h


# --------------------------------------------------------------------------- orderings
def pixel_ranks(heatmap: np.ndarray) -> np.ndarray:
    """Rank of every pixel in heatmap order (0 = most relevant); ties in row-major order.

    ``ranks[r, c] = j`` means pixel ``(r, c)`` is the ``j``-th to be perturbed.
    """
    h = np.asarray(heatmap, dtype=np.float64)
    order = np.argsort(-h.ravel(), kind="stable")
    ranks = np.empty(h.size, dtype=np.int64)
    ranks[order] = np.arange(h.size)
    return ranks.reshape(h.shape)


def region_size_px(image_size: int, region_px: int = 34, reference_size: int = 224) -> int:
    """Region side scaled to the image: ``max(1, round(region_px * image_size / reference))``.

    The AOPC study used 34x34 px regions on 224 px inputs; at 128 px that is 19 px, at 64 px
    10 px, so the grid keeps about 7 x 7 regions at every input size.
    """
    return max(1, int(round(region_px * image_size / reference_size)))


Tile = tuple[int, int, int, int]


def region_tiles(shape: tuple[int, ...], region: int) -> list[Tile]:
    """Non-overlapping ``region x region`` tiles from the top-left corner (edge tiles are
    cut at the border), in row-major order: ``[(r0, r1, c0, c1), ...]``, max exclusive."""
    if region < 1:
        raise ValueError("region must be >= 1 px")
    height, width = int(shape[0]), int(shape[1])
    return [(r0, min(r0 + region, height), c0, min(c0 + region, width))
            for r0 in range(0, height, region) for c0 in range(0, width, region)]


def grid_tiles(shape: tuple[int, ...], grid: int) -> list[Tile]:
    """A ``grid x grid`` block grid in row-major order: row edges ``floor(i * H / grid)``
    and column edges ``floor(j * W / grid)``, ``i, j = 0..grid`` (blocks differ by at most
    one pixel; 64 px at grid 9: eight 7 px blocks and a last one of 8 px)."""
    height, width = int(shape[0]), int(shape[1])
    if grid < 1 or grid > min(height, width):
        raise ValueError(f"grid must be in [1, {min(height, width)}] for a {shape} image")
    rows = [i * height // grid for i in range(grid + 1)]
    cols = [j * width // grid for j in range(grid + 1)]
    return [(rows[i], rows[i + 1], cols[j], cols[j + 1])
            for i in range(grid) for j in range(grid)]


def _tiles(shape: tuple[int, ...], region: int | None, grid: int | None) -> list[Tile]:
    if (region is None) == (grid is None):
        raise ValueError("give exactly one of region (tile side, px) and grid (blocks per side)")
    return grid_tiles(shape, int(grid)) if grid is not None else region_tiles(shape, int(region))


def tile_order(heatmap: np.ndarray, region: int | None = None,
               grid: int | None = None) -> list[Tile]:
    """The tiles, most relevant first: ``[(r0, r1, c0, c1), ...]``, max exclusive; either
    ``region x region`` tiles (:func:`region_tiles`) or a ``grid x grid`` block grid
    (:func:`grid_tiles`).

    A tile's relevance is its **mean** heatmap value (equal to the sum's order when every
    tile is full-size, as in Samek et al. 2017; the mean does not penalise the smaller edge
    tiles); ties keep row-major tile order.
    """
    h = np.asarray(heatmap, dtype=np.float64)
    tiles = _tiles(h.shape, region, grid)
    scores = [h[r0:r1, c0:c1].mean() for r0, r1, c0, c1 in tiles]
    order = np.argsort(-np.asarray(scores), kind="stable")
    return [tiles[i] for i in order]


def tile_ranks(heatmap: np.ndarray, region: int | None = None,
               grid: int | None = None) -> np.ndarray:
    """Per pixel, the position of its tile in :func:`tile_order` (0 = perturbed first)."""
    ranks = np.empty(np.shape(heatmap), dtype=np.int64)
    for j, (r0, r1, c0, c1) in enumerate(tile_order(heatmap, region, grid)):
        ranks[r0:r1, c0:c1] = j
    return ranks


# --------------------------------------------------------------------------- batched paths
def path_predictions(
    predict: Predictor,
    base: np.ndarray,
    end: np.ndarray,
    ranks: np.ndarray,
    thresholds: np.ndarray,
    batch_size: int = 64,
) -> np.ndarray:
    """Predictions along perturbation paths, batched across images: ``(N, P)``.

    Point ``k`` of image ``i`` is ``x_ik = where(ranks[i] < thresholds[k], end[i], base[i])``:
    the first ``thresholds[k]`` pixels (or regions) in heatmap order taken from ``end``, the
    rest from ``base``. ``thresholds`` is ``(P,)`` (shared) or ``(N, P)``. The ``N * P``
    points are built lazily and sent in batches of ``batch_size`` rows (the last one may
    be smaller): ``ceil(N * P / batch_size)`` calls of ``predict``.
    """
    base = np.asarray(base, dtype=np.float32)
    end = np.broadcast_to(np.asarray(end, dtype=np.float32), base.shape)
    n = len(base)
    thr = np.asarray(thresholds)
    thr = np.broadcast_to(thr, (n, thr.shape[-1])) if thr.ndim == 1 else thr
    p = thr.shape[1]
    out = np.empty((n, p), dtype=np.float64)
    batch_size = max(1, int(batch_size))
    buf = np.empty((min(batch_size, n * p), *base.shape[1:]), dtype=np.float32)
    where: list[tuple[int, int]] = []
    for flat in range(n * p):
        i, k = divmod(flat, p)
        np.copyto(buf[len(where)], base[i])
        sel = ranks[i] < thr[i, k]
        buf[len(where)][sel] = end[i][sel]
        where.append((i, k))
        if len(where) == len(buf) or flat == n * p - 1:
            probs = np.asarray(predict(buf[:len(where)]), dtype=np.float64).reshape(-1)
            for (ii, kk), v in zip(where, probs, strict=True):
                out[ii, kk] = v
            where.clear()
    return out


def curve_auc(curve: np.ndarray) -> np.ndarray | float:
    """Area under a curve sampled at ``P`` equally spaced points of [0, 1] (trapezoid rule):
    ``(sum(c) - (c_0 + c_{P-1}) / 2) / (P - 1)``, along the last axis.

    RISE's ``auc`` (Petsiuk et al. 2018) is the same formula.
    """
    c = np.asarray(curve, dtype=np.float64)
    if c.shape[-1] < 2:
        raise ValueError("a curve needs at least 2 points")
    val = (c.sum(axis=-1) - (c[..., 0] + c[..., -1]) / 2.0) / (c.shape[-1] - 1)
    return float(val) if np.ndim(val) == 0 else val


# --------------------------------------------------------------------------- AOPC
def aopc_from_curves(curves: np.ndarray) -> np.ndarray:
    """Per-image AOPC from MoRF curves ``f(x_0), ..., f(x_L)`` (shape ``(N, L + 1)``).

    Definition (Samek et al. 2017, "Evaluating the visualization of what a deep neural
    network has learned", IEEE TNNLS 28:2660, eq. 12):
    ``AOPC = 1/(L+1) * < sum_{k=0..L} f(x_0) - f(x_k) >``, the mean over images of the
    per-image value returned here (the ``k = 0`` term is 0). Higher = the most relevant
    regions matter more = a more faithful heatmap. With probabilities it lies in
    ``[-L/(L+1), L/(L+1)]``.
    """
    c = np.asarray(curves, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] < 1:
        raise ValueError("curves must be (N, L + 1)")
    return (c[:, :1] - c).sum(axis=1) / c.shape[1]


def morf_noise(shape: tuple[int, int], index: int, seed: int, mean: float = 0.0,
               sd: float = 0.1) -> np.ndarray:
    """The fixed Gaussian noise field of image ``index``: ``N(mean, sd)`` from
    ``numpy.random.default_rng([seed, index])``, float32 ``(H, W)``.

    Drawn once per image and reused at every step, so a region keeps the same perturbation
    once perturbed and the path is reproducible in any batching.
    """
    return np.random.default_rng([int(seed), int(index)]).normal(mean, sd, shape).astype(
        np.float32)


def _morf_end(images: np.ndarray, perturbation: str, seed: int, noise_mean: float,
              noise_sd: float, fill: float) -> np.ndarray:
    if perturbation == "gaussian_noise":
        return np.stack([x + morf_noise(x.shape, i, seed, noise_mean, noise_sd)
                         for i, x in enumerate(images)]) if len(images) else images
    if perturbation == "constant":
        return np.full_like(images, fill)
    raise ValueError(f"unknown perturbation {perturbation!r} (gaussian_noise, constant)")


@dataclass
class PathResult:
    """Per-image scores of a path metric plus its curves (``(N, P)``) and forward calls;
    ``params``: the settings the value depends on (AOPC: ``grid``, tiles per side, and
    ``steps``, the ``L`` of the formula)."""

    values: np.ndarray
    curves: np.ndarray
    forward_calls: int
    params: dict[str, int] = field(default_factory=dict)


def morf_aopc(
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
    batch_size: int = 64,
    grid: int | None = None,
) -> PathResult:
    """AOPC with most-relevant-first region perturbation, batched.

    Definition: :func:`aopc_from_curves` over the MoRF path of each image: ``x_0`` the image,
    ``x_k`` = ``x_{k-1}`` with the ``k``-th most relevant tile (:func:`tile_order`: tiles of
    side ``region`` px, or a ``grid x grid`` block grid; give one) perturbed, ``k = 1..L``.
    ``L = min(steps, number of tiles)`` (default: every tile). ``params`` of the result:
    ``{"grid": tiles per side, "steps": L}``.
    Perturbations: ``"gaussian_noise"`` (default; the COVID-19 AOPC study: additive
    Gaussian noise with ``noise_mean`` 0 and ``noise_sd`` 0.1 in [0, 1] intensity units,
    one fixed field per image, :func:`morf_noise`; not clipped, so the perturbation is
    exactly the stated one) or ``"constant"`` (the region is replaced by ``fill``).

    Cost: ``ceil(N * (L + 1) / batch_size)`` forward calls (:func:`path_predictions`).
    """
    x, h = _check_batch(images, heatmaps)
    counter = CountingPredictor(predict)
    tiles = _tiles(x.shape[1:], region, grid)
    n_tiles = len(tiles)
    n_steps = n_tiles if steps is None else min(int(steps), n_tiles)
    side = int(grid) if grid is not None else math.ceil(x.shape[2] / int(region))
    params = {"grid": side, "steps": n_steps}
    if len(x) == 0:
        return PathResult(np.zeros(0), np.zeros((0, 0)), 0, params)
    ranks = np.stack([tile_ranks(hm, region, grid) for hm in h])
    end = _morf_end(x, perturbation, seed, noise_mean, noise_sd, fill)
    curves = path_predictions(counter, x, end, ranks, np.arange(n_steps + 1),
                              batch_size=batch_size)
    return PathResult(aopc_from_curves(curves), curves, counter.calls, params)


# --------------------------------------------------------------------------- deletion / insertion
def _pixel_thresholds(n_pixels: int, steps: int) -> np.ndarray:
    if steps < 1:
        raise ValueError("steps must be >= 1")
    return (np.arange(steps + 1, dtype=np.int64) * n_pixels) // steps


def deletion_scores(
    predict: Predictor,
    images: np.ndarray,
    heatmaps: np.ndarray,
    steps: int = 100,
    fill: float = 0.5,
    batch_size: int = 64,
) -> PathResult:
    """Deletion AUC per image (lower = more faithful).

    Definition (Petsiuk et al. 2018, "RISE: Randomized input sampling for explanation of
    black-box models", BMVC): remove pixels in heatmap order (:func:`pixel_ranks`), replacing
    them by ``fill``, and record the probability at ``steps + 1`` equally spaced fractions
    ``0, 1/steps, ..., 1`` of removed pixels (``floor(k * H * W / steps)`` pixels at step
    ``k``); the score is :func:`curve_auc` of that curve. ``fill = 0.5`` is the normalised
    input's zero (RISE deletes to 0 in normalised space, i.e. to the dataset mean).
    """
    x, h = _check_batch(images, heatmaps)
    counter = CountingPredictor(predict)
    if len(x) == 0:
        return PathResult(np.zeros(0), np.zeros((0, 0)), 0)
    ranks = np.stack([pixel_ranks(hm) for hm in h])
    curves = path_predictions(counter, x, np.full_like(x, fill), ranks,
                              _pixel_thresholds(x[0].size, steps), batch_size=batch_size)
    return PathResult(np.asarray(curve_auc(curves)), curves, counter.calls)


def blurred(image: np.ndarray, ksize: int = 11, sigma: float = 5.0) -> np.ndarray:
    """Gaussian blur (OpenCV, reflect-101 border): the insertion start image of RISE
    (kernel 11, sigma 5)."""
    return cv2.GaussianBlur(np.asarray(image, dtype=np.float32), (ksize, ksize), sigma)


def insertion_scores(
    predict: Predictor,
    images: np.ndarray,
    heatmaps: np.ndarray,
    steps: int = 100,
    blur_ksize: int = 11,
    blur_sigma: float = 5.0,
    batch_size: int = 64,
) -> PathResult:
    """Insertion AUC per image (higher = more faithful).

    Definition (Petsiuk et al. 2018, RISE): start from a blurred copy of the image
    (:func:`blurred`) and put original pixels back in heatmap order, recording the
    probability at ``steps + 1`` equally spaced fractions as in :func:`deletion_scores`;
    the score is :func:`curve_auc` of that curve.
    """
    x, h = _check_batch(images, heatmaps)
    counter = CountingPredictor(predict)
    if len(x) == 0:
        return PathResult(np.zeros(0), np.zeros((0, 0)), 0)
    ranks = np.stack([pixel_ranks(hm) for hm in h])
    base = np.stack([blurred(xi, blur_ksize, blur_sigma) for xi in x])
    curves = path_predictions(counter, base, x, ranks, _pixel_thresholds(x[0].size, steps),
                              batch_size=batch_size)
    return PathResult(np.asarray(curve_auc(curves)), curves, counter.calls)


# --------------------------------------------------------------------------- masked-out area
def masked_out_area(
    predict: Predictor,
    image: np.ndarray,
    heatmap: np.ndarray,
    threshold: float,
    step: float = 0.005,
    fill: float = 0.5,
    batch_size: int = 64,
) -> float:
    """PYLON's masked-out area of one image (lower = more faithful, in [0, 1]).

    Definition (Preechakul et al. 2022, iScience 25:103933): mask the image in heatmap order
    (:func:`pixel_ranks`), ``step`` (0.5%) of the image area at a time (``ceil(k * step *
    H * W)`` pixels after ``k`` steps, replaced by ``fill``), until the prediction flips
    from positive (``p >= threshold``, the decision threshold chosen on validation by the
    maximal geometric mean of sensitivity and specificity) to negative (``p < threshold``);
    the score is the masked fraction of the image at the first flip.

    Decisions: an image the model does not call positive has no flip to measure -> ``nan``;
    a prediction that survives masking of the whole image is censored at 1.0. See
    :func:`masked_out_areas` for how the steps are searched.
    """
    x = np.asarray(image, dtype=np.float32)[None]
    h = np.asarray(heatmap, dtype=np.float64)[None]
    return float(masked_out_areas(predict, x, h, threshold, step, fill, batch_size).values[0])


def masked_out_areas(
    predict: Predictor,
    images: np.ndarray,
    heatmaps: np.ndarray,
    threshold: float,
    step: float = 0.005,
    fill: float = 0.5,
    batch_size: int = 64,
    first_chunk: int = 8,
) -> PathResult:
    """:func:`masked_out_area` for a batch of images, searched in growing chunks.

    Every image still unresolved evaluates its next ``c`` steps in one batched pass
    (:func:`path_predictions` across images); ``c`` starts at ``first_chunk`` and doubles
    up to ``batch_size``, so an early flip (the common case for a faithful heatmap) costs a
    few forward rows and a late one at most about twice the steps. The first flip is
    always found exactly (every step up to it is evaluated). ``curves`` is empty.
    """
    x, h = _check_batch(images, heatmaps)
    if not 0.0 < step <= 1.0:
        raise ValueError("step must be in (0, 1]")
    counter = CountingPredictor(predict)
    n = len(x)
    vals = np.full(n, np.nan)
    if n == 0:
        return PathResult(vals, np.zeros((0, 0)), 0)
    p0 = np.concatenate([np.asarray(counter(x[i:i + batch_size]), dtype=np.float64).reshape(-1)
                         for i in range(0, n, batch_size)])
    n_pix = x[0].size
    n_steps = math.ceil(1.0 / step - 1e-9)
    counts = np.minimum(n_pix, np.ceil(np.arange(1, n_steps + 1) * step * n_pix - 1e-9)
                        ).astype(np.int64)
    ranks = np.stack([pixel_ranks(hm) for hm in h])
    todo = [i for i in range(n) if p0[i] >= threshold]
    done_steps = 0
    chunk = max(1, int(first_chunk))
    end = np.full_like(x[:1], fill)[0]
    while todo and done_steps < n_steps:
        sel = counts[done_steps:done_steps + chunk]
        probs = path_predictions(counter, x[todo], end, ranks[todo], sel,
                                 batch_size=batch_size)
        still = []
        for j, i in enumerate(todo):
            flipped = np.flatnonzero(probs[j] < threshold)
            if flipped.size:
                vals[i] = float(sel[flipped[0]]) / n_pix
            else:
                still.append(i)
        todo = still
        done_steps += len(sel)
        chunk = min(chunk * 2, max(1, int(batch_size)))
    for i in todo:
        vals[i] = 1.0
    return PathResult(vals, np.zeros((n, 0)), counter.calls)


# --------------------------------------------------------------------------- ROAD
class SigmoidTarget:
    """pytorch-grad-cam target: the sigmoid probability of one logit."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(model_output[..., self.index])


def road_scores(
    model: nn.Module,
    images: np.ndarray,
    heatmaps: np.ndarray,
    finding_index: int,
    percentiles: Sequence[int] = (10, 20, 30, 40, 50, 60, 70, 80, 90),
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """ROAD (RemOve And Debias) per image, via ``pytorch_grad_cam.metrics.road``.

    Definition (Rong et al. 2022, "A consistent and efficient evaluation strategy for
    attribution methods", ICML): pixels are removed by noisy linear imputation (no
    retraining); the score is the change in the finding's probability, averaged over the
    removal ``percentiles``. pytorch-grad-cam's percentile ``p`` *keeps* pixels below the
    ``p``-th heatmap percentile, i.e. ``ROADMostRelevantFirst(p)`` removes the top
    ``100 - p`` % and ``ROADLeastRelevantFirst(p)`` the bottom ``p`` %.

    Returns per-image arrays: ``road_morf`` = mean change after removing the most relevant
    pixels (more negative = more faithful), ``road_lerf`` = the same for the least relevant
    (closer to 0 = more faithful), ``road_combined = (lerf - morf) / 2`` (pytorch-grad-cam's
    ``ROADCombined``; higher = more faithful). All in [-1, 1]. The imputation noise is
    seeded (``torch`` RNG forked, LeRF then MoRF, as ``ROADCombined`` draws it).
    """
    from pytorch_grad_cam.metrics.road import (
        ROADLeastRelevantFirstAverage,
        ROADMostRelevantFirstAverage,
    )

    x, h = _check_batch(images, heatmaps)
    if len(x) == 0:
        empty = np.zeros(0)
        return {"road_morf": empty, "road_lerf": empty, "road_combined": empty}
    device = next(model.parameters()).device
    model.eval()
    inputs = ((torch.from_numpy(x) - MEAN) / STD).unsqueeze(1).to(device)
    cams = h.astype(np.float32)
    targets = [SigmoidTarget(finding_index)] * len(x)
    pcts = [int(p) for p in percentiles]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        lerf = ROADLeastRelevantFirstAverage(pcts)(inputs, cams, targets, model)
        morf = ROADMostRelevantFirstAverage(pcts)(inputs, cams, targets, model)
    lerf = np.asarray(lerf, dtype=np.float64).reshape(-1)
    morf = np.asarray(morf, dtype=np.float64).reshape(-1)
    return {"road_morf": morf, "road_lerf": lerf, "road_combined": (lerf - morf) / 2.0}


# --------------------------------------------------------------------------- all at once
def faithfulness_values(
    model: nn.Module,
    finding_index: int,
    images: np.ndarray,
    heatmaps: np.ndarray,
    threshold: float,
    config: dict,
    seed: int = 0,
    precision: Precision | None = None,
) -> dict[str, np.ndarray]:
    """Per-image faithfulness metrics of one finding's heatmaps, as configured.

    ``config`` is the ``evaluate.faithfulness`` section of ``resources/params.yaml``
    (defaults in ``xcam_assets.evaluate.tables.EVALUATE_DEFAULTS``): ``metrics`` picks among
    ``aopc``, ``deletion``, ``insertion``, ``masked_out_area``, ``road``; the AOPC regions
    are a ``aopc.grid x aopc.grid`` block grid (default 9, the AOPC study's grid; module
    notes), or with ``grid: null`` tiles of ``region_px`` scaled from ``reference_size`` to
    the image size (:func:`region_size_px`); ``aopc.steps`` is ``L`` (null: every region);
    ``road.max_images`` caps ROAD (the costly one) to the first images. The caller chooses
    the images (the metric table uses true positives). ``precision``: that of the model's
    predictions and heatmaps (:func:`torch_predictor`); ROAD runs through
    pytorch-grad-cam's own loop in fp32.
    Returns metric name -> ``(n,)`` array (nan where undefined); with AOPC also the
    parameter rows ``aopc_grid`` (tiles per side) and ``aopc_steps`` (``L``), constant
    arrays, so the table records them beside the value.
    """
    x, h = _check_batch(images, heatmaps)
    wanted = set(config.get("metrics") or [])
    predict = torch_predictor(model, finding_index, precision=precision)
    bs = int(config.get("batch_size", 64))
    out: dict[str, np.ndarray] = {}
    if not len(x):
        return out
    if "aopc" in wanted:
        a = config["aopc"]
        grid = a.get("grid")
        region = None if grid is not None else region_size_px(
            x.shape[-1], int(a["region_px"]), int(a["reference_size"]))
        res = morf_aopc(predict, x, h, region, steps=a.get("steps"),
                        perturbation=a["perturbation"],
                        noise_mean=float(a["noise_mean"]), noise_sd=float(a["noise_sd"]),
                        fill=float(a["fill"]), seed=seed, batch_size=bs,
                        grid=None if grid is None else int(grid))
        out["aopc"] = res.values
        out["aopc_grid"] = np.full(len(x), float(res.params["grid"]))
        out["aopc_steps"] = np.full(len(x), float(res.params["steps"]))
    if "deletion" in wanted:
        d = config["deletion"]
        out["deletion_auc"] = deletion_scores(predict, x, h, steps=int(d["steps"]),
                                              fill=float(d["fill"]), batch_size=bs).values
    if "insertion" in wanted:
        d = config["insertion"]
        out["insertion_auc"] = insertion_scores(
            predict, x, h, steps=int(d["steps"]), blur_ksize=int(d["blur_ksize"]),
            blur_sigma=float(d["blur_sigma"]), batch_size=bs).values
    if "masked_out_area" in wanted:
        d = config["masked_out_area"]
        out["masked_out_area"] = masked_out_areas(predict, x, h, threshold,
                                                  step=float(d["step"]), fill=float(d["fill"]),
                                                  batch_size=bs).values
    if "road" in wanted:
        r = config["road"]
        cap = r.get("max_images")
        m = len(x) if cap is None else min(int(cap), len(x))
        out.update(road_scores(model, x[:m], h[:m], finding_index,
                               percentiles=r["percentiles"], seed=seed))
    return out
