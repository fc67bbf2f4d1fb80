"""Per-seed models for the seed-level statistics of the metric table.

A profile with ``seeds: N > 1`` trains every seed and keeps each seed's model under
``checkpoints/<arch>/seeds/seed-<s>/`` (xcam_assets.train.fit); the checkpoint of record
(the lowest validation loss) is the one the heatmap sets and the bootstrap rows use. PYLON
reports every figure as the mean over its 5 seeds with a Student-t 95% CI, so here each
kept seed model is scored as the checkpoint of record is:

* :func:`seed_predictions`: it predicts the val and test splits, and every **diagnostic**
  metric gets a ``<metric>_seed_mean`` row (:func:`xcam_assets.evaluate.tables.seed_rows`);
* :func:`seed_heatmap_values`: it makes its own heatmaps of the boxed test images (the
  images localization scores) for every configured CAM method, with the explain stage's
  functions and precision rule, and every **localization** metric
  (:func:`xcam_assets.evaluate.tables.localization_table`: pointing game, its tolerance
  variant, energy pointing game, EHR AUC, weak localization, PYLON's point localization
  accuracy and IoU, blank-map rate) gets a ``<metric>_seed_mean`` row per CAM method
  (:func:`xcam_assets.evaluate.tables.seed_summary_rows`).

* :func:`seed_faithfulness_values`: on its own true positives of the test split (labelled
  positive and called positive at the seed's own val threshold, capped as the single
  checkpoint's faithfulness is: ``evaluate.faithfulness.max_images`` and ``findings``) it
  makes each CAM method's maps and scores the **faithfulness** metrics named in
  ``evaluate.seed_heatmaps.faithfulness`` (default ``[aopc]``, the scorecard's
  faithfulness column; any of ``aopc, deletion, insertion, masked_out_area, road``) with
  :func:`xcam_assets.evaluate.faithfulness.faithfulness_values`, so every scorecard metric
  has its seed-level row.

All these rows carry ``ci_method = t_over_seeds`` and ``n`` = seeds; the plain row beside
them is the single checkpoint of record with its patient bootstrap CI. A seed's value of a
faithfulness metric is the mean over its true positives; a seed with no true positive of
a finding has no value there, and that row's ``n`` counts the seeds that had one (the
heatmap rows allow no nan; ``n`` shows the loss). The per-seed heatmaps are
scored, not stored. Their cost is one CAM pass per seed, method and boxed test image, plus
per seed, method and true positive the forwards of the faithfulness metrics named
(``evaluate.seed_heatmaps`` in resources/params.yaml: ``enabled``, ``max_images``,
``methods``, ``faithfulness``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from xcam_assets.config import Settings
from xcam_assets.evaluate.faithfulness import faithfulness_values
from xcam_assets.evaluate.tables import PARAMETERS, localization_table, thresholds_from_predictions
from xcam_assets.explain.cams import heatmap_stack, parse_method, reshape_transform_for
from xcam_assets.explain.stage import ExplainConfig
from xcam_assets.train.checkpoint import load_checkpoint, read_sidecar
from xcam_assets.train.loop import predict_logits
from xcam_assets.train.precision import Precision
from xcam_assets.train.stage import precision_for
from xcam_assets.train.zoo import build_model, state_dict_hash, target_layers

#: (cam_method, finding, metric) -> one seed model's value
SeedValues = dict[tuple[str, str, str], float]

#: the faithfulness metrics a seed model is scored on by default: the scorecard's AOPC
SEED_FAITHFULNESS_DEFAULT = ("aopc",)


class StaleSeeds(RuntimeError):
    """A seed listed by the checkpoint of record is missing or is not the model trained."""


def seed_dir(settings: Settings, arch: str, seed: int) -> Path:
    return settings.checkpoints_dir / arch / "seeds" / f"seed-{seed}"


def trained_seeds(settings: Settings, arch: str) -> list[int]:
    """The seeds the architecture's checkpoint of record was chosen from (one: none kept)."""
    return [int(s) for s in read_sidecar(settings.checkpoints_dir / arch).get("seeds", [])]


