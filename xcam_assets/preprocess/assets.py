"""Preprocess stage: each ingested DICOM -> CLAHE tensor at the profile's size."""

import base64
import os

import cv2
import dagster as dg
import numpy as np

from xcam_assets.hashing import dvc_data_version
from xcam_assets.ingest.assets import dicom_inventory, findings
from xcam_assets.ingest.dicom import decode_u8
from xcam_assets.preprocess.pipeline import (
    PREPROCESS_VERSION,
    batch_jobs,
    preprocess_batch,
    preprocess_params,
)
from xcam_assets.project import XcamProject, batch_partitions

GROUP = "preprocess"


def preview_markdown(before: list[np.ndarray], after: list[np.ndarray], size: int = 160) -> str:
    """Before/after strip as an inline PNG so the UI shows what CLAHE did."""
    tiles = [np.vstack([cv2.resize(b, (size, size)), cv2.resize(a, (size, size))])
             for b, a in zip(before, after, strict=True)]
    ok, png = cv2.imencode(".png", np.hstack(tiles))
    return ("top: decoded input, bottom: CLAHE tensor\n\n"
            f"![preview](data:image/png;base64,{base64.b64encode(png.tobytes()).decode()})")


@dg.asset(partitions_def=batch_partitions, group_name=GROUP, code_version=PREPROCESS_VERSION,
          deps=[dicom_inventory, findings], kinds={"numpy", "opencv"})
def clahe_tensors(context: dg.AssetExecutionContext, xcam: XcamProject) -> dg.MaterializeResult:
    """decode -> modality/VOI LUT -> MONOCHROME1 inversion -> 8-bit -> CLAHE -> pad/resize.

    Shards `data/tensors/<batch>/images.npy` (N, S, S) uint8 and `regions.npy`
    (N, F, S, S) ground-truth masks per finding, plus `manifest.parquet`. Images whose
    source, labels and parameters are unchanged are reused, not recomputed."""
    s = xcam.settings()
    batch = context.partition_key
    params = preprocess_params(s)
    jobs = batch_jobs(s, batch)
    workers = int(s.params.get("preprocess", {}).get("workers", 0)) or (os.cpu_count() or 1)
    out_dir = s.tensors_dir / batch
    outcome = preprocess_batch(jobs, params, out_dir, batch, s.raw_dir / batch,
                               workers=workers, log=context.log.info)
    context.log.info(f"{outcome.computed} image(s) computed, {outcome.reused} reused "
                     f"in {outcome.seconds:.1f}s")
    images = np.load(out_dir / "images.npy", mmap_mode="r")
    before = [decode_u8(j.path) for j in jobs[:4]]
    return dg.MaterializeResult(
        metadata={"n_images": len(jobs), "computed": outcome.computed, "reused": outcome.reused,
                  "shape": list(images.shape), "clahe": dg.MetadataValue.json(s.clahe),
                  "image_size": s.image_size, "params_hash": params.digest(),
                  "images_per_s": outcome.computed / max(outcome.seconds, 1e-9),
                  "preview": dg.MetadataValue.md(
                      preview_markdown(before, [np.asarray(images[i]) for i in range(len(before))]))
                  if before else "no images",
                  "path": dg.MetadataValue.path(str(out_dir))},
        data_version=dg.DataVersion(dvc_data_version(out_dir)),
    )
