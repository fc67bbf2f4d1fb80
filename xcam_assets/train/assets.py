"""Train stage: one checkpoint per architecture partition (every zoo entry is a partition;
`xcam materialize train` runs the active profile's `architectures`)."""

import math

import dagster as dg
import polars as pl

from xcam_assets.config import Settings
from xcam_assets.hashing import dvc_data_version
from xcam_assets.ingest.assets import cohort_splits
from xcam_assets.preprocess.assets import clahe_tensors
from xcam_assets.project import XcamProject, architecture_partitions
from xcam_assets.train.checkpoint import read_sidecar
from xcam_assets.train.distributed import ddp_command
from xcam_assets.train.stage import train_and_save

GROUP = "train"
arch_partitions = architecture_partitions()


def _finite(d: dict) -> dict:
    """NaN -> None (JSON metadata has no NaN)."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in d.items()}


def checkpoint_result(settings: Settings, arch: str) -> dg.MaterializeResult:
    """The materialization of a written checkpoint, from its sidecar and model card: the
    same metadata whether this process or a DDP launch trained it."""
    out = settings.checkpoints_dir / arch
    side = read_sidecar(out)
    card = (out / "model_card.md").read_text()
    seed_table = pl.DataFrame([{k: v for k, v in r.items() if k != "weights_sha256"}
                               for r in side["seed_runs"]]).to_pandas()
    val_auc = side["seed_summary"]["val_auc"]
    return dg.MaterializeResult(
        metadata={"val_auc": side["val_auc"], "best_epoch": side["best_epoch"],
                  "seed": side["seed"], "recipe": side["recipe"]["name"],
                  "n_seeds": len(side["seeds"]), "processes": side.get("processes", 1),
                  "val_auc_mean": val_auc["mean"],
                  "val_auc_ci": dg.MetadataValue.json(_finite(val_auc)),
                  "weights_sha256": side["weights_sha256"],
                  "history": dg.MetadataValue.md(
                      pl.DataFrame(side["history"]).to_pandas().to_markdown(index=False)),
                  "seeds": dg.MetadataValue.md(seed_table.to_markdown(index=False)),
                  "model_card": dg.MetadataValue.md(card),
                  "path": dg.MetadataValue.path(str(out))},
        data_version=dg.DataVersion(dvc_data_version(out)),
    )


@dg.asset(partitions_def=arch_partitions, group_name=GROUP, code_version="2",
          deps=[cohort_splits, dg.AssetDep(clahe_tensors, partition_mapping=dg.AllPartitionMapping())],
          kinds={"pytorch"})
def checkpoints(context: dg.AssetExecutionContext, xcam: XcamProject) -> dg.MaterializeResult:
    """A classifier of the zoo trained on the train split by the profile's recipe, once per
    seed; the lowest-val-loss seed is the checkpoint (best epoch by validation loss).

    Saved as safetensors + JSON sidecar (provenance) + markdown model card. Resumes an
    interrupted run from its last completed epoch. With `ddp_processes: N` in the profile
    the training runs as N DDP processes under torchrun, launched through Dagster Pipes
    (their logs stream into this run)."""
    s = xcam.settings()
    arch = context.partition_key
    processes = int(s.profile.get("ddp_processes", 1))
    if processes > 1:
        dg.PipesSubprocessClient(cwd=str(s.root)).run(
            context=context, command=ddp_command(s, arch, processes, study=xcam.study))
    else:
        train_and_save(s, arch, context.log.info)
    return checkpoint_result(s, arch)
