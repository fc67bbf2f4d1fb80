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


def _dagster_k8s():  # noqa: ANN202
    """dagster-k8s comes with xcam's `k8s` extra, which `make setup` installs: missing is a
    broken install, so these tests fail instead of skipping."""
    try:
        import dagster_k8s
    except ModuleNotFoundError as exc:
        pytest.fail(f"{exc}: install xcam's `k8s` extra (make setup; see the README)")
    return dagster_k8s


def test_k8s_run_config_is_valid_for_the_k8s_executor() -> None:
    k8s = _dagster_k8s()
    config = yaml.safe_load((DEPLOY / "k8s_run_config.yaml").read_text())
    job = _definitions(executor=k8s.k8s_job_executor).resolve_job_def("train")
    result = dg.validate_run_config(job, config)  # raises on anything the schema rejects
    executor = result["execution"]["k8s"]  # processed config, keyed by the executor's name
    assert executor["per_step_k8s_config"].keys() == GPU_STEPS.keys()
    # ... and a typo in the executor section is caught, not ignored
    bad = yaml.safe_load((DEPLOY / "k8s_run_config.yaml").read_text())
    bad["execution"]["config"]["step_k8s_config"]["containr_config"] = {}
    with pytest.raises(dg.DagsterInvalidConfigError):
        dg.validate_run_config(job, bad)


def test_k8s_step_pods_built_by_dagster_k8s_get_gpus_for_the_two_steps_only() -> None:
    """The pod specs `k8s_job_executor` would submit, built with dagster-k8s's own merge and
    Kubernetes model code (the container/pod sections are free-form in the config schema and
    only checked against the Kubernetes models when a step is launched)."""
    _dagster_k8s()
    from types import SimpleNamespace

    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import UserDefinedDagsterK8sConfig, construct_dagster_k8s_job

    config = yaml.safe_load((DEPLOY / "k8s_run_config.yaml").read_text())
    exc = config["execution"]["config"]
    launcher = yaml.safe_load((DEPLOY / "dagster_k8s_instance.yaml").read_text())
    launcher = launcher["run_launcher"]["config"]
    # as in dagster_k8s.executor.k8s_job_executor and K8sStepHandler._get_container_context
    executor_context = K8sContainerContext(
        image_pull_policy=exc.get("image_pull_policy"),
        service_account_name=exc.get("service_account_name"), env_vars=exc.get("env_vars"),
        env_secrets=exc.get("env_secrets"), namespace=exc.get("job_namespace"),
        run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(exc["step_k8s_config"]))
    run_launcher = SimpleNamespace(job_image=launcher["job_image"], dagster_home="/opt/dagster",
                                   instance_config_map=launcher["instance_config_map"],
                                   postgres_password_secret=launcher["postgres_password_secret"])
    for step in [*GPU_STEPS, "some_cpu_step"]:
        context = executor_context.merge(K8sContainerContext(
            run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(
                exc["per_step_k8s_config"].get(step, {}))))
        k8s_job = construct_dagster_k8s_job(
            context.get_k8s_job_config(exc["job_image"], run_launcher),
            ["dagster", "api", "execute_step"], job_name=f"xcam-{step.replace('_', '-')}",
            user_defined_k8s_config=context.run_k8s_config)
        pod = k8s_job.spec.template.spec
        container = pod.containers[0]
        gpu = step in GPU_STEPS
        for amounts in (container.resources.requests, container.resources.limits):
            assert (amounts.get("nvidia.com/gpu") == "1") is gpu, step
        assert (pod.node_selector == {"nvidia.com/gpu.present": "true"}) is gpu, step
        # the shared data volume survives the per-step override (deep merge)
        assert [v.name for v in pod.volumes] == ["xcam-data"], step
        assert [m.mount_path for m in container.volume_mounts] == ["/data/xcam"], step
        env = {e.name: e.value for e in container.env}
        assert env["XCAM_DATA_DIR"] == "/data/xcam" and env["XCAM_PROFILE"] == "study", step
        assert container.image == exc["job_image"] and pod.service_account_name == "dagster"


def test_k8s_instance_run_launcher_config_is_valid_for_k8s_run_launcher() -> None:
    _dagster_k8s()
    import importlib

    from dagster._config import process_config, resolve_to_config_type

    launcher = yaml.safe_load((DEPLOY / "dagster_k8s_instance.yaml").read_text())["run_launcher"]
    klass = getattr(importlib.import_module(launcher["module"]), launcher["class"])
    schema = resolve_to_config_type(klass.config_type())
    result = process_config(schema, launcher["config"])  # as DagsterInstance loads it
    assert result.success, result.errors
    assert not process_config(schema, {**launcher["config"], "job_namespce": "x"}).success


def test_instance_example_names_the_k8s_launcher_and_postgres() -> None:
    instance = yaml.safe_load((DEPLOY / "dagster_k8s_instance.yaml").read_text())
    assert instance["run_launcher"]["class"] == "K8sRunLauncher"
    db = instance["storage"]["postgres"]["postgres_db"]
    # psycopg2 is the driver dagster-postgres installs; SQLAlchemy 2.1 defaults to psycopg 3
    assert db["scheme"] == "postgresql+psycopg2"
