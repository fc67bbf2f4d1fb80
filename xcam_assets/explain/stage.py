"""The explain stage's run, without Dagster: test-split predictions and CAM heatmaps of
one trained architecture, with overlays, montages and a provenance sidecar."""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from xcam_assets.atomic import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_parquet,
)
from xcam_assets.config import Settings
from xcam_assets.explain.cams import heatmap_stack, parse_method, reshape_transform_for
from xcam_assets.explain.overlays import encode_png, montage, overlay
from xcam_assets.hashing import sha256_file
from xcam_assets.preprocess.store import split_arrays, tensors_version
from xcam_assets.train.checkpoint import load_trained_model
from xcam_assets.train.checkpoint import read_sidecar as read_checkpoint_sidecar
from xcam_assets.train.fit import code_hash, fingerprint
from xcam_assets.train.loop import predict_logits
from xcam_assets.train.precision import Precision
from xcam_assets.train.stage import precision_for
from xcam_assets.train.zoo import pick_device, target_layers, zoo_entry

SIDECAR = "heatmaps.json"
EXPLAIN_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ExplainConfig:
    """`explain:` of params.yaml and the profile, read once: overlay alphas, how many
    positives get overlays per finding, the CAM batch size and the CAM methods."""

    cam_methods: tuple[str, ...]
    batch_size: int
    overlay_alphas: tuple[float, ...] = (0.3, 0.5, 0.7)
    n_overlays: int = 4
    positives_only: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> ExplainConfig:
        """Profile `explain:` over params.yaml `explain:` over the defaults; the batch size
        defaults to the profile's training batch size."""
        cfg = {**(settings.params.get("explain") or {}), **(settings.profile.get("explain") or {})}
        return cls(cam_methods=tuple(settings.profile["cam_methods"]),
                   batch_size=int(cfg.get("batch_size") or settings.profile["batch_size"]),
                   overlay_alphas=tuple(float(a) for a in cfg.get("overlay_alphas",
                                                                  cls.overlay_alphas)),
                   n_overlays=int(cfg.get("n_overlays", cls.n_overlays)),
                   positives_only=bool(cfg.get("positives_only", False)))


@dataclass
class ExplainOutcome:
    """What a heatmap set holds: per method its sidecar entry, and per made method a
    montage of positives (the image array, or its PNG bytes when the set was kept, and its
    caption) for the UI."""

    out: Path
    n_images: int
    methods: dict[str, dict[str, Any]]
    montages: dict[str, tuple[np.ndarray | bytes, str]] = field(default_factory=dict)


def read_sidecar(out: Path) -> dict:
    """The heatmap set's sidecar (`heatmaps/<arch>/heatmaps.json`)."""
    return json.loads((out / SIDECAR).read_text())


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        buf = io.BytesIO()
        np.save(buf, array)
        tmp.write_bytes(buf.getvalue())


def write_predictions(settings: Settings, model: Any, device: Any, out: Path,
                      precision: Precision | None = None) -> None:
    """The model's probabilities on the val and test splits (`predictions.parquet`)."""
    preds = []
    for split in ("val", "test"):
        keys, x, y, _ = split_arrays(settings, split)
        prob = 1.0 / (1.0 + np.exp(-predict_logits(model, x, device=device,
                                                    precision=precision)))
        for k, finding in enumerate(settings.findings):
            preds.append(pl.DataFrame({"image_key": keys, "split": split, "finding": finding,
                                       "label": y[:, k].astype(np.int8),
                                       "probability": prob[:, k].astype(np.float64)}))
    atomic_write_parquet(out / "predictions.parquet", pl.concat(preds))


