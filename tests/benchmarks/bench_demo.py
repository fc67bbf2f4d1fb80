"""The whole demo lineage through Dagster: wall time and orchestration overhead.

Run: .venv/bin/python tests/benchmarks/bench_demo.py [--profile demo|tiny] [--keep]
[--precision auto|fp32|bf16] [--seeds N] [--architectures a,b]
(a plain script, not collected by pytest).

What it does, as `make demo` (`xcam demo`) does without DVC and the UI: a fresh project
in a temp dir (a copy of resources/ and of dagster_home/dagster.yaml, its own data dir
and DAGSTER_HOME, as the tests' `project` fixture), the SYNTHETIC demo cohort written by
`xcam demo-cohort` (the profile's `demo_images`), then `materialize_all`: every stage, one
in-process Dagster run per stage and partition, on the project's persistent SQLite
instance, provenance tags, blocking checks and all.

Figures:

* `lineage_s`: wall time of `materialize_all` (cohort writing and the imports excluded:
  `import_s` and `cohort_s` are printed apart).
* `overhead_fraction`: the share of `lineage_s` spent outside the steps' bodies, i.e.
  `1 - |union of body intervals| / lineage_s`. A step's body is the user code of an asset
  or an asset check: from the step's last framework event before the code runs
  (STEP_START, or the last LOADED_INPUT / STEP_INPUT) to its first event after it
  (STEP_OUTPUT / ASSET_CHECK_EVALUATION / ASSET_MATERIALIZATION / STEP_FAILURE), from
  the event log of every run `materialize_all` started. Everything else counts as
  overhead: creating and launching runs, the instance look-ups between runs (stale
  checks, reaping dead runs, partition registration), event-log writes, input loading
  and output handling, and the gaps between one run's end and the next one's start. The
  union (not the sum) keeps overlapping steps from being counted twice (the runs here
  are in-process, so steps do not overlap; a multiprocess executor would).
  `step_overhead_fraction` is the looser figure with whole steps (STEP_START to
  STEP_SUCCESS/FAILURE) in place of bodies.

Per stage (each run's `xcam/stage` tag): runs, run wall time (RUN_START to the run's end
event), body time, and the run's own overhead; plus the time outside every run. On a
loaded machine the bodies' times swing widely from run to run; `overhead_s`, the
absolute figure, is the one to compare between versions of the orchestration.
`XCAM_SQLITE_PINS=0` runs without xcam_assets.sqlite_pins (Dagster's SQLite writes as
shipped), to see what the pins save.

Targets (issue #19): demo lineage <= 5 minutes on the 2-core CPU machine, overhead <= 5%.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

BODY_START = {"STEP_START", "LOADED_INPUT", "STEP_INPUT"}
BODY_END = {"STEP_OUTPUT", "ASSET_CHECK_EVALUATION", "ASSET_MATERIALIZATION",
            "STEP_FAILURE", "STEP_SUCCESS"}
STEP_END = {"STEP_SUCCESS", "STEP_FAILURE", "STEP_SKIPPED"}
# a run's start and end events (Dagster still writes the PIPELINE_* values)
RUN_START = {"RUN_START", "PIPELINE_START"}
RUN_END = {"RUN_SUCCESS", "RUN_FAILURE", "RUN_CANCELED",
           "PIPELINE_SUCCESS", "PIPELINE_FAILURE", "PIPELINE_CANCELED"}


def union_length(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Total length of the union of the intervals, clipped to [lo, hi]."""
    total, end = 0.0, lo
    for a, b in sorted((max(a, lo), min(b, hi)) for a, b in intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def make_project(root: Path, profile: str, precision: str | None = None,
                 seeds: int | None = None, architectures: list[str] | None = None) -> None:
    shutil.copytree(REPO / "resources", root / "resources")
    overrides = {"precision": precision, "seeds": seeds, "architectures": architectures}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:  # the profile's own keys, set as a user would set them
        import yaml

        path = root / "resources" / "params.yaml"
        params = yaml.safe_load(path.read_text())
        params["profiles"][profile].update(overrides)
        path.write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dagster_home").mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", root / "dagster_home" / "dagster.yaml")
    os.environ.update({
        "XCAM_ROOT": str(root), "XCAM_DATA_DIR": str(root / "data"),
        "DAGSTER_HOME": str(root / "dagster_home"), "XCAM_PROFILE": profile,
        "GX_ANALYTICS_ENABLED": "false",
    })
    os.environ.setdefault("XCAM_PSEUDONYM_KEY", "benchmark-only-key-not-a-secret")


