"""Explain stage: test-split predictions and CAM heatmaps per architecture."""

import io

import cv2
import dagster as dg
import numpy as np
import polars as pl

from xcam_assets.explain.cams import compute_heatmaps
from xcam_assets.explain.overlays import montage, png_markdown
from xcam_assets.hashing import atomic_path, atomic_write_parquet, combine_hashes, sha256_file
from xcam_assets.resources import XcamConfig
from xcam_assets.train.assets import arch_partitions, checkpoints, split_arrays
from xcam_assets.train.checkpoint import load_checkpoint
from xcam_assets.train.loop import predict_logits
from xcam_assets.train.zoo import build_model, pick_device, target_layers

GROUP = "explain"


def method_file(method: str) -> str:
    return method.replace("+", "p") + ".npy"


@dg.asset(partitions_def=arch_partitions, group_name=GROUP, code_version="1",
          deps=[checkpoints], kinds={"pytorch"})
def heatmap_sets(context: dg.AssetExecutionContext, xcam: XcamConfig) -> dg.MaterializeResult:
    """Per test image, finding and configured CAM method: a heatmap in [0, 1] at input
    size (float16, `heatmaps/<arch>/<method>.npy` (N, F, S, S)), plus the model's
    probabilities on the val and test splits (`predictions.parquet`)."""
    s = xcam.settings()
    arch = context.partition_key
    device = pick_device()
    model = build_model(arch, s.zoo, n_classes=len(s.findings))
    load_checkpoint(s.checkpoints_dir / arch, model)
    model.to(device)
    out = s.heatmaps_dir / arch
    preds = []
    for split in ("val", "test"):
        keys, x, y, _ = split_arrays(s, split)
        prob = 1.0 / (1.0 + np.exp(-predict_logits(model, x, device=device)))
        for k, finding in enumerate(s.findings):
            preds.append(pl.DataFrame({"image_key": keys, "split": split, "finding": finding,
                                       "label": y[:, k].astype(np.int8),
                                       "probability": prob[:, k].astype(np.float64)}))
    atomic_write_parquet(out / "predictions.parquet", pl.concat(preds))
    keys, x_te, y_te, _ = split_arrays(s, "test")
    layers = target_layers(model, arch, s.zoo)
    methods = list(s.profile["cam_methods"])
    metadata: dict = {}
    hashes = [("predictions", sha256_file(out / "predictions.parquet"))]
    for method in methods:
        maps = np.zeros((len(keys), len(s.findings), *x_te.shape[1:]), dtype=np.float16)
        for k in range(len(s.findings)):
            maps[:, k] = compute_heatmaps(model, layers, x_te, method, k,
                                          batch_size=int(s.profile["batch_size"]))
        with atomic_path(out / method_file(method), suffix=".npy") as tmp:
            buf = io.BytesIO()
            np.save(buf, maps)
            tmp.write_bytes(buf.getvalue())
        hashes.append((method, sha256_file(out / method_file(method))))
        pos = [i for i in range(len(keys)) if y_te[i].max() > 0][:4]
        pic = montage([x_te[i] for i in pos], [maps[i, 0].astype(np.float32) for i in pos])
        cv2.imwrite(str(out / f"montage_{method_file(method)[:-4]}.png"), pic)
        metadata[f"montage_{method}"] = dg.MetadataValue.md(
            png_markdown(pic, f"{arch} {method}: positives, alpha 0 / 0.3 / 0.6"))
        context.log.info(f"{method}: {len(keys)} heatmaps")
    atomic_write_parquet(out / "heatmap_manifest.parquet",
                         pl.DataFrame({"image_key": keys, "row": list(range(len(keys)))}))
    return dg.MaterializeResult(
        metadata={"n_test_images": len(keys), "methods": methods,
                  "path": dg.MetadataValue.path(str(out)), **metadata},
        data_version=dg.DataVersion(combine_hashes(hashes)),
    )
