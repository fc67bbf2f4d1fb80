"""The canonical labels.csv: what the reader accepts, groups and refuses (with row numbers)."""

from __future__ import annotations

import pickle
from pathlib import Path

import polars as pl
import pytest

from xcam_assets.ingest.labels import (
    LABEL_COLUMNS,
    LABELS_SCHEMA,
    LabelError,
    read_batch_labels,
    write_batch_labels,
)

HEADER = ",".join(LABEL_COLUMNS)

ROWS = [
    {"file": "a.dcm", "finding": "Nodule", "present": 1,
     "x_min": 10, "y_min": 20, "x_max": 30.5, "y_max": 40},
    {"file": "a.dcm", "finding": "Nodule", "present": 1,
     "x_min": 100, "y_min": 120, "x_max": 130, "y_max": 140.25},
    {"file": "a.dcm", "finding": "Effusion", "present": 0},
    {"file": "sub/b.dcm", "finding": "Nodule", "present": 1, "mask_file": "masks/b.png"},
    {"file": "c.dcm", "finding": "Nodule", "present": 0},
]


def _labels(tmp_path: Path, *data_rows: str) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text("\n".join([HEADER, *data_rows]) + "\n")
    return path


def test_round_trip_and_multi_box_grouping(tmp_path: Path) -> None:
    path = write_batch_labels(ROWS, tmp_path / "labels.csv")
    frame = read_batch_labels(path)
    assert frame.schema == pl.Schema(LABELS_SCHEMA)
    assert frame.select("file", "finding", "present").rows() == [
        ("a.dcm", "Nodule", True), ("a.dcm", "Effusion", False),
        ("sub/b.dcm", "Nodule", True), ("c.dcm", "Nodule", False)]
    # the positive with two boxes is one row holding both boxes, in file order
    assert frame["boxes"][0].to_list() == [
        {"x_min": 10.0, "y_min": 20.0, "x_max": 30.5, "y_max": 40.0},
        {"x_min": 100.0, "y_min": 120.0, "x_max": 130.0, "y_max": 140.25}]
    assert frame["boxes"][2].to_list() == []  # positive without a box
    assert frame["mask_file"].to_list() == [None, None, "masks/b.png", None]
    # grouped frame -> write -> identical file; no temp file left behind
    again = write_batch_labels(frame, tmp_path / "again.csv")
    assert again.read_text() == path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.csv", "labels.csv"]
    assert path.read_text().splitlines()[0] == HEADER
    assert len(path.read_text().splitlines()) == 1 + len(ROWS)


def test_header_only_is_an_empty_frame_and_bom_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (HEADER + "\n").encode())
    frame = read_batch_labels(path)
    assert frame.height == 0 and frame.schema == pl.Schema(LABELS_SCHEMA)


BAD_ROWS = {
    "present_not_binary": (["a.dcm,X,2,,,,,"], 1, "present must be 0 or 1"),
    "present_word": (["a.dcm,X,yes,,,,,"], 1, "present must be 0 or 1"),
    "partial_box": (["a.dcm,X,0,,,,,", "b.dcm,X,1,1,2,3,,"], 2, "box is incomplete"),
    "x_min_not_below_x_max": (["a.dcm,X,1,5,1,5,9,"], 1, "x_min 5 is not < x_max 5"),
    "y_min_above_y_max": (["a.dcm,X,1,1,9,5,3,"], 1, "y_min 9 is not < y_max 3"),
    "negative": (["a.dcm,X,1,-1,2,3,4,"], 1, "x_min '-1' is negative"),
    "not_a_number": (["a.dcm,X,1,1,2,three,4,"], 1, "x_max 'three' is not a number"),
    "not_finite": (["a.dcm,X,1,1,2,inf,4,"], 1, "not finite"),
    "absent_with_box": (["a.dcm,X,0,1,2,3,4,"], 1, "present=0 row must have no box"),
    "absent_with_mask": (["a.dcm,X,0,,,,,m.png"], 1, "present=0 row must have no box"),
    "present_and_absent": (["a.dcm,X,1,1,2,3,4,", "b.dcm,X,0,,,,,", "a.dcm,X,0,,,,,"], 3,
                           "present=1 and present=0 (also row 1)"),
    "mask_dotdot": (["a.dcm,X,1,,,,,../etc/m.png"], 1, "contains '..'"),
    "mask_absolute": (["a.dcm,X,1,,,,,/tmp/m.png"], 1, "absolute path"),
    "mask_windows_drive": (["a.dcm,X,1,,,,,C:/m.png"], 1, "absolute path"),
    "file_outside": (["../a.dcm,X,1,,,,,"], 1, "contains '..'"),
    "empty_file": ([",X,1,,,,,"], 1, "file is empty"),
    "empty_finding": (["a.dcm,,1,,,,,"], 1, "finding is empty"),
    "two_masks": (["a.dcm,X,1,,,,,m1.png", "a.dcm,X,1,,,,,m2.png"], 2, "two mask files"),
    "field_count": (["a.dcm,X,1,,,,", "b.dcm,X,0,,,,,"], 1, "has 7 fields, expected 8"),
}


@pytest.mark.parametrize("rows,row_no,problem", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_bad_row_names_file_and_row(tmp_path: Path, rows: list[str], row_no: int,
                                    problem: str) -> None:
    path = _labels(tmp_path, *rows)
    with pytest.raises(LabelError) as info:
        read_batch_labels(path)
    message = str(info.value)
    assert f"{path}: row {row_no}: " in message, message
    assert problem in message, message
    assert isinstance(info.value, ValueError)
    assert [row for row, _ in info.value.errors] == [row_no]
    # the error survives pickling (Dagster ships errors between processes)
    assert str(pickle.loads(pickle.dumps(info.value))) == message


@pytest.mark.parametrize("header,problem", [
    ("file,finding,present,x_min,y_min,x_max,y_max", "missing ['mask_file']"),
    (HEADER + ",note", "unexpected ['note']"),
    ("finding,file,present,x_min,y_min,x_max,y_max,mask_file", "out of order"),
])
def test_bad_header_is_named(tmp_path: Path, header: str, problem: str) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(header + "\n")
    with pytest.raises(LabelError, match="header: columns must be exactly") as info:
        read_batch_labels(path)
    assert str(path) in str(info.value) and problem in str(info.value)


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    path = _labels(tmp_path, "a.dcm,X,1,1,2,3,4,", "b.dcm,X,7,,,,,", "c.dcm,X,1,9,2,3,4,")
    with pytest.raises(LabelError) as info:
        read_batch_labels(path)
    assert [row for row, _ in info.value.errors] == [2, 3]
    assert str(info.value).count(f"{path}: row ") == 2


def test_writer_refuses_what_the_reader_would_reject(tmp_path: Path) -> None:
    target = tmp_path / "labels.csv"
    target.write_text("old\n")
    bad = [*ROWS, {"file": "d.dcm", "finding": "X", "present": 0, "x_min": 1, "y_min": 1,
                   "x_max": 2, "y_max": 2}]
    with pytest.raises(LabelError, match=r"labels\.csv: row 6: a present=0 row"):
        write_batch_labels(bad, target)
    assert target.read_text() == "old\n"  # the previous file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["labels.csv"]
