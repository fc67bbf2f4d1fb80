"""`xcam materialize ingest` re-runs only the batches that are new or changed (issue #20,
item 4), on a real SQLite instance and the tiny synthetic demo cohort: a batch that
arrives alone is the only one materialized; a touched file (same bytes) re-runs nothing;
a file added to an arrival batch, an inventory removed from disk (as `dvc repro` does)
or changed cohort parameters re-run what they affect; `--force` re-runs every batch.
The audit does not call a dependency stale when its re-materialization gave the same
data version, and still does when the version changed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.event_api import AssetRecordsFilter

from xcam_assets.config import load_settings
from xcam_assets.demo import write_demo_cohort
from xcam_assets.orchestrate import (
    STAGES,
    ingest_stale_reason,
    materialize_stage,
    run_audit,
)

INGEST = [dg.AssetKey(k) for k in STAGES["ingest"]]


def _counts(instance: dg.DagsterInstance, batches: list[str]) -> dict[str, int]:
    """How many times each batch's ingest assets were materialized (all three agree)."""
    out = {}
    for batch in batches:
        n = {len(instance.fetch_materializations(
            AssetRecordsFilter(asset_key=key, asset_partitions=[batch]), limit=100).records)
            for key in INGEST}
        assert len(n) == 1, (batch, n)
        out[batch] = n.pop()
    return out


def _ran(lines: list[str]) -> list[str]:
    """The batches of "materialized raw_dicoms+dicom_inventory+findings[<batch>] (run ..)"."""
    prefix = f"materialized {'+'.join(STAGES['ingest'])}["
    return [line[len(prefix):line.index("]")] for line in lines if line.startswith(prefix)]


@pytest.mark.slow
def test_ingest_materializes_only_new_or_changed_batches(project: Path,
                                                         tmp_path: Path) -> None:
    s = load_settings()
    staged = write_demo_cohort(tmp_path / "upload", n_images=36, n_batches=3, size=64,
                               seed=s.seed, finding=s.findings[0])
    names = [b.name for b in staged]
    s.incoming_dir.mkdir(parents=True)

    def arrive(batch: Path) -> Path:
        dst = s.incoming_dir / batch.name
        shutil.move(str(batch), dst)
        (dst / ".complete").touch()
        return dst

    first = [arrive(b) for b in staged[:2]]
    instance = dg.DagsterInstance.get()
    logs: list[str] = []

    def ingest(**kw: object) -> list[str]:
        logs.clear()
        materialize_stage("ingest", s, instance=instance, log=logs.append, **kw)
        return [line for line in logs if line.startswith("materialized ")]

    assert len(ingest()) == 2 and _counts(instance, names[:2]) == {names[0]: 1, names[1]: 1}
    assert [ingest_stale_reason(instance, s, b) for b in names[:2]] == [None, None]

    # the consumer of every batch's findings uses version X of each
    materialize_stage("splits", s, instance=instance, log=lambda m: None)

    # a third batch arrives: it alone is materialized
    arrive(staged[2])
    assert ingest_stale_reason(instance, s, names[2]) == "raw_dicoms never materialized"
    assert _ran(ingest()) == [names[2]], logs
    assert _counts(instance, names) == {names[0]: 1, names[1]: 1, names[2]: 1}
    assert sum("is up to date: not re-run" in line for line in logs) == 2, logs

    # a file touched (same bytes, new mtime) is no change; nothing runs
    label = first[0] / "labels.csv"
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    assert ingest() == [] and _counts(instance, names) == {n: 1 for n in names}

    # --force: every batch again, each to the data version it had; the audit of the
    # splits (which used the first versions) calls none of them stale
    ran = ingest(force=True)
    assert len(ran) == 3 and _counts(instance, names) == {n: 2 for n in names}
    lines: list[str] = []
    assert run_audit("cohort_splits", out_dir=tmp_path / "audit-same", settings=s,
                     instance=instance, log=lines.append) == 0, lines
    assert not [line for line in lines if "re-materialized" in line], lines

    # a file added to an arrival batch: that batch re-runs, to another data version,
    # and the audit says so
    extra = sorted(first[1].glob("*.dcm"))[0]
    shutil.copy(extra, first[1] / f"{extra.stem}_copy.dcm")  # a duplicate: quarantined
    assert ingest_stale_reason(instance, s, names[1]) == f"data/incoming/{names[1]} changed"
    assert _ran(ingest()) == [names[1]], logs
    assert _counts(instance, names) == {names[0]: 2, names[1]: 3, names[2]: 2}
    lines.clear()
    run_audit("cohort_splits", out_dir=tmp_path / "audit-changed", settings=s,
              instance=instance, log=lines.append)
    stale = [line for line in lines if "re-materialized" in line]
    assert stale and all(f"[{names[1]}]" in line for line in stale), lines

    # an output removed from disk (`dvc repro` deletes the stage's outs first)
    (s.inventory_dir / f"{names[2]}.parquet").unlink()
    assert "dicom_inventory's file is missing" in ingest_stale_reason(instance, s, names[2])
    assert _ran(ingest()) == [names[2]], logs

    # the cohort parameters changed: every batch
    params = s.root / "resources" / "params.yaml"
    doc = yaml.safe_load(params.read_text())
    doc["cohort"]["photometric_check"] = not doc["cohort"]["photometric_check"]
    params.write_text(yaml.safe_dump(doc))
    s = load_settings()
    assert "cohort parameters changed" in ingest_stale_reason(instance, s, names[0])
    assert len(ingest()) == 3
    assert [ingest_stale_reason(instance, s, b) for b in names] == [None] * 3
