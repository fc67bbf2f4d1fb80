"""Dataset adapters: hand-computed cases, then the real tables' counts, recomputed
independently with the csv module (no polars) where the README gives no figure."""

from __future__ import annotations

import csv
import gzip
import io
import json
import zipfile
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import polars as pl
import pydicom
import pytest
from real_data import shared_data

from xcam_assets.ingest.adapters import ADAPTER_SCHEMA
from xcam_assets.ingest.adapters.batch import write_batch_labels_for
from xcam_assets.ingest.adapters.generic import read_canonical_csv, read_coco
from xcam_assets.ingest.adapters.nih import read_nih
from xcam_assets.ingest.adapters.registry import FORMATS, read_labels
from xcam_assets.ingest.adapters.rsna import read_rsna
from xcam_assets.ingest.adapters.siim import read_siim, rle_decode, union_mask
from xcam_assets.ingest.adapters.tbx11k import read_tbx11k
from xcam_assets.ingest.adapters.vindr import fuse_boxes, read_vindr
from xcam_assets.ingest.labels import read_batch_labels


def _rows(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt", newline="") as fh:
        return list(csv.DictReader(fh))


# ---- hand-computed cases -----------------------------------------------------------------


def test_rle_decode_column_major_relative() -> None:
    # 3x3, runs: start 1 length 2 -> flat 1,2 ; gap 3 after pixel 3 -> flat 6, length 1
    # column-major: flat k -> (row k % 3, col k // 3): (1,0) (2,0) (0,2)
    mask = rle_decode("1 2 3 1", width=3, height=3)
    expected = np.zeros((3, 3), bool)
    expected[1, 0] = expected[2, 0] = expected[0, 2] = True
    np.testing.assert_array_equal(mask, expected)
    assert union_mask(["0 1", "8 1"], 3, 3).sum() == 2
    with pytest.raises(ValueError, match="past"):
        rle_decode("8 5", 3, 3)


def test_siim_leading_space_column_and_multiple_rows(tmp_path: Path) -> None:
    table = tmp_path / "rle.csv"
    table.write_text("ImageId, EncodedPixels\nA, -1\nB, 0 2\nB, 5 1\nC,-1\n")
    frame = read_siim(table)
    assert list(frame.schema) == list(ADAPTER_SCHEMA)
    rows = {r["file"]: r for r in frame.iter_rows(named=True)}
    assert rows["A.dcm"]["present"] is False and rows["A.dcm"]["mask_file"] is None
    assert rows["B.dcm"]["present"] is True and rows["B.dcm"]["mask_rle"] == ["0 2", "5 1"]
    assert rows["B.dcm"]["mask_file"] == "masks/B.png"
    assert frame.height == 3


def test_vindr_fusion_rule() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=float)
    # R1 and R2 agree on the first place (IoU 81/119 = 0.68), R3 alone on the second
    fused = fuse_boxes(boxes, ["R1", "R2", "R3"], min_votes=2, iou=0.4)
    assert fused == [{"x_min": 0.5, "y_min": 0.5, "x_max": 10.5, "y_max": 10.5}]
    # no place agreed by two readers: every cluster is kept
    apart = fuse_boxes(boxes[[0, 2]], ["R1", "R2"], min_votes=2, iou=0.4)
    assert len(apart) == 2


def test_vindr_votes(tmp_path: Path) -> None:
    table = tmp_path / "train.csv"
    table.write_text(
        "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n"
        "a,Nodule/Mass,8,R1,0,0,10,10\n"
        "a,Nodule/Mass,8,R2,1,1,11,11\n"
        "a,No finding,14,R3,,,,\n"
        "b,Nodule/Mass,8,R1,0,0,10,10\n"
        "b,No finding,14,R2,,,,\n"
        "b,No finding,14,R3,,,,\n")
    frame = read_vindr(table).sort("file")
    assert frame["file"].to_list() == ["a.dicom", "b.dicom"]
    assert frame["present"].to_list() == [True, False]
    assert frame["boxes"][0].to_list() == [{"x_min": 0.5, "y_min": 0.5, "x_max": 10.5,
                                            "y_max": 10.5}]
    assert read_vindr(table, min_votes=1)["present"].to_list() == [True, True]


