"""The `xcam` command: demo cohort, materialization, importers, DVC, UI."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from xcam_assets.config import load_settings


def _dvc(settings, *args: str, check: bool = True) -> int:
    """Run DVC from its own tool environment (.venv-dvc), one command at a time per
    checkout (xcam_assets.provenance.dvc.run_dvc holds a lock file)."""
    from xcam_assets.provenance.dvc import run_dvc

    return run_dvc(settings, *args, check=check).returncode


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
        force = getattr(args, "force", False)
        if not args.stages or args.stages == ["all"]:
            materialize_all(force=force)
        else:
            for stage in args.stages:
                if stage not in ORDER:
                    raise SystemExit(f"xcam: unknown stage {stage!r} (stages: {', '.join(ORDER)})")
                materialize_stage(stage, force=force)
    except StageFailed as exc:
        raise SystemExit(f"xcam: {exc}") from exc
    s = load_settings()
    for name, path in (("metric table", s.metrics_dir / "metric_table.parquet"),
                       ("comparison", s.metrics_dir / "comparison.csv"),
                       ("localization (PYLON's table)", s.metrics_dir / "localization.csv"),
                       ("external validation", s.external_scores_dir / "metric_table.parquet")):
        if path.exists():
            print(f"xcam: {name}: {path}")
    evaluated = not args.stages or args.stages == ["all"] or "evaluate" in args.stages
    if evaluated and getattr(args, "scorecard", True):
        print_scorecard(s)


def print_scorecard(settings) -> None:
    """The scorecard as an aligned table, then where the long table, scorecard.csv and
    report.html are (`xcam_assets.evaluate.report.terminal_summary`)."""
    from xcam_assets.evaluate.report import terminal_summary

    print(terminal_summary(settings))


def cmd_report(args: argparse.Namespace) -> None:
    """`xcam report [--out PATH]`: the study's standalone HTML report, with the latest
    result of every check and the data versions the Dagster instance holds now."""
    from xcam_assets.evaluate.assets import metric_tables
    from xcam_assets.evaluate.report import report_path, write_study_report
    from xcam_assets.orchestrate import project_instance
    from xcam_assets.provenance.records import latest_check_results, latest_data_versions

    s = load_settings()
    if not (s.metrics_dir / "metric_table.parquet").exists():
        raise SystemExit(f"xcam: no metric table in {s.metrics_dir}: run `xcam materialize`")
    instance = project_instance(s)
    out = Path(args.out) if args.out else report_path(s)
    version = next(iter(metric_tables.code_versions_by_key.values()), "")
    write_study_report(s, out, checks=latest_check_results(instance),
                       data_versions=latest_data_versions(instance),
                       checks_note="as recorded in the Dagster instance when the report was made",
                       code_version=f"metric_tables {version}")
    print(f"xcam: report: {out}")


def cmd_compare_tables(args: argparse.Namespace) -> None:
    """`xcam compare-tables OLD NEW`: two metric tables side by side; exit 0 either way."""
    from xcam_assets.evaluate.compare import compare_tables, format_comparison, read_metric_table

    try:
        old, new = read_metric_table(Path(args.old)), read_metric_table(Path(args.new))
    except FileNotFoundError as exc:
        raise SystemExit(f"xcam: {exc}") from None
    table = compare_tables(old, new, metrics=args.metric or None)
    if args.architecture:
        table = table.filter(table["architecture"].is_in(args.architecture))
    if args.finding:
        table = table.filter(table["finding"].is_in(args.finding))
    if args.csv:
        table.write_csv(args.csv)
    print(format_comparison(table, moved_only=args.moved_only))
    moved = int(table["moved"].fill_null(False).sum())
    print(f"\n{table.height} figures compared, {moved} moved beyond a CI "
          f"(new value outside the old CI or old outside the new)")


def cmd_demo(args: argparse.Namespace) -> None:
    cmd_demo_cohort(argparse.Namespace(n_images=None, force=False))
    cmd_materialize(argparse.Namespace(stages=["all"], scorecard=False))
    s = load_settings()
    if not args.no_dvc:
        _dvc(s, "commit", "--force", "--quiet")
        _dvc(s, "push", "--quiet")
    print("\nxcam: lineage materialized")
    print_scorecard(s)


def batch_dir(settings, name: str) -> Path:
    """`data/incoming/<name>`, refusing a name that is not one plain folder name (a
    `--batch ../x` must not write outside the drop zone)."""
    if (not name or name in (".", "..") or "/" in name or "\\" in name
            or any(ord(c) < 32 for c in name) or name.startswith(".")):
        raise SystemExit(f"xcam: --batch {name!r} is not a plain folder name (no '/', "
                         "'\\', '..', leading '.' or control characters)")
    return settings.incoming_dir / name


def cmd_import_tbx11k(args: argparse.Namespace) -> None:
    from xcam_assets.ingest.importers.tbx11k_png import import_tbx11k

    s = load_settings()
    out = batch_dir(s, args.batch)
    import_tbx11k(Path(args.source), out, limit=args.limit)
    (out / ".complete").touch()
    print(f"imported TBX11K into {out}; run with XCAM_STUDY=tbx11k (finding ActiveTuberculosis)")


def cmd_import_nih(args: argparse.Namespace) -> None:
    """`xcam import-nih SOURCE [--batch nih] [--limit N] [subset]`: the batch, then
    `.complete` last, so ingest never sees half a batch. Subsets (an external-site batch):
    `--patients-from FILE` keeps every image of the listed NIH patients, `--exclude-listed`
    the complement (patient-disjoint batches); `--images-from FILE` picks images."""
    from xcam_assets.ingest.importers.nih_png import (
        DATA_ENTRY,
        find_table,
        images_of_patients,
        import_nih,
        read_list,
        wanted_names,
    )

    out = batch_dir(load_settings(), args.batch)
    source = Path(args.source)
    images: list[str] | None = None
    listed = args.patients_from or args.images_from
    if args.exclude_listed and not listed:
        raise SystemExit("xcam: --exclude-listed needs --patients-from or --images-from")
    if listed:
        try:
            entries = read_list(Path(listed))
        except OSError as exc:
            raise SystemExit(f"xcam: cannot read {listed}: {exc}") from exc
        if args.patients_from:
            table = find_table(source.resolve(), DATA_ENTRY)
            if table is None:
                raise SystemExit(f"xcam: no {DATA_ENTRY} in {source}")
            try:
                images, unknown = images_of_patients(table, entries, args.exclude_listed)
            except ValueError as exc:
                raise SystemExit(f"xcam: {listed}: {exc}") from exc
            if unknown:
                print(f"xcam: {len(unknown)} listed patient(s) have no image: {unknown[:5]}")
            present = {p.name for p in (source / "images").glob("*.png")}
            images = [n for n in images if n in present]  # the table may list more
        else:
            images = wanted_names(entries)
            if args.exclude_listed:
                drop = set(images)
                images = [p.name for p in sorted((source / "images").glob("*.png"))
                          if p.name not in drop]
    problems: list[str] = []
    try:
        import_nih(source, out, limit=args.limit, images=images, problems=problems)
    except (ValueError, FileExistsError) as exc:
        raise SystemExit(f"xcam: {exc}") from exc
    if args.external:
        from xcam_assets.ingest.batch_meta import BatchMeta, write_batch_meta

        write_batch_meta(out, BatchMeta(role="external", site=args.site or ""))
        print(f"declared {out.name} external (batch.yaml): scored by the frozen checkpoints "
              "(external_scores), never split or trained on")
    (out / ".complete").touch()
    n = len(list(out.glob("*.dcm")))
    skipped = sum(p.startswith("skipped ") for p in problems)
    print(f"imported NIH ChestX-ray14 into {out}: {n} image(s), {skipped} skipped, "
          f"{len(problems) - skipped} other note(s) (listed above); labels: the 14 findings "
          "(set cohort.findings to those you study). Cite Wang et al., CVPR 2017; data: "
          "NIH Clinical Center")


def add_import_nih_parser(sub: Any) -> argparse.ArgumentParser:
    """The `import-nih` subcommand on `sub` (build_parser's subparsers)."""
    p = sub.add_parser("import-nih", help="bring NIH ChestX-ray14 PNGs + tables in as a "
                       "DICOM batch")
    p.add_argument("source", help="folder with images/*.png, Data_Entry_2017*.csv and "
                   "BBox_List_2017.csv (read only)")
    p.add_argument("--batch", default="nih", help="folder name under data/incoming/")
    p.add_argument("--limit", type=int, help="first N images in name order (after the subset)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--patients-from", metavar="FILE", help="import only these patients' "
                       "images: one NIH Patient ID per line (61, 00000061 or NIH-00000061)")
    group.add_argument("--images-from", metavar="FILE", help="import only these images: one "
                       "PNG name per line (00000061_012.png)")
    p.add_argument("--exclude-listed", action="store_true", help="import everything but the "
                   "listed patients/images (the complement batch)")
    p.add_argument("--external", action="store_true", help="declare the batch external "
                   "(another site): scored by the frozen models, never in the split")
    p.add_argument("--site", help="the external batch's site, shown with its results")
    p.set_defaults(fn=cmd_import_nih)
    return p


def cmd_import_labels(args: argparse.Namespace) -> None:
    from xcam_assets.ingest.adapters.batch import write_batch_labels_for
    from xcam_assets.ingest.adapters.registry import read_labels

    s = load_settings()
    folder = batch_dir(s, args.batch)
    summary = write_batch_labels_for(read_labels(args.format, *args.tables), folder)
    print(f"wrote {folder / 'labels.csv'}: {summary}")


def ui_command(args: argparse.Namespace) -> list[str]:
    """The `dagster dev` command line `xcam ui` runs: webserver + daemon on `--host`
    (default 127.0.0.1: the UI is not reachable from other machines unless asked)."""
    dagster = Path(sys.executable).parent / "dagster"
    return [str(dagster), "dev", "-w", "workspace.yaml", "-h", args.host, "-p", str(args.port)]


def cmd_ui(args: argparse.Namespace) -> None:
    """`dagster dev` as a child of this process, which stops it and every process below
    it (webserver, daemon, code servers, their gRPC servers, run workers) within 5 s of
    Ctrl-C, SIGTERM or SIGHUP (`xcam_assets.procs.supervise`): `dagster dev` alone may
    take a minute or more and leave its code servers running."""
    from xcam_assets.procs import supervise

    s = load_settings()
    os.environ.setdefault("DAGSTER_HOME", str(s.root / "dagster_home"))
    command = ui_command(args)
    os.chdir(s.root)
    raise SystemExit(supervise(command))


def cmd_audit(args: argparse.Namespace) -> None:
    from xcam_assets.orchestrate import run_audit

    raise SystemExit(run_audit(args.asset, partition=args.partition,
                               out_dir=Path(args.out) if args.out else None))


def cmd_dvc(args: argparse.Namespace) -> None:
    raise SystemExit(_dvc(load_settings(), *args.dvc_args, check=False))


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--force", action="store_true", help="ingest every batch, not only the new "
                   "or changed ones")
    p.set_defaults(fn=cmd_materialize)
    p = sub.add_parser("import-tbx11k", help="bring TBX11K PNG + VOC boxes in as a DICOM batch")
    p.add_argument("source")
    p.add_argument("--batch", default="tbx11k")
    p.add_argument("--limit", type=int)
    p.set_defaults(fn=cmd_import_tbx11k)
    add_import_nih_parser(sub)
    from xcam_assets.ingest.pacs.commands import add_pacs_parsers

    add_pacs_parsers(sub)
    p = sub.add_parser("import-labels", help="a dataset's label table -> a batch's labels.csv "
                       "(formats: siim nih rsna vindr tbx11k csv coco)")
    p.add_argument("format")
    p.add_argument("tables", nargs="+")
    p.add_argument("--batch", required=True, help="folder name under data/incoming/")
    p.set_defaults(fn=cmd_import_labels)
    p = sub.add_parser("ui", help="serve the Dagster UI (webserver + daemon) on 127.0.0.1")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.set_defaults(fn=cmd_ui)
    p = sub.add_parser("audit", help="provenance of an asset down to each raw DICOM's sha256: "
                       "JSON + HTML + W3C PROV-JSON; re-hashes every file, exit 1 on mismatch")
    p.add_argument("asset", help="asset key, e.g. metric_tables")
    p.add_argument("--partition", help="one partition (batch or architecture); default: all")
    p.add_argument("--out", help="output folder (default: reports/audit)")
    p.set_defaults(fn=cmd_audit)
    p = sub.add_parser("report", help="the study's standalone HTML report (scorecard, plots, "
                       "montages, checks, provenance): one self-contained file")
    p.add_argument("--out", help="output file (default: reports/report.html)")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("compare-tables", help="two metric tables side by side (before/after a "
                       "change): which figures moved beyond their CI")
    p.add_argument("old", help="metric_table.parquet, or the metrics folder holding it")
    p.add_argument("new", help="metric_table.parquet, or the metrics folder holding it")
    p.add_argument("--metric", action="append", help="only this metric (repeatable)")
    p.add_argument("--architecture", action="append", help="only this model (repeatable)")
    p.add_argument("--finding", action="append", help="only this finding (repeatable)")
    p.add_argument("--moved-only", action="store_true", help="list only the figures that moved")
    p.add_argument("--csv", help="also write the whole comparison as CSV here")
    p.set_defaults(fn=cmd_compare_tables)
    p = sub.add_parser("dvc", help="run DVC from its isolated environment")
    p.add_argument("dvc_args", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_dvc)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
