"""DICOM header facts and pixel decoding to a display-oriented unit image.

Everything downstream (CLAHE, classifier, Grad-CAM) assumes one convention:
a float32 2-D array in [0, 1] where **higher = brighter** (bone and opaque
regions bright, air dark), as a radiologist would see the image. Getting there
needs the DICOM pipeline in its standard order: stored values -> Modality LUT /
rescale -> VOI LUT / window -> MONOCHROME1 inversion. Skipping the inversion is
the classic bug that silently trains a model on negatives of half the images.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import DeflatedExplicitVRLittleEndian

# output key -> DICOM keyword (for the plain header attributes)
_STR_FIELDS = {
    "sop_instance_uid": "SOPInstanceUID",
    "study_instance_uid": "StudyInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
    "patient_id": "PatientID",
    "modality": "Modality",
    "body_part": "BodyPartExamined",
    "view_position": "ViewPosition",
    "photometric_interpretation": "PhotometricInterpretation",
}
_INT_FIELDS = {
    "bits_allocated": "BitsAllocated",
    "bits_stored": "BitsStored",
    "rows": "Rows",
    "columns": "Columns",
    "samples_per_pixel": "SamplesPerPixel",
}
_FLOAT_FIELDS = {"rescale_slope": ("RescaleSlope", 1.0),
                 "rescale_intercept": ("RescaleIntercept", 0.0)}

HEADER_FIELDS: tuple[str, ...] = (
    *_STR_FIELDS, *_INT_FIELDS, "transfer_syntax_uid", "has_pixel_data", *_FLOAT_FIELDS,
)
"""Keys of the dict `read_header` returns, in a stable order."""

# (7FE0,0010) Pixel Data tag as it appears on disk, little and big endian
_PIXEL_DATA_TAG_BYTES = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")
_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")


class DicomDecodeError(ValueError):
    """A file that cannot become a unit image; str() names the file and the problem."""

    def __init__(self, path: str | PathLike[str], reason: str) -> None:
        # args = (path, reason) so the exception pickles (Dagster ships errors between processes)
        super().__init__(str(path), reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def _str_or_none(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, list | tuple | MultiValue):
        value = "\\".join(str(v) for v in value)
    text = str(value).strip()
    return text or None


def _int_or_none(value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float_or(value: Any, default: float) -> float | None:
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def read_header(path: Path) -> dict[str, Any]:
    """Header facts of one file without reading its pixels (fast enough for every arrival).

    Raises pydicom's InvalidDicomError for a non-DICOM file (no `force`): the caller
    quarantines it. `patient_id` is raw: the caller pseudonymises it. Missing or empty
    tags give None; `rescale_slope`/`rescale_intercept` default to 1.0/0.0 when absent.
    """
    path = Path(path)
    with path.open("rb") as fp:
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
        tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        if tsyntax == DeflatedExplicitVRLittleEndian:
            # the stream was inflated in memory, so the file position means nothing here
            has_pixels = "PixelData" in pydicom.dcmread(path, defer_size="1 KB")
        else:
            # pydicom rewinds to the start of the element it stopped at (or sits at EOF)
            has_pixels = fp.read(4) in _PIXEL_DATA_TAG_BYTES
    out: dict[str, Any] = {k: _str_or_none(ds.get(kw)) for k, kw in _STR_FIELDS.items()}
    out.update({k: _int_or_none(ds.get(kw)) for k, kw in _INT_FIELDS.items()})
    out["transfer_syntax_uid"] = _str_or_none(tsyntax)
    out["has_pixel_data"] = bool(has_pixels)
    out.update({k: _float_or(ds.get(kw), d) for k, (kw, d) in _FLOAT_FIELDS.items()})
    return {k: out[k] for k in HEADER_FIELDS}


def _modality_range(ds: Dataset) -> tuple[float, float]:
    """Theoretical (first, last) output of the Modality LUT stage, as pydicom's windowing uses."""
    if ds.get("ModalityLUTSequence"):
        depth = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**depth - 1)
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2**bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return lo, hi