def write_overlays(out: Path, key: str, findings: list[str], keys: list[str], x: np.ndarray,
                   y: np.ndarray, maps: np.ndarray, cfg: ExplainConfig) -> np.ndarray:
    """Overlay PNGs of the first positives of each finding at every alpha, and their
    montage (`montage_<key>.png`); returns the montage."""
    tiles, captions = [], []
    for k, finding in enumerate(findings):
        pos = [i for i in range(len(keys)) if y[i, k] > 0][:cfg.n_overlays]
        for i in pos:
            heat = maps[i, k].astype(np.float32)
            for a in cfg.overlay_alphas:
                atomic_write_bytes(out / "overlays" / key /
                                   f"{keys[i]}_{finding}_a{int(round(a * 100)):03d}.png",
                                   encode_png(overlay(x[i], heat, a)))
            tiles.append((x[i], heat))
            captions.append(f"{keys[i][:10]} {finding}")
    pic = montage([t[0] for t in tiles], [t[1] for t in tiles],
                  alphas=(0.0, *cfg.overlay_alphas), captions=captions)
    atomic_write_bytes(out / f"montage_{key}.png", encode_png(pic))
    return pic


def explain_code_hash() -> str:
    """Digest of the code a heatmap set is made by: the explain stage (its Dagster asset
    module aside) and the training code that builds and runs the model (precision rule,
    zoo)."""
    h = hashlib.sha256(code_hash().encode())
    for path in sorted(EXPLAIN_DIR.glob("*.py")):
        if path.name != "assets.py":
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def explain_fingerprint(settings: Settings, arch: str, cfg: ExplainConfig) -> str:
    """What a heatmap set is made from: the checkpoint of record (its weights hash and
    training fingerprint), the val and test images' tensors and the splits file, the
    explain settings, findings, image size, precision setting and code."""
    ckpt = read_checkpoint_sidecar(settings.checkpoints_dir / arch)
    splits = pl.read_parquet(settings.splits_path, columns=["image_key", "split"])
    keys = splits.filter(pl.col("split").is_in(["val", "test"]))["image_key"].to_list()
    return fingerprint({
        "architecture": arch, "weights_sha256": ckpt.get("weights_sha256"),
        "training_fingerprint": ckpt.get("training_fingerprint"),
        "tensors": tensors_version(settings, keys), "splits": sha256_file(settings.splits_path),
        "explain": asdict(cfg), "findings": list(settings.findings),
        "image_size": settings.image_size, "precision_setting": settings.precision,
        "code": explain_code_hash()})


def current_heatmap_set(out: Path, explain_fp: str) -> ExplainOutcome | None:
    """The heatmap set in `out` when it was made from exactly these inputs (`explain_fp`)
    and every file its sidecar names is there; else None. Re-materializing then keeps it
    as it is (its data version does not move), as `checkpoint_is_current` keeps a
    checkpoint: an external batch or a re-run costs no CAM pass."""
    try:
        side = read_sidecar(out)
    except (OSError, ValueError):
        return None
    if side.get("explain_fingerprint") != explain_fp:
        return None
    needed = [out / "predictions.parquet", out / "heatmap_manifest.parquet"]
    for info in side["methods"].values():
        if info.get("status") == "ok":
            needed += [out / info["file"], out / info["peaks_file"]]
    if not all(p.is_file() for p in needed):
        return None
    outcome = ExplainOutcome(out=out, n_images=int(side["n_images"]), methods=side["methods"])
    for name, info in side["methods"].items():
        png = out / f"montage_{info['file'][:-len('.npy')]}.png" if info.get("file") else None
        if png is not None and png.is_file():
            outcome.montages[name] = (png.read_bytes(), montage_caption(
                side["architecture"], name, side.get("overlay_alphas", [])))
    return outcome


def montage_caption(arch: str, method: str, alphas: Sequence[float]) -> str:
    return f"{arch} {method}: positives, alpha 0 / " + " / ".join(f"{a:g}" for a in alphas)


