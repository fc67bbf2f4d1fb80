"""How each stage's cost grows with the number of images (the README's scaling table).

For each N (default 100, 1,000 and 10,000) a fresh project is made in a temporary
folder: the SYNTHETIC demo cohort (256 px DICOMs, arrival batches of at most 1,000
images), then every stage of the lineage is materialized through the real Dagster
path (`xcam_assets.orchestrate.materialize_stage`, SQLite instance, blocking checks)
and timed. Sizing: the demo profile (128 px) with one resnet18 and ONE training
epoch (a full training run costs epochs x this), Grad-CAM only, faithfulness on at
most 6 images. Each N runs in its own process (training several models in one
process slows the later ones here).

The marginal cost per image (slope between the two largest N) projects SIIM-ACR
(12,000 images) and NIH ChestX-ray14 (112,120) on this machine. Run:

    .venv/bin/python tests/benchmarks/bench_scaling.py [--sizes 100 1000 10000]

The bare baseline in the same run is the per-stage bare-loop figure where one
exists: preprocessing (pydicom + LUTs + cv2 CLAHE + resize + write) on the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STAGES = ["ingest", "preprocess", "splits", "train", "explain", "evaluate"]


def one_size(n: int, root: Path) -> dict[str, float]:
    """Materialize the lineage on n synthetic images under root; seconds per stage."""
    import yaml

    shutil.copytree(REPO / "resources", root / "resources")
    (root / "dagster_home").mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", root / "dagster_home" / "dagster.yaml")
    os.environ.update(XCAM_ROOT=str(root), XCAM_DATA_DIR=str(root / "data"),
                      DAGSTER_HOME=str(root / "dagster_home"), XCAM_PROFILE="demo",
                      XCAM_PSEUDONYM_KEY="bench-scaling-key", GX_ANALYTICS_ENABLED="false",
                      XCAM_LOG_LEVEL="WARNING")
    params_file = root / "resources" / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    demo = params["profiles"]["demo"]
    demo.update(architectures=["resnet18"], epochs=1, cam_methods=["gradcam"], n_boot=200,
                min_val_auc=0.0)
    params["demo"]["n_batches"] = max(1, n // 1000)
    params_file.write_text(yaml.safe_dump(params))

    from xcam_assets.config import load_settings
    from xcam_assets.demo import write_demo_cohort
    from xcam_assets.orchestrate import materialize_stage, project_instance

    settings = load_settings()
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    batches = write_demo_cohort(settings.incoming_dir, n_images=n,
                                n_batches=int(params["demo"]["n_batches"]), size=256,
                                seed=settings.seed)
    for b in batches:
        (b / ".complete").touch()
    times["write_cohort"] = time.perf_counter() - t0
    instance = project_instance(settings)
    for stage in STAGES:
        t0 = time.perf_counter()
        materialize_stage(stage, settings, instance=instance, log=lambda m: None)
        times[stage] = time.perf_counter() - t0

    # bare baseline for the one stage that has a bare loop: preprocessing, one process
    from bench_preprocess import bare_loop  # same folder

    paths = sorted(settings.incoming_dir.glob("demo-batch-*/*.dcm"))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        bare_loop(paths, int(demo["image_size"]), 2.0, 8, Path(tmp) / "bare.npy")
    times["bare_preprocess_1proc"] = time.perf_counter() - t0
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory(prefix="xcam-scaling-") as tmp:
            times = one_size(args.one, Path(tmp))
        args.out.write_text(json.dumps(times))
        return

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "17179869184",
           "MALLOC_TRIM_THRESHOLD_": "17179869184"}
    rows: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            out = Path(tmp) / f"{n}.json"
            subprocess.run([sys.executable, __file__, "--one", str(n), "--out", str(out)],
                           check=True, env=env, cwd=REPO)
            rows[n] = json.loads(out.read_text())
            print(f"N={n}: " + ", ".join(f"{k} {v:.1f}s" for k, v in rows[n].items()),
                  flush=True)

    cols = ["write_cohort", *STAGES]
    print("\n| images | " + " | ".join(cols) + " | lineage total | preprocess vs bare 1-proc |")
    print("|" + "---|" * (len(cols) + 3))
    for n, t in rows.items():
        total = sum(t[c] for c in STAGES)
        print(f"| {n:,} | " + " | ".join(f"{t[c]:.1f} s" for c in cols)
              + f" | {total:.1f} s | {t['bare_preprocess_1proc'] / t['preprocess']:.2f}x |")
    sizes = sorted(rows)
    if len(sizes) >= 2:
        a, b = sizes[-2], sizes[-1]
        slope = {c: (rows[b][c] - rows[a][c]) / (b - a) for c in STAGES}
        print("\nmarginal ms per image (between the two largest N): "
              + ", ".join(f"{c} {1000 * v:.2f}" for c, v in slope.items()))
        for name, n in (("SIIM-ACR", 12_000), ("NIH ChestX-ray14", 112_120)):
            proj = {c: rows[b][c] + slope[c] * (n - b) for c in STAGES}
            print(f"projected here, {name} ({n:,} images), one training epoch: "
                  + ", ".join(f"{c} {v / 60:.1f} min" for c, v in proj.items())
                  + f"; total {sum(proj.values()) / 3600:.2f} h")
    big = rows[sizes[-1]]
    print(f"RESULT scaling sizes={','.join(map(str, sizes))} "
          + " ".join(f"{c}_s={big[c]:.1f}" for c in STAGES)
          + f" preprocess_vs_bare={big['bare_preprocess_1proc'] / big['preprocess']:.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.path.insert(0, str(REPO))
    main()