def _has_voi_lut(ds: Dataset) -> bool:
    seq = ds.get("VOILUTSequence")
    return bool(seq) and None not in (seq[0].get("LUTDescriptor"), seq[0].get("LUTData"))


def _has_window(ds: Dataset) -> bool:
    return ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None


def _scale(arr: np.ndarray, first: float, last: float) -> np.ndarray:
    span = last - first
    if span == 0:
        return np.zeros(arr.shape, dtype=np.float64)
    return (np.asarray(arr, dtype=np.float64) - first) / span


def decode_unit(source: str | PathLike[str] | Dataset) -> np.ndarray:
    """Decode one grayscale radiograph to float32 2-D in [0, 1], higher = brighter.

    Order (PS3.3 C.11): stored values -> Modality LUT / rescale -> VOI -> MONOCHROME1
    inversion -> clip. Scaling to [0, 1]:

    * VOI LUT Sequence: by the LUT's own output min..max (robust to LUTs that declare
      16 bits for 12-bit data). Window Center/Width (first window): by the window's output
      range, which pydicom sets to the theoretical Modality-LUT output range.
    * No VOI: min-max over the **theoretical** Modality-LUT output range (unsigned, no
      rescale: 0..2**BitsStored-1; rescale applied to that range's ends), never over the
      image's own min/max: one fixed mapping per file, no contrast stretch from outliers,
      and a uniform image stays uniform. Cost: data that uses a small part of an honest
      BitsStored looks dark here; CLAHE later restores local contrast.

    Raises `DicomDecodeError` (a ValueError naming the file) for an unreadable file, no
    pixel data, colour or non-MONOCHROME data, multi-frame data, an undecodable transfer
    syntax (the decoder's message is kept) or an invalid VOI window.
    """
    if isinstance(source, Dataset):
        ds = source
        label = str(getattr(source, "filename", None) or "<dataset>")
    else:
        label = str(source)
        try:
            ds = pydicom.dcmread(source)
        except Exception as exc:  # any parser failure: same error type for callers
            raise DicomDecodeError(label, f"not a readable DICOM file: {exc}") from exc
    if "PixelData" not in ds:
        raise DicomDecodeError(label, "no pixel data (7FE0,0010)")
    spp = _int_or_none(ds.get("SamplesPerPixel", 1))
    photometric = _str_or_none(ds.get("PhotometricInterpretation"))
    if spp != 1 or photometric not in _GRAYSCALE:
        raise DicomDecodeError(label, f"not a grayscale image (photometric {photometric!r}, "
                                      f"{spp} samples per pixel)")
    frames = _int_or_none(ds.get("NumberOfFrames")) or 1
    if frames > 1:
        raise DicomDecodeError(label, f"multi-frame image ({frames} frames); expected one")
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        stored = ds.pixel_array
    except Exception as exc:  # decoders raise many types; keep their message
        name = getattr(tsyntax, "name", None) or str(tsyntax)
        raise DicomDecodeError(
            label, f"cannot decode pixel data (transfer syntax {name}): {exc}") from exc
    if stored.ndim != 2:
        raise DicomDecodeError(label, f"expected a 2-D image, got shape {stored.shape}")

    values = apply_modality_lut(stored, ds)
    first, last = _modality_range(ds)
    if _has_voi_lut(ds):
        lut = np.asarray(ds.VOILUTSequence[0].LUTData)
        out = apply_voi_lut(values, ds, index=0)
        unit = _scale(out, float(lut.min()), float(lut.max()))
    elif _has_window(ds):
        try:
            out = apply_voi_lut(values, ds, index=0)
        except ValueError as exc:
            raise DicomDecodeError(label, f"invalid VOI window: {exc}") from exc
        unit = _scale(out, first, last)
    else:
        unit = _scale(values, min(first, last), max(first, last))
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    return np.clip(unit, 0.0, 1.0).astype(np.float32)


def to_uint8(unit: np.ndarray) -> np.ndarray:
    """Unit image -> uint8 (round half to even of x*255), the input CLAHE expects."""
    return np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
