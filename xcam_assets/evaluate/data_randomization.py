"""Issue #18: the data randomization test of Adebayo et al. 2018 (opt-in), glue without
Dagster. The science (label permutation, map comparison, verdict) is in :mod:`.sanity`.

Switched on by ``evaluate.randomization.data.enabled`` (resources/params.yaml; default off).
**Cost**: one more training run per architecture, about the cost of the original training
at the same epochs (``epochs`` caps it), plus two heatmap calls per CAM method for
``max_images`` test images.

The permuted-label model is trained by the train stage's own functions
(:func:`~xcam_assets.train.fit.fit_architecture`, the architecture's training profile and
recipe, its pretrained / transfer initialisation, the training seed of the checkpoint of
record), on the train split with its label rows permuted (seed :func:`permutation_seed`)
and the val split's too (seed + 1), so that model selection has no real signal either.

It is cached under ``data/data_randomized/<arch>/`` (weights + ``model.json`` sidecar with
its fingerprint): a re-run with the same original checkpoint, recipe, epoch cap and
permutation seed reuses it (:func:`~xcam_assets.train.stage.checkpoint_is_current`).
Not under ``checkpoints/<arch>/``: that folder is the `checkpoints` asset's output, whose
data version is the DVC hash of the whole folder, so writing into it from the evaluate
stage would make `xcam audit` and DVC see the recorded checkpoint as altered. The cache is
not versioned (``data/.gitignore``); its fingerprint, weights sha256 and seeds are recorded
in ``metrics/metric_table.json`` (``data_randomization``).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xcam_assets.config import Settings
from xcam_assets.evaluate.beyond import _mean_row, _param_row, positives_for
from xcam_assets.evaluate.sanity import data_randomization_test, permute_labels
from xcam_assets.explain.cams import MethodSpec, compute_heatmaps, reshape_transform_for
from xcam_assets.preprocess.store import split_arrays
from xcam_assets.train.checkpoint import load_checkpoint, read_sidecar, save_checkpoint
from xcam_assets.train.fit import fingerprint, fit_architecture, pretrained_for
from xcam_assets.train.recipes import recipe_from_profile
from xcam_assets.train.stage import checkpoint_is_current, init_checkpoint_dir, precision_for
from xcam_assets.train.zoo import build_model, resolve_pretrained, target_layers

__all__ = ["DATA_DEFAULTS", "PermutedModel", "data_config", "data_randomization_table",
           "data_randomized_dir", "permutation_seed", "permuted_label_model"]

#: defaults of ``evaluate.randomization.data``; ``max_spearman`` None = the model
#: randomization test's ``max_spearman``; ``seed`` None = derived from the profile seed
DATA_DEFAULTS: dict[str, Any] = {"enabled": False, "epochs": None, "max_images": 4,
                                 "max_spearman": None, "seed": None}

#: bump when the permutation rule changes: cached permuted-label models are then retrained
PERMUTATION_VERSION = 1
DIR_NAME = "data_randomized"


def data_config(randomization: Mapping[str, Any]) -> dict[str, Any]:
    """``evaluate.randomization.data`` over :data:`DATA_DEFAULTS`, ``max_spearman``
    resolved (the model randomization test's threshold unless set)."""
    cfg = {**DATA_DEFAULTS, **dict(randomization.get("data") or {})}
    if cfg["max_spearman"] is None:
        cfg["max_spearman"] = float(randomization.get("max_spearman", 0.5))
    return cfg


def permutation_seed(base_seed: int, cfg: Mapping[str, Any]) -> int:
    """The train labels' permutation seed: ``cfg["seed"]``, else one derived from the
    profile seed (a fixed offset, so it differs from the training seeds); val uses + 1."""
    if cfg.get("seed") is not None:
        return int(cfg["seed"])
    return (int(base_seed) * 1_000_003 + zlib.crc32(b"data_randomization")) % 2**31


def data_randomized_dir(settings: Settings, arch: str) -> Path:
    """Where `arch`'s permuted-label model is cached (module docstring)."""
    return settings.data_dir / DIR_NAME / arch


@dataclass
class PermutedModel:
    """The permuted-label model (eval mode, on the evaluate device) and its provenance
    (stable across re-runs: it goes into metric_table.json); ``reused`` / ``train_s`` say
    whether this call trained it and how long that took."""

    model: nn.Module
    record: dict[str, Any]
    reused: bool = False
    train_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def _capped_profile(prof: Mapping[str, Any], epochs: int | None) -> dict[str, Any]:
    """The training profile with every phase's epochs capped at `epochs` (None: as is)."""
    out = dict(prof)
    if epochs is not None:
        for key in ("epochs", "phase1_epochs"):
            if out.get(key) is not None:
                out[key] = min(int(epochs), int(out[key]))
    return out


def permuted_label_model(settings: Settings, arch: str, cfg: Mapping[str, Any],
                         device: torch.device, log: Callable[[str], None] = print
                         ) -> PermutedModel:
    """`arch` trained by its profile's recipe on permuted train / val labels (module
    docstring), or the cached one when its fingerprint matches. ``cfg``: :func:`data_config`.
    Needs the architecture's checkpoint of record (its training seed and fingerprint)."""
    original = read_sidecar(settings.checkpoints_dir / arch)
    prof = _capped_profile(settings.training_profile(arch), cfg.get("epochs"))
    recipe = recipe_from_profile(prof)
    seed = int(original["seed"])
    perm = permutation_seed(settings.seed, cfg)
    n_classes = len(settings.findings)
    out = data_randomized_dir(settings, arch)
    # the original's training fingerprint covers data, zoo entry, recipe, batch, image
    # size, findings, initialisation, precision, seeds and training code
    training_fp = fingerprint({
        "data_randomization": PERMUTATION_VERSION,
        "original_training_fingerprint": original.get("training_fingerprint")
        or original.get("weights_sha256"),
        "recipe": recipe.to_dict(), "seed": seed, "permutation_seed": perm,
        "val_permutation_seed": perm + 1})
    record = {"architecture": arch, "path": out.relative_to(settings.data_dir).as_posix(),
              "training_fingerprint": training_fp,
              "training_seed": seed, "permutation_seed": perm,
              "val_permutation_seed": perm + 1,
              "original_weights_sha256": original.get("weights_sha256")}
    if checkpoint_is_current(out, training_fp):
        model = build_model(arch, settings.zoo, n_classes, image_size=settings.image_size)
        side = load_checkpoint(out, model)
        log(f"{arch}: permuted-label model up to date (same original checkpoint, recipe and "
            f"permutation seed {perm}): reused")
        return PermutedModel(model=model.to(device).eval(),
                             record={**record, "weights_sha256": side["weights_sha256"],
                                     "epochs": side["epochs"]},
                             reused=True, history=side.get("history", []))
    use_pretrained = pretrained_for(prof.get("pretrained", False), arch, settings.zoo)
    pretrained = None if use_pretrained is None else resolve_pretrained(
        arch, settings.zoo, pretrained=use_pretrained, pretrained_file=prof.get("pretrained_file"),
        pretrained_dir=prof.get("pretrained_dir"), root=settings.root)
    _, x_tr, y_tr, _ = split_arrays(settings, "train")
    _, x_va, y_va, _ = split_arrays(settings, "val")
    precision = precision_for(settings, arch, device)
    log(f"data randomization test: training {arch} on permuted labels (seed {perm}), "
        f"{len(x_tr)} train / {len(x_va)} val images, recipe {recipe.name}, "
        f"at most {prof['epochs']} epochs, training seed {seed}")
    t0 = time.perf_counter()
    outcome = fit_architecture(
        arch, settings.zoo, n_classes, x_tr, permute_labels(y_tr, perm), x_va,
        permute_labels(y_va, perm + 1), recipe=recipe, batch_size=int(prof["batch_size"]),
        seeds=[seed], image_size=settings.image_size, out_dir=out, device=device,
        base_fingerprint={"data_randomization": training_fp}, pretrained_file=pretrained,
        resume=bool(prof.get("resume", True)), deterministic=bool(prof.get("deterministic", False)),
        precision=precision, init_checkpoint=init_checkpoint_dir(settings, arch),
        log=lambda m: log(f"[permuted labels] {m}"))
    train_s = time.perf_counter() - t0
    run = outcome.primary
    record = {**record, "weights_sha256": run.weights_sha256, "epochs": len(run.history)}
    sidecar = {**record, "findings": settings.findings, "image_size": settings.image_size,
               "recipe": recipe.to_dict(), "best_epoch": run.best_epoch,
               "val_auc_permuted_labels": None if np.isnan(run.val_auc) else run.val_auc,
               "val_loss_permuted_labels": run.val_loss, "history": run.history,
               "train_s": round(train_s, 2), **precision.record()}
    card = (f"# Permuted-label model: {arch}\n\nTrained on the train split with its labels "
            f"randomly permuted (seed {perm}; val labels seed {perm + 1}) for the data "
            "randomization test (Adebayo et al. 2018). It has learnt nothing about the "
            "findings: never use it for predictions.\n")
    save_checkpoint(out, outcome.model, sidecar, card)
    return PermutedModel(model=outcome.model.to(device).eval(), record=record,
                         train_s=train_s, history=run.history)


def data_randomization_table(arch: str, spec: MethodSpec, model: nn.Module,
                             permuted: nn.Module, zoo: Mapping[str, Any], x_test: np.ndarray,
                             y_test: np.ndarray, findings: Sequence[str],
                             cfg: Mapping[str, Any], n_boot: int, seed: int,
                             groups: np.ndarray | None = None, epochs: int | None = None
                             ) -> list[dict]:
    """The data randomization test of one architecture x CAM method on the first
    ``cfg["max_images"]`` test images positive for the first finding (fp32 heatmaps from
    the explain stage's target layers): rows ``data_randomization_spearman`` /
    ``data_randomization_ssim`` (mean similarity of the original and the permuted-label
    model's maps, patient-bootstrap CI over the images), the verdict
    ``data_randomization_test_failed`` (1 = the maps survived the labels' permutation),
    its threshold ``data_randomization_max_spearman`` and ``data_randomization_epochs``
    (the epochs the permuted-label model trained). ``cfg``: :func:`data_config`."""
    sel = positives_for(y_test, 0, int(cfg["max_images"]))
    if not len(sel):
        return []
    reshape = reshape_transform_for(arch, dict(zoo))

    def heat(m: nn.Module) -> np.ndarray:
        return compute_heatmaps(m, target_layers(m, arch, zoo), x_test[sel], spec, 0,
                                reshape_transform=reshape)

    res = data_randomization_test(heat(model), heat(permuted))
    name, finding, n = spec.name, findings[0], len(sel)
    g = None if groups is None else np.asarray(groups)[sel]
    rows = (_mean_row(arch, name, finding, "data_randomization_spearman", res.spearman,
                      n_boot, seed, g)
            + _mean_row(arch, name, finding, "data_randomization_ssim", res.ssim, n_boot,
                        seed, g))
    if not rows:
        return []  # every original map blank: nothing to compare
    max_spearman = float(cfg["max_spearman"])
    rows += [_param_row(arch, name, finding, "data_randomization_test_failed",
                        float(res.failed(max_spearman)), n),
             _param_row(arch, name, finding, "data_randomization_max_spearman", max_spearman,
                        n)]
    if epochs is not None:
        rows.append(_param_row(arch, name, finding, "data_randomization_epochs", epochs, n))
    return rows
