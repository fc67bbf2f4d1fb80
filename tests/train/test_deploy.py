"""The scale-out examples in resources/deploy/ parse and fit xcam's training job."""

from __future__ import annotations

import dagster as dg
import pytest
import yaml
from train_helpers import REPO

from xcam_assets.resources import XcamConfig
from xcam_assets.train.assets import arch_partitions, checkpoints

DEPLOY = REPO / "resources" / "deploy"


def _train_job() -> dg.JobDefinition:
    defs = dg.Definitions(assets=[checkpoints], resources={"xcam": XcamConfig()},
                          jobs=[dg.define_asset_job("train", selection=[checkpoints],
                                                    partitions_def=arch_partitions)])
    return defs.resolve_job_def("train")


def test_k8s_run_config_requests_a_gpu_for_the_training_step_only() -> None:
    config = yaml.safe_load((DEPLOY / "k8s_run_config.yaml").read_text())
    execution = config["execution"]["config"]
    assert checkpoints.op.name == "checkpoints"  # the step key per_step_k8s_config names
    gpu = execution["per_step_k8s_config"]["checkpoints"]["container_config"]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in execution["step_k8s_config"]["container_config"][
        "resources"]["limits"]
    # everything but the executor section is valid run config for the real training job
    rest = {k: v for k, v in config.items() if k != "execution"}
    result = dg.validate_run_config(_train_job(), rest)
    assert result["resources"]["xcam"]["config"]["profile"] == "study"


def test_k8s_run_config_is_valid_for_the_k8s_executor_when_installed() -> None:
    k8s = pytest.importorskip("dagster_k8s", reason="dagster-k8s is not a dependency here; "
                              "install it to validate the executor section")
    config = yaml.safe_load((DEPLOY / "k8s_run_config.yaml").read_text())
    job = dg.Definitions(assets=[checkpoints], resources={"xcam": XcamConfig()},
                         executor=k8s.k8s_job_executor,
                         jobs=[dg.define_asset_job("train", selection=[checkpoints],
                                                   partitions_def=arch_partitions)]
                         ).resolve_job_def("train")
    dg.validate_run_config(job, config)


def test_instance_example_names_the_k8s_launcher_and_postgres() -> None:
    instance = yaml.safe_load((DEPLOY / "dagster_k8s_instance.yaml").read_text())
    assert instance["run_launcher"]["class"] == "K8sRunLauncher"
    assert "postgres" in instance["storage"]
