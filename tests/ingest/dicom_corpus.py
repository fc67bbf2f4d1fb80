"""Real DICOM files for ingest tests: good files in every transfer syntax we can encode
here, and bad files of many distinct kinds, each with the reason the inventory must give.

Everything starts from the SYNTHETIC demo cohort (upright chest-like images with fake
PHI), so a good file differs from its source only in what the test varies. Encoders:
pydicom natively (RLE Lossless, deflate, implicit VR, big endian with swapped bytes),
pylibjpeg-openjpeg (JPEG 2000 lossless), pyjpegls (JPEG-LS lossless, when installed),
Pillow (JPEG baseline) and a small JPEG lossless (process 14, SV1) encoder below.
Not encodable here, so not covered by a file: JPEG extended 12-bit, HTJ2K.
"""

from __future__ import annotations

import copy
import csv
import io
import shutil
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_encoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from xcam_assets.demo import write_demo_cohort

HAS_JPEGLS = get_encoder(JPEGLSLossless).is_available


# ---- a JPEG lossless (ITU T.81 process 14, first-order prediction) encoder --------------


def jpeg_lossless_sv1(img: np.ndarray, precision: int) -> bytes:
    """Encode a 2-D unsigned image losslessly, predictor 1 (left), one Huffman table.

    Tiny and slow (pure Python), enough for test images: all 17 difference
    categories get a 5-bit code."""
    x = img.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = x[0, :-1]
    pred[1:, 0] = x[:-1, 0]
    pred[1:, 1:] = x[1:, :-1]
    diff = (x - pred) % 65536
    diff[diff > 32768] -= 65536
    bits: list[str] = []
    for d in diff.ravel().tolist():
        ssss = abs(d).bit_length()
        bits.append(format(ssss, "05b"))
        if 0 < ssss < 16:
            extra = d if d > 0 else d + (1 << ssss) - 1
            bits.append(format(extra, f"0{ssss}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    scan = bytearray()
    for i in range(0, len(stream), 8):
        byte = int(stream[i:i + 8], 2)
        scan.append(byte)
        if byte == 0xFF:
            scan.append(0x00)
    h, w = x.shape
    sof = bytes([0xFF, 0xC3, 0, 11, precision, h >> 8, h & 255, w >> 8, w & 255, 1, 1, 0x11, 0])
    counts = [0] * 16
    counts[4] = 17
    dht = bytes([0xFF, 0xC4, 0, 36, 0x00, *counts, *range(17)])
    sos = bytes([0xFF, 0xDA, 0, 8, 1, 1, 0x00, 1, 0, 0])
    return b"\xff\xd8" + sof + dht + sos + bytes(scan) + b"\xff\xd9"


# ---- helpers ---------------------------------------------------------------------------


def demo_sources(tmp: Path, n: int = 6, size: int = 128) -> list[Path]:
    """A few SYNTHETIC demo files (DX and CR, MONOCHROME1/2, 8..16 bits, fake PHI)."""
    batches = write_demo_cohort(tmp, n_images=n, n_batches=1, size=size, seed=7)
    return sorted(batches[0].glob("*.dcm"))


def fresh(ds: Dataset) -> Dataset:
    """A copy with its own SOP Instance UID (so variants are not duplicates)."""
    out = copy.deepcopy(ds)
    out.SOPInstanceUID = out.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return out


def save(ds: Dataset, path: Path, **kw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True, **kw)
    return path


def _as_monochrome2_16(ds: Dataset) -> Dataset:
    """16-bit-allocated MONOCHROME2 variant with the same brightness (12 bits stored)."""
    out = fresh(ds)
    unit = _unit(ds)
    out.PhotometricInterpretation = "MONOCHROME2"
    out.BitsAllocated, out.BitsStored, out.HighBit, out.PixelRepresentation = 16, 12, 11, 0
    for kw in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept", "RescaleType"):
        if kw in out:
            delattr(out, kw)
    out.PixelData = np.rint(unit * 4095).astype(np.uint16).tobytes()
    out["PixelData"].VR = "OW"
    return out


def _as_8bit(ds: Dataset) -> Dataset:
    out = _as_monochrome2_16(ds)
    out.BitsAllocated, out.BitsStored, out.HighBit = 8, 8, 7
    out.PixelData = np.rint(_unit(ds) * 255).astype(np.uint8).tobytes()
    out["PixelData"].VR = "OB"
    return out


def _unit(ds: Dataset) -> np.ndarray:
    from xcam_assets.ingest.dicom import decode_unit

    return decode_unit(ds)


# ---- good files --------------------------------------------------------------------------


def good_files(src: list[Path], out: Path) -> dict[str, str]:
    """Write good files under `out`; returns {relative path: what it exercises}."""
    ref = pydicom.dcmread(src[0])
    m2 = _as_monochrome2_16(ref)
    written: dict[str, str] = {}
    out.mkdir(parents=True, exist_ok=True)

    def put(name: str, ds: Dataset, what: str, **kw: object) -> None:
        save(ds, out / name, **kw)
        written[name] = what

    for i, p in enumerate(src[:4]):  # the demo's own encodings, untouched bytes
        shutil.copyfile(p, out / f"demo_{i}.dcm")
        written[f"demo_{i}.dcm"] = "demo cohort file as written"
    put("explicit_le_12bit.dcm", m2, "Explicit VR LE, 12 of 16 bits")
    ds = fresh(m2)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    put("implicit_le.dcm", ds, "Implicit VR LE")
    ds = Dataset()  # a plain Dataset: FileDataset refuses to switch endianness
    ds.update(fresh(m2))
    ds.file_meta = copy.deepcopy(m2.file_meta)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.PixelData = np.frombuffer(m2.PixelData, "<u2").astype(">u2").tobytes()
    put("explicit_be.dcm", ds, "Explicit VR Big Endian (retired)")
    ds = fresh(m2)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    put("deflated.dcm", ds, "Deflated Explicit VR LE")
    ds = fresh(m2)
    ds.compress(RLELossless)
    put("rle.dcm", ds, "RLE Lossless")
    ds = fresh(m2)
    ds.compress(JPEG2000Lossless)
    put("j2k_lossless.dcm", ds, "JPEG 2000 lossless")
    if HAS_JPEGLS:
        ds = fresh(m2)
        ds.compress(JPEGLSLossless)
        put("jpegls_lossless.dcm", ds, "JPEG-LS lossless")
    ds = fresh(m2)
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([jpeg_lossless_sv1(m2.pixel_array, 12)])
    ds["PixelData"].VR = "OB"
    put("jpeg_lossless_sv1.dcm", ds, "JPEG lossless process 14 SV1")
    b8 = _as_8bit(ref)
    ds = fresh(b8)
    buf = io.BytesIO()
    Image.fromarray(b8.pixel_array).save(buf, format="JPEG", quality=95)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    put("jpeg_baseline.dcm", ds, "JPEG baseline 8-bit (lossy)")
    ds = fresh(m2)  # signed 16-bit with a rescale back to the same range
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 1, 16, 15
    signed = (m2.pixel_array.astype(np.int32) * 8 - 16384).astype(np.int16)
    ds.PixelData = signed.tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = "0.125", "2048"
    # LINEAR window C=2048, W=4096 maps rescaled p to (p - 2047.5)/4095 + 0.5 = p/4095
    ds.WindowCenter, ds.WindowWidth = "2048", "4096"
    put("signed_rescale.dcm", ds, "signed pixels + Modality rescale + window")
    ds = fresh(m2)  # VOI LUT sequence: an identity LUT over 12 bits, 16-bit entries
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])  # LUTDescriptor
    item.add_new(0x00283006, "US", list(range(0, 65536, 16)))  # LUTData
    ds.VOILUTSequence = Sequence([item])
    put("voi_lut.dcm", ds, "VOI LUT Sequence")
    ds = fresh(ref)
    if "ViewPosition" in ds:
        del ds.ViewPosition
    put("sub/dir/no_view.dcm", ds, "no ViewPosition, in a sub-folder")
    return written


