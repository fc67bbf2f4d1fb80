"""NIH ChestX-ray14 importer: real PNGs and NIH's own table rows -> a DICOM batch ingest takes.

A handful of real images (three of patient 468, two boxed; normals; NIH's byte-identical
pair 00002658_001/_002) is copied into tmp with their real Data_Entry / BBox_List rows; a
truncated copy, a copy without a table row, an RGBA copy (equal channels: imported) and a
tinted RGB copy (skipped) test the skips. ../shared/data is read in place and never written."""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pydicom
import pytest
from PIL import Image
from real_data import shared_data

from xcam_assets.cli import add_import_nih_parser
from xcam_assets.config import load_settings
from xcam_assets.ingest.importers.nih_png import (
    NIH_CITATION,
    dicom_age,
    gray_pixels,
    images_of_patients,
    import_nih,
    nih_patient_id,
)
from xcam_assets.ingest.labels import read_batch_labels
from xcam_assets.orchestrate import STAGES, _run, register_batches
from xcam_assets.project import XcamProject

BOXED = ["00000468_017.png", "00000468_033.png"]  # patient 468, one Atelectasis box each
SAME_PATIENT = "00000468_040.png"                 # patient 468, no box
NORMAL = "00000129_000.png"                       # No Finding; its age is made 412 below
RGBA = "00000797_000.png"                         # No Finding, AP: saved as RGBA gray
TINTED = "00000427_000.png"                       # saved as RGB with a tinted pixel
TRUNCATED = "00000550_000.png"                    # first half of the file only
NO_ROW = "99999999_000.png"                       # a real PNG under a name NIH never used
TWINS = ["00002658_001.png", "00002658_002.png"]  # two NIH files with the same bytes
GOOD = [*BOXED, SAME_PATIENT, NORMAL, RGBA, *TWINS]
LOG = "xcam_assets.ingest.importers.nih_png"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _nih() -> Path:
    return shared_data("nih-cxr14")