def explain_architecture(settings: Settings, arch: str,
                         log: Callable[[str], None] = print) -> ExplainOutcome:
    """Per test image, finding and configured CAM method: a heatmap in [0, 1] at input
    size (float16, `heatmaps/<arch>/<method>.npy` (N, F, S, S), rows in the order of
    `heatmap_manifest.parquet`), predictions, overlays, montages and the sidecar. A set
    made from the same checkpoint, images, settings and code is kept as it is
    (:func:`current_heatmap_set`)."""
    cfg = ExplainConfig.from_settings(settings)
    out = settings.heatmaps_dir / arch
    explain_fp = explain_fingerprint(settings, arch, cfg)
    kept = current_heatmap_set(out, explain_fp)
    if kept is not None:
        log(f"{arch}: heatmap set up to date (same checkpoint, images, methods and code): "
            "kept as is")
        return kept
    device = pick_device()
    model = load_trained_model(settings, arch, device)
    precision = precision_for(settings, arch, device, model)
    write_predictions(settings, model, device, out, precision)
    keys, x_te, y_te, _ = split_arrays(settings, "test")
    layers = target_layers(model, arch, settings.zoo)
    reshape = reshape_transform_for(arch, settings.zoo)
    atomic_write_parquet(out / "heatmap_manifest.parquet", pl.DataFrame(
        {"image_key": keys, "row": list(range(len(keys))),
         **{f"y_{f}": y_te[:, k].astype(np.int8) for k, f in enumerate(settings.findings)}}))
    outcome = ExplainOutcome(out=out, n_images=len(keys), methods={})
    for method in cfg.cam_methods:
        spec = parse_method(method)
        if spec.is_class_map and not hasattr(model, "class_maps"):
            outcome.methods[spec.name] = {
                "status": "skipped", "base": spec.base, "relu": spec.relu,
                "reason": f"{arch} has no class_maps() (not a PYLON model)"}
            log(f"{spec.name}: skipped for {arch} (no class maps)")
            continue
        t0 = time.perf_counter()
        peaks = np.zeros((*y_te.shape, 2), dtype=np.int32)
        maps = heatmap_stack(model, layers, x_te, spec, len(settings.findings),
                             batch_size=cfg.batch_size, reshape_transform=reshape,
                             only=(y_te > 0) if cfg.positives_only else None, peaks=peaks,
                             precision=precision)
        seconds = time.perf_counter() - t0
        path = out / f"{spec.key}.npy"
        _save_npy(path, maps)
        _save_npy(out / f"{spec.key}_peaks.npy", peaks)
        outcome.methods[spec.name] = {
            "status": "ok", "file": path.name, "sha256": sha256_file(path),
            "peaks_file": f"{spec.key}_peaks.npy", "positives_only": cfg.positives_only,
            "base": spec.base,
            "relu": spec.relu, "shape": list(maps.shape), "dtype": "float16",
            "seconds": round(seconds, 3),
            "heatmaps_per_s": round((int((y_te > 0).sum()) if cfg.positives_only
                                     else maps.shape[0] * maps.shape[1]) / max(seconds, 1e-9),
                                    2)}
        pic = write_overlays(out, spec.key, settings.findings, keys, x_te, y_te, maps, cfg)
        outcome.montages[spec.name] = (pic, montage_caption(arch, spec.name, cfg.overlay_alphas))
        log(f"{spec.name}: {maps.shape[0]} x {maps.shape[1]} heatmaps in {seconds:.1f}s")
    entry = zoo_entry(arch, settings.zoo)
    atomic_write_json(out / SIDECAR, {
        "architecture": arch, "findings": settings.findings, "image_size": settings.image_size,
        "n_images": len(keys),
        "target_layers": list(entry.target_layers),
        "reshape_transform": entry.reshape_transform, "batch_size": cfg.batch_size,
        "overlay_alphas": list(cfg.overlay_alphas), "methods": outcome.methods,
        "device": str(device), **precision.record(), "precision_setting": settings.precision,
        "explain_fingerprint": explain_fp})
    return outcome
