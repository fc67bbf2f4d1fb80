"""clahe_tensors: exact geometry, independent OpenCV recomputation on real images,
content-addressed reuse, and crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from real_data import shared_data

from xcam_assets.hashing import sha256_file
from xcam_assets.preprocess.clahe import geometry_for
from xcam_assets.preprocess.pipeline import (
    ImageJob,
    PreprocessParams,
    preprocess_batch,
    process_image,
)
from xcam_assets.preprocess.store import verify_batch

REPO = Path(__file__).resolve().parents[2]


def opencv_reference(u8: np.ndarray, clip: float, grid: int, size: int) -> np.ndarray:
    """Independent recomputation: cv2 CLAHE, zero-pad to a centred square, area resize."""
    out = cv2.createCLAHE(clipLimit=clip, tileGridSize=(grid, grid)).apply(u8)
    h, w = out.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    out = cv2.copyMakeBorder(out, top, side - h - top, left, side - w - left,
                             cv2.BORDER_CONSTANT, value=0)
    return cv2.resize(out, (size, size), interpolation=cv2.INTER_AREA)


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2") -> Path:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality, ds.PatientID = "OT", "T1"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def params(size: int = 64, clip: float = 2.0) -> PreprocessParams:
    return PreprocessParams(clip, 8, size, True, ("lesion",))


def test_geometry_of_a_known_box_is_exact() -> None:
    # 200 rows x 300 cols -> padded to 300x300 (50 rows above) -> scaled by 60/300 = 0.2
    geom = geometry_for((200, 300), 60, pad_to_square=True)
    assert (geom.pad_x, geom.pad_y, geom.scale_x, geom.scale_y) == (0, 50, 0.2, 0.2)
    np.testing.assert_allclose(geom.boxes(np.array([[100, 20, 150, 70]])),
                               [[20.0, 14.0, 30.0, 24.0]])
    stretch = geometry_for((200, 300), 60, pad_to_square=False)
    np.testing.assert_allclose(stretch.boxes(np.array([[100, 20, 150, 70]])),
                               [[20.0, 6.0, 30.0, 21.0]])


def test_box_and_mask_stay_on_the_lesion(tmp_path: Path) -> None:
    img = np.full((200, 300), 40, np.uint8)
    img[20:70, 100:150] = 230  # the "lesion", 50x50 px, box (100, 20, 150, 70)
    path = write_dicom(tmp_path / "a.dcm", img)
    mask = np.zeros_like(img)
    mask[20:70, 100:150] = 255
    cv2.imwrite(str(tmp_path / "m.png"), mask)
    job = ImageJob("k", path, "a.dcm", "s",
                   {"lesion": (((100.0, 20.0, 150.0, 70.0),), ("m.png",))})
    tensor, regions, boxes = process_image(job, params(60), tmp_path)
    assert boxes == {"lesion": [[20.0, 14.0, 30.0, 24.0]]}
    region = regions[0].astype(bool)
    assert region.sum() == 100  # 10x10 px after the 0.2 scale
    assert np.argwhere(region).min(0).tolist() == [14, 20]
    assert tensor[region].mean() > tensor[~region].mean() + 100


def test_real_dicoms_match_an_independent_opencv_recomputation(tmp_path: Path) -> None:
    siim = next(shared_data("dicom", "siim").glob("*.dcm"))
    rg1 = shared_data("dicom", "nema-rg1", "RG1_UNCR.dcm")
    # SIIM: 8-bit MONOCHROME2, no VOI: the stored values are the display values
    ref_siim = pydicom.dcmread(siim).pixel_array.astype(np.uint8)
    # RG1: 15-bit MONOCHROME1, linear window C=15000 W=30000 over 0..32767 (PS3.3 C.11.2.1.2)
    ds = pydicom.dcmread(rg1)
    x = ds.pixel_array.astype(np.float64)
    c, w, top = 15000.0, 30000.0, 32767.0
    y = np.clip(((x - (c - 0.5)) / (w - 1) + 0.5) * top, 0, top)
    ref_rg1 = np.rint((1.0 - y / top) * 255).astype(np.uint8)  # MONOCHROME1: invert
    for path, ref_u8 in ((siim, ref_siim), (rg1, ref_rg1)):
        job = ImageJob("k", path, path.name, "s", {})
        tensor, _, _ = process_image(job, params(256), tmp_path)
        expected = opencv_reference(ref_u8, 2.0, 8, 256)
        diff = np.abs(tensor.astype(int) - expected.astype(int))
        assert diff.max() <= 1, (path.name, diff.max())


def test_tbx11k_tensors_match_opencv_on_the_png(tmp_path: Path) -> None:
    from xcam_assets.ingest.importers.tbx11k_png import import_tbx11k

    source = shared_data("tbx11k")
    batch = import_tbx11k(source, tmp_path / "tbx", limit=12)
    for dcm in sorted(batch.glob("*.dcm")):
        png = cv2.imread(str(source / "images" / f"{dcm.stem}.png"), cv2.IMREAD_GRAYSCALE)
        tensor, _, _ = process_image(ImageJob("k", dcm, dcm.name, "s", {}), params(224),
                                     tmp_path)
        diff = np.abs(tensor.astype(int) - opencv_reference(png, 2.0, 8, 224).astype(int))
        assert diff.max() <= 1, dcm.name


def _jobs(tmp_path: Path, n: int, offset: int = 0) -> list[ImageJob]:
    rng = np.random.default_rng(offset)
    jobs = []
    for i in range(offset, offset + n):
        p = write_dicom(tmp_path / f"img{i}.dcm", rng.integers(0, 255, (80, 96), np.uint8))
        jobs.append(ImageJob(f"k{i}", p, p.name, sha256_file(p), {}))
    return jobs


def test_unchanged_inputs_recompute_nothing_and_params_recompute_all(tmp_path: Path) -> None:
    out = tmp_path / "tensors" / "b1"
    jobs = _jobs(tmp_path, 10)
    first = preprocess_batch(jobs, params(), out, "b1", tmp_path, workers=1)
    assert (first.computed, first.reused) == (10, 0)
    stamp = (out / "images.npy").stat().st_mtime_ns
    again = preprocess_batch(jobs, params(), out, "b1", tmp_path, workers=1)
    assert (again.computed, again.reused, again.rewritten) == (0, 10, False)
    assert (out / "images.npy").stat().st_mtime_ns == stamp
    # five more images in the same batch: only they are computed
    more = jobs + _jobs(tmp_path, 5, offset=100)
    grown = preprocess_batch(more, params(), out, "b1", tmp_path, workers=1)
    assert (grown.computed, grown.reused) == (5, 10)
    np.testing.assert_array_equal(np.load(out / "images.npy")[:10],
                                  np.load(tmp_path / "tensors" / "b1" / "images.npy")[:10])
    # a changed CLAHE clip limit recomputes everything, with a new params hash
    changed = preprocess_batch(more, params(clip=3.0), out, "b1", tmp_path, workers=1)
    assert (changed.computed, changed.reused) == (15, 0)
    assert changed.manifest["params_hash"][0] != grown.manifest["params_hash"][0]
    # a changed source (same key, new hash) is recomputed alone
    edited = [*more[:-1], ImageJob(more[-1].image_key, more[-1].path, more[-1].file, "new",
                                   {})]
    partial = preprocess_batch(edited, params(clip=3.0), out, "b1", tmp_path, workers=1)
    assert (partial.computed, partial.reused) == (1, 14)


def test_workers_give_identical_shards(tmp_path: Path) -> None:
    jobs = _jobs(tmp_path, 70)
    one = preprocess_batch(jobs, params(), tmp_path / "one", "b", tmp_path, workers=1)
    two = preprocess_batch(jobs, params(), tmp_path / "two", "b", tmp_path, workers=2,
                           chunk_size=8)
    assert one.manifest["images_sha256"][0] == two.manifest["images_sha256"][0]
    assert one.manifest["regions_sha256"][0] == two.manifest["regions_sha256"][0]


def test_bad_image_fails_the_batch_naming_the_file(tmp_path: Path) -> None:
    jobs = _jobs(tmp_path, 3)
    (tmp_path / "broken.dcm").write_bytes(b"not a dicom")
    jobs.append(ImageJob("kb", tmp_path / "broken.dcm", "broken.dcm", "x", {}))
    with pytest.raises(ValueError, match="broken.dcm"):
        preprocess_batch(jobs, params(), tmp_path / "out", "b", tmp_path, workers=1)
    assert not (tmp_path / "out" / "manifest.parquet").exists()
    assert not (tmp_path / "out" / "images.npy").exists()


def test_a_script_without_a_main_guard_runs_once_with_two_workers(tmp_path: Path) -> None:
    """Worker processes start without the caller's entry script: an unguarded script
    calling xcam is not re-run by them (it used to be, and then failed in the forkserver
    with "start a new process before ... bootstrapping phase")."""
    jobs = _jobs(tmp_path, 12)
    runs = tmp_path / "top_level_runs.txt"
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from xcam_assets.preprocess.pipeline import ImageJob, PreprocessParams, preprocess_batch
        with open({str(runs)!r}, "a") as fh:
            fh.write("ran\\n")
        src = Path({str(tmp_path)!r})
        jobs = [ImageJob(f"k{{i}}", src / f"img{{i}}.dcm", f"img{{i}}.dcm", "s", {{}})
                for i in range(12)]
        out = preprocess_batch(jobs, PreprocessParams(2.0, 8, 64, True, ("lesion",)),
                               Path(sys.argv[1]), "b", src, workers=2)
        print("COMPUTED", out.computed, "MAIN", sys.modules["__main__"].__file__)
    """)
    (tmp_path / "unguarded.py").write_text(script)
    done = subprocess.run([sys.executable, str(tmp_path / "unguarded.py"), str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"COMPUTED 12 MAIN {tmp_path / 'unguarded.py'}" in done.stdout  # __main__ restored
    assert runs.read_text() == "ran\n"  # the top level ran once, in the script's process
    one = preprocess_batch(jobs, params(), tmp_path / "one", "b", tmp_path, workers=1)
    assert np.array_equal(np.load(tmp_path / "o" / "images.npy"),
                          np.load(tmp_path / "one" / "images.npy"))
    assert one.computed == 12


@pytest.mark.parametrize("kill_after", ["first progress line", "shards renamed"])
def test_kill_9_leaves_nothing_a_later_run_reads_as_valid(tmp_path: Path, kill_after) -> None:
    """SIGKILL a preprocessing process mid-way; the next run completes and equals a clean run."""
    jobs_dir = tmp_path / "src"
    jobs_dir.mkdir()
    n = 400
    rng = np.random.default_rng(0)
    for i in range(n):
        write_dicom(jobs_dir / f"img{i:04d}.dcm", rng.integers(0, 255, (192, 192), np.uint8))
    script = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        import xcam_assets.preprocess.pipeline as pl_
        from xcam_assets.preprocess.pipeline import ImageJob, PreprocessParams, preprocess_batch
        if __name__ == "__main__":  # worker processes re-import this script
            src = Path({str(jobs_dir)!r})
            jobs = [ImageJob(p.stem, p, p.name, p.stem, {{}}) for p in sorted(src.glob('*.dcm'))]
            clip = float(sys.argv[1])
            if os.environ.get("PAUSE_AFTER_RENAME"):
                real = pl_.os.replace
                def slow_replace(a, b):
                    real(a, b)
                    if str(b).endswith("regions.npy"):
                        print("RENAMED", flush=True); time.sleep(30)
                pl_.os.replace = slow_replace
            preprocess_batch(jobs, PreprocessParams(clip, 8, 64, True, ("lesion",)),
                             Path(sys.argv[2]), "b", src, workers=2, chunk_size=16,
                             log=lambda m: print(m, flush=True))
            print("DONE", flush=True)
    """)
    (tmp_path / "run.py").write_text(script)
    out = tmp_path / "out"
    clean = tmp_path / "clean"
    subprocess.run([sys.executable, str(tmp_path / "run.py"), "2.0", str(clean)], check=True,
                   capture_output=True)
    # an earlier complete result with other parameters sits in `out`
    subprocess.run([sys.executable, str(tmp_path / "run.py"), "4.0", str(out)], check=True,
                   capture_output=True)
    env = dict(os.environ, PAUSE_AFTER_RENAME="1" if kill_after == "shards renamed" else "")
    proc = subprocess.Popen([sys.executable, str(tmp_path / "run.py"), "2.0", str(out)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True, env=env)
    marker = "images preprocessed" if kill_after == "first progress line" else "RENAMED"
    deadline = time.time() + 60
    for line in proc.stdout:
        if marker in line or time.time() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # whatever is on disk: either a consistent old set, or a set verify_batch rejects
    problems = verify_batch(out)
    if not problems:
        import polars as pl

        assert pl.read_parquet(out / "manifest.parquet")["params_hash"][0] == \
            PreprocessParams(4.0, 8, 64, True, ("lesion",)).digest()
    # the next run completes and equals the uninterrupted run
    subprocess.run([sys.executable, str(tmp_path / "run.py"), "2.0", str(out)], check=True,
                   capture_output=True)
    assert verify_batch(out) == []
    assert sha256_file(out / "images.npy") == sha256_file(clean / "images.npy")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
