"""The preprocessing stage as a plain function: jobs in, shards + manifest out.

Content-addressed reuse: an image whose source sha256, labels and parameters
hash match a row of the batch's existing (verified) manifest is copied, not
recomputed. The rest is spread over worker processes (forkserver) that write
straight into memory-mapped temporary shards; the shards are renamed into
place and the manifest, which records their sha256, is written last. A run
killed at any point leaves either the old consistent set or files that
`store.verify_batch` rejects.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import polars as pl

from xcam_assets.atomic import atomic_write_parquet, remove_stale_temps, temp_path
from xcam_assets.config import Settings
from xcam_assets.hashing import sha256_file
from xcam_assets.ingest.dicom import decode_u8
from xcam_assets.preprocess.clahe import clahe_tensor
from xcam_assets.preprocess.store import verify_batch

#: bump when the computation changes in a way parameters do not capture
PREPROCESS_VERSION = "1"

MANIFEST_SCHEMA = {
    "image_key": pl.String, "row": pl.Int64, "batch": pl.String, "file": pl.String,
    "source_sha256": pl.String, "labels_sha256": pl.String, "params_hash": pl.String,
    "height": pl.Int64, "width": pl.Int64, "boxes_json": pl.String,
}


@dataclass(frozen=True)
class PreprocessParams:
    clip_limit: float
    tile_grid: int
    size: int
    pad_to_square: bool
    findings: tuple[str, ...]

    def digest(self) -> str:
        blob = json.dumps({**asdict(self), "version": PREPROCESS_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ImageJob:
    """One image to preprocess; `labels` maps finding -> (boxes, mask paths)."""

    image_key: str
    path: Path
    file: str
    source_sha256: str
    labels: dict[str, tuple[tuple[tuple[float, float, float, float], ...], tuple[str, ...]]]

    def labels_digest(self) -> str:
        blob = json.dumps(self.labels, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class BatchOutcome:
    manifest: pl.DataFrame
    computed: int
    reused: int
    seconds: float
    rewritten: bool
    failures: list[str] = field(default_factory=list)


def process_image(job: ImageJob, params: PreprocessParams,
                  base_dir: Path) -> tuple[np.ndarray, np.ndarray, dict[str, list]]:
    """decode -> 8-bit -> CLAHE -> pad/resize, plus each finding's region and boxes."""
    u8 = decode_u8(job.path)
    tensor, geom = clahe_tensor(u8, params.clip_limit, params.tile_grid, params.size,
                                params.pad_to_square)
    regions = np.zeros((len(params.findings), params.size, params.size), dtype=np.uint8)
    boxes_out: dict[str, list] = {}
    for k, finding in enumerate(params.findings):
        boxes, masks = job.labels.get(finding, ((), ()))
        if boxes:
            tb = geom.boxes(np.asarray(boxes, dtype=np.float64))
            boxes_out[finding] = np.round(tb, 3).tolist()
            for x0, y0, x1, y1 in tb:
                regions[k, int(np.floor(y0)):int(np.ceil(y1)),
                        int(np.floor(x0)):int(np.ceil(x1))] = 1
        for mask_file in masks:
            mask = cv2.imread(str(base_dir / mask_file), cv2.IMREAD_GRAYSCALE)
            if mask is None:
                raise ValueError(f"mask {base_dir / mask_file} cannot be read")
            regions[k] |= geom.mask(mask > 0).astype(np.uint8)
    return tensor, regions, boxes_out


# -- worker side: a long-lived pool per process; each chunk maps the temp shards -------
_POOLS: dict[int, object] = {}


def _worker_init() -> None:
    cv2.setNumThreads(1)


def _worker_chunk(task: tuple[str, str, PreprocessParams, Path, list[tuple[int, ImageJob]]]
                  ) -> list[tuple[int, str | None, str]]:
    """Compute a chunk's rows straight into the batch's temp shards.

    The shards are mapped per chunk and dropped at return (mapping costs microseconds):
    a long-lived worker then never holds a map of a file that has since been renamed
    to its final name.
    """
    images_path, regions_path, params, base_dir, chunk = task
    images = np.load(images_path, mmap_mode="r+")
    regions_out = np.load(regions_path, mmap_mode="r+")
    out = []
    for row, job in chunk:
        try:
            tensor, regions, boxes = process_image(job, params, base_dir)
        except Exception as exc:  # reported per image, the batch goes on
            out.append((row, None, f"{job.file}: {exc}"))
            continue
        images[row] = tensor
        regions_out[row] = regions
        out.append((row, json.dumps(boxes, sort_keys=True), ""))
    # no msync per chunk: a MAP_SHARED write is in the page cache, which survives a
    # killed process; a torn file after power loss fails the manifest's sha256
    del images, regions_out
    return out


