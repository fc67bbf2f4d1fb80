"""Decoder tests: hand-made files with exact expected values, then the real files in place."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import polars as pl
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from real_data import shared_data

from xcam_assets.ingest.dicom import (
    HEADER_FIELDS,
    PHOTOMETRIC_MARGIN,
    DicomDecodeError,
    decode_u8,
    decode_unit,
    photometric_score,
    read_header,
    to_uint8,
    transfer_syntax_problem,
)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SIIM = DATA / "dicom/siim/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
RG1_UNCR = DATA / "dicom/nema-rg1/RG1_UNCR.dcm"
RG1_J2KR = DATA / "dicom/nema-rg1/RG1_J2KR.dcm"
FAKE_MONO1 = DATA / "dicom/edited/Fake_MONOHR1.dcm"

PIX12 = np.array([[0, 1024, 2048], [3071, 4095, 1]], dtype=np.uint16)


def _write(path: Path, pixels: np.ndarray | None, photometric: str = "MONOCHROME2",
           bits: int = 12, **attrs: object) -> Path:
    """A minimal Explicit VR LE Part 10 file; `pixels=None` writes no PixelData."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality, ds.BodyPartExamined = "PAT1", "CR", "CHEST"
    ds.ViewPosition = ""
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    shape = (2, 3) if pixels is None else pixels.shape[-2:]
    ds.Rows, ds.Columns = shape
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    if pixels is not None:
        ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_monochrome2_12bit_exact(tmp_path: Path) -> None:
    unit = decode_unit(_write(tmp_path / "m2.dcm", PIX12))
    assert unit.dtype == np.float32 and unit.shape == (2, 3)
    np.testing.assert_allclose(unit, PIX12 / 4095.0, atol=1e-7)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    unit = decode_unit(_write(tmp_path / "m1.dcm", PIX12, photometric="MONOCHROME1"))
    np.testing.assert_allclose(unit, 1.0 - PIX12 / 4095.0, atol=1e-7)


def test_rescale_uses_theoretical_output_range(tmp_path: Path) -> None:
    # slope 2, intercept -1024: output range -1024..7166; a linear map of it scales back to p/4095
    unit = decode_unit(_write(tmp_path / "r.dcm", PIX12, RescaleSlope=2, RescaleIntercept=-1024))
    np.testing.assert_allclose(unit, PIX12 / 4095.0, atol=1e-7)


def test_no_rescale_no_window_does_not_stretch(tmp_path: Path) -> None:
    narrow = np.full((2, 3), 1000, dtype=np.uint16)
    np.testing.assert_allclose(decode_unit(_write(tmp_path / "n.dcm", narrow)), 1000 / 4095,
                               atol=1e-7)


def test_window_exact(tmp_path: Path) -> None:
    # LINEAR window C=2048, W=1024 on 12 bits: p <= 1536 -> 0, p > 2559 -> 1,
    # else (p - 2047.5) / 1023 + 0.5 = (p - 1536) / 1023
    pix = np.array([[0, 1536, 1792], [2048, 2559, 4095]], dtype=np.uint16)
    unit = decode_unit(_write(tmp_path / "w.dcm", pix, WindowCenter=2048, WindowWidth=1024))
    np.testing.assert_allclose(unit, [[0, 0, 256 / 1023], [512 / 1023, 1, 1]], atol=1e-7)
    inv = decode_unit(_write(tmp_path / "w1.dcm", pix, photometric="MONOCHROME1",
                             WindowCenter=2048, WindowWidth=1024))
    np.testing.assert_allclose(inv, 1 - unit, atol=1e-7)


def test_rescale_then_window(tmp_path: Path) -> None:
    # window in rescaled units: x = p - 1024; C=0, W=1024 -> x <= -512 -> 0, x > 511 -> 1
    pix = np.array([[0, 512, 1024], [1535, 1536, 4095]], dtype=np.uint16)
    unit = decode_unit(_write(tmp_path / "rw.dcm", pix, RescaleSlope=1, RescaleIntercept=-1024,
                              WindowCenter=0, WindowWidth=1024))
    np.testing.assert_allclose(unit, [[0, 0, 512 / 1023], [1, 1, 1]], atol=1e-7)


