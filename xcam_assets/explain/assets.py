"""Explain stage: test-split predictions and CAM heatmaps per architecture."""

import io
import json
import time

import dagster as dg
import numpy as np
import polars as pl

from xcam_assets.explain.cams import heatmap_stack, parse_method, reshape_transform_for
from xcam_assets.explain.overlays import encode_png, montage, overlay, png_markdown
from xcam_assets.hashing import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_parquet,
    dvc_data_version,
    sha256_file,
)
from xcam_assets.resources import XcamConfig
from xcam_assets.train.assets import arch_partitions, checkpoints, split_arrays
from xcam_assets.train.checkpoint import load_checkpoint
from xcam_assets.train.loop import predict_logits
from xcam_assets.train.zoo import build_model, pick_device, target_layers

GROUP = "explain"
SIDECAR = "heatmaps.json"
EXPLAIN_DEFAULTS = {"overlay_alphas": [0.3, 0.5, 0.7], "n_overlays": 4, "batch_size": None}


def method_file(method: str) -> str:
    """`gradcam++` -> `gradcampp.npy` (the stored heatmaps of a configured method)."""
    return parse_method(method).key + ".npy"


def explain_config(s) -> dict:
    """`explain:` of params.yaml over the defaults; batch size defaults to the profile's."""
    cfg = {**EXPLAIN_DEFAULTS, **(s.params.get("explain") or {}),
           **(s.profile.get("explain") or {})}
    cfg["batch_size"] = int(cfg["batch_size"] or s.profile["batch_size"])
    return cfg


def read_sidecar(out) -> dict:
    """The heatmap set's sidecar (`heatmaps/<arch>/heatmaps.json`)."""
    return json.loads((out / SIDECAR).read_text())


def load_trained_model(s, arch: str, device):
    """The architecture's checkpoint in eval mode on `device`, built at the image size it
    was trained at (ViT position embeddings are sized for it; recorded in model.json)."""
    ckpt = s.checkpoints_dir / arch
    size = json.loads((ckpt / "model.json").read_text()).get("image_size", s.image_size)
    model = build_model(arch, s.zoo, n_classes=len(s.findings), image_size=int(size))
    load_checkpoint(ckpt, model)
    return model.to(device).eval()


def _save_npy(path, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        buf = io.BytesIO()
        np.save(buf, array)
        tmp.write_bytes(buf.getvalue())


@dg.asset(partitions_def=arch_partitions, group_name=GROUP, code_version="2",
          deps=[checkpoints], kinds={"pytorch"})
def heatmap_sets(context: dg.AssetExecutionContext, xcam: XcamConfig) -> dg.MaterializeResult:
    """Per test image, finding and configured CAM method: a heatmap in [0, 1] at input
    size (float16, `heatmaps/<arch>/<method>.npy` (N, F, S, S), rows in the order of
    `heatmap_manifest.parquet`), the model's probabilities on the val and test splits
    (`predictions.parquet`), a sidecar `heatmaps.json` (methods, target layers, hashes,
    speed), overlay PNGs at several alpha levels (`overlays/<method>/`) and a montage per
    method (`montage_<method>.png`)."""
    s = xcam.settings()
    arch = context.partition_key
    cfg = explain_config(s)
    device = pick_device()
    model = load_trained_model(s, arch, device)
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
    reshape = reshape_transform_for(arch, s.zoo)
    manifest = pl.DataFrame({"image_key": keys, "row": list(range(len(keys))),
                             **{f"y_{f}": y_te[:, k].astype(np.int8)
                                for k, f in enumerate(s.findings)}})
    atomic_write_parquet(out / "heatmap_manifest.parquet", manifest)
    metadata: dict = {}
    methods: dict[str, dict] = {}
    alphas = tuple(float(a) for a in cfg["overlay_alphas"])
    for method in s.profile["cam_methods"]:
        spec = parse_method(method)
        if spec.is_class_map and not hasattr(model, "class_maps"):
            methods[spec.name] = {"status": "skipped", "base": spec.base, "relu": spec.relu,
                                  "reason": f"{arch} has no class_maps() (not a PYLON model)"}
            context.log.info(f"{spec.name}: skipped for {arch} (no class maps)")
            continue
        t0 = time.perf_counter()
        maps = heatmap_stack(model, layers, x_te, spec, len(s.findings),
                             batch_size=cfg["batch_size"], reshape_transform=reshape)
        seconds = time.perf_counter() - t0
        path = out / f"{spec.key}.npy"
        _save_npy(path, maps)
        digest = sha256_file(path)
        methods[spec.name] = {"status": "ok", "file": path.name, "sha256": digest,
                              "base": spec.base, "relu": spec.relu, "shape": list(maps.shape),
                              "dtype": "float16", "seconds": round(seconds, 3),
                              "heatmaps_per_s": round(maps.shape[0] * maps.shape[1]
                                                      / max(seconds, 1e-9), 2)}
        # overlays and montage: the first positives of each finding
        tiles, captions = [], []
        for k, finding in enumerate(s.findings):
            pos = [i for i in range(len(keys)) if y_te[i, k] > 0][:int(cfg["n_overlays"])]
            for i in pos:
                heat = maps[i, k].astype(np.float32)
                for a in alphas:
                    png = encode_png(overlay(x_te[i], heat, a))
                    atomic_write_bytes(out / "overlays" / spec.key /
                                       f"{keys[i]}_{finding}_a{int(round(a * 100)):03d}.png", png)
                tiles.append((x_te[i], heat))
                captions.append(f"{keys[i][:10]} {finding}")
        pic = montage([t[0] for t in tiles], [t[1] for t in tiles], alphas=(0.0, *alphas),
                      captions=captions)
        atomic_write_bytes(out / f"montage_{spec.key}.png", encode_png(pic))
        metadata[f"montage_{spec.name}"] = dg.MetadataValue.md(
            png_markdown(pic, f"{arch} {spec.name}: positives, alpha 0 / "
                              + " / ".join(f"{a:g}" for a in alphas)))
        context.log.info(f"{spec.name}: {maps.shape[0]} x {maps.shape[1]} heatmaps in "
                         f"{seconds:.1f}s")
    layer_names = s.zoo[arch]["target_layer"]
    atomic_write_json(out / SIDECAR, {
        "architecture": arch, "findings": s.findings, "image_size": s.image_size,
        "n_images": len(keys), "target_layers": layer_names if isinstance(layer_names, list)
        else [layer_names], "reshape_transform": s.zoo[arch].get("reshape_transform"),
        "batch_size": cfg["batch_size"], "overlay_alphas": list(alphas), "methods": methods,
        "device": str(device)})
    return dg.MaterializeResult(
        metadata={"n_test_images": len(keys),
                  "methods": [m for m, v in methods.items() if v["status"] == "ok"],
                  "skipped": {m: v["reason"] for m, v in methods.items()
                              if v["status"] != "ok"},
                  "heatmaps_per_s": {m: v["heatmaps_per_s"] for m, v in methods.items()
                                     if v["status"] == "ok"},
                  "path": dg.MetadataValue.path(str(out)), **metadata},
        data_version=dg.DataVersion(dvc_data_version(out)),
    )
