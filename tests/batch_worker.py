"""A long-lived worker for tests/test_concurrency.py: runs one arrival batch's ingest +
preprocessing (raw_dicoms, dicom_inventory, findings, clahe_tensors; their checks are
left out: a process each, and not what is compared) as a Dagster run under the
**multiprocess executor** (a process per step,
forked from a forkserver that has xcam's definitions preloaded), then commits the DVC
stages as the `dvc_commit_after_run` sensor does. The project comes from the
environment (XCAM_ROOT, DAGSTER_HOME, ...), fixed for the worker's life: the test resets
the project between iterations, so the worker pays for its imports once.

Protocol (one line each way): the worker prints `ready`; `run <batch>` answers
`done <batch> <run status> <dvc exit code>`; `quit` ends it. Everything else the worker
and its step processes print goes to stderr (the test's log file).
"""

import os
import sys

import dagster as dg

from xcam_assets.automation import INGEST_ASSETS
from xcam_assets.definitions import ASSETS, CHECKS
from xcam_assets.project import XcamProject, batch_partitions

RUN_CONFIG = {"execution": {"config": {"start_method": {"forkserver": {
    "preload_modules": ["xcam_assets.definitions"]}}}}}


def ingest_job() -> dg.JobDefinition:
    """The `ingest_batch` assets under Dagster's default multiprocess executor."""
    job = dg.define_asset_job("ingest_batch_multiprocess",
                              selection=dg.AssetSelection.assets(*INGEST_ASSETS).without_checks(),
                              partitions_def=batch_partitions,
                              executor_def=dg.multiprocess_executor)
    defs = dg.Definitions(assets=ASSETS, asset_checks=CHECKS, jobs=[job],
                          resources={"xcam": XcamProject()})
    return defs.resolve_job_def("ingest_batch_multiprocess")


def run_batch(batch: str) -> tuple[str, int]:
    from xcam_assets.config import load_settings
    from xcam_assets.orchestrate import project_instance
    from xcam_assets.provenance.dvc import run_dvc

    settings = load_settings()
    with project_instance(settings) as instance:  # locked: the first opening creates it
        if batch not in instance.get_dynamic_partitions(batch_partitions.name):
            instance.add_dynamic_partitions(batch_partitions.name, [batch])
        result = dg.execute_job(dg.reconstructable(ingest_job), instance=instance,
                                run_config=RUN_CONFIG, tags={"dagster/partition": batch})
        status = instance.get_run_by_id(result.run_id).status.value
    code = -1
    if status == "SUCCESS":  # as dvc_commit_after_run: commit the stages it materialized
        proc = run_dvc(settings, "commit", "--force", "--quiet", "ingest", "preprocess",
                       check=False, capture=True)
        sys.stderr.write(proc.stdout + proc.stderr)
        code = proc.returncode
    return status, code


def main() -> None:
    answers = os.fdopen(os.dup(1), "w")  # the protocol; fd 1 (inherited) -> stderr
    os.dup2(2, 1)
    answers.write("ready\n")
    answers.flush()
    for line in sys.stdin:
        command, *args = line.split()
        if command == "quit":
            break
        if command == "run":
            status, code = run_batch(args[0])
            answers.write(f"done {args[0]} {status} {code}\n")
            answers.flush()


if __name__ == "__main__":
    main()