def test_8bit_and_to_uint8(tmp_path: Path) -> None:
    pix = np.array([[0, 128, 255]], dtype=np.uint8)
    unit = decode_unit(_write(tmp_path / "b8.dcm", pix, bits=8))
    np.testing.assert_array_equal(to_uint8(unit), pix)
    np.testing.assert_array_equal(to_uint8(np.array([0.0, 0.5, 1.0, 1.2, -0.1])),
                                  [0, 128, 255, 255, 0])


def test_no_pixel_data(tmp_path: Path) -> None:
    path = _write(tmp_path / "nopix.dcm", None)
    header = read_header(path)
    assert header["has_pixel_data"] is False
    with pytest.raises(DicomDecodeError, match="nopix.dcm.*no pixel data"):
        decode_unit(path)


def test_header_fields(tmp_path: Path) -> None:
    header = read_header(_write(tmp_path / "h.dcm", PIX12))
    assert tuple(header) == HEADER_FIELDS
    assert header["has_pixel_data"] is True
    assert header["patient_id"] == "PAT1" and header["bits_stored"] == 12
    assert header["rows"] == 2 and header["columns"] == 3
    assert header["transfer_syntax_uid"] == ExplicitVRLittleEndian
    assert header["view_position"] is None  # '' -> None
    assert header["rescale_slope"] == 1.0 and header["rescale_intercept"] == 0.0


def test_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a DICOM file")
    with pytest.raises(InvalidDicomError):
        read_header(path)
    with pytest.raises(DicomDecodeError, match="notes.txt"):
        decode_unit(path)


def test_rejects_colour_and_multiframe(tmp_path: Path) -> None:
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    path = _write(tmp_path / "rgb.dcm", rgb, photometric="RGB", bits=8, SamplesPerPixel=3,
                  PlanarConfiguration=0)
    with pytest.raises(DicomDecodeError, match="rgb.dcm.*grayscale"):
        decode_unit(path)
    frames = np.zeros((2, 2, 3), dtype=np.uint16)
    path = _write(tmp_path / "mf.dcm", frames, NumberOfFrames=2)
    with pytest.raises(DicomDecodeError, match="mf.dcm.*multi-frame"):
        decode_unit(path)


