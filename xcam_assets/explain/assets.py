"""Explain stage: test-split predictions and CAM heatmaps per architecture."""

import dagster as dg

from xcam_assets.explain.overlays import png_markdown
from xcam_assets.explain.stage import explain_architecture
from xcam_assets.hashing import dvc_data_version
from xcam_assets.project import XcamProject
from xcam_assets.train.assets import arch_partitions, checkpoints

GROUP = "explain"


@dg.asset(partitions_def=arch_partitions, group_name=GROUP, code_version="2",
          deps=[checkpoints], kinds={"pytorch"})
def heatmap_sets(context: dg.AssetExecutionContext, xcam: XcamProject) -> dg.MaterializeResult:
    """Per test image, finding and configured CAM method: a heatmap in [0, 1] at input
    size (float16, `heatmaps/<arch>/<method>.npy` (N, F, S, S), rows in the order of
    `heatmap_manifest.parquet`), the model's probabilities on the val and test splits
    (`predictions.parquet`), a sidecar `heatmaps.json` (methods, target layers, hashes,
    speed), overlay PNGs at several alpha levels (`overlays/<method>/`) and a montage per
    method (`montage_<method>.png`)."""
    outcome = explain_architecture(xcam.settings(), context.partition_key, context.log.info)
    made = {m: v for m, v in outcome.methods.items() if v["status"] == "ok"}
    return dg.MaterializeResult(
        metadata={"n_test_images": outcome.n_images, "methods": list(made),
                  "skipped": {m: v["reason"] for m, v in outcome.methods.items()
                              if v["status"] != "ok"},
                  "heatmaps_per_s": {m: v["heatmaps_per_s"] for m, v in made.items()},
                  "path": dg.MetadataValue.path(str(outcome.out)),
                  **{f"montage_{m}": dg.MetadataValue.md(png_markdown(pic, caption))
                     for m, (pic, caption) in outcome.montages.items()}},
        data_version=dg.DataVersion(dvc_data_version(outcome.out)),
    )