def seed_models(settings: Settings, arch: str, device: torch.device
                ) -> Iterator[tuple[int, nn.Module]]:
    """(seed, that seed's kept model in eval mode on `device`) for every seed the checkpoint
    of record lists (``seed_runs``); nothing when it was trained with one seed. Each model
    must hash to the ``weights_sha256`` listed for it, else :class:`StaleSeeds`: a table
    must not mix seeds of different trainings."""
    side = read_sidecar(settings.checkpoints_dir / arch)
    runs = side.get("seed_runs") or []
    if len(runs) < 2:
        return
    for run in runs:
        seed = int(run["seed"])
        d = seed_dir(settings, arch, seed)
        if not (d / "model.json").exists():
            raise StaleSeeds(f"{arch}: seed {seed} is listed by the checkpoint but "
                             f"{d} has no model: re-materialize checkpoints[{arch}]")
        size = json.loads((d / "model.json").read_text()).get(
            "image_size", side.get("image_size", settings.image_size))
        model = build_model(arch, settings.zoo, n_classes=len(settings.findings),
                            image_size=int(size))
        load_checkpoint(d, model)
        if run.get("weights_sha256") and state_dict_hash(model) != run["weights_sha256"]:
            raise StaleSeeds(f"{arch}: the model in {d} is not seed {seed}'s model of the "
                             "checkpoint of record (weights_sha256 differs): re-materialize "
                             f"checkpoints[{arch}]")
        yield seed, model.to(device).eval()


def seed_predictions(settings: Settings, arch: str, splits: Mapping[str, tuple],
                     device: torch.device, log: Callable[[str], None] = print,
                     models: Iterable[tuple[int, nn.Module]] | None = None
                     ) -> dict[int, pl.DataFrame]:
    """Seed -> that seed's model's probabilities on `splits` (name -> the
    ``split_arrays`` tuple ``(keys, images, labels, regions)``), in the format of the
    explain stage's ``predictions.parquet``. Empty when the checkpoint was trained with
    one seed; :class:`StaleSeeds` as :func:`seed_models`. `models`: the seed models
    already loaded (the evaluate stage loads them once for predictions and heatmaps)."""
    out: dict[int, pl.DataFrame] = {}
    for seed, model in (seed_models(settings, arch, device) if models is None else models):
        out[seed] = predictions_frame(model, settings.findings, splits, device,
                                      precision_for(settings, arch, device, model))
        del model
        log(f"{arch}: seed {seed} predicted")
    return out


def predictions_frame(model: torch.nn.Module, findings: Sequence[str],
                      splits: Mapping[str, tuple], device: torch.device,
                      precision: Precision | None = None) -> pl.DataFrame:
    """`image_key, split, finding, label, probability` of `model` on `splits`, predicted
    in `precision` (the explain stage's: the seed of record then scores as its own row)."""
    frames = []
    for split, (keys, x, y, _) in splits.items():
        prob = 1.0 / (1.0 + np.exp(-predict_logits(model, x, device=device,
                                                   precision=precision)))
        for k, finding in enumerate(findings):
            frames.append(pl.DataFrame({"image_key": list(keys), "split": split,
                                        "finding": finding,
                                        "label": np.asarray(y)[:, k].astype(np.int8),
                                        "probability": prob[:, k].astype(np.float64)}))
    return pl.concat(frames)


# --------------------------------------------------------------------------- heatmaps
def boxed_images(regions: np.ndarray, max_images: int | None = None) -> np.ndarray:
    """Indices of the test images with a ground-truth region of some finding (the only
    images localization scores), in test order, the first `max_images` of them (None: all)."""
    has = np.asarray(regions).reshape(regions.shape[0], regions.shape[1], -1).any(axis=2)
    idx = np.flatnonzero(has.any(axis=1))
    return idx if max_images is None else idx[:int(max_images)]


def seed_methods(cam_methods: Sequence[str], only: Sequence[str] | None) -> list[str]:
    """The configured CAM methods scored per seed: all, or those named in `only` (the
    ``seed_heatmaps.methods`` setting), in the profile's order."""
    if only is None:
        return list(cam_methods)
    wanted = {parse_method(m).name for m in only}
    return [m for m in cam_methods if parse_method(m).name in wanted]


