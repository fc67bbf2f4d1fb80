"""DICOMweb puller: QIDO-RS finds the PACS's chest radiograph series, WADO-RS fetches the
instances xcam does not have yet into a staging folder, and the folder is handed over as
one complete batch under `data/incoming/` (see `staging`). The batch sensor and ingest
take over from there: what arrives is raw data, de-identified and quarantined exactly
like any incoming batch.

The query (resources/params.yaml `pacs.dicomweb`): series with Modality in
`modalities` and BodyPartExamined `body_part`, StudyDate from `since` (first poll) or
from the last poll's date minus `lookback_days`. Credentials come only from the
environment (bearer token, or user + password). Nothing is fetched twice (the ledger
holds every SOP Instance UID taken in); a pull stopped by a server error, a timeout or
kill -9 resumes into the same staging folder at its next start, fetching only what is
missing; transient HTTP errors (429, 500, 502, 503, 504) are retried with backoff first.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Any

import pydicom

from xcam_assets.ingest.pacs.staging import PacsArea

RETRIED = (HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.INTERNAL_SERVER_ERROR,
           HTTPStatus.BAD_GATEWAY, HTTPStatus.SERVICE_UNAVAILABLE, HTTPStatus.GATEWAY_TIMEOUT)
SOP_INSTANCE_UID, SOP_CLASS_UID = "00080018", "00080016"
STUDY_UID, SERIES_UID = "0020000D", "0020000E"


@dataclass(frozen=True)
class DicomwebConfig:
    """`pacs.dicomweb` of resources/params.yaml (credentials: names of env variables)."""

    url: str | None = None
    token_env: str = "XCAM_DICOMWEB_TOKEN"
    user_env: str = "XCAM_DICOMWEB_USER"
    password_env: str = "XCAM_DICOMWEB_PASSWORD"
    modalities: tuple[str, ...] = ("CR", "DX")
    body_part: str | None = "CHEST"
    since: str | None = None
    lookback_days: int | None = 7
    max_instances_per_poll: int = 500
    interval_s: int = 300
    timeout_s: float = 60
    batch_prefix: str = "pacs"

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> DicomwebConfig:
        raw = dict((params.get("pacs") or {}).get("dicomweb") or {})
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"pacs.dicomweb: unknown key(s) {unknown}")
        if "modalities" in raw:
            raw["modalities"] = tuple(raw["modalities"])
        if raw.get("since") is not None:
            raw["since"] = str(raw["since"])
        return cls(**{k: v for k, v in raw.items() if v is not None or k in
                      ("url", "since", "lookback_days", "body_part")})


def make_client(cfg: DicomwebConfig) -> Any:
    """A dicomweb-client `DICOMwebClient` with the environment's credentials and retries."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    if not cfg.url:
        raise ValueError("pacs.dicomweb.url is not set (resources/params.yaml)")
    session = requests.Session()
    headers = {}
    token = os.environ.get(cfg.token_env)
    user, password = os.environ.get(cfg.user_env), os.environ.get(cfg.password_env)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    elif user:
        session.auth = (user, password or "")
    client = DICOMwebClient(url=cfg.url.rstrip("/"), session=session, headers=headers,
                            timeout=cfg.timeout_s)
    client.set_http_retry_params(retry=True, max_attempts=4, wait_exponential_multiplier=250,
                                 retriable_error_codes=RETRIED)
    return client


def _value(item: dict[str, Any], tag: str) -> str | None:
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


@dataclass
class PullReport:
    """What one pull saw and did: PACS studies/instances matching the query, how many
    xcam already had, fetched now, and the batch handed over (if any)."""

    since: str | None
    polled_at: str
    pacs_studies: int = 0
    pacs_series: int = 0
    pacs_instances: int = 0
    already_had: int = 0
    fetched: int = 0
    pending: int = 0  # matching instances left for the next pull (max_instances_per_poll)
    staging: str | None = None
    batch: str | None = None
    batch_instances: int = 0
    recovered: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.pending == 0


