"""Benchmark: clahe_tensors' preprocessing vs a bare loop, workers, incremental batches.

Real images: the 601 TBX11K radiographs in ../shared/data, wrapped as DICOM by the
importer (8-bit, 512x512). Bare loop = pydicom decode + modality/VOI LUTs +
cv2 CLAHE + cv2 resize + write, one process. Run:

    .venv/bin/python tests/benchmarks/bench_preprocess.py [--size 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut, apply_voi_lut

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from xcam_assets.hashing import sha256_file  # noqa: E402
from xcam_assets.ingest.importers.tbx11k_png import import_tbx11k  # noqa: E402
from xcam_assets.preprocess.pipeline import (  # noqa: E402
    ImageJob,
    PreprocessParams,
    preprocess_batch,
)


def bare_loop(paths: list[Path], size: int, clip: float, grid: int, out: Path) -> None:
    clahe = cv2.createCLAHE(clipLimit=clip, tileGridSize=(grid, grid))
    result = np.zeros((len(paths), size, size), np.uint8)
    for i, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float32)
        lo, hi = 0.0, float(2 ** ds.BitsStored - 1)
        u8 = np.rint(np.clip((arr - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            u8 = 255 - u8
        result[i] = cv2.resize(clahe.apply(u8), (size, size), interpolation=cv2.INTER_AREA)
    np.save(out, result)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    source = REPO.parent / "shared" / "data" / "tbx11k"
    if not source.exists():
        print(f"SKIP: {source} is absent (real TBX11K images needed)")
        return
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        batch_dir = import_tbx11k(source, tmp / "tbx")
        paths = sorted(batch_dir.glob("*.dcm"))
        n = len(paths)
        jobs = [ImageJob(image_key=p.stem, path=p, file=p.name, source_sha256=sha256_file(p),
                         labels={}) for p in paths]
        params = PreprocessParams(2.0, 8, args.size, True, ("ActiveTuberculosis",))

        def ours(workers: int, jobs=jobs, name="ours") -> None:
            out = tmp / f"{name}-{workers}"
            if out.exists():
                for f in out.iterdir():
                    f.unlink()
            preprocess_batch(jobs, params, out, "tbx", batch_dir, workers=workers,
                             log=lambda m: None)

        t_bare = timed(lambda: bare_loop(paths, args.size, 2.0, 8, tmp / "bare.npy"),
                       args.repeats)
        t_one = timed(lambda: ours(1), args.repeats)
        t_two = timed(lambda: ours(2), args.repeats)
        # same numbers either way (the bare loop is an independent implementation)
        bare = np.load(tmp / "bare.npy")
        mine = np.load(tmp / "ours-1" / "images.npy")
        max_diff = int(np.abs(bare.astype(int) - mine.astype(int)).max())

        # incremental: 60 new images on top of 600 done, vs all 660 from scratch
        base, new = jobs[:600], jobs[600:660] if n >= 660 else jobs[-60:]
        extra = [ImageJob(image_key=f"{j.image_key}-copy", path=j.path, file=j.file,
                          source_sha256=j.source_sha256, labels={}) for j in new]
        all_jobs = base + extra
        t_full = timed(lambda: ours(2, all_jobs, "full"), args.repeats)

        def add_batch() -> None:  # the new batch arrives as its own partition
            out = tmp / "newbatch"
            if out.exists():
                for f in out.iterdir():
                    f.unlink()
            preprocess_batch(extra, params, out, "new", batch_dir, workers=2, log=lambda m: None)

        t_new = timed(add_batch, args.repeats)

        def reuse_same_dir() -> None:  # or appended to the same batch: content-addressed reuse
            out = tmp / "grow"
            if out.exists():
                for f in out.iterdir():
                    f.unlink()
            preprocess_batch(base, params, out, "b", batch_dir, workers=2, log=lambda m: None)
            t0 = time.perf_counter()
            o = preprocess_batch(all_jobs, params, out, "b", batch_dir, workers=2,
                                 log=lambda m: None)
            assert o.computed == len(extra) and o.reused == len(base), o
            reuse_same_dir.seconds = time.perf_counter() - t0

        grow = []
        for _ in range(args.repeats):
            reuse_same_dir()
            grow.append(reuse_same_dir.seconds)
        t_grow = statistics.median(grow)

    ips = lambda t: n / t  # noqa: E731
    print(f"images: {n} TBX11K DICOMs (512x512 8-bit) -> {args.size}px, median of {args.repeats}")
    print(f"bare loop        {ips(t_bare):8.0f} images/s")
    print(f"ours, 1 worker   {ips(t_one):8.0f} images/s  (ratio {t_bare / t_one:.2f}; max diff "
          f"vs bare {max_diff} grey levels)")
    print(f"ours, 2 workers  {ips(t_two):8.0f} images/s  (speed-up {t_one / t_two:.2f}x)")
    print(f"660 from scratch {t_full:.3f}s; new 60-image batch {t_new:.3f}s "
          f"(ratio {t_new / t_full:.3f}); 60 appended to a 600-image batch {t_grow:.3f}s "
          f"(ratio {t_grow / t_full:.3f})")
    print(f"RESULT preprocess n={n} bare_ips={ips(t_bare):.0f} ours_ips={ips(t_one):.0f} "
          f"ratio={t_bare / t_one:.3f} workers2_speedup={t_one / t_two:.3f} "
          f"new_batch_ratio={t_new / t_full:.3f} appended_ratio={t_grow / t_full:.3f} "
          f"max_diff={max_diff}")


if __name__ == "__main__":
    main()
