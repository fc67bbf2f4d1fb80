"""Hostile label tables: every malformed row is named by file and row, nothing is written
outside the batch, through the real readers, adapters and the `findings` asset.

Policy (see `xcam_assets.ingest.labels`): at **ingest** a batch's labels.csv is screened
row by row; bad rows are recorded in data/findings/<batch>.parquet with
`status="rejected_label"` and a reason `<batch>/labels.csv: row <n>: <problem>`, good
rows pass, and the blocking check `labels_match_images` fails listing them. At
**import** (`xcam import-labels`, the adapters) a table with a bad row is refused as a
whole with every bad row named, and nothing is written.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from xcam_assets.config import load_settings
from xcam_assets.demo import write_demo_cohort
from xcam_assets.ingest.adapters.batch import write_batch_labels_for
from xcam_assets.ingest.adapters.nih import read_nih
from xcam_assets.ingest.adapters.registry import read_labels
from xcam_assets.ingest.adapters.rsna import read_rsna
from xcam_assets.ingest.adapters.siim import read_siim
from xcam_assets.ingest.adapters.vindr import read_vindr
from xcam_assets.ingest.labels import (
    LABEL_COLUMNS,
    LabelError,
    read_batch_labels,
    screen_batch_labels,
)
from xcam_assets.orchestrate import STAGES, StageFailed, _run, register_batches
from xcam_assets.project import XcamProject

HEADER = ",".join(LABEL_COLUMNS)


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---- the canonical labels.csv, row by row -------------------------------------------------

HOSTILE_ROWS = {  # data row -> (text, expected problem)
    2: ("a.dcm,lesion,1,10,20,abc,40,", "x_max 'abc' is not a number"),
    3: ("../../outside.dcm,lesion,0,,,,,", "contains '..'"),
    4: ("/etc/passwd,lesion,0,,,,,", "is an absolute path"),
    5: ("nul\x00name.dcm,lesion,0,,,,,", "contains a control character"),
    6: ("b.dcm,lesion,1,,,,,../../../../tmp/evil.png", "mask_file '../../../../tmp/evil.png'"),
    7: ("c.dcm,lesion,1,1,2,3", "has 6 fields, expected 8"),
    8: ("d.dcm,lesion,1,1e999,2,3,4,", "is not finite"),
    9: ("e.dcm,lesion,1,-5,2,3,4,", "is negative"),
    10: ("C:/windows/e.dcm,lesion,0,,,,,", "is an absolute path"),
    11: ("f\\g.dcm,lesion,0,,,,,", "contains a backslash"),
    12: ("a.dcm,lesion,0,,,,,", "present=1 and present=0 (also row 1)"),
}


def _hostile_csv(path: Path) -> bytes:
    rows = ["a.dcm,lesion,1,10,20,30,40,"] + [HOSTILE_ROWS[n][0] for n in sorted(HOSTILE_ROWS)]
    data = ("\n".join([HEADER, *rows]) + "\n").encode()
    data += b"z.dcm,lesion,0,,,,,\n"  # row 13: good
    data += b"\xff\xfe.dcm,lesion,0,,,,,\n"  # row 14: not UTF-8
    path.write_bytes(data)
    return data


def test_screening_keeps_good_rows_and_names_every_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    _hostile_csv(path)
    good, bad = screen_batch_labels(path, "site/labels.csv")
    assert good.select("file", "finding", "present").rows() == [
        ("a.dcm", "lesion", True), ("z.dcm", "lesion", False)]
    assert good["label_rows"].to_list() == [[1], [13]]
    assert good["boxes"][0].to_list() == [{"x_min": 10.0, "y_min": 20.0, "x_max": 30.0,
                                           "y_max": 40.0}]
    reasons = dict(zip(bad["label_row"], bad["reason"], strict=True))
    assert set(reasons) == {*HOSTILE_ROWS, 14}
    for n, (_, problem) in HOSTILE_ROWS.items():
        assert reasons[n].startswith(f"site/labels.csv: row {n}: "), reasons[n]
        assert problem in reasons[n], reasons[n]
    assert reasons[14] == "site/labels.csv: row 14: is not UTF-8 text"
    # the rejected row keeps its file text (printable) for the findings table
    assert bad.filter(pl.col("label_row") == 5)["file"].item() == "nul\x00name.dcm"
    assert bad.filter(pl.col("label_row") == 14)["file"].item() == "\ufffd\ufffd.dcm"
    # the strict reader refuses the same file, naming the same rows
    with pytest.raises(LabelError) as info:
        read_batch_labels(path)
    assert sorted({row for row, _ in info.value.errors}) == sorted({*HOSTILE_ROWS, 14})
    assert f"{path}: row 5: file 'nul\\x00name.dcm' contains a control character" in str(
        info.value)


def test_unreadable_csv_fails_the_whole_file_naming_the_row(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(f'{HEADER}\na.dcm,lesion,0,,,,,\n"{"x" * 200_000}",lesion,0,,,,,\n')
    with pytest.raises(LabelError, match=r"labels\.csv: row 2: unreadable CSV: field larger"):
        screen_batch_labels(path)


@pytest.fixture
def labelled_batch(project: Path) -> dict:
    """A small SYNTHETIC batch whose labels.csv gets hostile rows appended."""
    s = load_settings()
    batch = write_demo_cohort(s.incoming_dir, n_images=6, n_batches=1, size=64, seed=s.seed,
                              finding=s.findings[0])[0]
    (batch / ".complete").touch()
    labels = batch / "labels.csv"
    base = labels.read_text().splitlines()
    n = len(base) - 1
    good = read_batch_labels(labels)
    positive = good.filter(pl.col("present"))["file"][0]
    negative = good.filter(~pl.col("present"))["file"][0]
    extra = {
        n + 1: (f"{negative},lesion,1,10,20,abc,40,", "x_max 'abc' is not a number"),
        n + 2: (f"{positive},lesion,1,10,10,500,20,",
                "box x 10..500, y 10..20 lies outside the 64x64 image"),
        n + 3: ("ghost.dcm,lesion,0,,,,,", "names ghost.dcm, which is not a file of batch"),
        n + 4: ("../../../../outside.dcm,lesion,0,,,,,", "contains '..'"),
        n + 5: ("/etc/passwd,lesion,0,,,,,", "is an absolute path"),
        n + 6: ("nul\x00.dcm,lesion,0,,,,,", "contains a control character"),
        n + 7: (f"{positive},lesion,1,,,,,../../../../tmp/xcam-evil.png", "contains '..'"),
    }
    labels.write_text("\n".join([*base, *(t for t, _ in extra.values())]) + "\n")
    return {"settings": s, "batch": batch, "extra": extra, "n": n}


def test_findings_records_bad_rows_and_the_check_names_them(labelled_batch: dict,
                                                            project: Path) -> None:
    s, batch, extra = labelled_batch["settings"], labelled_batch["batch"], labelled_batch["extra"]
    outside_before = _tree(project.parent)
    instance = dg.DagsterInstance.get()
    register_batches(instance, [batch.name])
    with pytest.raises(StageFailed, match="labels_match_images"):
        _run(STAGES["ingest"] + STAGES["preprocess"], instance, XcamProject(), batch.name,
             log=print)
    frame = pl.read_parquet(s.findings_dir / f"{batch.name}.parquet")
    # every original row passed; every hostile row is recorded with its row and reason
    ok = frame.filter(pl.col("status") == "ok")
    assert ok.height == labelled_batch["n"]
    assert sorted(r for rows in ok["label_rows"] for r in rows) == list(
        range(1, labelled_batch["n"] + 1))
    assert ok.filter(pl.col("present"))["boxes"].list.len().min() >= 1  # the good box stays
    problems = frame.filter(pl.col("status").is_in(["rejected_label", "missing_image"]))
    by_row = {rows[0]: reason for rows, reason in problems.select("label_rows", "reason")
              .iter_rows()}
    assert set(by_row) == set(extra)
    for n, (_, problem) in extra.items():
        assert by_row[n].startswith(f"{batch.name}/labels.csv: row {n}: "), by_row[n]
        assert problem in by_row[n], by_row[n]
    # the blocking check failed, naming each of them; nothing downstream ran
    rec = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(dg.AssetKey("findings"), "labels_match_images"), limit=1)[0]
    assert rec.status.value == "FAILED"
    evaluation = rec.event.dagster_event.event_specific_data
    for n in extra:
        assert f"{batch.name}/labels.csv: row {n}: " in evaluation.description
    assert instance.get_latest_materialization_event(dg.AssetKey("clahe_tensors")) is None
    # no label value was used as a name to write: nothing appeared outside the project,
    # and inside it only under data/ and the Dagster home
    new = _tree(project.parent).keys() - outside_before.keys()
    assert new and all(k.startswith(("project/data/", "project/dagster_home/")) for k in new)
    assert not list(project.parent.rglob("*outside*")) and not list(
        project.parent.rglob("*xcam-evil*"))


# ---- adapters (import time): the whole table is refused, naming every bad row ---------------

SIIM_BAD = {
    "odd count": ("1 2 3", "odd number of values (3)"),
    "not an integer": ("1 2 x 4", "RLE value 'x' is not an integer"),
    "negative": ("5 -2", "negative gap or length"),
    "past the image": ("1048570 10", "runs past the 1024x1024 image"),
    "float": ("1.5 2", "RLE value '1.5' is not an integer"),
}


@pytest.mark.parametrize("rle,problem", SIIM_BAD.values(), ids=SIIM_BAD.keys())
def test_siim_bad_rle_is_refused_naming_table_and_row(tmp_path: Path, rle: str,
                                                      problem: str) -> None:
    table = tmp_path / "train-rle.csv"
    table.write_text(f"ImageId, EncodedPixels\nA, -1\nB, 0 2\nC, {rle}\nD, 4 4\n")
    with pytest.raises(LabelError) as info:
        read_siim(table)
    assert info.value.errors == [(3, f"C: {problem}")] or problem in str(info.value)
    assert f"{table}: row 3: C: " in str(info.value) and problem in str(info.value)


def test_siim_several_bad_rows_are_all_named(tmp_path: Path) -> None:
    table = tmp_path / "train-rle.csv"
    table.write_text("ImageId,EncodedPixels\nA,1 2 3\nB,-1\n,-1\nC,q 1\n")
    with pytest.raises(LabelError) as info:
        read_labels("siim", table)
    assert [row for row, _ in info.value.errors] == [1, 3, 4]
    assert "row 3: ImageId is empty" in str(info.value)


@pytest.mark.parametrize("fmt,text,row,problem", [
    ("rsna", "patientId,x,y,width,height,Target\np1,1,2,3,4,1\np2,1,two,3,4,1\n", 2,
     "y 'two' is not a finite number"),
    ("rsna", "patientId,x,y,width,height,Target\np1,,,,,0\np2,1,2,3,4,yes\n", 2,
     "Target 'yes' must be 0 or 1"),
    ("vindr", "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n"
              "a,Nodule/Mass,8,R1,0,0,10,10\na,No finding,14,R2,,,,\n"
              "b,Nodule/Mass,8,R1,0,0,inf,10\n", 3, "x_max 'inf' is not a finite number"),
], ids=["rsna_coordinate", "rsna_target", "vindr_coordinate"])
def test_non_numeric_coordinates_name_table_and_row(tmp_path: Path, fmt: str, text: str,
                                                    row: int, problem: str) -> None:
    table = tmp_path / "table.csv"
    table.write_text(text)
    reader = {"rsna": read_rsna, "vindr": read_vindr}[fmt]
    with pytest.raises(LabelError) as info:
        reader(table)
    assert str(info.value) == f"{table}: row {row}: {problem}"


def test_nih_bbox_non_numeric_names_row(tmp_path: Path) -> None:
    entry = tmp_path / "Data_Entry_2017.csv"
    entry.write_text("Image Index,Finding Labels,Patient ID\n1.png,Nodule,1\n2.png,Mass,2\n")
    bbox = tmp_path / "BBox_List_2017.csv"
    bbox.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n1.png,Nodule,1,2,3,4\n"
                    "2.png,Mass,5,6,seven,8\n")
    with pytest.raises(LabelError) as info:
        read_nih(entry, bbox)
    assert str(info.value).startswith(f"{bbox}: row 2: ")
    assert "'seven' is not a finite number" in str(info.value)


@pytest.fixture
def small_batch(tmp_path: Path) -> Path:
    batch = write_demo_cohort(tmp_path / "incoming", n_images=3, n_batches=1, size=64,
                              seed=3)[0]
    (batch / "labels.csv").unlink()
    for mask in (batch / "masks").glob("*"):
        mask.unlink()
    return batch


def test_import_refuses_a_box_outside_the_image(small_batch: Path, tmp_path: Path) -> None:
    stem = sorted(small_batch.glob("*.dcm"))[0].stem
    table = tmp_path / "rsna.csv"  # RSNA boxes are in a 1024 space: x + w = 1100 > 1024
    table.write_text(f"patientId,x,y,width,height,Target\n{stem},1000,10,100,50,1\n")
    before = _tree(small_batch)
    with pytest.raises(ValueError, match=rf"{stem}\.dcm Pneumonia: box x 62.5..68.75, "
                                         r"y 0.625..3.75 does not lie inside the 64x64 image"):
        write_batch_labels_for(read_rsna(table), small_batch)
    assert _tree(small_batch) == before  # nothing written


def test_import_counts_unknown_ids_and_writes_only_known_ones(small_batch: Path,
                                                            tmp_path: Path) -> None:
    stems = sorted(p.stem for p in small_batch.glob("*.dcm"))
    table = tmp_path / "train-rle.csv"
    table.write_text("ImageId,EncodedPixels\n" + "".join(f"{s},-1\n" for s in stems)
                     + "not-in-this-batch,0 5\n")
    summary = write_batch_labels_for(read_siim(table), small_batch)
    assert summary["label_images_not_in_batch"] == 1 and summary["images"] == len(stems)
    assert "not-in-this-batch" not in (small_batch / "labels.csv").read_text()
    assert not (small_batch / "masks").exists() or not any((small_batch / "masks").iterdir())


@pytest.mark.parametrize("image_id", ["../../../../tmp/xcam-evil", "/tmp/xcam-evil",
                                      "xcam\x00evil", "..\\..\\xcam-evil"])
def test_import_refuses_hostile_image_ids_and_writes_nothing(small_batch: Path, tmp_path: Path,
                                                             image_id: str) -> None:
    """A SIIM ImageId naming a path outside the batch: refused, nothing written anywhere
    (the mask name is only ever the stem of a batch file, never table text)."""
    stems = sorted(p.stem for p in small_batch.glob("*.dcm"))
    table = tmp_path / "train-rle.csv"
    # the hostile id ends in a real file's stem: matching by stem alone would accept it
    hostile = image_id + stems[0] if "\x00" not in image_id else image_id
    table.write_text("ImageId,EncodedPixels\n" + "".join(f"{s},-1\n" for s in stems[1:])
                     + f'"{hostile}",0 5\n')
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match="unsafe image names, nothing written"):
        write_batch_labels_for(read_siim(table), small_batch)
    assert _tree(tmp_path) == before
    assert not list(Path("/tmp").glob("xcam-evil*"))
