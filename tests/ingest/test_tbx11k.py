"""TBX11K importer: pixels unchanged, provenance recorded, boxes scaled right, labels complete."""

from __future__ import annotations

import hashlib
import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import polars as pl
import pydicom
import pytest
from PIL import Image
from real_data import shared_data

from xcam_assets.ingest.importers.png import SECONDARY_CAPTURE_SOP_CLASS
from xcam_assets.ingest.importers.tbx11k_png import (
    TBX11K_CITATION,
    import_tbx11k,
    parse_voc,
    voc_box_to_pixels,
)
from xcam_assets.ingest.labels import read_batch_labels

FINDING = "ActiveTuberculosis"
SUBSET = 40  # sorted names: h0001 first, then 39 tb images


def _tbx11k() -> Path:
    return shared_data("tbx11k")


@pytest.fixture(scope="module")
def subset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    source = _tbx11k()
    out = tmp_path_factory.mktemp("tbx11k") / "batch"
    problems: list[str] = []
    assert import_tbx11k(source, out, limit=SUBSET, problems=problems) == out.resolve()
    return source, out, problems


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_subset_holds_h0001_and_pixels_are_the_pngs(subset) -> None:
    source, out, problems = subset
    assert problems == []
    pngs = sorted((source / "images").glob("*.png"))[:SUBSET]
    assert pngs[0].name == "h0001.png"
    assert sorted(p.name for p in out.glob("*.dcm")) == sorted(f"{p.stem}.dcm" for p in pngs)
    sops = set()
    for png in pngs:
        ds = pydicom.dcmread(out / f"{png.stem}.dcm")
        expected = np.asarray(Image.open(png))
        assert ds.pixel_array.dtype == np.uint8
        np.testing.assert_array_equal(ds.pixel_array, expected)
        assert ds.SOPClassUID == SECONDARY_CAPTURE_SOP_CLASS
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert (ds.Modality, ds.BodyPartExamined, ds.ViewPosition, ds.ConversionType) == (
            "OT", "CHEST", "PA", "WSD")
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsStored == 8
        assert ds.PatientID == f"TBX11K-{png.stem}"
        sha = _sha256(png)
        for text in (ds.DerivationDescription, ds.ImageComments):
            assert text == f"converted from TBX11K images/{png.name} sha256={sha}"
        sops.add(ds.SOPInstanceUID)
        assert len({ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID}) == 3
    assert len(sops) == SUBSET


def test_subset_labels_match_an_independent_recount(subset) -> None:
    source, out, _ = subset
    labels = read_batch_labels(out / "labels.csv")
    stems = [p.stem for p in sorted((source / "images").glob("*.png"))[:SUBSET]]
    # recount straight from the XML files, without the importer's parser
    expected_pos, expected_boxes = set(), {}
    for stem in stems:
        xml = source / "annotations" / f"{stem}.xml"
        if not xml.exists():
            continue
        for obj in ET.parse(xml).getroot().iter("object"):
            name = obj.findtext("name")
            expected_boxes[name] = expected_boxes.get(name, 0) + 1
            if name == FINDING:
                expected_pos.add(f"{stem}.dcm")
    main = labels.filter(pl.col("finding") == FINDING)
    assert main.height == SUBSET  # every image has a row for the finding
    assert set(main.filter("present")["file"]) == expected_pos
    assert 0 < len(expected_pos) < SUBSET
    assert not main.filter(pl.col("file") == "h0001.dcm")["present"][0]
    # no box of any class is lost
    counts = labels.group_by("finding").agg(pl.col("boxes").list.len().sum())
    assert dict(counts.iter_rows()) == expected_boxes


def test_hand_checked_box_tb0005(subset) -> None:
    source, out, _ = subset
    # tb0005.xml: <size> 1756 x 2022; one ActiveTuberculosis box xmin 1313 ymin 505
    # xmax 1451 ymax 681 (VOC: 1-based, inclusive). PNG is 512 x 512. 0-based, max exclusive:
    #   x_min = (1313 - 1) * 512 / 1756 = 382.5421...  y_min = (505 - 1) * 512 / 2022 = 127.6202...
    #   x_max =  1451      * 512 / 1756 = 423.0706...  y_max =  681      * 512 / 2022 = 172.4392...
    voc = parse_voc(source / "annotations" / "tb0005.xml")
    assert (voc["width"], voc["height"]) == (1756.0, 2022.0)
    assert voc["objects"] == [(FINDING, 1313.0, 505.0, 1451.0, 681.0)]
    assert Image.open(source / "images" / "tb0005.png").size == (512, 512)
    row = read_batch_labels(out / "labels.csv").filter(
        (pl.col("file") == "tb0005.dcm") & (pl.col("finding") == FINDING)).row(0, named=True)
    assert row["present"] is True
    assert row["boxes"] == [pytest.approx(
        {"x_min": 382.542, "y_min": 127.620, "x_max": 423.071, "y_max": 172.439}, abs=1e-9)]


