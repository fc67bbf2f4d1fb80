"""One architecture, N seeds: train each (resumably), summarise, pick the checkpoint.

Plain functions (no Dagster): the `checkpoints` asset calls `fit_architecture` and writes
the result. Seeds are `seed, seed+1, ...` (profile `seeds: N`, or an explicit list). With
N > 1 each seed's model is kept under `<arch>/seeds/seed-<s>/` and a re-run after a crash
reuses finished seeds (same fingerprint) and resumes the interrupted one from its last
completed epoch (`<arch>/_resume/seed-<s>.pt`). Under DDP every rank runs this and rank 0
alone writes. The checkpoint of record is the seed with
the lowest best validation loss (selection on validation data only); the validation AUC
and loss over seeds are reported as mean with a Student-t 95 % CI (PYLON's protocol).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xcam_assets.stats import t_confidence_interval
from xcam_assets.train import checkpoint as ckpt
from xcam_assets.train.loop import mean_auc, predict_logits, rank_and_world, train_classifier
from xcam_assets.train.precision import Precision
from xcam_assets.train.recipes import Recipe
from xcam_assets.train.zoo import build_model, head_prefixes, state_dict_hash

TRAIN_DIR = Path(__file__).resolve().parent


def seeds_for(profile: dict[str, Any], base_seed: int) -> list[int]:
    """`seeds: 5` -> [base, base+1, ..., base+4]; `seeds: [1, 2]` -> as given; default one."""
    raw = profile.get("seeds", 1)
    if isinstance(raw, list | tuple):
        seeds = [int(s) for s in raw]
    else:
        seeds = [base_seed + k for k in range(int(raw))]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a positive count or a list of distinct seeds, got {raw}")
    return seeds


def pretrained_for(raw: Any, arch: str, zoo_names: Collection[str]) -> bool | None:
    """What the profile's `pretrained` asks for `arch`, as `resolve_pretrained`'s flag.

    `true` / `false` (or absent): that flag, for every architecture, as ever. A list of
    zoo names (one study profile with pretrained models and a from-scratch contrast):
    True for a listed `arch`; None for the others, meaning from scratch with no weight
    file at all (neither the profile's nor the zoo entry's `pretrained_file`). A listed
    name the zoo does not know is an error (a typo must not train from scratch)."""
    if not isinstance(raw, list | tuple):
        return bool(raw)
    names = [str(a) for a in raw]
    unknown = sorted(set(names) - set(zoo_names))
    if unknown:
        raise ValueError(f"pretrained lists architectures the zoo does not know: {unknown} "
                         f"(known: {', '.join(sorted(zoo_names))})")
    return True if arch in names else None


def code_hash() -> str:
    """Digest of the training code: a resume state from other code is not resumed."""
    h = hashlib.sha256()
    for path in sorted(TRAIN_DIR.glob("*.py")):
        if path.name not in ("assets.py", "checks.py"):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def fingerprint(payload: dict[str, Any]) -> str:
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass
class SeedRun:
    seed: int
    val_auc: float
    val_loss: float
    best_epoch: int
    weights_sha256: str
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_epoch: int | None = None
    reused: bool = False


@dataclass
class FitOutcome:
    model: nn.Module
    primary: SeedRun
    runs: list[SeedRun]
    summary: dict[str, dict[str, float]]


def val_auc_of(model: nn.Module, x_val: np.ndarray, y_val: np.ndarray,
               device: torch.device, precision: Precision | None = None) -> float:
    """Mean val AUC in the precision the model trained and is explained in (the one its
    best epoch was chosen in)."""
    return mean_auc(y_val, predict_logits(model, x_val, device=device, precision=precision))


def seed_summary(runs: Sequence[SeedRun]) -> dict[str, dict[str, float]]:
    """Mean and t-based 95 % CI over seeds of the validation AUC and loss."""
    out = {}
    for metric in ("val_auc", "val_loss"):
        mean, low, high = t_confidence_interval([getattr(r, metric) for r in runs])
        out[metric] = {"mean": mean, "ci_low": low, "ci_high": high, "n": len(runs)}
    return out


def _nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def fit_architecture(
    arch: str,
    zoo: dict[str, dict[str, Any]],
    n_classes: int,
    x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray,
    *,
    recipe: Recipe,
    batch_size: int,
    seeds: list[int],
    image_size: int,
    out_dir: Path,
    device: torch.device,
    base_fingerprint: dict[str, Any],
    pretrained_file: Path | None = None,
    resume: bool = True,
    deterministic: bool = False,
    precision: Precision | None = None,
    init_checkpoint: Path | None = None,
    log: Callable[[str], None] = print,
) -> FitOutcome:
    """Train `arch` once per seed; return the lowest-val-loss model (on the CPU) and all runs."""
    runs: list[SeedRun] = []
    best_model: nn.Module | None = None
    keep_seeds = len(seeds) > 1
    rank, world = rank_and_world()
    for seed in seeds:
        fp = fingerprint({**base_fingerprint, "seed": seed, "code": code_hash(),
                          "processes": world})
        seed_dir = out_dir / "seeds" / f"seed-{seed}"
        model = None
        if keep_seeds and (seed_dir / "model.json").exists():
            done = json.loads((seed_dir / "model.json").read_text())
            if done.get("fingerprint") == fp:
                model = build_model(arch, zoo, n_classes, image_size=image_size)
                ckpt.load_checkpoint(seed_dir, model)
                kept = ("seed", "val_loss", "best_epoch", "weights_sha256", "history",
                        "resumed_from_epoch")
                run = SeedRun(val_auc=float("nan") if done["val_auc"] is None
                              else float(done["val_auc"]), reused=True,
                              **{k: done[k] for k in kept})
                log(f"[{arch} seed {seed}] already trained (same inputs): reused")
        if model is None:
            torch.manual_seed(seed)  # deterministic initialisation per seed
            model = build_model(arch, zoo, n_classes, image_size=image_size,
                                pretrained_file=pretrained_file)
            if init_checkpoint is not None:  # transfer: another study's weights
                ckpt.load_transfer_checkpoint(model, init_checkpoint, arch,
                                              head_prefixes(model, arch, zoo))
            resume_path = out_dir / "_resume" / f"seed-{seed}.pt" if resume else None
            result = train_classifier(
                model, x_tr, y_tr, x_va, y_va, batch_size=batch_size, seed=seed,
                log=lambda m, s=seed: log(f"[{arch} seed {s}] {m}"), device=device,
                recipe=recipe, heads=head_prefixes(model, arch, zoo),
                resume_path=resume_path, fingerprint=fp, deterministic=deterministic,
                precision=precision)
            model.cpu().to(memory_format=torch.contiguous_format)
            run = SeedRun(seed=seed, val_auc=val_auc_of(model, x_va, y_va, torch.device("cpu"),
                                                        precision),
                          val_loss=result.best_val_loss, best_epoch=result.best_epoch,
                          weights_sha256=state_dict_hash(model), history=result.history,
                          resumed_from_epoch=result.resumed_from_epoch)
            if keep_seeds and rank == 0:
                record = {**asdict(run), "val_auc": _nan_to_none(run.val_auc),
                          "architecture": arch, "fingerprint": fp, "image_size": image_size}
                record.pop("reused")
                ckpt.save_checkpoint(seed_dir, model, record)
            if rank == 0 and resume_path is not None and resume_path.exists():
                resume_path.unlink()
                if not any(resume_path.parent.iterdir()):
                    resume_path.parent.rmdir()
        runs.append(run)
        if best_model is None or run.val_loss < min(r.val_loss for r in runs[:-1]):
            best_model = model
        else:
            del model
    primary = min(runs, key=lambda r: (r.val_loss, seeds.index(r.seed)))
    assert best_model is not None
    return FitOutcome(model=best_model, primary=primary, runs=runs, summary=seed_summary(runs))
