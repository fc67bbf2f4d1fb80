"""Coarse demographic and device facts of a DICOM header, for subgroup analyses.

Only coarse values leave the header (de-identification, see `deid.py`): sex as the DICOM
code M / F / O, age as a **band** (never the age in days, never a date), the manufacturer
as a short code. Any value that does not parse gives None; these facts never quarantine a
file.

* ``patient_sex``: PatientSex (0010,0040) when it is M, F or O (upper-cased), else None.
* ``age_band``: from PatientAge (0010,1010, ``nnnD|W|M|Y``), else from the whole years
  between PatientBirthDate and StudyDate (the birth date is read here and dropped); bands
  :data:`AGE_BANDS` ``0-39``, ``40-59``, ``60-79``, ``80+`` (whole years; an age over
  120 years is treated as an error: None). Coarse on purpose: wide enough to hold
  patients in every band of a few hundred images, and the usual adult chest X-ray strata.
* ``manufacturer``: Manufacturer (0008,0070) when it is short printable text (at most 64
  characters of letters, digits, space and ``.,&()_-``), runs of other characters than
  letters and digits replaced by ``_`` (``XCAM SYNTHETIC`` -> ``XCAM_SYNTHETIC``), else None.
"""

from __future__ import annotations

import re
from datetime import date
from typing import Any

AGE_BANDS: tuple[tuple[int, str], ...] = ((0, "0-39"), (40, "40-59"), (60, "60-79"),
                                          (80, "80+"))
"""(lowest whole year, band name), ascending."""
MAX_AGE_YEARS = 120
DEMOGRAPHIC_COLUMNS: tuple[str, ...] = ("patient_sex", "age_band", "manufacturer")

_AGE = re.compile(r"(\d{1,3})([DWMY])")
_DATE = re.compile(r"(\d{4})(\d{2})(\d{2})")
_MANUFACTURER = re.compile(r"[A-Za-z0-9 .,&()_-]{1,64}")
_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def age_band(years: float | None) -> str | None:
    """The band of an age in (whole) years; None for None, negative or over 120."""
    if years is None or years < 0 or years > MAX_AGE_YEARS:
        return None
    name = None
    for low, band in AGE_BANDS:
        if int(years) >= low:
            name = band
    return name


def age_years(patient_age: str | None, birth_date: str | None = None,
              study_date: str | None = None) -> float | None:
    """Age in years from PatientAge, else whole years from birth to study date."""
    text = (patient_age or "").strip().upper()
    if (m := _AGE.fullmatch(text)) is not None:
        return int(m.group(1)) * _UNIT_YEARS[m.group(2)]
    b = _DATE.fullmatch((birth_date or "").strip())
    s = _DATE.fullmatch((study_date or "").strip())
    if b is None or s is None:
        return None
    try:
        born = date(*(int(v) for v in b.groups()))
        seen = date(*(int(v) for v in s.groups()))
    except ValueError:
        return None
    years = seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))
    return float(years) if years >= 0 else None


def sex_code(value: Any) -> str | None:
    text = str(value or "").strip().upper()
    return text if text in ("M", "F", "O") else None


def manufacturer_code(value: Any) -> str | None:
    text = str(value or "").strip()
    if not _MANUFACTURER.fullmatch(text):
        return None
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or None


def demographics(ds: Any) -> dict[str, str | None]:
    """:data:`DEMOGRAPHIC_COLUMNS` of a pydicom dataset (module docstring); never raises."""
    def get(keyword: str) -> Any:
        try:
            value = ds.get(keyword)
        except Exception:  # a malformed element: the fact is unknown
            return None
        return None if value is None else str(value)

    try:
        years = age_years(get("PatientAge"), get("PatientBirthDate"), get("StudyDate"))
    except Exception:
        years = None
    return {"patient_sex": sex_code(get("PatientSex")), "age_band": age_band(years),
            "manufacturer": manufacturer_code(get("Manufacturer"))}