def run_intervals(instance, run_id: str) -> dict:
    """The run's start/end, and its steps' (step, body) intervals, from the event log."""
    steps: dict[str, dict] = defaultdict(dict)
    run_start = run_end = None
    for entry in instance.all_logs(run_id):
        ev = entry.dagster_event
        if ev is None:
            continue
        kind, ts, key = ev.event_type_value, entry.timestamp, ev.step_key
        if kind in RUN_START:
            run_start = ts
        elif kind in RUN_END:
            run_end = ts
        if key is None:
            continue
        step = steps[key]
        if kind == "STEP_START":
            step["start"] = ts
        if kind in BODY_START and "body_end" not in step:
            step["body_start"] = ts
        elif kind in BODY_END and "body_start" in step and "body_end" not in step:
            step["body_end"] = ts
        if kind in STEP_END:
            step["end"] = ts
    return {
        "start": run_start, "end": run_end,
        "steps": [(s["start"], s["end"]) for s in steps.values() if "start" in s and "end" in s],
        "bodies": {k: (s["body_start"], s["body_end"]) for k, s in steps.items()
                   if "body_start" in s and "body_end" in s},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="demo", help="params.yaml profile (default demo)")
    ap.add_argument("--keep", action="store_true", help="keep the temp project, print its path")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                    help="set the profile's precision (default: as params.yaml has it); "
                         "two runs, auto and fp32, with --keep give the parity table's inputs")
    ap.add_argument("--seeds", type=int, default=None,
                    help="set the profile's seeds (several: the parity table's seed-mean rows)")
    ap.add_argument("--architectures", default=None,
                    help="comma-separated zoo entries in place of the profile's")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="xcam-bench-demo-"))
    root = tmp / "project"
    make_project(root, args.profile, args.precision, args.seeds,
                 args.architectures.split(",") if args.architectures else None)

    t0 = time.perf_counter()
    from xcam_assets.cli import cmd_demo_cohort
    from xcam_assets.config import load_settings
    from xcam_assets.orchestrate import materialize_all, project_instance
    import_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    cmd_demo_cohort(argparse.Namespace(n_images=None, force=False))
    cohort_s = time.perf_counter() - t0

    settings = load_settings()
    instance = project_instance(settings)
    logs: list[str] = []

    def log(msg: str) -> None:
        logs.append(msg)
        print(f"  [{time.perf_counter() - t_wall0:7.1f}s] {msg}", flush=True)

    t_epoch0 = time.time()
    t_wall0 = time.perf_counter()
    cpu0 = time.process_time()
    materialize_all(settings=settings, instance=instance, log=log)
    lineage_s = time.perf_counter() - t_wall0
    cpu_s = time.process_time() - cpu0
    t_epoch1 = t_epoch0 + lineage_s

    runs = list(reversed(instance.get_runs()))  # oldest first (a fresh instance: ours)
    bodies: list[tuple[float, float]] = []
    steps: list[tuple[float, float]] = []
    in_runs: list[tuple[float, float]] = []
    per_stage: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    per_step: dict[str, float] = defaultdict(float)
    for run in runs:
        iv = run_intervals(instance, run.run_id)
        if iv["start"] is None or iv["end"] is None:
            continue
        stage = run.tags.get("xcam/stage", "?")
        body = list(iv["bodies"].values())
        bodies += body
        steps += iv["steps"]
        in_runs.append((iv["start"], iv["end"]))
        row = per_stage[stage]
        row["runs"] += 1
        row["run_s"] += iv["end"] - iv["start"]
        row["body_s"] += union_length(body, iv["start"], iv["end"])
        row["step_s"] += union_length(iv["steps"], iv["start"], iv["end"])
        for key, (a, b) in iv["bodies"].items():
            per_step[key] += b - a

    body_s = union_length(bodies, t_epoch0, t_epoch1)
    step_s = union_length(steps, t_epoch0, t_epoch1)
    run_s = union_length(in_runs, t_epoch0, t_epoch1)
    overhead = 1 - body_s / lineage_s
    step_overhead = 1 - step_s / lineage_s

    print(f"\nprofile {args.profile}: imports {import_s:.1f} s, cohort {cohort_s:.1f} s "
          f"(excluded), lineage {lineage_s:.1f} s ({cpu_s:.1f} s CPU of this process), "
          f"{len(runs)} runs, SQLite pins {os.environ.get('XCAM_SQLITE_PINS', '1') != '0'}")
    print(f"{'stage (run tag)':<48} {'runs':>4} {'run s':>8} {'body s':>8} {'step s':>8} "
          f"{'overhead s':>10}")
    for stage, row in per_stage.items():
        print(f"{stage:<48} {int(row['runs']):>4} {row['run_s']:>8.2f} {row['body_s']:>8.2f} "
              f"{row['step_s']:>8.2f} {row['run_s'] - row['body_s']:>10.2f}")
    print(f"{'outside every run (launch, look-ups, gaps)':<48} {'':>4} "
          f"{lineage_s - run_s:>8.2f} {'':>8} {'':>8} {lineage_s - run_s:>10.2f}")
    print(f"{'total':<48} {len(runs):>4} {lineage_s:>8.2f} {body_s:>8.2f} {step_s:>8.2f} "
          f"{lineage_s - body_s:>10.2f}")
    print("\nbody time per step (summed over partitions):")
    for key, secs in sorted(per_step.items(), key=lambda kv: -kv[1]):
        print(f"  {key:<44} {secs:8.2f} s")
    if args.keep:
        print(f"\nproject kept in {root}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"RESULT demo lineage_s={lineage_s:.1f} overhead_fraction={overhead:.3f} "
          f"step_overhead_fraction={step_overhead:.3f} overhead_s={lineage_s - body_s:.1f} "
          f"runs={len(runs)} cpu_s={cpu_s:.1f} import_s={import_s:.1f} "
          f"pins={int(os.environ.get('XCAM_SQLITE_PINS', '1') != '0')} profile={args.profile} "
          f"precision={args.precision or 'as-configured'}"
          + (f" seeds={args.seeds}" if args.seeds else "")
          + (f" architectures={args.architectures}" if args.architectures else ""))


if __name__ == "__main__":
    main()
