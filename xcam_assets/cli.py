"""The `xcam` command: demo cohort, materialization, importers, DVC, UI."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from xcam_assets.config import load_settings


def _dvc(settings, *args: str, check: bool = True) -> int:
    """Run DVC from its own tool environment (.venv-dvc: its antlr pin clashes with
    dagster's), with this environment's `xcam` on PATH for the stage commands."""
    root = settings.root
    dvc = os.environ.get("XCAM_DVC") or str(root / ".venv-dvc" / "bin" / "dvc")
    if not Path(dvc).exists():
        print(f"xcam: DVC not found at {dvc}; run `make setup` (skipping `dvc {' '.join(args)}`)")
        return 0 if not check else 1
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DAGSTER_HOME", str(root / "dagster_home"))
    proc = subprocess.run([dvc, *args], cwd=root, env=env)
    if check and proc.returncode:
        raise SystemExit(f"xcam: `dvc {' '.join(args)}` failed with exit code {proc.returncode}")
    return proc.returncode


def cmd_demo_cohort(args: argparse.Namespace) -> None:
    from xcam_assets.demo import write_demo_cohort

    s = load_settings()
    demo = s.params["demo"]
    n = int(args.n_images or s.profile.get("demo_images", demo["n_images"]))
    existing = sorted(s.incoming_dir.glob("demo-batch-*")) if s.incoming_dir.is_dir() else []
    if existing and not args.force:
        print(f"demo cohort already in {s.incoming_dir} ({len(existing)} batches)")
        return
    batches = write_demo_cohort(s.incoming_dir, n_images=n, n_batches=int(demo["n_batches"]),
                                size=int(demo["size"]), seed=s.seed,
                                finding=s.findings[0],
                                positive_fraction=float(demo["positive_fraction"]))
    for b in batches:
        (b / ".complete").touch()
    print(f"wrote the SYNTHETIC demo cohort: {n} DICOM files in {len(batches)} batches "
          f"under {s.incoming_dir}")


def cmd_materialize(args: argparse.Namespace) -> None:
    from xcam_assets.orchestrate import ORDER, StageFailed, materialize_all, materialize_stage

    try:
        if not args.stages or args.stages == ["all"]:
            materialize_all()
        else:
            for stage in args.stages:
                if stage not in ORDER:
                    raise SystemExit(f"xcam: unknown stage {stage!r} (stages: {', '.join(ORDER)})")
                materialize_stage(stage)
    except StageFailed as exc:
        raise SystemExit(f"xcam: {exc}") from exc


def cmd_demo(args: argparse.Namespace) -> None:
    cmd_demo_cohort(argparse.Namespace(n_images=None, force=False))
    cmd_materialize(argparse.Namespace(stages=["all"]))
    s = load_settings()
    if not args.no_dvc:
        _dvc(s, "commit", "--force", "--quiet")
        _dvc(s, "push", "--quiet")
    table = s.metrics_dir / "comparison.csv"
    print(f"\nxcam: lineage materialized; metric table at {s.metrics_dir / 'metric_table.parquet'}")
    if table.exists():
        print(table.read_text())


def cmd_import_tbx11k(args: argparse.Namespace) -> None:
    from xcam_assets.ingest.tbx11k import import_tbx11k

    s = load_settings()
    out = s.incoming_dir / args.batch
    import_tbx11k(Path(args.source), out, limit=args.limit)
    (out / ".complete").touch()
    print(f"imported TBX11K into {out}; run with XCAM_STUDY=tbx11k (finding ActiveTuberculosis)")


def cmd_ui(args: argparse.Namespace) -> None:
    s = load_settings()
    os.environ.setdefault("DAGSTER_HOME", str(s.root / "dagster_home"))
    dagster = Path(sys.executable).parent / "dagster"
    os.chdir(s.root)
    os.execv(str(dagster), [str(dagster), "dev", "-w", "workspace.yaml",
                            "-h", args.host, "-p", str(args.port)])


def cmd_dvc(args: argparse.Namespace) -> None:
    raise SystemExit(_dvc(load_settings(), *args.dvc_args, check=False))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="xcam", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="demo cohort -> every asset -> DVC commit/push")
    p.add_argument("--no-dvc", action="store_true")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("demo-cohort", help="write the SYNTHETIC demo cohort to data/incoming")
    p.add_argument("--n-images", type=int)
    p.add_argument("--force", action="store_true")
    p.set_defaults(fn=cmd_demo_cohort)
    p = sub.add_parser("materialize", help="materialize stages: ingest preprocess splits "
                       "train explain evaluate (default: all)")
    p.add_argument("stages", nargs="*")
    p.set_defaults(fn=cmd_materialize)
    p = sub.add_parser("import-tbx11k", help="bring TBX11K PNG + VOC boxes in as a DICOM batch")
    p.add_argument("source")
    p.add_argument("--batch", default="tbx11k")
    p.add_argument("--limit", type=int)
    p.set_defaults(fn=cmd_import_tbx11k)
    p = sub.add_parser("ui", help="serve the Dagster UI (webserver + daemon) on 127.0.0.1")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.set_defaults(fn=cmd_ui)
    p = sub.add_parser("dvc", help="run DVC from its isolated environment")
    p.add_argument("dvc_args", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_dvc)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
