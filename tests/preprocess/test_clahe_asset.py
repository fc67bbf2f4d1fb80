"""clahe_tensors as an asset: reuse shows in its metadata; a parameter change moves its
data version."""

from __future__ import annotations

import dagster as dg

from xcam_assets.config import load_settings
from xcam_assets.demo import write_demo_cohort
from xcam_assets.orchestrate import STAGES, _run, register_batches
from xcam_assets.project import XcamProject


def _latest(instance: dg.DagsterInstance, batch: str) -> tuple[dict, str]:
    event = instance.get_latest_materialization_event(dg.AssetKey("clahe_tensors"))
    mat = event.asset_materialization
    assert mat.partition == batch
    meta = {k: v.value for k, v in mat.metadata.items()}
    return meta, mat.tags["dagster/data_version"]


def test_rematerialize_reuses_and_clip_limit_changes_version(project) -> None:
    s = load_settings()
    batches = write_demo_cohort(s.incoming_dir, n_images=24, n_batches=2, size=96, seed=1)
    for b in batches:
        (b / ".complete").touch()
    instance = dg.DagsterInstance.get()
    register_batches(instance, [b.name for b in batches])
    keys = STAGES["ingest"] + STAGES["preprocess"]
    _run(keys, instance, XcamProject(), batches[0].name, log=print)
    meta1, v1 = _latest(instance, batches[0].name)
    assert (meta1["computed"], meta1["reused"]) == (12, 0)
    _run(keys, instance, XcamProject(), batches[0].name, log=print)
    meta2, v2 = _latest(instance, batches[0].name)
    assert (meta2["computed"], meta2["reused"], v2) == (0, 12, v1)
    # a second batch costs only its own images
    _run(keys, instance, XcamProject(), batches[1].name, log=print)
    meta3, _ = _latest(instance, batches[1].name)
    assert (meta3["computed"], meta3["reused"]) == (12, 0)
    # change the CLAHE clip limit in the project's params: everything recomputed, new version
    params = project / "resources" / "params.yaml"
    params.write_text(params.read_text().replace("clip_limit: 2.0", "clip_limit: 3.5"))
    _run(keys, instance, XcamProject(), batches[0].name, log=print)
    meta4, v4 = _latest(instance, batches[0].name)
    assert (meta4["computed"], meta4["reused"]) == (12, 0)
    assert v4 != v1
