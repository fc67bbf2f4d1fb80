"""The Dagster resource every asset takes (`xcam`: `XcamProject`) and the partitions.

Named for what it is, the project (root, profile, study, data folder), so it is not
confused with the `resources/` folder of YAML files or with Dagster's run `Config`."""

import warnings

import dagster as dg

from xcam_assets.config import Settings, load_settings

# partitioned asset checks are "preview" in dagster 1.13; we rely on them knowingly
warnings.filterwarnings("ignore", category=dg.PreviewWarning)

#: one dynamic partition per arrival batch (a folder under data/incoming/)
batch_partitions = dg.DynamicPartitionsDefinition(name="batches")


def architecture_partitions() -> dg.StaticPartitionsDefinition:
    """One partition per model-zoo entry (resources/models.yaml), so the UI shows and
    materializes every architecture; `xcam materialize` runs the profile's `architectures`."""
    return dg.StaticPartitionsDefinition(list(load_settings().zoo))


class XcamProject(dg.ConfigurableResource):
    """Where the project lives and which profile/study sizes the work.

    Empty strings mean: take it from the environment / resources/params.yaml.
    """

    root: str = ""
    profile: str = ""
    study: str = ""
    data_dir: str = ""

    def settings(self) -> Settings:
        from pathlib import Path

        return load_settings(
            root=Path(self.root) if self.root else None,
            profile=self.profile or None,
            study=self.study or None,
            data_dir=Path(self.data_dir) if self.data_dir else None,
        )
