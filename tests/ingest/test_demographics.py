"""Coarse demographics of the inventory (xcam_assets.ingest.demographics): bands, codes,
nothing finer than a band leaves the header."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.dataset import Dataset

from xcam_assets.ingest.demographics import (
    age_band,
    age_years,
    demographics,
    manufacturer_code,
    sex_code,
)


@pytest.mark.parametrize(("years", "band"), [(0, "0-39"), (39.9, "0-39"), (40, "40-59"),
                                             (59, "40-59"), (60, "60-79"), (79, "60-79"),
                                             (80, "80+"), (104, "80+"), (121, None),
                                             (-1, None), (None, None)])
def test_age_bands(years: float | None, band: str | None) -> None:
    assert age_band(years) == band


def test_age_from_patient_age_or_dates() -> None:
    assert age_years("058Y") == 58
    assert age_years("006M") == pytest.approx(0.5)
    assert age_years(None, "19600615", "20200614") == 59
    assert age_years(None, "19600615", "20200615") == 60
    assert age_years("", "1960", "20200615") is None
    assert age_years("abc") is None


def test_codes() -> None:
    assert sex_code(" f ") == "F" and sex_code("X") is None and sex_code(None) is None
    assert manufacturer_code("XCAM SYNTHETIC") == "XCAM_SYNTHETIC"
    assert manufacturer_code("GE Healthcare, Inc.") == "GE_Healthcare_Inc"
    assert manufacturer_code("x" * 65) is None and manufacturer_code("a\x00b") is None


def test_demographics_of_a_dataset_keep_only_coarse_values() -> None:
    ds = Dataset()
    ds.PatientSex = "M"
    ds.PatientBirthDate = "19451203"
    ds.StudyDate = "20260101"
    ds.Manufacturer = "Acme Imaging"
    out = demographics(ds)
    assert out == {"patient_sex": "M", "age_band": "80+", "manufacturer": "Acme_Imaging"}
    assert "1945" not in str(out)
    assert demographics(Dataset()) == dict.fromkeys(out)
    ds.PatientAge = "045Y"  # PatientAge wins over the dates
    assert demographics(ds)["age_band"] == "40-59"
    assert isinstance(ds, pydicom.Dataset)


def test_inventory_rows_carry_the_coarse_facts(tmp_path) -> None:
    from xcam_assets.demo import write_demo_cohort
    from xcam_assets.ingest.inventory import IngestPolicy, inventory_rows

    batch = write_demo_cohort(tmp_path, n_images=6, n_batches=1, size=96, seed=3)[0]
    inv = inventory_rows(batch, batch.name, b"k", IngestPolicy())
    ok = inv.filter(inv["status"] == "ok")
    assert ok.height >= 1
    assert set(ok["patient_sex"].to_list()) <= {"M", "F", "O"}
    assert set(ok["age_band"].to_list()) <= {"0-39", "40-59", "60-79", "80+"}
    assert set(ok["manufacturer"].to_list()) == {"XCAM_SYNTHETIC"}
    text = inv.write_csv()
    for path in sorted(batch.glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert str(ds.PatientBirthDate) not in text and str(ds.PatientID) not in text
