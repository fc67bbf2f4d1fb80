"""PNG radiographs -> Secondary Capture DICOM: the part every PNG importer shares.

The platform ingests DICOM only; public datasets (TBX11K, NIH ChestX-ray14) ship PNG.
Each PNG becomes a Secondary Capture DICOM whose pixels are the PNG's, byte for byte,
whose UIDs derive from the PNG's sha256 (re-import writes the same bytes) and whose
header says where it came from. Written by hand: pydicom has no PNG -> DICOM helper.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from xcam_assets.hashing import sha256_bytes

SECONDARY_CAPTURE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def _uid(sha: str, role: str) -> str:
    return generate_uid(entropy_srcs=[sha, role])


def secondary_capture(
    pixels: np.ndarray,
    sha: str,
    *,
    origin: str,
    patient_id: str,
    deid_method: str,
    study_description: str,
    series_description: str,
    patient_sex: str = "",
    patient_age: str = "",
    view_position: str = "PA",
) -> Dataset:
    """A Secondary Capture DICOM dataset holding `pixels` (uint8, 2-D) unchanged.

    UIDs derive from `sha` (the source file's sha256) and no dates are written, so the
    same source gives the same bytes. `origin` goes to DerivationDescription and
    ImageComments (the source's name and sha256, for provenance)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 image, got {pixels.dtype} {pixels.shape}")
    sop_uid = _uid(sha, "sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SECONDARY_CAPTURE_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PatientName = ""
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = patient_sex
    if patient_age:
        ds.PatientAge = patient_age
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = deid_method
    # Study / series: one each per image; dates left empty so the bytes are reproducible
    ds.StudyInstanceUID = _uid(sha, "study")
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.StudyDescription = study_description
    ds.SeriesInstanceUID = _uid(sha, "series")
    ds.SeriesNumber = 1
    ds.SeriesDescription = series_description
    ds.Modality = "OT"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view_position
    ds.ConversionType = "WSD"
    ds.SecondaryCaptureDeviceManufacturer = "xcam"
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.DerivationDescription = origin
    ds.ImageComments = origin
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    data = np.ascontiguousarray(pixels).tobytes()
    ds.add_new(0x7FE00010, "OB", data + b"\0" * (len(data) % 2))  # even length, as DICOM needs
    return ds


def read_gray_png(path: Path) -> tuple[np.ndarray, str]:
    """The PNG's pixels (uint8, 2-D) and the sha256 of the very bytes decoded."""
    raw = path.read_bytes()
    with Image.open(io.BytesIO(raw)) as im:
        if im.format != "PNG":
            raise ValueError(f"not a PNG (format {im.format})")
        if im.mode != "L":
            raise ValueError(f"mode {im.mode!r} is not 8-bit grayscale ('L')")
        im.load()
        pixels = np.asarray(im, dtype=np.uint8).copy()
    return pixels, sha256_bytes(raw)


def is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
    except ValueError:
        return False
    return True


def refuse_stale_batch(out_batch_dir: Path, planned: set[str]) -> None:
    """Raise FileExistsError when `out_batch_dir` holds DICOMs this import would not write
    (a stale, larger import): re-importing the same source is fine, mixing two is not."""
    if out_batch_dir.exists():
        stale = sorted(p.name for p in out_batch_dir.glob("*.dcm") if p.name not in planned)
        if stale:
            raise FileExistsError(f"{out_batch_dir} already holds {len(stale)} DICOM(s) this "
                                  f"import would not write (e.g. {stale[:3]}); use a new batch")