@contextmanager
def _entry_script_hidden() -> Iterator[None]:
    """Start processes without the entry script.

    A forkserver (or spawn) child imports the parent's `__main__` before its task: for
    a Dagster step process that is the whole dagster CLI, and a user's script without an
    `if __name__ == "__main__":` guard would run again in every worker (and, calling
    xcam, start pools from inside the forkserver: "An attempt has been made to start a
    new process before the current process has finished its bootstrapping phase").
    The workers' tasks need only this module, so `__main__` is hidden while they start,
    as for an interactive session."""
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def _pool(workers: int):
    """A pool kept for the life of the process: starting workers costs more than a batch.

    forkserver, not fork: forking a multithreaded process (torch, polars, dagster
    threads) can deadlock a child on a lock held at fork time. The server and the
    workers start without the entry script (`_entry_script_hidden`).
    """
    pool = _POOLS.get(workers)
    if pool is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["xcam_assets.preprocess.pipeline"])
        with _entry_script_hidden():
            pool = _POOLS[workers] = ctx.Pool(workers, initializer=_worker_init)
        atexit.register(pool.terminate)
    return pool


def _reusable(out_dir: Path, params_hash: str) -> dict[tuple[str, str, str], int]:
    """(image_key, source_sha256, labels_sha256) -> row of a verified previous manifest."""
    manifest_path = out_dir / "manifest.parquet"
    if not manifest_path.exists() or verify_batch(out_dir):
        return {}
    old = pl.read_parquet(manifest_path)
    if "labels_sha256" not in old.columns:
        return {}
    old = old.filter(pl.col("params_hash") == params_hash)
    return {(k, s, lab): r for k, s, lab, r in
            zip(old["image_key"], old["source_sha256"], old["labels_sha256"], old["row"],
                strict=True)}


