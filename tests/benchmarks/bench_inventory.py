"""Inventory throughput vs a bare pydicom loop, and the cost of adding a batch.

Run: .venv/bin/python tests/benchmarks/bench_inventory.py [--files 1000]
(a plain script, not collected by pytest). Files: the SYNTHETIC demo cohort written to
a temp dir (256 x 256, 8..16 bit, DX/CR, MONOCHROME1/2), warm page cache.

Two like-with-like comparisons, the four loops alternating on chunks of 50 files (the
machine is shared: load changes then hit all of them alike), median of 5 passes:

* headers + hashes: `inventory_rows` with `IngestPolicy(decode=False)` (parse up to the
  pixels, sha256, every header check, HMAC pseudonyms, the polars table) vs the bare
  loop `pydicom.dcmread(path, stop_before_pixels=True)` + `sha256_file(path)`;
* with the decode check: `inventory_rows` as the asset runs it (the above + decode the
  pixels once, length/blank/window checks, photometric score on a subsample) vs the
  bare loop `pydicom.dcmread(path)` + `.pixel_array` + `sha256_file(path)`.

Then incremental ingest through Dagster in-process (raw copy + inventory of one new
batch partition, after a small warm-up batch so Dagster's first-run cost is not
counted): k new files with N = 0 and N = --files already ingested, and 4k new files
with N: the time follows k, not N.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pydicom

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from xcam_assets.demo import write_demo_cohort  # noqa: E402
from xcam_assets.hashing import sha256_file  # noqa: E402
from xcam_assets.ingest.inventory import IngestPolicy, inventory_rows  # noqa: E402

POLICY = IngestPolicy(modalities=frozenset({"DX", "CR"}))


def bare_headers(files: list[Path]) -> None:
    for p in files:
        pydicom.dcmread(p, stop_before_pixels=True)
        sha256_file(p)


def bare_decode(files: list[Path]) -> None:
    for p in files:
        pydicom.dcmread(p).pixel_array  # noqa: B018 - decoding is the point
        sha256_file(p)


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def throughput(batch: Path, repeats: int = 5, chunk: int = 50) -> dict[str, float]:
    """Files/s of the four loops. The machine is shared, so the loops alternate on
    chunks of `chunk` files (each chunk: bare, ours, bare decode, ours decode): load
    changes hit all four alike. Median over `repeats` passes of the summed times."""
    files = sorted(batch.glob("*.dcm"))
    n = len(files)
    policy_h = IngestPolicy(modalities=POLICY.modalities, decode=False)
    bare_decode(files)  # warm the page cache and the imports
    runs: dict[str, list[float]] = {k: [] for k in ("bare_h", "ours_h", "bare_d", "ours_d")}
    for _ in range(repeats):
        total = dict.fromkeys(runs, 0.0)
        for i in range(0, n, chunk):
            part = files[i:i + chunk]
            total["bare_h"] += timed(bare_headers, part)
            total["ours_h"] += timed(inventory_rows, batch, "b", b"k", policy_h, None, part)
            total["bare_d"] += timed(bare_decode, part)
            total["ours_d"] += timed(inventory_rows, batch, "b", b"k", POLICY, None, part)
        for k, v in total.items():
            runs[k].append(v)
    frame = inventory_rows(batch, "b", b"k", POLICY)
    assert frame.filter(frame["status"] != "ok").height == 0, "benchmark files must be good"
    assert frame.height == n
    return {k: n / statistics.median(v) for k, v in runs.items()} | {"n": n}


def incremental(root: Path, n_existing: int, k: int) -> dict[str, float]:
    """Seconds to ingest (raw copy + inventory) a new batch of k / 4k files, N = 0 and N."""
    project = root / "project"
    shutil.copytree(REPO / "resources", project / "resources")
    (project / "dagster_home").mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", project / "dagster_home")
    os.environ.update(XCAM_ROOT=str(project), XCAM_DATA_DIR=str(project / "data"),
                      DAGSTER_HOME=str(project / "dagster_home"), XCAM_PROFILE="tiny",
                      XCAM_PSEUDONYM_KEY="bench-key", GX_ANALYTICS_ENABLED="false",
                      XCAM_LOG_LEVEL="ERROR")
    import dagster as dg

    from xcam_assets.orchestrate import _run, register_batches
    from xcam_assets.project import XcamProject

    incoming = project / "data" / "incoming"
    specs = {"warm-up": (8, 9), "new-k-first": (k, 1), "existing": (n_existing, 2),
             "new-k": (k, 3), "new-4k": (4 * k, 4)}
    for name, (n, seed) in specs.items():
        [d] = write_demo_cohort(root / f"gen-{name}", n_images=n, n_batches=1, size=256,
                                seed=seed)
        shutil.move(d, incoming / name)
    instance = dg.DagsterInstance.get()
    register_batches(instance, list(specs))
    keys = ["raw_dicoms", "dicom_inventory"]
    out = {}
    for name in specs:
        t = time.perf_counter()
        result = _run(keys, instance, XcamProject(), name, log=lambda m: None)
        wall = time.perf_counter() - t
        meta = next(e.event_specific_data.materialization.metadata for e in result.all_events
                    if e.event_type_value == "ASSET_MATERIALIZATION"
                    and e.asset_key == dg.AssetKey("dicom_inventory"))
        out[name] = (wall, float(meta["seconds"].value))  # run wall time, inventory step
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--k", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="xcam-bench-inv-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        [batch] = write_demo_cohort(root / "cohort", n_images=args.files, n_batches=1,
                                    size=256, seed=0)
        print(f"wrote {args.files} SYNTHETIC demo files in {time.perf_counter() - t:.1f}s")
        r = throughput(batch)
        ratio_h, ratio_d = r["ours_h"] / r["bare_h"], r["ours_d"] / r["bare_d"]
        print(f"headers+hash : inventory {r['ours_h']:7.0f} files/s, bare "
              f"{r['bare_h']:7.0f} files/s, ratio {ratio_h:.2f}")
        print(f"+decode check: inventory {r['ours_d']:7.0f} files/s, bare "
              f"{r['bare_d']:7.0f} files/s, ratio {ratio_d:.2f}")
        inc = incremental(root / "inc", args.files, args.k)
        k, n = args.k, args.files
        for label, name in ((f"add {k} files, N=0 existing", "new-k-first"),
                            (f"add {n} files (the existing batch)", "existing"),
                            (f"add {k} files, N={n} existing", "new-k"),
                            (f"add {4 * k} files, N={n + k} existing", "new-4k")):
            wall, step = inc[name]
            print(f"{label:38s} run {wall:6.2f}s (raw copy + inventory + checks), "
                  f"inventory step {step:6.3f}s = {1000 * step / int(label.split()[1]):.2f} "
                  "ms/file")
        print(f"RESULT inventory files={r['n']} headers_hash_fps={r['ours_h']:.0f} "
              f"bare_headers_hash_fps={r['bare_h']:.0f} ratio={ratio_h:.2f} "
              f"decode_fps={r['ours_d']:.0f} bare_decode_fps={r['bare_d']:.0f} "
              f"ratio_decode={ratio_d:.2f} "
              f"inv_k{k}_N0_s={inc['new-k-first'][1]:.3f} "
              f"inv_k{k}_N{n}_s={inc['new-k'][1]:.3f} "
              f"inv_k{4 * k}_N{n + k}_s={inc['new-4k'][1]:.3f} "
              f"inv_N{n}_s={inc['existing'][1]:.3f} "
              f"run_k{k}_N0_s={inc['new-k-first'][0]:.2f} run_k{k}_N{n}_s={inc['new-k'][0]:.2f} "
              f"run_k{4 * k}_N{n + k}_s={inc['new-4k'][0]:.2f}")


if __name__ == "__main__":
    main()