def seed_heatmap_values(settings: Settings, arch: str, model: nn.Module,
                        methods: Sequence[str], images_u8: np.ndarray, regions: np.ndarray,
                        boxes: Sequence[Mapping] | None, tolerance_px: int,
                        weak_threshold: float, batch_size: int, device: torch.device
                        ) -> SeedValues:
    """One seed model's localization metrics per CAM method on `images_u8` (boxed test
    images; `regions` and `boxes` theirs): heatmaps made as the explain stage makes them
    (:func:`~xcam_assets.explain.cams.heatmap_stack` at the same precision, float16
    storage form and float32 peaks), scored by
    :func:`~xcam_assets.evaluate.tables.localization_table` as the checkpoint of record's
    stored maps are. Only the (image, finding) pairs with a region are computed (the
    others are not scored). A class-map method on a model without class maps is skipped,
    as the explain stage skips it. Parameter rows (:data:`PARAMETERS`) are left out."""
    n_f = len(settings.findings)
    precision = precision_for(settings, arch, device, model)
    layers = target_layers(model, arch, settings.zoo)
    reshape = reshape_transform_for(arch, settings.zoo)
    only = np.asarray(regions).reshape(len(regions), n_f, -1).any(axis=2)
    out: SeedValues = {}
    for method in methods:
        spec = parse_method(method)
        if spec.is_class_map and not hasattr(model, "class_maps"):
            continue
        peaks = np.zeros((len(images_u8), n_f, 2), dtype=np.int32)
        maps = heatmap_stack(model, layers, images_u8, spec, n_f, batch_size=batch_size,
                             reshape_transform=reshape, only=only, peaks=peaks,
                             precision=precision)
        rows = localization_table(arch, spec.name, list(settings.findings),
                                  maps.astype(np.float32), regions, n_boot=0, seed=0,
                                  tolerance_px=tolerance_px, boxes=boxes,
                                  weak_threshold=weak_threshold, peaks=peaks)
        for r in rows:
            if r["metric"] not in PARAMETERS:
                out[(spec.name, r["finding"], r["metric"])] = float(r["value"])
    return out


def seed_heatmap_table(settings: Settings, arch: str, images_u8: np.ndarray,
                       regions: np.ndarray, boxes: Sequence[Mapping] | None,
                       cfg: Mapping[str, Any], device: torch.device,
                       log: Callable[[str], None] = print,
                       models: Iterable[tuple[int, nn.Module]] | None = None
                       ) -> tuple[dict[int, SeedValues], dict[str, Any]]:
    """Every kept seed's localization values (:func:`seed_heatmap_values`) on the boxed
    test images, and a record of what was scored (images, methods, metrics; no
    timings) for ``metric_table.json``. `cfg`: the merged ``evaluate`` section (its
    ``seed_heatmaps``, ``tolerance_px``, ``weak_localization_threshold``). Empty when
    disabled or when the checkpoint was trained with one seed. `models` as for
    :func:`seed_predictions`."""
    sh = cfg.get("seed_heatmaps") or {}
    if not sh.get("enabled", True):
        return {}, {"enabled": False}
    idx = boxed_images(regions, sh.get("max_images"))
    methods = seed_methods(settings.profile["cam_methods"], sh.get("methods"))
    batch = ExplainConfig.from_settings(settings).batch_size
    box_list = None if boxes is None else [boxes[i] for i in idx]
    values: dict[int, SeedValues] = {}
    for seed, model in (seed_models(settings, arch, device) if models is None else models):
        t0 = time.perf_counter()
        values[seed] = seed_heatmap_values(
            settings, arch, model, methods, images_u8[idx], regions[idx], box_list,
            int(cfg["tolerance_px"]), float(cfg["weak_localization_threshold"]), batch,
            device) if len(idx) else {}
        del model
        log(f"{arch}: seed {seed} heatmaps scored ({len(idx)} boxed test images, "
            f"{len(methods)} methods, {time.perf_counter() - t0:.1f}s)")
    # no timings here: metric_table.json is part of the metrics' data version
    return values, {"enabled": True, "n_images": int(len(idx)),
                    "max_images": sh.get("max_images"), "methods": methods,
                    "metrics": "localization (evaluate.tables.localization_table)"}


