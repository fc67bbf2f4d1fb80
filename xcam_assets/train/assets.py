"""Train stage: one checkpoint per architecture partition (every zoo entry is a partition;
`xcam materialize train` runs the active profile's `architectures`)."""

import math

import dagster as dg
import numpy as np
import polars as pl

from xcam_assets.hashing import combine_hashes, dvc_data_version, sha256_file
from xcam_assets.ingest.assets import cohort_splits
from xcam_assets.preprocess.assets import clahe_tensors
from xcam_assets.preprocess.store import load_tensor_set
from xcam_assets.provenance import environment, git_commit, package_versions
from xcam_assets.resources import XcamConfig, architecture_partitions
from xcam_assets.train.checkpoint import read_sidecar, save_checkpoint
from xcam_assets.train.distributed import ddp_command
from xcam_assets.train.fit import FitOutcome, fit_architecture, seeds_for
from xcam_assets.train.loop import rank_and_world
from xcam_assets.train.recipes import Recipe, recipe_from_profile
from xcam_assets.train.zoo import pick_device, resolve_pretrained, zoo_entry

GROUP = "train"
arch_partitions = architecture_partitions()


def split_arrays(s, split: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(keys, images uint8 (N,S,S), labels (N,F), regions (N,F,S,S)) for one split."""
    frame = pl.read_parquet(s.splits_path).filter(pl.col("split") == split).sort("image_key")
    keys = frame["image_key"].to_list()
    ts = load_tensor_set(s.tensors_dir, keys)
    y = frame.select([f"y_{f}" for f in s.findings]).to_numpy().astype(np.float32)
    return keys, ts.images, y, ts.regions


def tensors_version(s) -> str:
    return combine_hashes((p.parent.name, sha256_file(p))
                          for p in s.tensors_dir.glob("*/manifest.parquet"))


def _finite(d: dict) -> dict:
    """NaN -> None (JSON metadata has no NaN)."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in d.items()}


def _fmt_ci(summary: dict) -> str:
    m = summary
    if m["n"] < 2:
        return f"{m['mean']:.3f} (one seed: no CI)"
    return f"{m['mean']:.3f} (95% t-CI {m['ci_low']:.3f} to {m['ci_high']:.3f}, {m['n']} seeds)"


def describe_recipe(recipe: Recipe) -> str:
    parts = []
    for p in recipe.phases:
        what = "head only (backbone frozen)" if p.freeze_backbone else "all layers"
        sched = {"constant": "constant LR",
                 "plateau": (f"LR x{p.plateau_factor:g} after {p.plateau_patience} epochs without "
                             f"val-loss improvement, stop after reduction "
                             f"{p.stop_after_reductions}"),
                 "one_cycle": "one-cycle LR"}[p.schedule]
        parts.append(f"phase `{p.name}`: {what}, {p.optimizer} lr {p.lr:g} wd {p.weight_decay:g}, "
                     f"{sched}, at most {p.epochs} epochs")
    aug = recipe.augment
    augs = (f"rotation +-{aug.rotation_deg:g} deg, hflip {aug.hflip}, vflip {aug.vflip}, "
            f"noise sd {aug.noise_std:g}" if aug.enabled else "none")
    return (f"recipe `{recipe.name}`; " + "; ".join(parts)
            + f". Class balance: {recipe.balance}. Augmentation: {augs}.")


def model_card(arch: str, s, outcome: FitOutcome, recipe: Recipe, pretrained: str | None,
               n: dict[str, int]) -> str:
    entry = s.zoo[arch]
    run = outcome.primary
    init = f"pretrained weights `{pretrained}`" if pretrained else "from scratch (random init)"
    return f"""# Model card: {arch} ({', '.join(s.findings)})

**Intended use**: research on explainable chest X-ray classification with xcam;
heatmap-trust evaluation. Not a medical device; not for clinical decisions.

**Model**: `{entry.get('builder', 'timm')}` / timm `{entry['timm_name']}`, {len(s.findings)}
sigmoid output(s) (multi-label BCE), 1 input channel, {init}. CAM target
`{entry['target_layer']}`{'; own class maps (`pylon` CAM method)' if entry.get('builder') == 'pylon' else ''}.

**Data**: cohort under `{s.data_dir.name}/` (profile `{s.profile_name}`), patient-level
splits: train {n['train']} / val {n['val']} images. Input {s.image_size} px, CLAHE clip
{s.clahe['clip_limit']} tiles {s.clahe['tile_grid']}.

**Training**: {describe_recipe(recipe)} Batch {s.profile['batch_size']}; seeds
{', '.join(str(r.seed) for r in outcome.runs)}; this checkpoint: seed {run.seed}
(lowest validation loss), best epoch {run.best_epoch} of {len(run.history)}.

**Performance (validation)**: AUC {run.val_auc:.3f} for this checkpoint; over seeds
{_fmt_ci(outcome.summary['val_auc'])}. Test-split metrics with bootstrap CIs are in
`metric_tables`.

**Limitations**: small cohorts give wide intervals; the embedded demo cohort is synthetic;
heatmaps must be judged with the localization and faithfulness metrics before trusting them.
"""


def train_and_save(s, arch: str, log=print, device=None) -> None:
    """Train `arch` by the active profile and write its checkpoint (weights, sidecar, card).

    The body of the `checkpoints` asset, also run by every rank of a DDP launch
    (`xcam_assets.train.distributed`), where rank 0 alone writes."""
    prof = s.profile
    entry = zoo_entry(arch, s.zoo)
    recipe = recipe_from_profile(prof)
    seeds = seeds_for(prof, s.seed)
    pretrained = resolve_pretrained(arch, s.zoo, pretrained=bool(prof.get("pretrained", False)),
                                    pretrained_file=prof.get("pretrained_file"),
                                    pretrained_dir=prof.get("pretrained_dir"), root=s.root)
    _, x_tr, y_tr, _ = split_arrays(s, "train")
    _, x_va, y_va, _ = split_arrays(s, "val")
    device = device or pick_device()
    rank, world = rank_and_world()
    data_versions = {"clahe_tensors": tensors_version(s),
                     "cohort_splits": sha256_file(s.splits_path)}
    base_fp = {"architecture": arch, "zoo_entry": entry, "recipe": recipe.to_dict(),
               "batch_size": int(prof["batch_size"]), "image_size": s.image_size,
               "findings": s.findings, "data_versions": data_versions,
               "pretrained": sha256_file(pretrained) if pretrained else None}
    log(f"training {arch} on {device}" + (f" x {world} processes (DDP)" if world > 1 else "")
        + f": {len(x_tr)} train / {len(x_va)} val images, recipe {recipe.name}, seeds {seeds}, "
        f"{'pretrained ' + str(pretrained) if pretrained else 'from scratch'}")
    out = s.checkpoints_dir / arch
    outcome = fit_architecture(
        arch, s.zoo, len(s.findings), x_tr, y_tr, x_va, y_va, recipe=recipe,
        batch_size=int(prof["batch_size"]), seeds=seeds, image_size=s.image_size, out_dir=out,
        device=device, base_fingerprint=base_fp, pretrained_file=pretrained,
        resume=bool(prof.get("resume", True)), deterministic=bool(prof.get("deterministic", False)),
        log=log)
    if rank != 0:
        return
    run = outcome.primary
    sidecar = {
        "architecture": arch, "timm_name": entry["timm_name"],
        "builder": entry.get("builder", "timm"), "findings": s.findings,
        "profile": s.profile_name, "parameters": prof, "recipe": recipe.to_dict(),
        "clahe": s.clahe, "seed": run.seed, "seeds": [r.seed for r in outcome.runs],
        "seed_runs": [{"seed": r.seed, "val_auc": r.val_auc, "val_loss": r.val_loss,
                       "best_epoch": r.best_epoch, "weights_sha256": r.weights_sha256,
                       "resumed_from_epoch": r.resumed_from_epoch, "reused": r.reused}
                      for r in outcome.runs],
        "seed_summary": outcome.summary,
        "image_size": s.image_size, "in_chans": int(entry.get("in_chans", 1)),
        "target_layer": entry["target_layer"],
        "reshape_transform": entry.get("reshape_transform"),
        "class_maps": entry.get("builder") == "pylon",
        "pretrained": ({"file": str(pretrained), "sha256": base_fp["pretrained"]}
                       if pretrained else None),
        "best_epoch": run.best_epoch, "history": run.history, "val_auc": run.val_auc,
        "val_loss": run.val_loss, "resumed_from_epoch": run.resumed_from_epoch,
        "weights_sha256": run.weights_sha256, "data_versions": data_versions,
        "git_commit": git_commit(s.root), "packages": package_versions(),
        "environment": environment(), "device": str(device), "processes": world,
    }
    card = model_card(arch, s, outcome, recipe, str(pretrained) if pretrained else None,
                      {"train": len(x_tr), "val": len(x_va)})
    save_checkpoint(out, outcome.model, sidecar, card)


def checkpoint_result(s, arch: str) -> dg.MaterializeResult:
    """The materialization of a written checkpoint, from its sidecar and model card: the
    same metadata whether this process or a DDP launch trained it."""
    out = s.checkpoints_dir / arch
    side = read_sidecar(out)
    card = (out / "model_card.md").read_text()
    seed_table = pl.DataFrame([{k: v for k, v in r.items() if k != "weights_sha256"}
                               for r in side["seed_runs"]]).to_pandas()
    val_auc = side["seed_summary"]["val_auc"]
    return dg.MaterializeResult(
        metadata={"val_auc": side["val_auc"], "best_epoch": side["best_epoch"],
                  "seed": side["seed"], "recipe": side["recipe"]["name"],
                  "n_seeds": len(side["seeds"]), "processes": side.get("processes", 1),
                  "val_auc_mean": val_auc["mean"],
                  "val_auc_ci": dg.MetadataValue.json(_finite(val_auc)),
                  "weights_sha256": side["weights_sha256"],
                  "history": dg.MetadataValue.md(
                      pl.DataFrame(side["history"]).to_pandas().to_markdown(index=False)),
                  "seeds": dg.MetadataValue.md(seed_table.to_markdown(index=False)),
                  "model_card": dg.MetadataValue.md(card),
                  "path": dg.MetadataValue.path(str(out))},
        data_version=dg.DataVersion(dvc_data_version(out)),
    )


@dg.asset(partitions_def=arch_partitions, group_name=GROUP, code_version="2",
          deps=[cohort_splits, dg.AssetDep(clahe_tensors, partition_mapping=dg.AllPartitionMapping())],
          kinds={"pytorch"})
def checkpoints(context: dg.AssetExecutionContext, xcam: XcamConfig) -> dg.MaterializeResult:
    """A classifier of the zoo trained on the train split by the profile's recipe, once per
    seed; the lowest-val-loss seed is the checkpoint (best epoch by validation loss).

    Saved as safetensors + JSON sidecar (provenance) + markdown model card. Resumes an
    interrupted run from its last completed epoch. With `ddp_processes: N` in the profile
    the training runs as N DDP processes under torchrun, launched through Dagster Pipes
    (their logs stream into this run)."""
    s = xcam.settings()
    arch = context.partition_key
    processes = int(s.profile.get("ddp_processes", 1))
    if processes > 1:
        dg.PipesSubprocessClient(cwd=str(s.root)).run(
            context=context, command=ddp_command(s, arch, processes, study=xcam.study))
    else:
        train_and_save(s, arch, context.log.info)
    return checkpoint_result(s, arch)