def to_bytes(ds: pydicom.Dataset) -> bytes:
    """The instance as a DICOM Part 10 file, as the server sent it (preamble, file meta
    and the data set written like the original: no re-encoding)."""
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds)
    return buf.getvalue()


class PullBusy(RuntimeError):
    """Another pull (a sensor tick, `xcam pacs-pull`) of this data folder is running."""


@contextmanager
def pull_lock(area: PacsArea) -> Iterator[None]:
    """One pull at a time per data folder (two would fill one staging folder while the
    other hands it over); never waits: a busy lock is a skipped tick. A killed holder's
    lock is released by the kernel."""
    import fcntl

    path = area.base / "pull.lock"
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise PullBusy(f"another PACS pull holds {path}") from exc
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def pull_once(cfg: DicomwebConfig, area: PacsArea, since: str | None,
              client: Any | None = None, log: Any = print) -> PullReport:
    """One poll: query, fetch what is new (at most `max_instances_per_poll`), and hand
    the staging folder over as a batch once nothing matching is left to fetch."""
    with pull_lock(area):
        return _pull(cfg, area, since, client or make_client(cfg), log)


def _pull(cfg: DicomwebConfig, area: PacsArea, since: str | None, client: Any,
          log: Any) -> PullReport:
    report = PullReport(since=since, polled_at=datetime.now(UTC).isoformat(timespec="seconds"))
    report.recovered = area.recover()
    series: dict[tuple[str, str], None] = {}
    for modality in cfg.modalities:
        filters = {"Modality": modality}
        if cfg.body_part:
            filters["BodyPartExamined"] = cfg.body_part
        if since:
            filters["StudyDate"] = f"{since}-"
        for item in client.search_for_series(search_filters=filters, get_remaining=True,
                                             fields=[STUDY_UID, SERIES_UID]):
            study, uid = _value(item, STUDY_UID), _value(item, SERIES_UID)
            if study and uid:
                series[(study, uid)] = None
    report.pacs_series = len(series)
    report.pacs_studies = len({s for s, _ in series})
    todo: list[tuple[str, str, str]] = []
    for study, uid in sorted(series):
        for item in client.search_for_instances(study_instance_uid=study, series_instance_uid=uid,
                                                get_remaining=True,
                                                fields=[SOP_INSTANCE_UID, SOP_CLASS_UID]):
            sop = _value(item, SOP_INSTANCE_UID)
            if not sop:
                continue
            report.pacs_instances += 1
            if area.ledger.has_uid(sop):
                report.already_had += 1
            else:
                todo.append((study, uid, sop))
    report.pending = max(0, len(todo) - cfg.max_instances_per_poll)
    if not todo and area.find_staging(cfg.batch_prefix) is None:
        return report
    # a staging folder left by an earlier pull is resumed, and handed over even when
    # nothing is left to fetch (killed after its last fetch, before the hand-over)
    staging = area.open_staging(cfg.batch_prefix)
    report.staging = staging.name
    for study, uid, sop in todo[:cfg.max_instances_per_poll]:
        ds = client.retrieve_instance(study, uid, sop, media_types=(("application/dicom", "*"),))
        area.store(staging, sop, to_bytes(ds), source=f"dicomweb:{cfg.url}")
        report.fetched += 1
    if report.complete:
        report.batch_instances = len(area.staged_files(staging))
        final = area.finalize(staging)
        report.batch = final.name if final else None
        log(f"handed over {report.batch} ({report.batch_instances} instance(s))")
    return report


def next_since(cfg: DicomwebConfig, report: PullReport, previous: str | None) -> str | None:
    """The StudyDate the next poll asks from: the last complete poll's date minus
    `lookback_days` (a partial poll keeps the window it had)."""
    if not report.complete:
        return previous
    if cfg.lookback_days is None:
        return cfg.since
    day = datetime.fromisoformat(report.polled_at) - timedelta(days=int(cfg.lookback_days))
    return day.strftime("%Y%m%d")
