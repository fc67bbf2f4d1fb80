"""Quarantine through Dagster: >= 15 kinds of bad file beside good ones, two batches.

Every bad file gets its reason, every good file passes, nothing is lost or altered,
the runs succeed, clahe_tensors only meets good files, and a second batch reads and
decodes only its own files.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pydicom
import pytest
from dicom_corpus import HAS_JPEGLS, bad_files, demo_sources, fresh, good_files, save, write_labels

from xcam_assets.config import load_settings
from xcam_assets.ingest.deid import PHI_KEYWORDS
from xcam_assets.orchestrate import STAGES, _run, register_batches
from xcam_assets.project import XcamProject


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _phi_values(paths: list[Path]) -> set[str]:
    values: set[str] = set()
    for p in paths:
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, force=True)
        except Exception:
            continue
        for kw in PHI_KEYWORDS:
            v = str(ds.get(kw, "") or "")
            if len(v) >= 6:
                values.add(v)
    return values


@pytest.fixture
def corpus(project: Path, tmp_path: Path) -> dict:
    s = load_settings()
    src = demo_sources(tmp_path / "src")
    a, b = s.incoming_dir / "site-a", s.incoming_dir / "site-b"
    good = good_files(src, a)
    bad = bad_files(src, a)
    # batch b: two good files of its own and one already ingested by batch a
    ref = pydicom.dcmread(src[2])
    save(fresh(ref), b / "b_good_1.dcm")
    save(fresh(ref), b / "b_good_2.dcm")
    shutil.copyfile(a / "explicit_le_12bit.dcm", b / "again.dcm")
    for batch in (a, b):
        write_labels(batch)
        (batch / ".complete").touch()
    return {"settings": s, "a": a, "b": b, "good": good, "bad": bad}


def test_bad_files_quarantined_good_pass_nothing_lost(corpus: dict) -> None:
    s, a, b = corpus["settings"], corpus["a"], corpus["b"]
    good, bad = corpus["good"], corpus["bad"]
    kinds = {reason.split(":")[0].split(" (")[0] for reason in bad.values()}
    assert len(bad) >= 20 and len(kinds) >= 15, kinds
    before = {"site-a": _hashes(a), "site-b": _hashes(b)}
    instance = dg.DagsterInstance.get()
    register_batches(instance, ["site-a", "site-b"])
    keys = STAGES["ingest"] + STAGES["preprocess"]
    result_a = _run(keys, instance, XcamProject(), "site-a", log=print)
    assert result_a.success

    inv = pl.read_parquet(s.inventory_dir / "site-a.parquet")
    files = set(inv["file"].to_list())
    assert files == set(before["site-a"]) - {"labels.csv", ".complete"}  # one row per file
    assert set(good) | set(bad) == files
    for name, expected in bad.items():
        row = inv.filter(pl.col("file") == name).row(0, named=True)
        assert row["status"] == "quarantined", (name, row)
        assert expected in row["reason"], (name, expected, row["reason"])
    for name in good:
        row = inv.filter(pl.col("file") == name).row(0, named=True)
        assert row["status"] == "ok", (name, row["reason"])
        assert row["photometric_score"] > 0.5
    if HAS_JPEGLS:
        assert "jpegls_lossless.dcm" in good
    # the cross-batch duplicate, and batch b's own files
    result_b = _run(keys, instance, XcamProject(), "site-b", log=print)
    assert result_b.success
    inv_b = pl.read_parquet(s.inventory_dir / "site-b.parquet").sort("file")
    assert inv_b["status"].to_list() == ["quarantined", "ok", "ok"]
    assert inv_b["reason"][0] == ("duplicate SOP Instance UID: same image as "
                                  "site-a/explicit_le_12bit.dcm (already ingested; "
                                  "identical bytes)")

    # nothing lost or altered: incoming untouched, raw identical to incoming
    for batch, folder in (("site-a", a), ("site-b", b)):
        assert _hashes(folder) == before[batch]
        raw = _hashes(s.raw_dir / batch)
        assert raw == {k: v for k, v in before[batch].items() if k != ".complete"}
    # clahe_tensors met only the good files
    manifest = pl.read_parquet(s.tensors_dir / "site-a" / "manifest.parquet")
    assert set(manifest["file"].to_list()) == set(good)
    images = np.load(s.tensors_dir / "site-a" / "images.npy")
    assert images.shape[0] == len(good) and images.std(axis=(1, 2)).min() > 5
    # every check passed; the findings of quarantined files are marked as such
    for key in (dg.AssetCheckKey(dg.AssetKey("dicom_inventory"), "inventory_is_usable"),
                dg.AssetCheckKey(dg.AssetKey("findings"), "labels_match_images")):
        recs = instance.event_log_storage.get_asset_check_execution_history(key, limit=5)
        assert recs and all(r.status.value == "SUCCEEDED" for r in recs), key
    fnd = pl.read_parquet(s.findings_dir / "site-a.parquet")
    assert set(fnd.filter(pl.col("status") == "quarantined_image")["file"]) == set(bad)
    # no header PHI of any file (good or bad) in the inventory or the findings
    phi = _phi_values(sorted(p for p in a.rglob("*.dcm")))
    assert any(v.startswith("DEMO^PATIENT") for v in phi)
    for table in (inv, fnd.drop("boxes", "label_rows")):
        text = table.write_csv()
        assert not [v for v in phi if v in text]


def test_new_batch_reads_only_its_own_files(corpus: dict) -> None:
    """Batch b is ingested while batch a's raw files are away: it never opens them."""
    s = corpus["settings"]
    instance = dg.DagsterInstance.get()
    register_batches(instance, ["site-a", "site-b"])
    _run(STAGES["ingest"], instance, XcamProject(), "site-a", log=print)
    shutil.move(s.raw_dir / "site-a", s.data_dir / "site-a.away")
    shutil.move(corpus["a"], s.data_dir / "site-a.incoming.away")
    try:
        result = _run(STAGES["ingest"], instance, XcamProject(), "site-b", log=print)
    finally:
        shutil.move(s.data_dir / "site-a.away", s.raw_dir / "site-a")
        shutil.move(s.data_dir / "site-a.incoming.away", corpus["a"])
    mats = [e for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"]
    inv_meta = next(e.event_specific_data.materialization.metadata for e in mats
                    if e.asset_key == dg.AssetKey("dicom_inventory"))
    assert inv_meta["files_read_and_decoded"].value == 3
    inv_b = pl.read_parquet(s.inventory_dir / "site-b.parquet")
    assert inv_b.filter(pl.col("status") == "ok").height == 2