def test_reimport_is_byte_identical_and_source_untouched(tmp_path: Path) -> None:
    source = _tbx11k()
    before = sorted(p.relative_to(source) for p in source.rglob("*"))
    shas = {p.name: _sha256(p) for p in sorted((source / "images").glob("*.png"))[:3]}
    a = import_tbx11k(source, tmp_path / "a", limit=3)
    b = import_tbx11k(source, tmp_path / "b", limit=3)
    import_tbx11k(source, tmp_path / "a", limit=3)  # same batch again: allowed, same bytes
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) == sorted(
        [f"{Path(n).stem}.dcm" for n in shas] + ["labels.csv"])
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert sorted(p.relative_to(source) for p in source.rglob("*")) == before
    assert {n: _sha256(source / "images" / n) for n in shas} == shas
    with pytest.raises(FileExistsError, match="would not write"):
        import_tbx11k(source, tmp_path / "a", limit=2)  # a smaller import over a larger one
    with pytest.raises(ValueError, match="inside the source"):
        import_tbx11k(source, source / "out")


def test_full_import_counts_496_positives(tmp_path: Path) -> None:
    source = _tbx11k()
    problems: list[str] = []
    out = import_tbx11k(source, tmp_path / "full", problems=problems)  # ~5 s on 2 cores
    labels = read_batch_labels(out / "labels.csv")
    main = labels.filter(pl.col("finding") == FINDING)
    assert main.height == 601 == len(list(out.glob("*.dcm")))
    assert main["present"].sum() == 496  # README: 496 of the 600 tb images; h0001 negative
    assert problems == ["images/tb1199.png: annotation has no box; "
                        "imported as ActiveTuberculosis present=0"]


# ---- synthetic source (always runs): skips, classes, geometry, citation ----

def _voc(path: Path, size: tuple[int, int], objects: list[tuple]) -> None:
    objs = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin>"
        f"<xmax>{c}</xmax><ymax>{d}</ymax></bndbox></object>" for n, a, b, c, d in objects)
    path.write_text(f"<annotation><filename>{path.stem}</filename><size><width>{size[0]}</width>"
                    f"<height>{size[1]}</height></size>{objs}</annotation>")


def test_synthetic_source_skips_and_classes(tmp_path: Path, caplog) -> None:
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "annotations").mkdir()
    rng = np.random.default_rng(0)
    for stem in ("h0001", "tb0001", "tb0003", "tb0004", "tb0005"):
        Image.fromarray(rng.integers(0, 256, (64, 32), dtype=np.uint8)).save(
            src / "images" / f"{stem}.png")
    # tb0001: two Active boxes + one Obsolete, original 320 x 128 -> PNG 32 x 64
    _voc(src / "annotations" / "tb0001.xml", (320, 128),
         [(FINDING, 1, 1, 10, 64), (FINDING, 11, 33, 320, 128),
          ("ObsoletePulmonaryTuberculosis", 101, 1, 200, 2)])
    (src / "images" / "tb0002.png").write_bytes(b"not a png")     # unreadable
    Image.new("RGB", (8, 8)).save(src / "images" / "tb0006.png")  # not grayscale
    # tb0003: no XML -> label unknown -> skipped
    (src / "annotations" / "tb0004.xml").write_text("<annotation><size>")  # broken XML
    _voc(src / "annotations" / "tb0005.xml", (64, 128), [])  # no box -> negative, noted
    problems: list[str] = []
    with caplog.at_level(logging.WARNING):
        out = import_tbx11k(src, tmp_path / "out", problems=problems)
    assert sorted(p.name for p in out.glob("*.dcm")) == ["h0001.dcm", "tb0001.dcm", "tb0005.dcm"]
    skipped = sorted(p.split(":")[0] for p in problems if p.startswith("skipped"))
    assert skipped == ["skipped images/tb0002.png", "skipped images/tb0003.png",
                       "skipped images/tb0004.png", "skipped images/tb0006.png"]
    assert any("tb0005.png: annotation has no box" in p for p in problems)
    logged = [r for r in caplog.records if r.name == "xcam_assets.ingest.importers.tbx11k_png"]
    assert [r.getMessage() for r in logged] == problems and len(problems) == 5
    rows = read_batch_labels(out / "labels.csv").rows(named=True)
    got = {(r["file"], r["finding"]): (r["present"], r["boxes"]) for r in rows}
    assert got == {
        ("h0001.dcm", FINDING): (False, []),
        ("tb0001.dcm", FINDING): (True, [
            {"x_min": 0.0, "y_min": 0.0, "x_max": 1.0, "y_max": 32.0},
            {"x_min": 1.0, "y_min": 16.0, "x_max": 32.0, "y_max": 64.0}]),
        ("tb0001.dcm", "ObsoletePulmonaryTuberculosis"): (True, [
            {"x_min": 10.0, "y_min": 0.0, "x_max": 20.0, "y_max": 1.0}]),
        ("tb0005.dcm", FINDING): (False, []),
    }
    assert "Liu" in TBX11K_CITATION and "CVPR" in TBX11K_CITATION and "2020" in TBX11K_CITATION


def test_voc_box_conversion_edges() -> None:
    # the whole original image maps onto the whole PNG
    assert voc_box_to_pixels((1, 1, 2000, 1000), (2000, 1000), (512, 256)) == {
        "x_min": 0.0, "y_min": 0.0, "x_max": 512.0, "y_max": 256.0}
    # a box poking outside is clipped; one wholly outside is dropped
    assert voc_box_to_pixels((0, 1, 2100, 10), (2000, 1000), (512, 256))["x_max"] == 512.0
    assert voc_box_to_pixels((2100, 1, 2200, 10), (2000, 1000), (512, 256)) is None
    with pytest.raises(ValueError, match="patient ids"):
        import_tbx11k(Path("."), Path("x"), patient_key_from="study")  # type: ignore[arg-type]