# ---- bad files ---------------------------------------------------------------------------


def bad_files(src: list[Path], out: Path) -> dict[str, str]:
    """Write bad files under `out`; returns {relative path: expected reason substring}."""
    ref = pydicom.dcmread(src[0])
    m2 = _as_monochrome2_16(ref)
    good_bytes = src[1].read_bytes()
    bad: dict[str, str] = {}
    out.mkdir(parents=True, exist_ok=True)

    def put(name: str, ds: Dataset, reason: str, **kw: object) -> None:
        save(ds, out / name, **kw)
        bad[name] = reason

    (out / "notes.txt").write_text("a radiology report, not an image\n")
    bad["notes.txt"] = "not a DICOM file"
    (out / "zero.dcm").write_bytes(b"")
    bad["zero.dcm"] = "empty file"
    (out / "truncated_header.dcm").write_bytes(good_bytes[:300])
    bad["truncated_header.dcm"] = "truncated or corrupt header"
    (out / "truncated_pixels.dcm").write_bytes(good_bytes[:-5000])
    bad["truncated_pixels.dcm"] = "pixel data length mismatch"
    ds = fresh(m2)
    del ds.PixelData
    put("no_pixels.dcm", ds, "no pixel data")
    ds = fresh(m2)
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2 video
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3 not really mpeg"])
    ds["PixelData"].VR = "OB"
    put("mpeg2.dcm", ds, "unsupported transfer syntax MPEG2")
    ds = fresh(m2)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xdb definitely not a JPEG \xff\xd9"])
    ds["PixelData"].VR = "OB"
    put("corrupt_jpeg.dcm", ds, "cannot decode pixel data")
    ds = fresh(m2)
    ds.Modality = "CT"
    put("ct.dcm", ds, "wrong modality 'CT'")
    ds = fresh(m2)
    ds.BodyPartExamined = "KNEE"
    put("knee.dcm", ds, "wrong body part 'KNEE'")
    ds = fresh(m2)
    ds.ViewPosition = "LL"
    put("lateral.dcm", ds, "excluded view 'LL'")
    ds = fresh(m2)
    rgb = np.repeat(np.rint(_unit(m2) * 255).astype(np.uint8)[..., None], 3, axis=2)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = rgb.tobytes()
    put("rgb.dcm", ds, "not a grayscale image")
    ds = fresh(m2)
    ds.Rows = ds.Columns = 16
    ds.PixelData = np.zeros((16, 16), np.uint16).tobytes()
    put("tiny.dcm", ds, "absurd image size 16x16")
    shutil.copyfile(src[1], out / "zz_copy_of_demo_1.dcm")  # sorts after demo_1.dcm
    bad["zz_copy_of_demo_1.dcm"] = "duplicate SOP Instance UID: same image as"
    ds = fresh(m2)
    ds.PhotometricInterpretation = "MONOCHROME1"  # pixels left as MONOCHROME2
    put("fake_monochrome1.dcm", ds, "inconsistent photometric tag")
    ds = fresh(m2)
    ds.NumberOfFrames = 2
    ds.PixelData = m2.PixelData * 2
    put("multiframe.dcm", ds, "multi-frame image (2 frames)")
    ds = fresh(m2)
    del ds.PatientID
    put("no_patient_id.dcm", ds, "no Patient ID")
    ds = fresh(m2)
    ds.Rows = 100  # the data holds 128 rows
    put("wrong_geometry.dcm", ds, "pixel data length mismatch")
    ds = fresh(m2)
    ds.PixelData = np.full((m2.Rows, m2.Columns), 700, np.uint16).tobytes()
    put("blank.dcm", ds, "blank image")
    ds = fresh(m2)
    ds.WindowCenter, ds.WindowWidth = "2048", "0"
    put("zero_window.dcm", ds, "invalid VOI window")
    ds = fresh(m2)
    ds.BitsStored, ds.HighBit = 20, 19
    put("bits_stored_20.dcm", ds, "unsupported bit depth")
    return bad


def write_labels(batch_dir: Path, finding: str = "lesion") -> None:
    """labels.csv naming every candidate file of the batch (negatives, one positive)."""
    files = sorted(p.relative_to(batch_dir).as_posix() for p in batch_dir.rglob("*")
                   if p.is_file() and p.name not in ("labels.csv", ".complete"))
    with (batch_dir / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["file", "finding", "present", "x_min", "y_min", "x_max", "y_max",
                    "mask_file"])
        for i, f in enumerate(files):
            w.writerow([f, finding, int(i % 2 == 0), *([10, 10, 40, 40] if i % 2 == 0
                                                       else ["", "", "", ""]), ""])