def _filtered_csv(src: Path, dst: Path, names: set[str],
                  edit: dict[str, dict[str, str]] | None = None) -> None:
    """`src`'s header and the rows of `names`, unchanged but for `edit` (by column)."""
    with src.open(newline="") as f:
        rows = list(csv.reader(f))
    with dst.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(rows[0])
        for row in rows[1:]:
            if row[0] in names:
                for column, value in (edit or {}).get(row[0], {}).items():
                    row[rows[0].index(column)] = value
                writer.writerow(row)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    nih = _nih()
    src = tmp_path / "nih-src"
    (src / "images").mkdir(parents=True)
    for name in GOOD:
        shutil.copyfile(nih / "images" / name, src / "images" / name)
    gray = np.asarray(Image.open(nih / "images" / RGBA))
    Image.fromarray(np.dstack([gray, gray, gray, np.full_like(gray, 255)])).save(
        src / "images" / RGBA)
    tinted = np.dstack([np.asarray(Image.open(nih / "images" / TINTED))] * 3)
    tinted[0, 0, 0] ^= 1
    Image.fromarray(tinted).save(src / "images" / TINTED)
    data = (nih / "images" / TRUNCATED).read_bytes()
    (src / "images" / TRUNCATED).write_bytes(data[:len(data) // 2])
    shutil.copyfile(nih / "images" / "00000679_000.png", src / "images" / NO_ROW)
    names = {*GOOD, TINTED, TRUNCATED}
    # NIH's 2017 table had ages such as 412 (fixed in v2020): one row carries one here
    _filtered_csv(nih / "Data_Entry_2017_v2020.csv", src / "Data_Entry_2017_v2020.csv", names,
                  edit={NORMAL: {"Patient Age": "412"}})
    _filtered_csv(nih / "BBox_List_2017.csv", src / "BBox_List_2017.csv", names)
    return src


@pytest.fixture
def imported(source: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
             ) -> tuple[Path, Path, list[str], list[str]]:
    problems: list[str] = []
    with caplog.at_level(logging.WARNING, logger=LOG), warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom warns on a value over its VR's length
        out = import_nih(source, tmp_path / "batch", problems=problems)
    logged = [r.getMessage() for r in caplog.records if r.name == LOG]
    return source, out, problems, logged


def test_dicom_tags_and_pixels(imported) -> None:
    source, out, _, _ = imported
    nih = _nih()
    assert sorted(p.name for p in out.glob("*.dcm")) == sorted(
        f"{Path(n).stem}.dcm" for n in GOOD)
    # the real table's rows, read independently of the importer
    with (nih / "Data_Entry_2017_v2020.csv").open(newline="") as f:
        table = {r["Image Index"]: r for r in csv.DictReader(f)}
    for name in GOOD:
        ds = pydicom.dcmread(out / f"{Path(name).stem}.dcm")
        row = table[name]
        assert ds.PatientID == f"NIH-{int(row['Patient ID']):08d}"
        assert ds.PatientSex == row["Patient Gender"]
        assert ds.ViewPosition == row["View Position"]
        if name == NORMAL:
            assert "PatientAge" not in ds  # 412 in the tmp table: dropped
        else:
            assert ds.PatientAge == f"{int(row['Patient Age']):03d}Y"
        expected = np.asarray(Image.open(nih / "images" / name))  # the original gray PNG
        assert expected.dtype == np.uint8 and expected.shape == (384, 384)
        assert ds.PixelData == expected.tobytes()
        np.testing.assert_array_equal(ds.pixel_array, expected)
        sha = _sha256(source / "images" / name)  # the file imported (RGBA: the copy's)
        assert ds.DerivationDescription.startswith(
            f"converted from NIH ChestX-ray14 images/{name} sha256={sha}")
        assert ds.ImageComments == ds.DerivationDescription
        assert (ds.Modality, ds.BodyPartExamined, ds.PhotometricInterpretation,
                ds.Rows, ds.Columns) == ("OT", "CHEST", "MONOCHROME2", 384, 384)
    rgba = pydicom.dcmread(out / f"{Path(RGBA).stem}.dcm")
    assert "RGBA with equal channels" in rgba.DerivationDescription
    assert pydicom.dcmread(out / "00000468_017.dcm").PatientAge == "031Y"
    ids = {pydicom.dcmread(out / f"{Path(n).stem}.dcm").PatientID for n in
           [*BOXED, SAME_PATIENT]}
    assert ids == {"NIH-00000468"}  # one patient, three images, one ID


def test_boxes_scaled_by_hand(imported) -> None:
    _, out, _, _ = imported
    # BBox_List_2017.csv: 00000468_033.png,Atelectasis,204.47457627118598,502.544640492585,
    #   116.067796610169,53.152542372881406 (x, y, w, h in the 1024 x 1024 space).
    # Stored image 384 x 384: divide by 1024 / 384 = 2.6667 (multiply by 0.375):
    #   x_min = 204.4746 * 0.375 = 76.678     y_min = 502.5446 * 0.375 = 188.454
    #   x_max = (204.4746 + 116.0678) * 0.375 = 120.203
    #   y_max = (502.5446 + 53.1525) * 0.375 = 208.386
    labels = read_batch_labels(out / "labels.csv")
    row = labels.filter((pl.col("file") == "00000468_033.dcm")
                        & (pl.col("finding") == "Atelectasis")).row(0, named=True)
    assert row["present"] is True and len(row["boxes"]) == 1
    assert row["boxes"][0] == pytest.approx(
        {"x_min": 76.678, "y_min": 188.454, "x_max": 120.203, "y_max": 208.386}, abs=1.0)
    assert row["boxes"][0] == pytest.approx(
        {"x_min": 76.678, "y_min": 188.454, "x_max": 120.203, "y_max": 208.386}, abs=1e-3)
    # every imported image has the 14 findings + the derived Abnormal; the normal one none
    assert labels.height == 15 * len(GOOD)
    assert not labels.filter(pl.col("file") == "00000129_000.dcm")["present"].any()
    present = set(labels.filter(pl.col("file") == "00000468_017.dcm")
                  .filter("present")["finding"])
    assert present == {"Atelectasis", "Pneumothorax", "Abnormal"}
    assert labels["boxes"].list.len().sum() == 2  # the two boxed images, one box each


def test_bad_pngs_reported_by_name_others_imported(imported) -> None:
    _, out, problems, logged = imported
    assert logged == problems
    skipped = {p.split(":")[0]: p for p in problems if p.startswith("skipped ")}
    assert set(skipped) == {f"skipped images/{n}" for n in (TRUNCATED, NO_ROW, TINTED)}
    assert "cannot read it as 8-bit grayscale" in skipped[f"skipped images/{TRUNCATED}"]
    assert "no row in Data_Entry_2017_v2020.csv" in skipped[f"skipped images/{NO_ROW}"]
    assert "unequal colour channels" in skipped[f"skipped images/{TINTED}"]
    notes = [p for p in problems if not p.startswith("skipped ")]
    assert len(notes) == 3
    assert any(p.startswith(f"images/{TWINS[1]}: the same bytes as images/{TWINS[0]}")
               for p in notes)
    assert any(p.startswith(f"images/{NORMAL}: Patient Age '412'") for p in notes)
    assert any(p.startswith(f"images/{RGBA}: converted without loss") for p in notes)
    assert len(list(out.glob("*.dcm"))) == len(GOOD)
    files = set(read_batch_labels(out / "labels.csv")["file"])
    assert files == {f"{Path(n).stem}.dcm" for n in GOOD}  # skipped images get no label


def test_reimport_byte_identical_source_untouched(source: Path, tmp_path: Path) -> None:
    nih = _nih()
    before = {p.relative_to(source): _sha256(p) for p in source.rglob("*") if p.is_file()}
    shared = {n: _sha256(nih / "images" / n) for n in GOOD}
    a = import_nih(source, tmp_path / "a")
    b = import_nih(source, tmp_path / "b")
    import_nih(source, a)  # the same batch again: allowed, same bytes
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert "labels.csv" in names and len(names) == len(GOOD) + 1
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    after = {p.relative_to(source): _sha256(p) for p in source.rglob("*") if p.is_file()}
    assert after == before
    assert {n: _sha256(nih / "images" / n) for n in GOOD} == shared
    with pytest.raises(FileExistsError, match="would not write"):
        import_nih(source, a, images=[NORMAL])  # a smaller import over a larger one
    with pytest.raises(ValueError, match="overlap"):
        import_nih(source, source / "out")


def test_images_subset_is_its_own_batch(source: Path, tmp_path: Path) -> None:
    problems: list[str] = []
    out = import_nih(source, tmp_path / "site-b",
                     images=["00000468_017", "images/00000468_033.png", "00000000_000.png"],
                     problems=problems)
    assert sorted(p.name for p in out.glob("*.dcm")) == ["00000468_017.dcm", "00000468_033.dcm"]
    assert problems == [f"listed image 00000000_000.png has no PNG under "
                        f"{(source / 'images').resolve()}"]
    assert set(read_batch_labels(out / "labels.csv")["file"]) == {
        "00000468_017.dcm", "00000468_033.dcm"}
    names, unknown = images_of_patients(source / "Data_Entry_2017_v2020.csv",
                                        ["NIH-00000468", "00000129", "77777"])
    assert names == [NORMAL, *BOXED, SAME_PATIENT] and unknown == ["NIH-00077777"]
    rest, _ = images_of_patients(source / "Data_Entry_2017_v2020.csv", ["468"], exclude=True)
    assert set(rest).isdisjoint(names[1:]) and NORMAL in rest


def test_value_rules() -> None:
    assert [dicom_age(a) for a in ("58", "058Y", "7m", "0", "120", "121", "412", "", None,
                                   "58 years")] == [
        "058Y", "058Y", "007M", "000Y", "120Y", None, None, None, None, None]
    assert nih_patient_id("61") == nih_patient_id("NIH-00000061") == "NIH-00000061"
    assert nih_patient_id("x61") is None and nih_patient_id("123456789") is None
    ramp = np.arange(256, dtype=np.uint16).reshape(16, 16)
    for arr, mode in ((ramp, "I;16"), (ramp * np.uint16(257), "I;16")):
        im = Image.fromarray(arr)
        assert im.mode == mode
        pixels, how = gray_pixels(im)
        np.testing.assert_array_equal(pixels, ramp.astype(np.uint8))
        assert how
    with pytest.raises(ValueError, match="lose precision"):
        gray_pixels(Image.fromarray(ramp * np.uint16(200)))
    gray = ramp.astype(np.uint8)
    with pytest.raises(ValueError, match="transparent"):
        gray_pixels(Image.fromarray(np.dstack([gray, gray, gray, gray])))
    with pytest.raises(ValueError, match="without loss"):
        gray_pixels(Image.new("1", (4, 4)))
    assert "Wang" in NIH_CITATION and "NIH Clinical Center" in NIH_CITATION


def test_cli_and_ingest_accept_the_batch(project: Path, source: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`xcam import-nih` into data/incoming/nih, then the real ingest stage on it."""
    parser = argparse.ArgumentParser(prog="xcam")
    add_import_nih_parser(parser.add_subparsers(dest="command", required=True))
    listed = tmp_path / "patients.txt"
    listed.write_text("# external site\n468\n129\n797  # AP normal\nNIH-00002658\n")
    args = parser.parse_args(["import-nih", str(source), "--patients-from", str(listed)])
    assert args.batch == "nih"
    args.fn(args)
    s = load_settings()
    batch = s.incoming_dir / "nih"
    assert (batch / ".complete").exists()
    assert sorted(p.name for p in batch.glob("*.dcm")) == sorted(
        f"{Path(n).stem}.dcm" for n in GOOD)
    assert f"{len(GOOD)} image(s), 0 skipped" in capsys.readouterr().out
    bad = parser.parse_args(["import-nih", str(source), "--exclude-listed"])
    with pytest.raises(SystemExit, match="--exclude-listed needs"):
        bad.fn(bad)

    instance = dg.DagsterInstance.get()
    register_batches(instance, ["nih"])
    assert _run(STAGES["ingest"], instance, XcamProject(), "nih", log=print).success
    inv = pl.read_parquet(s.inventory_dir / "nih.parquet").sort("file")
    status = dict(zip(inv["file"], inv["status"], strict=True))
    assert status == {f"{Path(n).stem}.dcm": "ok" for n in GOOD} | {
        "00002658_002.dcm": "quarantined"}, inv.select("file", "reason")
    assert inv.filter(pl.col("file") == "00002658_002.dcm")["reason"][0].startswith(
        "duplicate SOP Instance UID: same image as nih/00002658_001.dcm")
    views = {f: pydicom.dcmread(batch / f).ViewPosition for f in inv["file"]}
    assert dict(zip(inv["file"], inv["view_position"], strict=True)) == views
    assert set(views.values()) == {"PA", "AP"}
    # NIH's Patient ID is pseudonymised: one key per patient, the ID itself nowhere
    keys = dict(zip(inv["file"], inv["patient_key"], strict=True))
    assert len({keys[f"{Path(n).stem}.dcm"] for n in [*BOXED, SAME_PATIENT]}) == 1
    assert len(set(keys.values())) == 4
    fnd = pl.read_parquet(s.findings_dir / "nih.parquet")
    for table in (inv, fnd.drop("boxes", "label_rows")):
        text = table.write_csv()
        assert "NIH-0" not in text  # the file names keep NIH's, which start with its number
    assert fnd.height == 15 * len(GOOD)
    assert dict(fnd.group_by("status").len().iter_rows()) == {"ok": 15 * (len(GOOD) - 1),
                                                              "quarantined_image": 15}
    box = fnd.filter((pl.col("file") == "00000468_033.dcm")
                     & (pl.col("finding") == "Atelectasis"))["boxes"][0].to_list()
    assert box == [pytest.approx({"x_min": 76.678, "y_min": 188.454, "x_max": 120.203,
                                  "y_max": 208.386}, abs=1e-3)]
    # sex and age travel in the immutable raw copy; the inventory keeps them coarse only
    raw = pydicom.dcmread(s.raw_dir / "nih" / "00000468_033.dcm")
    assert (raw.PatientSex, raw.PatientAge, raw.ViewPosition) == ("M", "031Y", "PA")
    row = inv.filter(pl.col("file") == "00000468_033.dcm")
    assert row.select("patient_sex", "age_band", "view_position").row(0) == ("M", "0-39", "PA")


def test_cli_module_is_light() -> None:
    """`xcam`'s parser is built for every command: it must not load the importer."""
    code = ("import sys, xcam_assets.cli; xcam_assets.cli.build_parser(); "
            "print(sorted(m for m in ('numpy', 'polars', 'pydicom', 'cv2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
