"""Fuzzing the inventory reader with hostile DICOM files (hypothesis).

Files are encoded **by hand** here, element by element (tag, VR, length, value), so
a test can lie about anything a real file can lie about: a VR that does not match
the tag, a length field that does not match the value, values of the wrong type or
absurd size, a transfer syntax that does not match the pixel data, bits allocated /
stored, rows x columns against the pixel bytes, photometric interpretation, broken
encapsulation, random bytes in the pixels, a deflated body that is not deflated,
plus byte-level damage afterwards (truncation at any point, overwritten bytes).
The starting point is a real, admissible radiograph: the SYNTHETIC demo image,
in each transfer syntax we can encode (native LE/BE/implicit, deflated, RLE,
JPEG baseline, JPEG lossless, JPEG-LS, JPEG 2000), so unmutated and mildly mutated
files are admitted and the "admitted" branch is exercised too.

Properties, per file (`scan_file`, what `inventory_rows` calls per file):

* no exception escapes (a bad file never fails the run);
* the row names the file, its status is `ok` or `quarantined`, a quarantined row
  has a non-empty reason, an admitted one none; the row fits the inventory schema
  (a header value that does not fit, e.g. a 20-digit Rows, must not break the batch);
* an admitted file really serves: `decode_u8` (what `clahe_tensors` calls) decodes
  it to a uint8 image of the header's size;
* the input bytes are never modified (sha256 before and after, and in the row);
* the row holds none of the file's identifiers (Patient Name / ID, UIDs), even when a
  lying VR or length makes one header value swallow its neighbours; an admitted row
  has a finite photometric score (no NaN image).

Also a LUT sequence with a bogus descriptor/data, a LINEAR window and rescale for the
mutations to hit, odd character sets and extra elements with random tags and VRs.
CI runs 2,000 fixed (derandomized) examples in about 20 s on 2 cores;
`XCAM_FUZZ_EXAMPLES=50000 XCAM_FUZZ_RANDOM=1` hunts further. The escapes found while
writing it are pinned in `FOUND` below.

Then whole batches of fuzzed files go through `inventory_rows` and through the real
Dagster assets (`raw_dicoms` + `dicom_inventory` and its blocking check).
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pydicom
import pytest
from dicom_corpus import HAS_JPEGLS, demo_sources, jpeg_lossless_sv1
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from xcam_assets.ingest.dicom import decode_u8, decode_unit
from xcam_assets.ingest.inventory import (
    INVENTORY_SCHEMA,
    IngestPolicy,
    inventory_rows,
    scan_file,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

KEY = b"fuzz-test-key"
POLICY = IngestPolicy()
SIZE = 64  # the policy's minimum side: small files, fast examples

# ---- a hand-rolled DICOM encoder ------------------------------------------------------------

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT",
             b"SV", b"UV"}
VRS = [b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT",
       b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST",
       b"SV", b"TM", b"UC", b"UI", b"UL", b"UN", b"UR", b"US", b"UT", b"UV"]
UNDEFINED = 0xFFFFFFFF
SEQ_DELIMITER = b"\xfe\xff\xdd\xe0\0\0\0\0"  # (FFFE,E0DD), length 0


@dataclass
class Elem:
    """One data element as it will be written: tag, VR bytes, value bytes, length field."""

    tag: int
    vr: bytes
    value: bytes
    length: int | None = None  # None: the true length


def _encode(elem: Elem, explicit: bool, little: bool) -> bytes:
    end = "<" if little else ">"
    n = len(elem.value) if elem.length is None else elem.length
    head = struct.pack(end + "HH", elem.tag >> 16, elem.tag & 0xFFFF)
    if not explicit:
        return head + struct.pack(end + "I", n & 0xFFFFFFFF) + elem.value
    if elem.vr in _LONG_VRS:
        return head + elem.vr + b"\0\0" + struct.pack(end + "I", n & 0xFFFFFFFF) + elem.value
    return head + elem.vr + struct.pack(end + "H", n & 0xFFFF) + elem.value


def text(value: str, vr: bytes = b"CS") -> bytes:
    raw = value.encode("latin-1", "replace")
    pad = b"\0" if vr == b"UI" else b" "
    return raw + pad * (len(raw) % 2)


def us(value: int, little: bool = True) -> bytes:
    return struct.pack("<H" if little else ">H", value & 0xFFFF)


def _file_bytes(meta: list[Elem], body: list[Elem], explicit: bool, little: bool,
                deflate: bool) -> bytes:
    meta_bytes = b"".join(_encode(e, True, True) for e in meta)
    group_length = _encode(Elem(0x00020000, b"UL", struct.pack("<I", len(meta_bytes))),
                           True, True)
    data = b"".join(_encode(e, explicit, little) for e in sorted(body, key=lambda e: e.tag))
    if deflate:
        c = zlib.compressobj(wbits=-15)
        data = c.compress(data) + c.flush()
    return b"\0" * 128 + b"DICM" + group_length + meta_bytes + data


@dataclass(frozen=True)
class Encoding:
    """A real encoding of the base image: transfer syntax and its Pixel Data value."""

    name: str
    tsyntax: str
    pixel_data: bytes
    encapsulated: bool
    bits_allocated: int
    bits_stored: int


def _base_image() -> np.ndarray:
    """The SYNTHETIC demo radiograph at SIZE px as 12-bit stored values (upright)."""
    with tempfile.TemporaryDirectory() as tmp:
        unit = decode_unit(demo_sources(Path(tmp), n=1, size=SIZE)[0])
    return np.rint(unit * 4095).astype(np.uint16)


IMG12 = _base_image()
IMG8 = (IMG12 >> 4).astype(np.uint8)


def _compressed(img: np.ndarray, tsyntax: str) -> bytes:
    ds = pydicom.Dataset()
    ds.Rows, ds.Columns = img.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = 8 if img.dtype == np.uint8 else 16
    ds.BitsStored = 8 if img.dtype == np.uint8 else 12
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = img.tobytes()
    ds.compress(tsyntax)
    return ds.PixelData + SEQ_DELIMITER


def _encodings() -> list[Encoding]:
    be = IMG12.astype(">u2").tobytes()
    out = [
        Encoding("explicit_le", ExplicitVRLittleEndian, IMG12.tobytes(), False, 16, 12),
        Encoding("explicit_le_8bit", ExplicitVRLittleEndian, IMG8.tobytes(), False, 8, 8),
        Encoding("implicit_le", ImplicitVRLittleEndian, IMG12.tobytes(), False, 16, 12),
        Encoding("explicit_be", ExplicitVRBigEndian, be, False, 16, 12),
        Encoding("deflated", DeflatedExplicitVRLittleEndian, IMG12.tobytes(), False, 16, 12),
        Encoding("rle", RLELossless, _compressed(IMG12, RLELossless), True, 16, 12),
        Encoding("j2k", JPEG2000Lossless, _compressed(IMG12, JPEG2000Lossless), True, 16, 12),
        Encoding("jpeg_lossless", JPEGLosslessSV1,
                 encapsulate([jpeg_lossless_sv1(IMG12, 12)]) + SEQ_DELIMITER, True, 16, 12),
    ]
    buf = io.BytesIO()
    Image.fromarray(IMG8).save(buf, format="JPEG", quality=95)
    out.append(Encoding("jpeg_baseline", JPEGBaseline8Bit, encapsulate([buf.getvalue()]) + SEQ_DELIMITER, True, 8, 8))
    if HAS_JPEGLS:
        out.append(Encoding("jpegls", JPEGLSLossless, _compressed(IMG12, JPEGLSLossless),
                            True, 16, 12))
    return out


ENCODINGS = _encodings()

# ---- what the fuzzer may write -----------------------------------------------------------

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian, RLELossless, JPEG2000Lossless, JPEGBaseline8Bit,
    JPEGLosslessSV1, JPEGLSLossless, "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.100",  # MPEG2 video
    "1.2.840.10008.1.2.4.51",  # JPEG extended
    "1.2.840.10008.5.1.4.1.1.2",  # a SOP class, not a transfer syntax
    "1.2.3.4.5.6.7", "", "garbage", "1.2.840.10008.1.2.1\0\0\0", "../../etc/passwd",
]
HOSTILE_TEXT = [
    "", " ", "\0", "../../../../tmp/evil", "/etc/passwd", "..\\..\\windows", "a\0b",
    "x" * 64, "x" * 5000, "\x1b$B", "\x1b(B", "é", "DX\\CR", "\\\\\\", "-1", "0",
    "99999999999999999999", "1e400", "nan", "inf", "-inf", "1.5", "0x10", " 12 ",
    "MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "CHEST", "chest",
    "LL", "PA", "AP", "DX", "CR", "CT", "%s%n", "{}", "'; DROP TABLE runs; --",
]
INT_VALUES = [0, 1, 2, 3, 7, 8, 12, 15, 16, 17, 24, 32, 63, 64, 65, 100, 128, 255, 256,
              4096, 16384, 16385, 32768, 65535]
NUMBER_TEXT = ["1", "0", "-1", "2", "3", "1.0", "-2048", "4096", "1e-30", "1e30", "1e400",
               "nan", "inf", "-inf", "abc", "", "1\\2", "2147483648", "99999999999999999999",
               "0.125", "0.0"]

# name -> (tag, VR, how the value is drawn)
FIELDS: dict[str, tuple[int, bytes, str]] = {
    "SpecificCharacterSet": (0x00080005, b"CS", "charset"),
    "SOPClassUID": (0x00080016, b"UI", "uid"),
    "SOPInstanceUID": (0x00080018, b"UI", "uid"),
    "Modality": (0x00080060, b"CS", "text"),
    "PatientName": (0x00100010, b"PN", "text"),
    "PatientID": (0x00100020, b"LO", "text"),
    "BodyPartExamined": (0x00180015, b"CS", "text"),
    "ViewPosition": (0x00185101, b"CS", "text"),
    "StudyInstanceUID": (0x0020000D, b"UI", "uid"),
    "SeriesInstanceUID": (0x0020000E, b"UI", "uid"),
    "SamplesPerPixel": (0x00280002, b"US", "int"),
    "PhotometricInterpretation": (0x00280004, b"CS", "text"),
    "PlanarConfiguration": (0x00280006, b"US", "int"),
    "NumberOfFrames": (0x00280008, b"IS", "number"),
    "Rows": (0x00280010, b"US", "int"),
    "Columns": (0x00280011, b"US", "int"),
    "BitsAllocated": (0x00280100, b"US", "int"),
    "BitsStored": (0x00280101, b"US", "int"),
    "HighBit": (0x00280102, b"US", "int"),
    "PixelRepresentation": (0x00280103, b"US", "int"),
    "WindowCenter": (0x00281050, b"DS", "number"),
    "WindowWidth": (0x00281051, b"DS", "number"),
    "RescaleIntercept": (0x00281052, b"DS", "number"),
    "RescaleSlope": (0x00281053, b"DS", "number"),
    "VOILUTFunction": (0x00281056, b"CS", "text"),
    "PresentationLUTShape": (0x20500020, b"CS", "text"),
}
CHARSETS = ["ISO_IR 100", "ISO_IR 192", "GB18030", "ISO 2022 IR 87", "\\ISO 2022 IR 87",
            "ISO_IR 13", "nonsense", "ISO_IR 6\\ISO_IR 100", ""]


PHI_MARKERS = ("FUZZ^PATIENT", "FUZZ0", "2.25.90")  # PatientName, PatientID, UIDs below


def base_fields(enc: Encoding, little: bool, n: int) -> dict[str, Elem]:
    """The elements of an admissible DX chest radiograph in encoding `enc`."""
    uid = f"2.25.{9000 + n}"
    fields = {
        "SOPClassUID": text("1.2.840.10008.5.1.4.1.1.1.1", b"UI"),
        "SOPInstanceUID": text(uid, b"UI"),
        "Modality": text("DX"), "PatientName": text("FUZZ^PATIENT", b"PN"),
        "PatientID": text(f"FUZZ{n:06d}", b"LO"), "BodyPartExamined": text("CHEST"),
        "ViewPosition": text("PA"), "StudyInstanceUID": text(uid + ".1", b"UI"),
        "SeriesInstanceUID": text(uid + ".2", b"UI"),
        "SamplesPerPixel": us(1, little), "PhotometricInterpretation": text("MONOCHROME2"),
        "Rows": us(SIZE, little), "Columns": us(SIZE, little),
        "BitsAllocated": us(enc.bits_allocated, little),
        "BitsStored": us(enc.bits_stored, little),
        "HighBit": us(enc.bits_stored - 1, little), "PixelRepresentation": us(0, little),
    }
    return {k: Elem(FIELDS[k][0], FIELDS[k][1], v) for k, v in fields.items()}


def rarely(p: float) -> st.SearchStrategy[bool]:
    """True with probability ~p (hypothesis favours small integers, so no `integers() == 0`)."""
    n = round(1 / p)
    return st.sampled_from([False] * (n - 1) + [True])


@st.composite
def field_value(draw: st.DrawFn, kind: str, little: bool) -> bytes:
    if kind == "int":
        return us(draw(st.sampled_from(INT_VALUES) | st.integers(0, 65535)), little)
    if kind == "number":
        return text(draw(st.sampled_from(NUMBER_TEXT)), b"DS")
    if kind == "charset":
        return text(draw(st.sampled_from(CHARSETS)))
    if kind == "uid":
        return text(draw(st.sampled_from(HOSTILE_TEXT) | st.sampled_from(
            ["1.2.3", "2.25.1", "1." * 40 + "1", "1.2.3\0\0\0\0"])), b"UI")
    return text(draw(st.sampled_from(HOSTILE_TEXT) | st.text(max_size=20)))


@st.composite
def mutate_elem(draw: st.DrawFn, elem: Elem, kind: str, little: bool) -> Elem | None:
    """None (delete), a new value, a new VR, a lying length, or random bytes."""
    how = draw(st.sampled_from(["delete", "value", "vr", "length", "bytes", "value+vr"]))
    if how == "delete":
        return None
    if how == "value":
        return Elem(elem.tag, elem.vr, draw(field_value(kind, little)))
    if how == "vr":
        return Elem(elem.tag, draw(st.sampled_from(VRS) | st.binary(min_size=2, max_size=2)),
                    elem.value)
    if how == "length":
        delta = draw(st.sampled_from([-3, -2, -1, 1, 2, 3, 100, 1 << 16, UNDEFINED])
                     | st.integers(0, UNDEFINED))
        return Elem(elem.tag, elem.vr, elem.value, max(0, len(elem.value) + delta)
                    if abs(delta) < 1 << 16 else delta)
    if how == "bytes":
        return Elem(elem.tag, elem.vr, draw(st.binary(max_size=40)))
    return Elem(elem.tag, draw(st.sampled_from(VRS)), draw(field_value(kind, little)))


@st.composite
def pixel_mutation(draw: st.DrawFn, enc: Encoding) -> tuple[bytes, int | None]:
    """Pixel Data value and length field (None = true length / undefined if encapsulated)."""
    data = enc.pixel_data
    how = draw(st.sampled_from(["keep"] * 6 + ["random", "truncate", "flip", "append",
                                              "other_encoding", "empty", "length"]))
    if how == "random":
        return draw(st.binary(max_size=300)) + bytes(draw(st.integers(0, 2 * len(data)))), None
    if how == "truncate":
        return data[:draw(st.integers(0, max(0, len(data) - 1)))], None
    if how == "flip":
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
        return bytes(buf), None
    if how == "append":
        return data + draw(st.binary(min_size=1, max_size=64)), None
    if how == "other_encoding":
        return draw(st.sampled_from(ENCODINGS)).pixel_data, None
    if how == "empty":
        return b"", None
    if how == "length":
        return data, draw(st.integers(0, UNDEFINED))
    return data, None


@st.composite
def lut_sequence(draw: st.DrawFn, explicit: bool, little: bool) -> Elem:
    """(0028,3010) VOI LUT or (0028,3000) Modality LUT Sequence: one item, lying freely."""
    end = "<" if little else ">"
    entries = draw(st.sampled_from([4096, 256, 0, 1, 2, 16, 65535]))
    first = draw(st.sampled_from([0, 0, 2048, 65535, 32768]))
    bits = draw(st.sampled_from([16, 12, 8, 0, 1, 17, 32]))
    descriptor = struct.pack(end + "HHH", entries, first, bits)
    if draw(rarely(1 / 4)):
        descriptor = draw(st.binary(max_size=8))
    n = draw(st.sampled_from([entries, entries, 0, 1, max(0, entries - 1), entries + 7]))
    data = (np.arange(n, dtype=np.uint32) * 16 % 65536).astype(end + "u2").tobytes()
    if draw(rarely(1 / 4)):
        data = draw(st.binary(max_size=64))
    item = [Elem(0x00283002, draw(st.sampled_from([b"US", b"SS", b"OW", b"DS"])), descriptor),
            Elem(0x00283006, draw(st.sampled_from([b"OW", b"US", b"OB"])), data)]
    if draw(st.booleans()):
        item.insert(1, Elem(0x00283003, b"LO", text("LUT")))  # LUTExplanation
    payload = b"".join(_encode(e, explicit, little) for e in item)
    seq = struct.pack(end + "HHI", 0xFFFE, 0xE000, len(payload)) + payload
    tag = draw(st.sampled_from([0x00283010, 0x00283000]))
    return Elem(tag, b"SQ", seq)


@dataclass
class Fuzzed:
    data: bytes
    what: str  # a one-line description for failure messages


@st.composite
def fuzzed_dicom(draw: st.DrawFn, n: int = 0) -> Fuzzed:
    enc = draw(st.sampled_from(ENCODINGS))
    notes = [enc.name]
    tsyntax = enc.tsyntax
    if draw(rarely(1 / 6)):
        tsyntax = draw(st.sampled_from(TRANSFER_SYNTAXES))
        notes.append(f"ts={tsyntax!r}")
    # the body is written as the *claimed* syntax says, unless the fuzzer lies about that too
    layout = enc.tsyntax if draw(rarely(1 / 8)) else tsyntax
    explicit = layout != ImplicitVRLittleEndian
    little = layout != ExplicitVRBigEndian
    deflate = layout == DeflatedExplicitVRLittleEndian
    fields = base_fields(enc, enc.tsyntax != ExplicitVRBigEndian, n)
    if draw(rarely(1 / 3)):  # a LINEAR window and an identity rescale, for mutations to hit
        top = 2 ** enc.bits_stored
        fields.update({name: Elem(FIELDS[name][0], FIELDS[name][1], text(value, b"DS")) for
                       name, value in (("WindowCenter", str(top // 2)),
                                       ("WindowWidth", str(top)), ("RescaleSlope", "1"),
                                       ("RescaleIntercept", "0"))})
        notes.append("window+rescale")
    n_fields = draw(st.sampled_from([0, 0, 1, 1, 1, 2, 2, 3, 4, 6]))
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=n_fields,
                              max_size=n_fields, unique=True)):
        tag, vr, kind = FIELDS[name]
        elem = fields.get(name, Elem(tag, vr, draw(field_value(kind, little))))
        new = draw(mutate_elem(elem, kind, little))
        notes.append(f"{name}->{'deleted' if new is None else new}")
        if new is None:
            fields.pop(name, None)
        else:
            fields[name] = new
    body = list(fields.values())
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 1, 1, 2]))):
        tag = draw(st.integers(0x00080000, 0x7FDFFFFF) | st.sampled_from(
            [0x00283010, 0x00283000, 0x00281050, 0x00291010, 0x7FE00008, 0xFFFEE000]))
        if tag in {e.tag for e in body}:
            continue
        extra = Elem(tag, draw(st.sampled_from(VRS)), draw(st.binary(max_size=24)))
        if draw(st.booleans()):
            extra.length = draw(st.sampled_from([UNDEFINED, 0, 1, 3, 1 << 20]))
        body.append(extra)
        notes.append(f"extra {extra}")
    if draw(rarely(1 / 8)):  # a VOI or Modality LUT sequence with a bogus descriptor/data
        body = [e for e in body if e.tag not in (0x00283000, 0x00283010)]
        body.append(draw(lut_sequence(explicit, little)))
        notes.append(f"LUT {body[-1]}")
    if not draw(rarely(1 / 10)):  # usually a Pixel Data element
        pixels, length = draw(pixel_mutation(enc))
        if length is None and enc.encapsulated and pixels == enc.pixel_data:
            length = UNDEFINED
        elif length is None and enc.encapsulated and draw(st.booleans()):
            length = UNDEFINED  # broken encapsulated stream
        notes.append(f"pixels {len(pixels)} bytes, length field {length}")
        pixel_vr = b"OW" if enc.bits_allocated == 16 and not enc.encapsulated else b"OB"
        if draw(rarely(1 / 10)):
            pixel_vr = draw(st.sampled_from(VRS))
            notes.append(f"pixel VR {pixel_vr!r}")
        body.append(Elem(0x7FE00010, pixel_vr, pixels, length))
    meta = [Elem(0x00020001, b"OB", b"\0\1"),
            Elem(0x00020002, b"UI", text("1.2.840.10008.5.1.4.1.1.1.1", b"UI")),
            Elem(0x00020003, b"UI", fields.get("SOPInstanceUID", Elem(0, b"UI", b"")).value),
            Elem(0x00020010, b"UI", text(tsyntax, b"UI")),
            Elem(0x00020012, b"UI", text("1.2.826.0.1.3680043.10.999", b"UI"))]
    data = _file_bytes(meta, body, explicit, little, deflate)
    damage = draw(st.sampled_from(["none"] * 14 + ["truncate"] * 3 + ["overwrite"] * 3
                                  + ["no_preamble"]))
    if damage == "truncate":
        cut = draw(st.integers(0, len(data) - 1))
        data = data[:cut]
        notes.append(f"truncated at {cut}")
    elif damage == "overwrite":
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 6))):
            at = draw(st.integers(132, len(buf) - 1))
            buf[at] = draw(st.integers(0, 255))
        data = bytes(buf)
        notes.append("bytes overwritten")
    elif damage == "no_preamble":
        data = data[132:]
        notes.append("no preamble")
    return Fuzzed(data, "; ".join(notes))


# ---- properties ---------------------------------------------------------------------------


def check_row(row: dict, rel: str, data: bytes, path: Path, what: str) -> None:
    """The per-file properties of the module docstring."""
    assert row["file"] == rel, what
    assert row["status"] in ("ok", "quarantined"), (row, what)
    if row["status"] == "quarantined":
        assert isinstance(row["reason"], str) and row["reason"].strip(), (row, what)
    else:
        assert row["reason"] is None, (row, what)
        assert row["image_key"] and row["patient_key"], (row, what)
        assert POLICY.min_size <= row["rows"] <= POLICY.max_size, (row, what)
        assert np.isfinite(row["photometric_score"]), (row, what)  # not a NaN image
        # an admitted file decodes the way clahe_tensors will decode it
        u8 = decode_u8(path)
        assert u8.dtype == np.uint8 and u8.shape == (row["rows"], row["columns"]), what
    for phi in PHI_MARKERS:  # the base file's identifiers never reach the inventory
        assert not [v for v in row.values() if isinstance(v, str) and phi in v], (phi, row, what)
    assert row["sha256"] == hashlib.sha256(data).hexdigest() and row["size_bytes"] == len(data)
    pl.DataFrame([row], schema=INVENTORY_SCHEMA)  # fits the inventory table
    assert path.read_bytes() == data, f"input modified: {what}"


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _good_file(enc: Encoding, n: int) -> bytes:
    """The unmutated file of encoding `enc` (admissible), SOP Instance UID 2.25.<9000+n>."""
    fields = base_fields(enc, enc.tsyntax != ExplicitVRBigEndian, n)
    pixel_vr = b"OW" if enc.bits_allocated == 16 and not enc.encapsulated else b"OB"
    body = [*fields.values(), Elem(0x7FE00010, pixel_vr, enc.pixel_data,
                                   UNDEFINED if enc.encapsulated else None)]
    meta = [Elem(0x00020001, b"OB", b"\0\1"),
            Elem(0x00020002, b"UI", text("1.2.840.10008.5.1.4.1.1.1.1", b"UI")),
            Elem(0x00020003, b"UI", fields["SOPInstanceUID"].value),
            Elem(0x00020010, b"UI", text(enc.tsyntax, b"UI"))]
    return _file_bytes(meta, body, enc.tsyntax != ImplicitVRLittleEndian,
                       enc.tsyntax != ExplicitVRBigEndian,
                       enc.tsyntax == DeflatedExplicitVRLittleEndian)


def test_unmutated_encodings_are_admitted(fuzz_dir: Path) -> None:
    """The fuzzer's starting points are good files: the admitted branch is reachable."""
    for i, enc in enumerate(ENCODINGS):
        data = _good_file(enc, i)
        path = fuzz_dir / f"{enc.name}.dcm"
        path.write_bytes(data)
        row = scan_file(path, path.name, "fuzz", KEY, POLICY)
        assert row["status"] == "ok", (enc.name, row["reason"])
        check_row(row, path.name, data, path, enc.name)


