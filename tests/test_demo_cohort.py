"""The SYNTHETIC demo cohort: layout, labels, determinism, and that it decodes upright."""

from __future__ import annotations

import csv
import json
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from xcam_assets.demo import IMAGE_COMMENT, LABEL_COLUMNS, write_demo_cohort
from xcam_assets.ingest.dicom import decode_unit, read_header


def _labels(batch: Path) -> list[dict[str, str]]:
    with (batch / "labels.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == LABEL_COLUMNS
        return list(reader)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """The default cohort (300 images, 256 px): generated once, timed, not asserted on time."""
    out = tmp_path_factory.mktemp("demo")
    t0 = time.perf_counter()
    batches = write_demo_cohort(out)
    print(f"\nwrite_demo_cohort(300 images, 256 px): {time.perf_counter() - t0:.2f} s")
    return out, batches


@pytest.fixture(scope="module")
def decoded(cohort: tuple[Path, list[Path]]) -> dict[Path, np.ndarray]:
    return {p: decode_unit(p) for b in cohort[1] for p in sorted(b.glob("*.dcm"))}


def test_layout_and_counts(cohort: tuple[Path, list[Path]]) -> None:
    out, batches = cohort
    assert [b.name for b in batches] == ["demo-batch-01", "demo-batch-02"]
    meta = json.loads((out / "demo_cohort.json").read_text())
    assert meta["synthetic"] is True and meta["n_images"] == 300 and meta["size"] == 256
    names = []
    for batch in batches:
        rows = _labels(batch)
        dcms = sorted(p.name for p in batch.glob("*.dcm"))
        assert len(rows) == len(dcms) == 150
        assert sorted(r["file"] for r in rows) == dcms
        assert {r["finding"] for r in rows} == {"lesion"}
        positives = sum(r["present"] == "1" for r in rows)
        assert positives == 75  # round(0.5 * 150) per batch
        names += dcms
    assert len(set(names)) == 300 and names[0] == "img_00001.dcm"


def test_masks_match_boxes(cohort: tuple[Path, list[Path]]) -> None:
    for batch in cohort[1]:
        for row in _labels(batch):
            if row["present"] == "0":
                assert row["mask_file"] == row["x_min"] == row["y_max"] == ""
                assert not (batch / "masks" / row["file"].replace(".dcm", ".png")).exists()
                continue
            mask = cv2.imread(str(batch / row["mask_file"]), cv2.IMREAD_UNCHANGED)
            assert mask.shape == (256, 256) and mask.dtype == np.uint8
            assert set(np.unique(mask).tolist()) == {0, 255}
            ys, xs = np.nonzero(mask)
            box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert box == [int(row[k]) for k in ("x_min", "y_min", "x_max", "y_max")]
            side = max(box[2] - box[0], box[3] - box[1])
            assert 0.08 * 256 <= side <= 0.45 * 256  # radius 6-14 % of size, roughly round


def test_encodings_vary_and_phi_is_fake(cohort: tuple[Path, list[Path]]) -> None:
    headers = [pydicom.dcmread(p, stop_before_pixels=True)
               for b in cohort[1] for p in sorted(b.glob("*.dcm"))]
    assert {int(h.BitsStored) for h in headers} == {8, 10, 12, 14, 16}
    assert all(int(h.BitsAllocated) == (8 if h.BitsStored == 8 else 16) for h in headers)
    assert {h.PhotometricInterpretation for h in headers} == {"MONOCHROME1", "MONOCHROME2"}
    assert {h.Modality for h in headers} == {"CR", "DX"}
    assert {h.ViewPosition for h in headers} == {"PA", "AP"}
    assert any("WindowCenter" in h for h in headers)
    assert any("WindowCenter" not in h and "RescaleIntercept" not in h for h in headers)
    assert any(float(h.get("RescaleIntercept", 0)) == -1024 for h in headers)
    h = headers[0]
    assert h.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert str(h.PatientName).startswith("DEMO^PATIENT") and h.PatientID.startswith("DEMO")
    assert h.PatientBirthDate and h.InstitutionName and h.ReferringPhysicianName
    assert h.ImageComments == IMAGE_COMMENT and h.BodyPartExamined == "CHEST"


def test_patients_stay_in_one_batch(cohort: tuple[Path, list[Path]]) -> None:
    where: dict[str, set[str]] = defaultdict(set)
    images: dict[str, int] = defaultdict(int)
    studies: dict[str, set[str]] = defaultdict(set)
    for batch in cohort[1]:
        for p in batch.glob("*.dcm"):
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            where[ds.PatientID].add(batch.name)
            images[ds.PatientID] += 1
            studies[ds.PatientID].add(ds.StudyInstanceUID)
    assert all(len(b) == 1 for b in where.values())
    assert max(images.values()) <= 3 and np.mean(list(images.values())) >= 2
    assert any(len(s) > 1 for s in studies.values())
    assert len(set().union(*studies.values())) == sum(len(s) for s in studies.values())


def test_every_image_decodes_upright(decoded: dict[Path, np.ndarray]) -> None:
    """Whatever the photometric interpretation, bits or VOI: lungs dark, mediastinum bright."""
    for path, unit in decoded.items():
        assert unit.shape == (256, 256)
        rows = slice(int(0.3 * 256), int(0.7 * 256))
        centre = unit[rows, int(0.45 * 256):int(0.55 * 256)].mean()
        lungs = np.concatenate([unit[rows, int(0.2 * 256):int(0.3 * 256)].ravel(),
                                unit[rows, int(0.7 * 256):int(0.8 * 256)].ravel()]).mean()
        assert centre > lungs + 0.2, f"{path.name}: centre {centre:.3f}, lungs {lungs:.3f}"
        assert 0.6 < centre < 0.95 and 0.1 < lungs < 0.5, path.name


def test_lesions_brighter_than_surrounding_lung(cohort: tuple[Path, list[Path]],
                                                decoded: dict[Path, np.ndarray]) -> None:
    """Brighter than a ring around it, and clearly brighter than the mirrored (lesion-free)
    region of the other lung, which has the same synthetic anatomy."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (15, 15))
    for batch in cohort[1]:
        for row in _labels(batch):
            if row["present"] != "1":
                continue
            mask = cv2.imread(str(batch / row["mask_file"]), cv2.IMREAD_GRAYSCALE) > 0
            ring = cv2.dilate(mask.astype(np.uint8), kernel).astype(bool) & ~mask
            unit = decoded[batch / row["file"]]
            lesion = unit[mask].mean()
            assert lesion > unit[ring].mean(), row["file"]
            assert lesion > unit[mask[:, ::-1]].mean() + 0.15, row["file"]


def test_deterministic(tmp_path: Path) -> None:
    kwargs = {"n_images": 12, "n_batches": 3, "size": 64, "seed": 7}
    first = write_demo_cohort(tmp_path / "a", **kwargs)
    write_demo_cohort(tmp_path / "b", **kwargs)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b and len(a) > 12
    assert [p.name for p in first] == ["demo-batch-01", "demo-batch-02", "demo-batch-03"]
    other = _files(Path(write_demo_cohort(tmp_path / "c", **{**kwargs, "seed": 8})[0]).parent)
    assert other["demo-batch-01/img_00001.dcm"] != a["demo-batch-01/img_00001.dcm"]
    sop = {read_header(tmp_path / d / f)["sop_instance_uid"]
           for d in ("a", "c") for f in ("demo-batch-01/img_00001.dcm",)}
    assert len(sop) == 2  # UIDs depend on the arguments: no clash between cohorts