def test_coco_and_canonical_csv(tmp_path: Path) -> None:
    coco = tmp_path / "instances.json"
    coco.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "x.png", "width": 100, "height": 80},
                   {"id": 2, "file_name": "y.png", "width": 100, "height": 80}],
        "categories": [{"id": 7, "name": "Nodule"}, {"id": 8, "name": "Mass"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 20, 5, 6]}]}))
    frame = read_coco(coco)
    assert frame.height == 4
    hit = frame.filter((pl.col("file") == "x.png") & (pl.col("finding") == "Nodule")).row(
        0, named=True)
    assert hit["present"] and hit["boxes"] == [{"x_min": 10.0, "y_min": 20.0, "x_max": 15.0,
                                                 "y_max": 26.0}]
    assert frame["present"].sum() == 1
    labels = tmp_path / "labels.csv"
    labels.write_text("file,finding,present,x_min,y_min,x_max,y_max,mask_file\n"
                      "a.dcm,Nodule,1,1,2,3,4,\na.dcm,Nodule,1,5,6,7,8,\nb.dcm,Nodule,0,,,,,\n")
    canon = read_canonical_csv(labels)
    assert canon.height == 2 and canon["boxes"].list.len().to_list() == [2, 0]
    assert set(FORMATS) == {"siim", "nih", "rsna", "vindr", "tbx11k", "csv", "coco"}
    assert read_labels("csv", labels).equals(canon)


def test_batch_labels_scale_boxes_and_render_masks(tmp_path: Path) -> None:
    """Adapter rows -> labels.csv of a batch of 256 px DICOMs (coordinates in 1024 space)."""
    from dicom_corpus import demo_sources

    src = demo_sources(tmp_path / "src", n=2, size=256)
    batch = tmp_path / "batch"
    (batch / "nested").mkdir(parents=True)
    for p in src:
        (batch / "nested" / p.name).write_bytes(p.read_bytes())
    a, b = src[0].stem, src[1].stem
    rle = "0 4 1020 4 1020 4 1020 4"  # a 4x4 block at rows 0-3, columns 0-3 of 1024x1024
    rows = pl.concat([
        read_siim_rows(tmp_path / "rle.csv", {a: [rle], b: []}),
        pl.DataFrame({"file": [f"{a}.png"], "finding": ["Nodule"], "present": [True],
                      "boxes": [[{"x_min": 100.0, "y_min": 200.0, "x_max": 300.0,
                                  "y_max": 400.0}]],
                      "coord_width": [1024.0], "coord_height": [1024.0]}),
        pl.DataFrame({"file": ["not_here.png"], "finding": ["Nodule"], "present": [False]}),
    ], how="diagonal_relaxed")
    summary = write_batch_labels_for(rows, batch)
    assert summary == {"rows": 3, "images": 2, "images_in_batch_without_labels": 0,
                       "label_images_not_in_batch": 1}
    labels = read_batch_labels(batch / "labels.csv")
    nodule = labels.filter(pl.col("finding") == "Nodule").row(0, named=True)
    assert nodule["file"] == f"nested/{a}.dcm"
    assert nodule["boxes"] == [{"x_min": 25.0, "y_min": 50.0, "x_max": 75.0, "y_max": 100.0}]
    mask = cv2.imread(str(batch / "masks" / f"{a}.png"), cv2.IMREAD_GRAYSCALE)
    assert mask.shape == (256, 256) and (mask > 0).sum() == 1 and mask[0, 0] == 255


def read_siim_rows(path: Path, masks: dict[str, list[str]]) -> pl.DataFrame:
    """A SIIM table written from {ImageId: RLE strings} (empty: -1), read back."""
    path.write_text("ImageId, EncodedPixels\n" + "".join(
        f"{k},{r}\n" for k, rles in masks.items() for r in (rles or ["-1"])))
    return read_siim(path)


# ---- the real tables ---------------------------------------------------------------------


def test_siim_real_table() -> None:
    path = shared_data("labels", "siim-pneumothorax-train-rle.csv.gz")
    frame = read_siim(path)
    assert frame.height == 12047 and frame["present"].sum() == 2669
    assert frame["mask_rle"].list.len().sum() + (~frame["present"]).sum() == 12954
    # the shared SIIM DICOM is a negative
    uid = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819"
    assert frame.filter(pl.col("file") == f"{uid}.dcm")["present"].to_list() == [False]
    # a positive image's mask area, independently: the sum of its run lengths
    first = frame.filter(pl.col("present")).row(0, named=True)
    rle = first["mask_rle"][0]
    lengths = [int(v) for v in rle.split()[1::2]]
    assert rle_decode(rle).sum() == sum(lengths) > 0
    # ... and its pixels: absolute starts by a running sum, column-major placement
    flat = np.zeros(1024 * 1024, bool)
    pos = 0
    nums = [int(v) for v in rle.split()]
    for gap, length in zip(nums[0::2], nums[1::2], strict=True):
        pos += gap
        flat[pos:pos + length] = True
        pos += length
    np.testing.assert_array_equal(rle_decode(rle), flat.reshape(1024, 1024).T)


