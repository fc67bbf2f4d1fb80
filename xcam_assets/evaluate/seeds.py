"""Per-seed predictions for the seed-level statistics of the metric table.

A profile with ``seeds: N > 1`` trains every seed and keeps each seed's model under
``checkpoints/<arch>/seeds/seed-<s>/`` (xcam_assets.train.fit); the checkpoint of record
(the lowest validation loss) is the one the heatmaps and the bootstrap rows use. Here each
kept seed model predicts the val and test splits, so the evaluate stage can report every
diagnostic metric as a mean over seeds with a Student-t 95% CI across seeds
(:func:`xcam_assets.evaluate.tables.seed_rows`), PYLON's protocol. Heatmap metrics are not
computed per seed (the explain stage makes heatmaps of the checkpoint of record only).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl
import torch

from xcam_assets.config import Settings
from xcam_assets.train.checkpoint import load_checkpoint, read_sidecar
from xcam_assets.train.loop import predict_logits
from xcam_assets.train.zoo import build_model, state_dict_hash


class StaleSeeds(RuntimeError):
    """A seed listed by the checkpoint of record is missing or is not the model trained."""


def seed_dir(settings: Settings, arch: str, seed: int) -> Path:
    return settings.checkpoints_dir / arch / "seeds" / f"seed-{seed}"


def trained_seeds(settings: Settings, arch: str) -> list[int]:
    """The seeds the architecture's checkpoint of record was chosen from (one: none kept)."""
    return [int(s) for s in read_sidecar(settings.checkpoints_dir / arch).get("seeds", [])]


def seed_predictions(settings: Settings, arch: str, splits: Mapping[str, tuple],
                     device: torch.device, log: Callable[[str], None] = print
                     ) -> dict[int, pl.DataFrame]:
    """Seed -> that seed's model's probabilities on `splits` (name -> the
    ``split_arrays`` tuple ``(keys, images, labels, regions)``), in the format of the
    explain stage's ``predictions.parquet``. Empty when the checkpoint was trained with
    one seed. Each seed model must hash to the ``weights_sha256`` the checkpoint of record
    lists for it (``seed_runs``), else :class:`StaleSeeds`."""
    side = read_sidecar(settings.checkpoints_dir / arch)
    runs = side.get("seed_runs") or []
    if len(runs) < 2:
        return {}
    out: dict[int, pl.DataFrame] = {}
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
        model = model.to(device).eval()
        out[seed] = predictions_frame(model, settings.findings, splits, device)
        del model
        log(f"{arch}: seed {seed} predicted")
    return out


def predictions_frame(model: torch.nn.Module, findings: Sequence[str],
                      splits: Mapping[str, tuple], device: torch.device) -> pl.DataFrame:
    """`image_key, split, finding, label, probability` of `model` on `splits`."""
    frames = []
    for split, (keys, x, y, _) in splits.items():
        prob = 1.0 / (1.0 + np.exp(-predict_logits(model, x, device=device)))
        for k, finding in enumerate(findings):
            frames.append(pl.DataFrame({"image_key": list(keys), "split": split,
                                        "finding": finding,
                                        "label": np.asarray(y)[:, k].astype(np.int8),
                                        "probability": prob[:, k].astype(np.float64)}))
    return pl.concat(frames)
