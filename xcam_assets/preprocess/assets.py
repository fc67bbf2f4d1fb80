"""Preprocess stage: each ingested DICOM -> CLAHE tensor at the profile's size."""

import base64
import json
import time

import cv2
import dagster as dg
import numpy as np
import polars as pl

from xcam_assets.hashing import combine_hashes
from xcam_assets.ingest.assets import dicom_inventory, findings
from xcam_assets.ingest.dicom import decode_unit, to_uint8
from xcam_assets.preprocess.clahe import clahe_tensor
from xcam_assets.preprocess.store import write_batch_tensors
from xcam_assets.resources import XcamConfig, batch_partitions

GROUP = "preprocess"


def _region(row_boxes: list, mask_file: str | None, raw_batch, geom, size: int) -> np.ndarray:
    region = np.zeros((size, size), dtype=bool)
    for b in row_boxes or []:
        x0, y0, x1, y1 = geom.boxes(np.array([[b["x_min"], b["y_min"],
                                                b["x_max"], b["y_max"]]]))[0]
        region[int(np.floor(y0)):int(np.ceil(y1)), int(np.floor(x0)):int(np.ceil(x1))] = True
    if mask_file:
        mask = cv2.imread(str(raw_batch / mask_file), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise ValueError(f"mask {raw_batch / mask_file} cannot be read")
        region |= geom.mask(mask > 0)
    return region


def preview_markdown(before: list[np.ndarray], after: list[np.ndarray], size: int = 160) -> str:
    """Before/after strip as an inline PNG so the UI shows what CLAHE did."""
    tiles = [np.vstack([cv2.resize(b, (size, size)), cv2.resize(a, (size, size))])
             for b, a in zip(before, after, strict=True)]
    ok, png = cv2.imencode(".png", np.hstack(tiles))
    return ("top: decoded input, bottom: CLAHE tensor\n\n"
            f"![preview](data:image/png;base64,{base64.b64encode(png.tobytes()).decode()})")


@dg.asset(partitions_def=batch_partitions, group_name=GROUP, code_version="1",
          deps=[dicom_inventory, findings], kinds={"numpy", "opencv"})
def clahe_tensors(context: dg.AssetExecutionContext, xcam: XcamConfig) -> dg.MaterializeResult:
    """decode -> modality/VOI LUT -> MONOCHROME1 inversion -> 8-bit -> CLAHE -> pad/resize.

    Shards `data/tensors/<batch>/images.npy` (N, S, S) uint8 and `regions.npy`
    (N, F, S, S) ground-truth masks per finding, plus `manifest.parquet`."""
    s = xcam.settings()
    batch = context.partition_key
    p = s.clahe
    size = s.image_size
    params_hash = s.section_hash("clahe")
    inv = (pl.read_parquet(s.inventory_dir / f"{batch}.parquet")
           .filter(pl.col("status") == "ok").sort("file"))
    fnd = pl.read_parquet(s.findings_dir / f"{batch}.parquet").filter(pl.col("status") == "ok")
    raw_batch = s.raw_dir / batch
    images = np.zeros((inv.height, size, size), dtype=np.uint8)
    regions = np.zeros((inv.height, len(s.findings), size, size), dtype=np.uint8)
    rows, before, after = [], [], []
    t0 = time.perf_counter()
    for i, rec in enumerate(inv.iter_rows(named=True)):
        unit = decode_unit(raw_batch / rec["file"])
        u8 = to_uint8(unit)
        tensor, geom = clahe_tensor(u8, p["clip_limit"], p["tile_grid"], size, p["pad_to_square"])
        images[i] = tensor
        boxes_out: dict[str, list] = {}
        for k, finding in enumerate(s.findings):
            lab = fnd.filter((pl.col("image_key") == rec["image_key"])
                             & (pl.col("finding") == finding) & pl.col("present"))
            for lrow in lab.iter_rows(named=True):
                regions[i, k] |= _region(lrow["boxes"], lrow["mask_file"], raw_batch, geom,
                                         size).astype(np.uint8)
                boxes_out.setdefault(finding, []).extend(
                    geom.boxes(np.array([[b["x_min"], b["y_min"], b["x_max"], b["y_max"]]
                                         for b in lrow["boxes"] or []]).reshape(-1, 4)).tolist())
        rows.append({"image_key": rec["image_key"], "row": i, "batch": batch,
                     "file": rec["file"], "source_sha256": rec["sha256"],
                     "params_hash": params_hash, "height": size, "width": size,
                     "boxes_json": json.dumps(boxes_out, sort_keys=True)})
        if len(before) < 4:
            before.append(u8)
            after.append(tensor)
        if (i + 1) % 100 == 0:
            context.log.info(f"{i + 1}/{inv.height} images, "
                             f"{(i + 1) / (time.perf_counter() - t0):.0f} images/s")
    manifest = pl.DataFrame(rows, schema={
        "image_key": pl.String, "row": pl.Int64, "batch": pl.String, "file": pl.String,
        "source_sha256": pl.String, "params_hash": pl.String, "height": pl.Int64,
        "width": pl.Int64, "boxes_json": pl.String})
    out_dir = s.tensors_dir / batch
    manifest = write_batch_tensors(out_dir, images, regions, manifest)
    elapsed = time.perf_counter() - t0
    version = combine_hashes([("images", manifest["images_sha256"][0] if manifest.height else ""),
                              ("regions", manifest["regions_sha256"][0] if manifest.height else ""),
                              ("params", params_hash)])
    return dg.MaterializeResult(
        metadata={"n_images": inv.height, "shape": list(images.shape),
                  "clahe": dg.MetadataValue.json(p), "image_size": size,
                  "images_per_s": inv.height / max(elapsed, 1e-9),
                  "preview": dg.MetadataValue.md(preview_markdown(before, after))
                  if before else "no images",
                  "path": dg.MetadataValue.path(str(out_dir))},
        data_version=dg.DataVersion(version),
    )