def test_nih_real_tables() -> None:
    data_entry = shared_data("labels", "Data_Entry_2017_v2020.csv.gz")
    bbox = shared_data("labels", "BBox_List_2017.csv.gz")
    frame = read_nih(data_entry, bbox)
    rows = _rows(data_entry)
    assert len(rows) == 112120 and frame["file"].n_unique() == 112120
    assert frame.height == 112120 * 14
    positives = defaultdict(int)
    for r in rows:
        for label in r["Finding Labels"].split("|"):
            positives[label] += 1
    got = dict(frame.group_by("finding").agg(pl.col("present").sum()).iter_rows())
    assert got == {k: v for k, v in positives.items() if k != "No finding" and k != "No Finding"}
    boxes = frame.filter(pl.col("boxes").list.len() > 0)
    assert boxes["boxes"].list.len().sum() == 984 and boxes["file"].n_unique() == 880
    pneumothorax = boxes.filter(pl.col("finding") == "Pneumothorax")
    assert pneumothorax["boxes"].list.len().sum() == 98
    assert boxes["present"].all()  # every boxed finding is a label of its image
    assert frame["patient_id"].n_unique() == len({r["Patient ID"] for r in rows})
    first = frame.filter((pl.col("file") == "00000001_000.png")
                         & pl.col("present"))["finding"].to_list()
    assert first == ["Cardiomegaly"]


def test_rsna_real_table() -> None:
    path = shared_data("labels", "kaggle_stage_2_train_labels.csv.zip")
    frame = read_rsna(path)
    with zipfile.ZipFile(path) as zf:
        rows = list(csv.DictReader(io.TextIOWrapper(zf.open(zf.namelist()[0]))))
    assert len(rows) == 30227
    assert frame.height == len({r["patientId"] for r in rows})
    assert frame["present"].sum() == len({r["patientId"] for r in rows if r["Target"] == "1"})
    assert frame["boxes"].list.len().sum() == sum(r["Target"] == "1" for r in rows)
    r0 = next(r for r in rows if r["Target"] == "1")
    box = frame.filter(pl.col("file") == f"{r0['patientId']}.dcm")["boxes"][0][0]
    assert box["x_max"] == pytest.approx(float(r0["x"]) + float(r0["width"]))


def test_vindr_real_table() -> None:
    path = shared_data("labels", "vinbigdata-train.csv.gz")
    rows = _rows(path)
    assert len(rows) == 67914
    votes: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in rows:
        if r["class_name"] != "No finding":
            votes[(r["image_id"], r["class_name"])].add(r["rad_id"])
    classes = {c for _, c in votes}
    for min_votes in (1, 2):
        frame = read_vindr(path, min_votes=min_votes)
        assert frame.height == 15000 * len(classes) == 15000 * 14
        expected = defaultdict(int)
        for (_, c), rads in votes.items():
            expected[c] += len(rads) >= min_votes
        got = dict(frame.group_by("finding").agg(pl.col("present").sum()).iter_rows())
        assert got == dict(expected)
        present = frame.filter(pl.col("present"))
        assert (present["boxes"].list.len() > 0).all()
    assert frame.filter(~pl.col("present"))["boxes"].list.len().sum() == 0


def test_tbx11k_adapter_matches_readme() -> None:
    source = shared_data("tbx11k")
    frame = read_tbx11k(source)
    active = frame.filter(pl.col("finding") == "ActiveTuberculosis")
    assert active.height == 601 and active["present"].sum() == 496
    h = frame.filter(pl.col("file") == "h0001.png")
    assert h["present"].to_list() == [False]


def test_real_siim_dicom_gets_its_label(tmp_path: Path) -> None:
    """The SIIM table -> labels.csv of a batch holding the real SIIM file (read in place)."""
    dcm = shared_data("dicom", "siim")
    batch = tmp_path / "batch"
    batch.mkdir()
    for p in dcm.glob("*.dcm"):
        (batch / p.name).symlink_to(p)
    frame = read_siim(shared_data("labels", "siim-pneumothorax-train-rle.csv.gz"))
    summary = write_batch_labels_for(frame, batch)
    assert summary["images"] == 1 and summary["label_images_not_in_batch"] == 12046
    labels = read_batch_labels(batch / "labels.csv")
    uid = pydicom.dcmread(next(batch.glob("*.dcm")), stop_before_pixels=True).SOPInstanceUID
    assert labels.row(0, named=True)["file"] == f"{uid}.dcm"
    assert labels["present"].to_list() == [False]
