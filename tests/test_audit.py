"""`xcam audit metric_tables` on a full tiny demo run: every step down to each raw DICOM's
sha256 verifies; the PROV-JSON validates with the `prov` library; the HTML report opens
in headless Chromium; one changed byte in a tensor shard fails the audit, naming the file."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from automation.harness import (
    BIN,
    chromium_page,
    copy_project,
    full_tiny_run,
    project_env,
)

pytestmark = pytest.mark.slow
LINEAGE = {"raw_dicoms", "dicom_inventory", "findings", "clahe_tensors", "cohort_splits",
           "checkpoints", "heatmap_sets", "metric_tables"}


@pytest.fixture
def full_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             tmp_path: Path) -> Path:
    return copy_project(full_tiny_run(request, tmp_path_factory), tmp_path / "project")


def _audit(root: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "xcam"), "audit", "metric_tables", "--out", str(out),
                           *args], cwd=root, env=project_env(root), capture_output=True,
                          text=True, timeout=600)


def test_audit_verifies_the_lineage_and_names_a_tampered_file(
        full_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from xcam_assets.orchestrate import run_audit

    out = tmp_path / "audit"
    proc = _audit(full_run, out)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    report = json.loads((out / "audit-metric_tables.json").read_text())
    assert report["audit"]["verdict"] == "pass"
    steps = {s["id"]: s for s in report["steps"]}
    assert {s["asset"] for s in steps.values()} == LINEAGE
    batches = sorted(p.name for p in (full_run / "data" / "raw").iterdir())
    for b in batches:
        for asset in ("raw_dicoms", "dicom_inventory", "findings", "clahe_tensors"):
            assert f"{asset}[{b}]" in steps
    for step in steps.values():
        assert step["status"] == "materialized"
        assert step["run"]["run_id"] and step["materialized_at"]
        assert step["host"] and step["user"] and step["git_commit"]
        assert step["code_version"] and step["packages"]["dagster"]
        assert step["parameters"]["seed"] and step["profile"] == "tiny"
        assert step["output"]["verified"] and step["output"]["on_disk"] == step["data_version"]
        assert step["checks"] and all(c["status"] == "SUCCEEDED" for c in step["checks"])
        assert all(c["blocking"] and "metadata" in c for c in step["checks"])
    assert steps["metric_tables"]["inputs"][0]["step"] == "heatmap_sets[resnet18]"
    card = steps["checkpoints[resnet18]"]["model_card"]
    assert "Model card" in card["model_card_md"] and card["model_json"]["architecture"]
    # down to each raw DICOM: the inventory's sha256, re-hashed on disk
    inv = pl.concat([pl.read_parquet(p) for p in (full_run / "data" / "inventory").glob("*")])
    raw = {(r["batch"], r["file"]): r for r in report["raw_dicoms"]}
    assert len(raw) == inv.height
    for row in inv.iter_rows(named=True):
        entry = raw[(row["batch"], row["file"])]
        assert entry["sha256_recorded"] == row["sha256"] == entry["sha256_on_disk"]

    # W3C PROV-JSON, read back by the prov library
    from prov.model import ProvDocument

    prov_path = out / "audit-metric_tables.prov.json"
    doc = ProvDocument.deserialize(source=str(prov_path), format="json")
    again = ProvDocument.deserialize(content=doc.serialize(format="json"), format="json")
    assert doc == again
    kinds = {str(r.get_type()) for r in doc.get_records()}
    assert {"prov:Entity", "prov:Activity", "prov:Agent", "prov:Generation", "prov:Usage",
            "prov:Association", "prov:Derivation"} <= kinds
    dicoms = [r for r in doc.get_records() if "dicom:" in str(r.identifier)]
    assert len(dicoms) == inv.height

    # the HTML report in a real browser
    html = out / "audit-metric_tables.html"
    with chromium_page(1400, 1000) as page:
        page.goto(html.as_uri())
        assert page.locator(".verdict").inner_text() == "PASS"
        for step_name in steps:
            assert page.locator(f"a[href='#{step_name}']").count() >= 1
        shot = out / "audit-report.png"
        page.screenshot(path=str(shot), full_page=False)
    print(f"audit report screenshot: {shot}")

    # tamper: one byte of one tensor shard; audit again (in process this time)
    for k, v in project_env(full_run).items():
        monkeypatch.setenv(k, v)
    shard = full_run / "data" / "tensors" / batches[0] / "images.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    lines: list[str] = []
    code = run_audit("metric_tables", out_dir=tmp_path / "audit-tampered",
                     instance=dg.DagsterInstance.get(), log=lines.append)
    print("\n".join(lines))
    assert code == 1
    rel = f"data/tensors/{batches[0]}/images.npy"
    assert rel in "\n".join(lines)
    bad = json.loads((tmp_path / "audit-tampered" / "audit-metric_tables.json").read_text())
    assert bad["audit"]["verdict"] == "fail"
    errors = [p for p in bad["audit"]["problems"] if p["severity"] == "error"]
    assert [p["file"] for p in errors] == [rel], errors


def test_audit_of_one_partition_and_a_changed_raw_dicom(full_run: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: `--partition`, and a raw DICOM altered after ingest is named too."""
    from xcam_assets.orchestrate import run_audit

    for k, v in project_env(full_run).items():
        monkeypatch.setenv(k, v)
    batch = sorted(p.name for p in (full_run / "data" / "raw").iterdir())[0]
    instance = dg.DagsterInstance.get()
    lines: list[str] = []
    assert run_audit("clahe_tensors", partition=batch, out_dir=tmp_path / "a",
                     instance=instance, log=lines.append) == 0
    dicom = sorted((full_run / "data" / "raw" / batch).glob("*.dcm"))[3]
    dicom.write_bytes(dicom.read_bytes()[:-1] + b"\x00")
    lines.clear()
    assert run_audit("clahe_tensors", partition=batch, out_dir=tmp_path / "b",
                     instance=instance, log=lines.append) == 1
    text = "\n".join(lines)
    assert f"data/raw/{batch}/{dicom.name}" in text
