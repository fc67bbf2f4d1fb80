"""A run launcher that stamps every launched run with xcam's provenance tags.

Configured in `dagster_home/dagster.yaml`; runs the UI, a sensor or the automation
daemon launch go through it (in-process runs of `xcam materialize` tag themselves).
With the default launcher the run executes on the launching host, so host and user
are those of the execution.
"""

from typing import Any

from dagster._core.launcher import DefaultRunLauncher
from dagster._core.launcher.base import LaunchRunContext
from dagster._serdes import ConfigurableClassData

from xcam_assets.provenance import TAG_HOST, TAG_LAUNCHED_BY, execution_tags


class ProvenanceRunLauncher(DefaultRunLauncher):
    """DefaultRunLauncher + `xcam/...` tags (host, user, git commit, packages, params)."""

    def __init__(self, inst_data: ConfigurableClassData | None = None) -> None:
        super().__init__(inst_data=inst_data)

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData,
                          config_value: dict[str, Any]) -> "ProvenanceRunLauncher":
        return cls(inst_data=inst_data)

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        if TAG_HOST not in run.tags:
            tags = execution_tags(launched_by=run.tags.get(TAG_LAUNCHED_BY) or "dagster")
            self._instance.add_run_tags(run.run_id, tags)
        super().launch_run(context)
