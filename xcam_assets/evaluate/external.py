"""External validation without Dagster: the frozen checkpoints score the external cohort.

Regulators ask how a model performs on data from a site it never saw. Batches declared
external (`batch.yaml`, see `xcam_assets.ingest.batch_meta`) never enter the split; here
each architecture's checkpoint, unchanged, predicts them, and the diagnostic metrics are
computed at the threshold chosen on the internal validation split (as for the test split),
per finding and within each view, with bootstrap CIs that resample the external
patients (stratified by class). Rows carry `split = external`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from xcam_assets.atomic import atomic_write_parquet
from xcam_assets.config import Settings
from xcam_assets.evaluate.tables import CI_PATIENTS, diagnostic_table, to_frame, view_auc_rows
from xcam_assets.ingest.stage import union_inventory
from xcam_assets.preprocess.store import load_tensor_set
from xcam_assets.train.checkpoint import load_trained_model, read_sidecar
from xcam_assets.train.loop import predict_logits
from xcam_assets.train.stage import precision_for
from xcam_assets.train.zoo import pick_device

SPLIT = "external"


@dataclass
class ExternalOutcome:
    long: pl.DataFrame
    path: Path
    n_images: int
    weights_sha256: dict[str, str]


def score_external(settings: Settings, log: Callable[[str], None] = print) -> ExternalOutcome:
    """Predictions (`external_scores/predictions_<arch>.parquet`) and the metric rows
    (`external_scores/metric_table.parquet`) of every profile architecture on the
    external cohort; an empty cohort gives an empty table."""
    cohort = pl.read_parquet(settings.external_path).sort("image_key")
    out = settings.external_scores_dir
    keys = cohort["image_key"].to_list()
    rows: list[dict] = []
    hashes: dict[str, str] = {}
    if keys:
        images = load_tensor_set(settings.tensors_dir, keys).images
        y = cohort.select([f"y_{f}" for f in settings.findings]).to_numpy()
        views = dict(union_inventory(settings).select("image_key", "view_position").iter_rows())
        n_boot = int(settings.profile["n_boot"])
        patients = dict(cohort.select("image_key", "patient_key").iter_rows())
        device = pick_device()
        for arch in settings.architectures:
            model = load_trained_model(settings, arch, device)
            hashes[arch] = _weights_sha256(settings, arch)
            precision = precision_for(settings, arch, device, model)  # as the internal predictions
            prob = 1.0 / (1.0 + np.exp(-predict_logits(model, images, device=device,
                                                        precision=precision)))
            ext = pl.concat([pl.DataFrame({
                "image_key": keys, "split": SPLIT, "finding": finding,
                "label": y[:, k].astype(np.int8), "probability": prob[:, k].astype(np.float64)})
                for k, finding in enumerate(settings.findings)])
            atomic_write_parquet(out / f"predictions_{arch}.parquet", ext)
            val = (pl.read_parquet(settings.heatmaps_dir / arch / "predictions.parquet")
                   .filter(pl.col("split") == "val"))
            preds = pl.concat([val, ext.select(val.columns)])
            rows += diagnostic_table(arch, preds, n_boot=n_boot, seed=settings.seed,
                                     split=SPLIT, patients=patients)
            rows += view_auc_rows(arch, preds, views, settings.findings[0], n_boot=n_boot,
                                  seed=settings.seed, split=SPLIT, patients=patients)
            log(f"{arch}: scored {len(keys)} external image(s)")
    long = to_frame(rows, split=SPLIT, ci_method=CI_PATIENTS)
    path = out / "metric_table.parquet"
    atomic_write_parquet(path, long)
    return ExternalOutcome(long=long, path=path, n_images=len(keys), weights_sha256=hashes)


def _weights_sha256(settings: Settings, arch: str) -> str:
    return str(read_sidecar(settings.checkpoints_dir / arch)["weights_sha256"])