def preprocess_batch(
    jobs: list[ImageJob],
    params: PreprocessParams,
    out_dir: Path,
    batch: str,
    base_dir: Path,
    workers: int = 1,
    log: Callable[[str], None] = print,
    chunk_size: int = 32,
) -> BatchOutcome:
    """Preprocess one batch into `out_dir` (images.npy, regions.npy, manifest.parquet)."""
    t0 = time.perf_counter()
    params_hash = params.digest()
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir, recursive=False)  # temp shards of a killed run
    reuse = _reusable(out_dir, params_hash)
    keys = [(j.image_key, j.source_sha256, j.labels_digest()) for j in jobs]
    old_rows = [reuse.get(k) for k in keys]
    if jobs and all(r == i for i, r in enumerate(old_rows)) and len(reuse) == len(jobs):
        manifest = pl.read_parquet(out_dir / "manifest.parquet")
        return BatchOutcome(manifest, computed=0, reused=len(jobs),
                            seconds=time.perf_counter() - t0, rewritten=False)

    n, s, f = len(jobs), params.size, len(params.findings)
    tmp_images = temp_path(out_dir / "images.npy")
    tmp_regions = temp_path(out_dir / "regions.npy")
    try:
        images = np.lib.format.open_memmap(tmp_images, mode="w+", dtype=np.uint8,
                                           shape=(n, s, s))
        regions = np.lib.format.open_memmap(tmp_regions, mode="w+", dtype=np.uint8,
                                            shape=(n, f, s, s))
        boxes_json: list[str | None] = [None] * n
        todo: list[tuple[int, ImageJob]] = []
        if any(r is not None for r in old_rows):
            old_images = np.load(out_dir / "images.npy", mmap_mode="r")
            old_regions = np.load(out_dir / "regions.npy", mmap_mode="r")
            old_manifest = pl.read_parquet(out_dir / "manifest.parquet").sort("row")
            old_boxes = old_manifest["boxes_json"].to_list()
        for i, (job, old) in enumerate(zip(jobs, old_rows, strict=True)):
            if old is None:
                todo.append((i, job))
            else:
                images[i] = old_images[old]
                regions[i] = old_regions[old]
                boxes_json[i] = old_boxes[old]
        images.flush()
        regions.flush()
        del images, regions
        failures: list[str] = []
        # small batches still spread over every worker: about 4 chunks per worker
        size = max(1, min(chunk_size, -(-len(todo) // (4 * max(workers, 1)))))
        tasks = [(str(tmp_images), str(tmp_regions), params, base_dir, todo[i:i + size])
                 for i in range(0, len(todo), size)]
        done = 0
        if workers > 1 and len(todo) >= 2 * workers:
            for results in _pool(workers).imap_unordered(_worker_chunk, tasks):
                done = _collect(results, boxes_json, failures, done, len(todo), t0, log)
        else:
            _worker_init()
            for task in tasks:
                done = _collect(_worker_chunk(task), boxes_json, failures, done, len(todo),
                                t0, log)
        if failures:
            raise ValueError(f"batch {batch}: {len(failures)} image(s) failed to preprocess: "
                             + "; ".join(failures[:5]))
        os.replace(tmp_images, out_dir / "images.npy")
        os.replace(tmp_regions, out_dir / "regions.npy")
    finally:
        for tmp in (tmp_images, tmp_regions):
            if tmp.exists():
                tmp.unlink()
    manifest = pl.DataFrame({
        "image_key": [j.image_key for j in jobs], "row": list(range(n)),
        "batch": [batch] * n, "file": [j.file for j in jobs],
        "source_sha256": [j.source_sha256 for j in jobs], "labels_sha256": [k[2] for k in keys],
        "params_hash": [params_hash] * n, "height": [s] * n, "width": [s] * n,
        "boxes_json": boxes_json}, schema=MANIFEST_SCHEMA).with_columns(
        pl.lit(sha256_file(out_dir / "images.npy")).alias("images_sha256"),
        pl.lit(sha256_file(out_dir / "regions.npy")).alias("regions_sha256"))
    atomic_write_parquet(out_dir / "manifest.parquet", manifest)
    return BatchOutcome(manifest, computed=len(todo), reused=n - len(todo),
                        seconds=time.perf_counter() - t0, rewritten=True)


def _collect(results, boxes_json, failures, done, total, t0, log) -> int:
    for row, boxes, err in results:
        if err:
            failures.append(err)
        else:
            boxes_json[row] = boxes
    before, done = done, done + len(results)
    if done // 200 > before // 200 or done == total:
        log(f"{done}/{total} images preprocessed, {done / (time.perf_counter() - t0):.0f} images/s")
    return done


def batch_jobs(settings: Settings, batch: str) -> list[ImageJob]:
    """One job per good inventory row of the batch, with its present findings' regions."""
    inv = (pl.read_parquet(settings.inventory_dir / f"{batch}.parquet")
           .filter(pl.col("status") == "ok").sort("file"))
    fnd = (pl.read_parquet(settings.findings_dir / f"{batch}.parquet")
           .filter((pl.col("status") == "ok") & pl.col("present")
                   & pl.col("finding").is_in(settings.findings)))
    labels: dict[str, dict] = {}
    for row in fnd.iter_rows(named=True):
        boxes = tuple((b["x_min"], b["y_min"], b["x_max"], b["y_max"]) for b in row["boxes"] or [])
        masks = (row["mask_file"],) if row["mask_file"] else ()
        old_b, old_m = labels.setdefault(row["image_key"], {}).get(row["finding"], ((), ()))
        labels[row["image_key"]][row["finding"]] = (old_b + boxes, old_m + masks)
    raw_batch = settings.raw_dir / batch
    return [ImageJob(image_key=r["image_key"], path=raw_batch / r["file"], file=r["file"],
                     source_sha256=r["sha256"], labels=labels.get(r["image_key"], {}))
            for r in inv.iter_rows(named=True)]


def preprocess_params(settings: Settings) -> PreprocessParams:
    """The profile's CLAHE and size settings as the pipeline's parameters."""
    p = settings.clahe
    return PreprocessParams(clip_limit=float(p["clip_limit"]), tile_grid=int(p["tile_grid"]),
                            size=settings.image_size, pad_to_square=bool(p["pad_to_square"]),
                            findings=tuple(settings.findings))