# CI: 2,000 fixed examples. XCAM_FUZZ_EXAMPLES=50000 XCAM_FUZZ_RANDOM=1 hunts further.
@settings(max_examples=int(os.environ.get("XCAM_FUZZ_EXAMPLES", "2000")), deadline=None,
          derandomize=not os.environ.get("XCAM_FUZZ_RANDOM"), database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(f=fuzzed_dicom())
def test_fuzzed_file_is_admitted_or_quarantined(f: Fuzzed, fuzz_dir: Path) -> None:
    path = fuzz_dir / "sub" / "fuzzed.dcm"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(f.data)
    try:
        row = scan_file(path, "sub/fuzzed.dcm", "fuzz", KEY, POLICY)
    except Exception as exc:  # the property: nothing escapes
        raise AssertionError(f"escaped the reader: {type(exc).__name__}: {exc} [{f.what}]"
                             ) from exc
    check_row(row, "sub/fuzzed.dcm", f.data, path, f.what)
    event(row["status"] if row["status"] == "ok" else
          row["reason"].split(":")[0].split(" (")[0][:50])


def _write(path: Path, enc: Encoding, changes: dict[str, Elem | None]) -> bytes:
    """A good file in `enc` with some elements replaced (None: deleted)."""
    fields = base_fields(enc, True, 1)
    for name, elem in changes.items():
        if elem is None:
            fields.pop(name, None)
        else:
            fields[name] = elem
    body = [*fields.values(), Elem(0x7FE00010, b"OW", enc.pixel_data)]
    meta = [Elem(0x00020001, b"OB", b"\0\1"), Elem(0x00020010, b"UI", text(enc.tsyntax, b"UI"))]
    data = _file_bytes(meta, body, True, True, False)
    path.write_bytes(data)
    return data


# escapes the fuzzer found (admitted by the inventory, then undecodable at clahe_tensors, or
# quoting header bytes), and their neighbours: each is now quarantined with a clear reason
FOUND = {
    "lone WindowCenter with VR FD (2 bytes)": (
        {"WindowCenter": Elem(0x00281050, b"FD", b"1 ")}, "cannot map pixel values"),
    "empty RescaleSlope beside a RescaleIntercept": (
        {"RescaleIntercept": Elem(0x00281052, b"DS", b"1 "),
         "RescaleSlope": Elem(0x00281053, b"DS", b"")}, "present but empty"),
    "RescaleSlope with VR AE (a str to pydicom)": (
        {"RescaleIntercept": Elem(0x00281052, b"DS", b"1 "),
         "RescaleSlope": Elem(0x00281053, b"AE", b"1 ")}, "cannot map pixel values"),
    "a window but no PixelRepresentation": (
        {"WindowCenter": Elem(0x00281050, b"DS", b"2048"),
         "WindowWidth": Elem(0x00281051, b"DS", b"4096"), "PixelRepresentation": None},
        "Missing required element: (0028,0103)"),
    "a window with an empty VOILUTFunction": (
        {"WindowCenter": Elem(0x00281050, b"DS", b"2048"),
         "WindowWidth": Elem(0x00281051, b"DS", b"4096"),
         "VOILUTFunction": Elem(0x00281056, b"CS", b"")}, "invalid VOI window: Unsupported"),
    "RescaleSlope nan (admitted: every pixel NaN)": (
        {"RescaleIntercept": Elem(0x00281052, b"DS", b"0 "),
         "RescaleSlope": Elem(0x00281053, b"DS", b"nan ")}, "NaN or infinity"),
    "BodyPartExamined whose VR lies, swallowing the UIDs": (
        {"BodyPartExamined": Elem(0x00180015, b"UT", b"CHEST ", 60)}, "malformed header"),
}


@pytest.mark.parametrize("changes,reason", FOUND.values(), ids=FOUND.keys())
def test_found_escapes_are_quarantined(fuzz_dir: Path, changes: dict, reason: str) -> None:
    path = fuzz_dir / "found.dcm"
    data = _write(path, ENCODINGS[0], changes)
    row = scan_file(path, "found.dcm", "fuzz", KEY, POLICY)
    assert row["status"] == "quarantined" and reason in row["reason"], row["reason"]
    check_row(row, "found.dcm", data, path, str(changes))


# ---- whole batches ------------------------------------------------------------------------

STEMS = ["img", "b c", "ünïcödé", "x" * 120, "-rf", "$(id)", "a;b'c\"", "%00", "new\nline",
         "CON", "..dots", "tab\there"]


@st.composite
def fuzzed_batch(draw: st.DrawFn) -> dict[str, bytes]:
    """{relative path: bytes}: fuzzed files under odd names, sub-folders and a duplicate."""
    files: dict[str, bytes] = {}
    for i in range(draw(st.integers(3, 16))):
        sub = draw(st.sampled_from(["", "", "sub/", "sub/deeper/", "masks_not/"]))
        files[f"{sub}{i:03d}_{draw(st.sampled_from(STEMS))}.dcm"] = draw(fuzzed_dicom(n=i)).data
    first = next(iter(files))
    files["zz_copy_of_first.dcm"] = files[first]  # a duplicate SOP Instance UID (if admitted)
    return files


def _write_batch(root: Path, files: dict[str, bytes]) -> dict[str, str]:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def check_batch(frame: pl.DataFrame, root: Path, files: dict[str, bytes],
                batch: str = "fuzz") -> None:
    """One row per file, each row's properties, no SOP Instance UID admitted twice."""
    assert frame.height == len(files) and set(frame["file"].to_list()) == set(files)
    for row in frame.iter_rows(named=True):
        check_row(row, row["file"], files[row["file"]], root / row["file"], row["file"])
    ok = frame.filter(pl.col("status") == "ok")
    assert ok["image_key"].n_unique() == ok.height
    copy = frame.filter(pl.col("file") == "zz_copy_of_first.dcm").row(0, named=True)
    first = frame.filter(pl.col("file") == next(iter(files))).row(0, named=True)
    if first["status"] == "ok":
        assert copy["status"] == "quarantined"
        assert copy["reason"].startswith(f"duplicate SOP Instance UID: same image as "
                                         f"{batch}/{first['file']} (in this batch; "
                                         "identical")


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(files=fuzzed_batch())
def test_fuzzed_batch_through_the_inventory(files: dict[str, bytes], fuzz_dir: Path) -> None:
    """The real whole-batch reader (`inventory_rows`) over batches of fuzzed files."""
    with tempfile.TemporaryDirectory(dir=fuzz_dir) as tmp:
        root = Path(tmp) / "fuzz"
        before = _write_batch(root, files)
        frame = inventory_rows(root, "fuzz", KEY, POLICY)
        check_batch(frame, root, files)
        assert before == {
            p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


_RUNS = iter(range(1000))


@settings(max_examples=2, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(files=fuzzed_batch())
def test_fuzzed_batch_through_dagster(files: dict[str, bytes], project: Path) -> None:
    """raw_dicoms + dicom_inventory (+ their blocking checks) as Dagster runs them: the
    run succeeds, every file has its row, each quarantined file is named with its
    reason in the run's log, and the incoming and raw copies are byte-identical."""
    from xcam_assets.config import load_settings
    from xcam_assets.definitions import ASSETS, CHECKS
    from xcam_assets.orchestrate import register_batches
    from xcam_assets.project import XcamProject

    s = load_settings()
    batch = f"fuzz-{next(_RUNS)}"
    files = {**files, "good.dcm": _good_file(ENCODINGS[0], 999)}  # one file always admitted
    before = _write_batch(s.incoming_dir / batch, files)
    instance = dg.DagsterInstance.get()
    register_batches(instance, [batch])
    result = dg.materialize([*ASSETS, *CHECKS],
                            selection=dg.AssetSelection.assets("raw_dicoms", "dicom_inventory"),
                            partition_key=batch, instance=instance,
                            resources={"xcam": XcamProject()}, raise_on_error=False)
    frame = pl.read_parquet(s.inventory_dir / f"{batch}.parquet")
    # examples share the project: the next one must not see these files as already ingested
    (s.inventory_dir / f"{batch}.parquet").rename(s.inventory_dir / f"{batch}.seen")
    checks = {e.asset_check_evaluation_data.asset_check_key.name:
              e.asset_check_evaluation_data for e in result.all_events
              if e.event_type_value == "ASSET_CHECK_EVALUATION"}
    assert result.success, {k: (v.passed, v.description) for k, v in checks.items()}
    check_batch(frame, s.raw_dir / batch, files, batch)
    assert frame.filter(pl.col("file") == "good.dcm")["status"].to_list() == ["ok"]
    logs = "\n".join(e.user_message for e in instance.all_logs(result.run_id))
    for row in frame.filter(pl.col("status") == "quarantined").iter_rows(named=True):
        assert f"quarantined {batch}/{row['file']}: {row['reason']}" in logs
    assert checks["raw_copy_is_faithful"].passed and checks["inventory_is_usable"].passed
    for root in (s.incoming_dir / batch, s.raw_dir / batch):
        assert {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()} == before