def test_undecodable_transfer_syntax(tmp_path: Path) -> None:
    path = tmp_path / "bad_jpeg.dcm"
    _write(path, None)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([b"\xff\xd8 definitely not a JPEG \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DicomDecodeError, match="bad_jpeg.dcm.*cannot decode"):
        decode_unit(path)


def test_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(DicomDecodeError("a/b.dcm", "no pixel data")))
    assert str(err) == "a/b.dcm: no pixel data" and isinstance(err, ValueError)


# ---- real data, read in place from ../shared/data -------------------------------------


@pytest.fixture(scope="module")
def real_data() -> Path:
    if not (RG1_UNCR.exists() and RG1_J2KR.exists() and SIIM.exists()):
        pytest.skip(f"real DICOM test data not found at {DATA} (expected ../shared/data "
                    "beside the repository root; absent on a fresh clone)")
    return DATA


@pytest.fixture(scope="module")
def rg1(real_data: Path) -> dict[str, np.ndarray]:
    return {"uncr": decode_unit(RG1_UNCR), "j2kr": decode_unit(RG1_J2KR)}


def _strips(unit: np.ndarray) -> tuple[float, float]:
    h, w = unit.shape
    rows = slice(int(0.3 * h), int(0.7 * h))
    centre = unit[rows, int(0.45 * w):int(0.55 * w)]
    lungs = np.concatenate([unit[rows, int(0.2 * w):int(0.3 * w)].ravel(),
                            unit[rows, int(0.7 * w):int(0.8 * w)].ravel()])
    return float(centre.mean()), float(lungs.mean())


def test_siim_decodes(real_data: Path) -> None:
    header = read_header(SIIM)
    assert header["has_pixel_data"] and header["transfer_syntax_uid"] == JPEGBaseline8Bit
    unit = decode_unit(SIIM)
    assert unit.shape == (1024, 1024) and unit.dtype == np.float32
    assert 0.0 <= unit.min() < unit.max() <= 1.0
    centre, lungs = _strips(unit)
    assert centre > lungs


def test_rg1_lossless_pair_identical(rg1: dict[str, np.ndarray]) -> None:
    assert rg1["uncr"].shape == (1955, 1841)
    np.testing.assert_array_equal(rg1["uncr"], rg1["j2kr"])


def test_rg1_monochrome1_upright(rg1: dict[str, np.ndarray]) -> None:
    assert read_header(RG1_UNCR)["photometric_interpretation"] == "MONOCHROME1"
    centre, lungs = _strips(rg1["uncr"])
    assert centre > lungs, f"mediastinum {centre:.3f} should be brighter than lungs {lungs:.3f}"


def test_decoder_follows_header_even_when_it_lies(real_data: Path) -> None:
    # Fake_MONOHR1 is the SIIM file relabelled MONOCHROME1 without inverting its pixels:
    # the decoder trusts the header, so it comes out as the exact negative (lungs bright).
    if not FAKE_MONO1.exists():
        pytest.skip(f"{FAKE_MONO1} not present")
    np.testing.assert_allclose(decode_unit(FAKE_MONO1), 1 - decode_unit(SIIM), atol=1e-6)


# ---- transfer syntaxes, the inventory's decode check, the photometric heuristic -------


@pytest.fixture(scope="module")
def good_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from dicom_corpus import demo_sources, good_files

    root = tmp_path_factory.mktemp("corpus")
    written = good_files(demo_sources(root / "src"), root / "good")
    return {name: root / "good" / name for name in written}


def test_every_lossless_syntax_decodes_identically(good_corpus: dict[str, Path]) -> None:
    from dicom_corpus import HAS_JPEGLS

    ref = decode_unit(good_corpus["explicit_le_12bit.dcm"])
    lossless = ["implicit_le.dcm", "explicit_be.dcm", "deflated.dcm", "rle.dcm",
                "j2k_lossless.dcm", "jpeg_lossless_sv1.dcm", "signed_rescale.dcm", "voi_lut.dcm"]
    if HAS_JPEGLS:
        lossless.append("jpegls_lossless.dcm")
    for name in lossless:
        unit = decode_unit(good_corpus[name])
        np.testing.assert_allclose(unit, ref, atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(decode_u8(good_corpus[name]), to_uint8(unit), name)
    # JPEG baseline is lossy and 8-bit: close to the 8-bit rendering, not equal
    jpeg = decode_unit(good_corpus["jpeg_baseline.dcm"])
    assert np.abs(jpeg - ref).mean() < 0.01 and np.abs(jpeg - ref).max() < 0.1


def test_jpeg_lossless_encoder_round_trip() -> None:
    """The test-only process 14 encoder, decoded by pylibjpeg, on extreme differences."""
    import libjpeg
    from dicom_corpus import jpeg_lossless_sv1

    img = np.array([[0, 4095, 0, 1], [4095, 0, 2048, 2047]], dtype=np.uint16)
    out = libjpeg.decode(jpeg_lossless_sv1(img, 12))
    np.testing.assert_array_equal(out, img)


def test_transfer_syntax_problem() -> None:
    assert transfer_syntax_problem(str(ExplicitVRLittleEndian)) is None
    assert transfer_syntax_problem("1.2.840.10008.1.2.4.80") is None  # JPEG-LS: pylibjpeg
    assert transfer_syntax_problem("1.2.840.10008.1.2.4.201") is None  # HTJ2K: pylibjpeg
    assert transfer_syntax_problem("1.2.840.10008.1.2.4.100") == (
        "unsupported transfer syntax MPEG2 Main Profile / Main Level "
        "(1.2.840.10008.1.2.4.100): no image decoder exists for it")
    assert "unknown (1.2.3.4.5)" in transfer_syntax_problem("1.2.3.4.5")
    assert transfer_syntax_problem(None) == "no transfer syntax in the file meta header"


def test_photometric_score_is_antisymmetric_and_exact() -> None:
    # 100x100: mediastinum column and abdomen 1.0, lungs 0.0, the rest 0.5
    img = np.full((100, 100), 0.5, dtype=np.float32)
    img[20:65, 12:45] = img[20:65, 55:88] = 0.0
    img[20:65, 42:58] = 1.0
    img[80:97, 30:70] = 1.0
    # p5..p95 of the central 80 % = 0..1 (no rescaling); mediastinum and abdomen medians 1;
    # the lung bands are 0 but for 3 of their 33 columns (the mediastinum overlaps them),
    # so p30 = p70 = 0: score = m_c + m_a - p30 - p70 = 2, and exactly -2 for 1 - img
    score = photometric_score(img)
    assert photometric_score(1 - img) == pytest.approx(-score, abs=1e-6)
    assert score == pytest.approx(2.0, abs=1e-6)
    assert photometric_score(np.full((50, 50), 0.3)) == 0.0


def test_photometric_score_separates_real_radiographs() -> None:
    """601 real TBX11K + 2 NIH PNGs (upright by construction) and their negatives."""
    import cv2

    pngs = sorted(shared_data("tbx11k", "images").glob("*.png"))
    pngs += sorted(shared_data("nih", "images").glob("*.png"))
    assert len(pngs) >= 600
    upright, inverted = [], []
    for p in pngs:
        unit = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255
        upright.append(photometric_score(unit))
        inverted.append(photometric_score(1 - unit))
    assert min(upright) > PHOTOMETRIC_MARGIN, min(upright)
    assert max(inverted) < -PHOTOMETRIC_MARGIN, max(inverted)


def test_real_dicoms_ingest_to_the_right_status(real_data: Path) -> None:
    from xcam_assets.ingest.inventory import IngestPolicy, inventory_rows

    dicom_dir = shared_data("dicom")
    before = {p: p.stat().st_mtime_ns for p in dicom_dir.rglob("*")}
    inv = inventory_rows(dicom_dir, "real", b"k", IngestPolicy()).sort("file")
    status = dict(zip(inv["file"], inv["status"], strict=True))
    assert status == {"edited/Fake_MONOHR1.dcm": "quarantined",
                      "nema-rg1/LICENSE_pydicom-data_MIT.txt": "quarantined",
                      "nema-rg1/RG1_J2KR.dcm": "ok", "nema-rg1/RG1_UNCR.dcm": "ok",
                      f"siim/{SIIM.name}": "ok"}
    fake = inv.filter(pl.col("file") == "edited/Fake_MONOHR1.dcm").row(0, named=True)
    assert fake["reason"].startswith("inconsistent photometric tag: PhotometricInterpretation "
                                     "is MONOCHROME1 but the decoded image looks inverted")
    assert fake["photometric_score"] < -0.5
    ok = inv.filter(pl.col("status") == "ok")
    assert ok["photometric_score"].min() > 0.5  # none inverted
    assert {p: p.stat().st_mtime_ns for p in dicom_dir.rglob("*")} == before


def test_decode_u8_equals_decode_unit_on_real_files(real_data: Path) -> None:
    for path in (SIIM, RG1_UNCR, FAKE_MONO1):
        np.testing.assert_array_equal(decode_u8(path), to_uint8(decode_unit(path)))


def test_fast_paths_agree_with_pydicom(good_corpus: dict[str, Path]) -> None:
    """Raw-bytes header reading and the linear fast view give pydicom's numbers."""
    from xcam_assets.ingest import dicom

    paths = [*good_corpus.values(), *(p for p in (SIIM, RG1_UNCR, FAKE_MONO1) if p.exists())]
    for path in paths:
        ds = pydicom.dcmread(path)
        fast = dicom.header_from_dataset(ds)
        slow = pydicom.dcmread(path)
        for key, kw in {**dicom._STR_FIELDS, **dicom._INT_FIELDS}.items():
            conv = dicom._str_or_none if key in dicom._STR_FIELDS else dicom._int_or_none
            assert fast[key] == conv(slow.get(kw)), (path.name, key)
        for key, (kw, default) in dicom._FLOAT_FIELDS.items():
            assert fast[key] == dicom._float_or(slow.get(kw), default), (path.name, key)
        stored = ds.pixel_array[::2, ::2]
        view, problem = dicom._linear_view(stored, ds, fast)
        assert problem is None
        if view is not None:
            full = dicom._to_unit(stored, ds, path.name)
            assert photometric_score(view) == pytest.approx(photometric_score(full), abs=1e-4)
