"""Train stage: one checkpoint per architecture partition."""

import dagster as dg
import numpy as np
import polars as pl
import torch

from xcam_assets.evaluate.diagnostic import roc_auc
from xcam_assets.hashing import combine_hashes, sha256_file
from xcam_assets.ingest.assets import cohort_splits
from xcam_assets.preprocess.assets import clahe_tensors
from xcam_assets.preprocess.store import load_tensor_set
from xcam_assets.provenance import environment, git_commit, package_versions
from xcam_assets.resources import XcamConfig, architecture_partitions
from xcam_assets.train.checkpoint import save_checkpoint
from xcam_assets.train.loop import predict_logits, train_classifier
from xcam_assets.train.zoo import build_model, pick_device, state_dict_hash

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


def model_card(arch: str, s, history: list[dict], val_auc: float, n: dict[str, int]) -> str:
    best = min(history, key=lambda r: r["val_loss"])
    return f"""# Model card: {arch} ({', '.join(s.findings)})

**Intended use**: research on explainable chest X-ray classification with xcam;
heatmap-trust evaluation. Not a medical device; not for clinical decisions.

**Data**: cohort under `{s.data_dir.name}/` (profile `{s.profile_name}`), patient-level
splits: train {n['train']} / val {n['val']} images. Input {s.image_size} px, 1 channel,
CLAHE clip {s.clahe['clip_limit']} tiles {s.clahe['tile_grid']}.

**Training**: timm `{s.zoo[arch]['timm_name']}` from scratch, AdamW lr {s.profile['lr']},
{s.profile['epochs']} epochs, batch {s.profile['batch_size']}, seed {s.seed};
best epoch {best['epoch']} by validation loss.

**Performance (validation)**: AUC {val_auc:.3f} (test-split metrics with bootstrap CIs
are in `metric_tables`).

**Limitations**: small cohort; the embedded demo cohort is synthetic; heatmaps must be
judged with the localization and faithfulness metrics before trusting them.
"""


@dg.asset(partitions_def=arch_partitions, group_name=GROUP, code_version="1",
          deps=[cohort_splits, dg.AssetDep(clahe_tensors, partition_mapping=dg.AllPartitionMapping())],
          kinds={"pytorch"})
def checkpoints(context: dg.AssetExecutionContext, xcam: XcamConfig) -> dg.MaterializeResult:
    """A timm classifier trained on the train split; best weights by validation loss.

    Saved as safetensors + JSON sidecar (provenance) + markdown model card."""
    s = xcam.settings()
    arch = context.partition_key
    prof = s.profile
    _, x_tr, y_tr, _ = split_arrays(s, "train")
    _, x_va, y_va, _ = split_arrays(s, "val")
    device = pick_device()
    torch.manual_seed(s.seed)
    model = build_model(arch, s.zoo, n_classes=len(s.findings),
                        pretrained_file=prof.get("pretrained_file"))
    context.log.info(f"training {arch} on {device}: {len(x_tr)} train / {len(x_va)} val images")
    result = train_classifier(model, x_tr, y_tr, x_va, y_va, epochs=int(prof["epochs"]),
                              batch_size=int(prof["batch_size"]), lr=float(prof["lr"]),
                              seed=s.seed, log=context.log.info, device=device)
    logits = predict_logits(model, x_va, device=device)
    val_auc = float(np.nanmean([roc_auc(y_va[:, k], logits[:, k])
                                for k in range(y_va.shape[1])]))
    weights_hash = state_dict_hash(model)
    sidecar = {
        "architecture": arch, "timm_name": s.zoo[arch]["timm_name"], "findings": s.findings,
        "profile": s.profile_name, "parameters": prof, "clahe": s.clahe, "seed": s.seed,
        "image_size": s.image_size, "in_chans": 1, "best_epoch": result.best_epoch,
        "history": result.history, "val_auc": val_auc, "weights_sha256": weights_hash,
        "data_versions": {"clahe_tensors": tensors_version(s),
                          "cohort_splits": sha256_file(s.splits_path)},
        "git_commit": git_commit(s.root), "packages": package_versions(),
        "environment": environment(), "device": str(device),
    }
    card = model_card(arch, s, result.history, val_auc, {"train": len(x_tr), "val": len(x_va)})
    out = s.checkpoints_dir / arch
    save_checkpoint(out, model.cpu(), sidecar, card)
    return dg.MaterializeResult(
        metadata={"val_auc": val_auc, "best_epoch": result.best_epoch,
                  "weights_sha256": weights_hash,
                  "history": dg.MetadataValue.md(
                      pl.DataFrame(result.history).to_pandas().to_markdown(index=False)),
                  "model_card": dg.MetadataValue.md(card),
                  "path": dg.MetadataValue.path(str(out))},
        data_version=dg.DataVersion(sha256_file(out / "model.safetensors")),
    )