# --------------------------------------------------------------------------- faithfulness
def seed_faithfulness_values(settings: Settings, arch: str, model: nn.Module,
                             methods: Sequence[str], images_u8: np.ndarray,
                             labels: np.ndarray, probabilities: np.ndarray,
                             thresholds: Mapping[str, float], faith: Mapping[str, Any],
                             metrics: Sequence[str], batch_size: int,
                             device: torch.device) -> SeedValues:
    """One seed model's faithfulness per CAM method and finding: the mean over its own
    true positives among the test images (`labels` positive and `probabilities` >= that
    seed's val `thresholds`; the first ``faith["max_images"]``, findings limited to
    ``faith["findings"]``, as the single checkpoint's rows are), its maps made as the
    explain stage makes them (float16 storage form), scored by
    :func:`~xcam_assets.evaluate.faithfulness.faithfulness_values` with the ``evaluate.
    faithfulness`` settings `faith` and only the `metrics` named. No value when the seed
    has no true positive of a finding (the seed-mean row's ``n`` then counts the seeds that
    had one; fewer than two: no row). Parameter rows (AOPC grid and L) are left out."""
    findings = list(settings.findings)
    precision = precision_for(settings, arch, device, model)
    layers = target_layers(model, arch, settings.zoo)
    reshape = reshape_transform_for(arch, settings.zoo)
    cfg = {**faith, "metrics": list(metrics)}
    names = _faithfulness_names(metrics)
    out: SeedValues = {}
    for k, finding in enumerate(findings):
        if faith.get("findings") and finding not in faith["findings"]:
            continue
        tp = np.flatnonzero((labels[:, k] > 0) & (probabilities[:, k] >= thresholds[finding]))
        if faith.get("max_images") is not None:
            tp = tp[:int(faith["max_images"])]
        only = np.zeros((len(tp), len(findings)), dtype=bool)
        only[:, k] = True
        for method in methods:
            spec = parse_method(method)
            if spec.is_class_map and not hasattr(model, "class_maps"):
                continue
            if not len(tp):
                values: dict[str, np.ndarray] = {}
            else:
                maps = heatmap_stack(model, layers, images_u8[tp], spec, len(findings),
                                     batch_size=batch_size, reshape_transform=reshape,
                                     only=only, precision=precision)
                values = faithfulness_values(model, k, images_u8[tp].astype(np.float32) / 255.0,
                                             maps[:, k].astype(np.float32), thresholds[finding],
                                             cfg, seed=settings.seed, precision=precision)
            for name in names:
                arr = np.asarray(values.get(name, []), dtype=np.float64)
                arr = arr[np.isfinite(arr)]
                if len(arr):  # no true positive: no value for this seed
                    out[(spec.name, finding, name)] = float(arr.mean())
    return out


def _faithfulness_names(metrics: Sequence[str]) -> list[str]:
    """The table's metric names of the configured faithfulness metrics."""
    names = {"aopc": ["aopc"], "deletion": ["deletion_auc"], "insertion": ["insertion_auc"],
             "masked_out_area": ["masked_out_area"],
             "road": ["road_morf", "road_lerf", "road_combined"]}
    unknown = [m for m in metrics if m not in names]
    if unknown:
        raise ValueError(f"evaluate.seed_heatmaps.faithfulness: unknown metric(s) {unknown}; "
                         f"choose from {sorted(names)}")
    return [n for m in metrics for n in names[m]]


def seed_faithfulness_table(settings: Settings, arch: str, images_u8: np.ndarray,
                            labels: np.ndarray, keys: Sequence[str],
                            per_seed: Mapping[int, pl.DataFrame], cfg: Mapping[str, Any],
                            device: torch.device, log: Callable[[str], None] = print,
                            models: Iterable[tuple[int, nn.Module]] | None = None
                            ) -> tuple[dict[int, SeedValues], dict[str, Any]]:
    """Every kept seed's faithfulness values (:func:`seed_faithfulness_values`) and a
    record of what was scored. `per_seed`: :func:`seed_predictions` (each seed's own val
    thresholds and test probabilities come from it); `cfg`: the merged ``evaluate``
    section. Empty when per-seed scoring is disabled, no metric is named or no
    faithfulness metric is configured at all."""
    sh = cfg.get("seed_heatmaps") or {}
    faith = cfg.get("faithfulness") or {}
    metrics = list(sh.get("faithfulness", SEED_FAITHFULNESS_DEFAULT) or [])
    _faithfulness_names(metrics)  # a clear error for an unknown name
    if not sh.get("enabled", True) or not metrics or not faith.get("metrics"):
        return {}, {"enabled": False, "metrics": metrics}
    methods = seed_methods(settings.profile["cam_methods"], sh.get("methods"))
    batch = ExplainConfig.from_settings(settings).batch_size
    order = {k: i for i, k in enumerate(keys)}
    values: dict[int, SeedValues] = {}
    for seed, model in (seed_models(settings, arch, device) if models is None else models):
        t0 = time.perf_counter()
        preds = per_seed[seed]
        thresholds = thresholds_from_predictions(preds)
        prob = np.full(labels.shape, np.nan)
        test = preds.filter(pl.col("split") == "test")
        for k, finding in enumerate(settings.findings):
            t = test.filter(pl.col("finding") == finding)
            idx = [order[key] for key in t["image_key"].to_list()]
            prob[idx, k] = t["probability"].to_numpy()
        values[seed] = seed_faithfulness_values(settings, arch, model, methods, images_u8,
                                                labels, prob, thresholds, faith, metrics,
                                                batch, device)
        log(f"{arch}: seed {seed} faithfulness scored ({', '.join(metrics)}; "
            f"{time.perf_counter() - t0:.1f}s)")
    return values, {"enabled": True, "metrics": metrics, "methods": methods,
                    "images": "each seed's own true positives of the test split, capped at "
                              f"evaluate.faithfulness.max_images ({faith.get('max_images')})"}
