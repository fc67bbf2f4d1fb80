"""The PACS subcommands of `xcam`: `receive` (C-STORE SCP) and `pacs-pull` (one DICOMweb
poll, what the `pacs_dicomweb_sensor` does on each tick, for cron or a first backfill)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from typing import Any

from xcam_assets.config import load_settings


def cmd_receive(args: argparse.Namespace) -> None:
    from xcam_assets.ingest.pacs.receiver import ReceiverConfig, run_receiver
    from xcam_assets.ingest.pacs.staging import PacsArea

    s = load_settings()
    cfg = ReceiverConfig.from_params(s.params, ae_title=args.ae_title, host=args.host,
                                     port=args.port, allowed_calling_aets=args.allow_aet,
                                     quiet_seconds=args.quiet_seconds)
    area = PacsArea.from_settings(s)
    try:
        raise SystemExit(run_receiver(cfg, area, log_file=area.base / "receiver.log"))
    except ValueError as exc:
        raise SystemExit(f"xcam receive: {exc}") from exc


def cmd_pacs_pull(args: argparse.Namespace) -> None:
    from xcam_assets.ingest.pacs.dicomweb import DicomwebConfig, pull_once
    from xcam_assets.ingest.pacs.staging import PacsArea

    s = load_settings()
    cfg = DicomwebConfig.from_params(s.params)
    if args.url:
        cfg = replace(cfg, url=args.url)
    if not cfg.url:
        raise SystemExit("xcam pacs-pull: no DICOMweb URL (pacs.dicomweb.url or --url)")
    report = pull_once(cfg, PacsArea.from_settings(s), args.since or cfg.since)
    print(json.dumps(asdict(report), indent=2, sort_keys=True))


def add_pacs_parsers(sub: Any) -> None:
    """`receive` and `pacs-pull` on build_parser's subparsers."""
    p = sub.add_parser("receive", help="DICOM C-STORE receiver: instances sent by the PACS "
                       "become batches under data/incoming/ (pacs.receiver in params.yaml)")
    p.add_argument("--ae-title", help="this receiver's AE title (default: pacs.receiver)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 11112)")
    p.add_argument("--allow-aet", action="append", default=[], metavar="AET",
                   help="a calling AE title allowed to send (repeat; replaces the list in "
                   "params.yaml)")
    p.add_argument("--quiet-seconds", type=float, help="hand a batch over after this many "
                   "seconds without an instance (default 30)")
    p.set_defaults(fn=cmd_receive)
    p = sub.add_parser("pacs-pull", help="one DICOMweb poll of the PACS (QIDO-RS + WADO-RS): "
                       "new instances become a batch under data/incoming/")
    p.add_argument("--url", help="DICOMweb root (default: pacs.dicomweb.url)")
    p.add_argument("--since", help="oldest StudyDate, YYYYMMDD (default: pacs.dicomweb.since)")
    p.set_defaults(fn=cmd_pacs_pull)
