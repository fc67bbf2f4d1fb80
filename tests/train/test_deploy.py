"""The scale-out examples in resources/deploy/ parse and fit xcam's training and explain
steps (tests/test_postgres.py runs the lineage on the Postgres instance file)."""

from __future__ import annotations

import dagster as dg
import pytest
import yaml
from train_helpers import REPO

from xcam_assets.explain.assets import heatmap_sets
from xcam_assets.project import XcamProject
from xcam_assets.train.assets import arch_partitions, checkpoints

DEPLOY = REPO / "resources" / "deploy"
GPU_STEPS = {"checkpoints": checkpoints, "heatmap_sets": heatmap_sets}


def _definitions(**kwargs) -> dg.Definitions:
    return dg.Definitions(assets=[checkpoints, heatmap_sets], resources={"xcam": XcamProject()},
                          jobs=[dg.define_asset_job("train", selection=[checkpoints, heatmap_sets],
                                                    partitions_def=arch_partitions)], **kwargs)


def test_k8s_run_config_requests_a_gpu_for_training_and_heatmaps_only() -> None:
    config = yaml.safe_load((DEPLOY / "k8s_run_config.yaml").read_text())
    execution = config["execution"]["config"]
    per_step = execution["per_step_k8s_config"]
    assert set(per_step) == set(GPU_STEPS)
    for step, asset in GPU_STEPS.items():
        assert asset.op.name == step  # the step key per_step_k8s_config names
        resources = per_step[step]["container_config"]["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == "1", step
        assert resources["limits"]["nvidia.com/gpu"] == "1", step
        pod = per_step[step]["pod_spec_config"]
        assert pod["node_selector"] == {"nvidia.com/gpu.present": "true"}, step
        assert {t["key"] for t in pod["tolerations"]} == {"nvidia.com/gpu"}, step
    cpu = execution["step_k8s_config"]["container_config"]["resources"]
    assert "nvidia.com/gpu" not in cpu["limits"] and "nvidia.com/gpu" not in cpu["requests"]
    # both GPU steps are steps of one job: the training + explain job of an architecture
    job = _definitions().resolve_job_def("train")
    assert {node.name for node in job.graph.nodes} == set(GPU_STEPS)
    # everything but the executor section is valid run config for that real job
    rest = {k: v for k, v in config.items() if k != "execution"}
    result = dg.validate_run_config(job, rest)
    assert result["resources"]["xcam"]["config"]["profile"] == "study"


def test_k8s_run_config_is_valid_for_the_k8s_executor_when_installed() -> None:
    k8s = pytest.importorskip("dagster_k8s", reason="dagster-k8s is not a dependency here; "
                              "install it to validate the executor section")
    config = yaml.safe_load((DEPLOY / "k8s_run_config.yaml").read_text())
    job = _definitions(executor=k8s.k8s_job_executor).resolve_job_def("train")
    dg.validate_run_config(job, config)


def test_instance_example_names_the_k8s_launcher_and_postgres() -> None:
    instance = yaml.safe_load((DEPLOY / "dagster_k8s_instance.yaml").read_text())
    assert instance["run_launcher"]["class"] == "K8sRunLauncher"
    db = instance["storage"]["postgres"]["postgres_db"]
    # psycopg2 is the driver dagster-postgres installs; SQLAlchemy 2.1 defaults to psycopg 3
    assert db["scheme"] == "postgresql+psycopg2"
