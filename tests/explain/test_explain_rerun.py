"""A heatmap set made from the same checkpoint, images, settings and code is kept as it is
on re-materialization (no CAM pass, the same data version); any change of those remakes it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from xcam_assets.config import _deep_merge, load_settings


@pytest.mark.slow
def test_heatmap_set_is_kept_while_its_inputs_stand(project: Path) -> None:
    from cohorts import arrived_demo_cohort

    from xcam_assets.explain.stage import SIDECAR, explain_architecture, read_sidecar
    from xcam_assets.hashing import dvc_data_version
    from xcam_assets.orchestrate import materialize_stage

    s = load_settings()
    arrived_demo_cohort(s, 40, size=96)
    for stage in ("ingest", "preprocess", "splits", "train", "explain"):
        materialize_stage(stage, s, log=lambda m: None)
    arch = s.architectures[0]
    out = s.heatmaps_dir / arch
    side = read_sidecar(out)
    files = [out / SIDECAR] + [out / i["file"] for i in side["methods"].values()
                               if i["status"] == "ok"]
    stamps = {p: p.stat().st_mtime_ns for p in files}
    version = dvc_data_version(out)

    said: list[str] = []
    kept = explain_architecture(s, arch, log=said.append)
    assert any("heatmap set up to date" in m for m in said), said
    assert {p: p.stat().st_mtime_ns for p in files} == stamps  # nothing rewritten
    assert dvc_data_version(out) == version
    assert kept.methods == side["methods"] and set(kept.montages) == {
        m for m, i in side["methods"].items() if i["status"] == "ok"}
    assert all(isinstance(pic, bytes) and pic[:4] == b"\x89PNG"
               for pic, _ in kept.montages.values())
    # through Dagster too: the asset re-materializes with the same data version
    materialize_stage("explain", s, log=lambda m: None)
    assert {p: p.stat().st_mtime_ns for p in files} == stamps

    # a missing heatmap file remakes the set
    first = files[1]
    first.unlink()
    said.clear()
    explain_architecture(s, arch, log=said.append)
    assert not any("up to date" in m for m in said) and first.is_file()

    # another method list is another set
    path = project / "resources" / "params.yaml"
    methods = ["gradcam"]
    path.write_text(yaml.safe_dump(_deep_merge(yaml.safe_load(path.read_text()),
                                               {"profiles": {"tiny": {"cam_methods": methods}}})))
    s = load_settings()
    said.clear()
    remade = explain_architecture(s, arch, log=said.append)
    assert not any("up to date" in m for m in said)
    assert list(remade.methods) == methods
    assert read_sidecar(out)["explain_fingerprint"] != side["explain_fingerprint"]
