"""`xcam receive`: a DICOM C-STORE SCP the PACS (or a modality) sends studies to.

Each admitted instance is written durably into a staging folder and recorded in the
ledger *before* the C-STORE response says success (0x0000): a receiver killed at any
moment has lost nothing it acknowledged, and an instance the sender resends (same SOP
Instance UID and bytes) is acknowledged again but not stored twice. Instances are
grouped into one batch until `quiet_seconds` pass with no instance and no open
association; the batch is then handed over complete under `data/incoming/` (see
`staging`), and the batch sensor ingests it like any batch. A restarted receiver
resumes the batch it was filling.

Refused, each with a logged reason: an association from a calling AE title not in
`allowed_calling_aets` (A-ASSOCIATE-RJ, "calling AE title not recognised"), or to
another called AE title; an instance whose SOP class is not in `sop_classes`
(status 0x0122, "SOP class not supported"). Listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from xcam_assets.ingest.pacs.staging import PacsArea

STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_OUT_OF_RESOURCES = 0xA700
LOG = logging.getLogger("xcam.receive")


@dataclass(frozen=True)
class ReceiverConfig:
    """`pacs.receiver` of resources/params.yaml (command-line options override it)."""

    ae_title: str = "XCAM"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1",
                                    "1.2.840.10008.5.1.4.1.1.1.1.1")
    quiet_seconds: float = 30.0
    batch_prefix: str = "recv"

    @classmethod
    def from_params(cls, params: dict[str, Any], **overrides: Any) -> ReceiverConfig:
        raw = dict((params.get("pacs") or {}).get("receiver") or {})
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"pacs.receiver: unknown key(s) {unknown}")
        raw.update({k: v for k, v in overrides.items() if v not in (None, [], ())})
        for key in ("allowed_calling_aets", "sop_classes"):
            if key in raw:
                raw[key] = tuple(str(v).strip() for v in raw[key])
        return cls(**raw)


class Receiver:
    """The SCP, its batching and its refusals (`start`, `stop`, `flush_if_quiet`)."""

    def __init__(self, cfg: ReceiverConfig, area: PacsArea) -> None:
        if not cfg.allowed_calling_aets:
            raise ValueError("no calling AE title is allowed to send (pacs.receiver."
                             "allowed_calling_aets is empty): name the PACS's AE title(s), "
                             "e.g. `xcam receive --allow-aet PACS1`")
        self.cfg = cfg
        self.area = area
        self._lock = threading.Lock()
        self._staging: Path | None = None
        self._last_store = 0.0
        self._stop = threading.Event()
        self.server: Any = None
        self.handed_over: list[Path] = []
        recovered = area.recover()
        if recovered:
            LOG.info(f"committed batch(es) handed over before a crash: {recovered}")
        pending = sorted(area.staging_root.glob(f"{cfg.batch_prefix}-*"))
        if pending:  # acknowledged before a restart: resumed, handed over when quiet
            self._staging = pending[0]
            self._last_store = time.monotonic()
            LOG.info(f"resuming batch {pending[0].name}: "
                     f"{len(area.staged_files(pending[0]))} instance(s) already staged")

    # -- DICOM event handlers ------------------------------------------------------------
    def handle_store(self, event: Any) -> int:
        """C-STORE: admitted SOP class -> durable in staging + ledger -> 0x0000."""
        calling = event.assoc.requestor.ae_title
        sop_class = str(event.request.AffectedSOPClassUID)
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        if sop_class not in self.cfg.sop_classes:
            LOG.warning(f"refused instance from {calling}: SOP class {sop_class} "
                        f"({UID(sop_class).name}) is not admitted (pacs.receiver.sop_classes: "
                        "CR and DX images only); status 0x0122")
            return STATUS_SOP_CLASS_NOT_SUPPORTED
        data = event.encoded_dataset(include_meta=True)
        try:
            with self._lock:
                if self._staging is None or not self._staging.exists():
                    self._staging = self.area.open_staging(self.cfg.batch_prefix)
                stored = self.area.store(self._staging, sop_uid, data, source=f"c-store:{calling}")
                self._last_store = time.monotonic()
        except OSError as exc:  # disk full, permissions: not acknowledged, the sender retries
            LOG.error(f"could not store an instance from {calling}: {exc}; status 0xA700")
            return STATUS_OUT_OF_RESOURCES
        LOG.info(f"{'stored' if stored.stored else 'already had (not stored again)'} "
                 f"{stored.file} from {calling} in {self._staging.name}")
        return STATUS_SUCCESS

    def handle_rejected(self, event: Any) -> None:
        """Log why an association was refused (pynetdicom rejects it before any data)."""
        calling = event.assoc.requestor.ae_title
        request = event.assoc.requestor.primitive  # the A-ASSOCIATE-RQ as received
        called = request.called_ae_title if request is not None else "?"
        address = f"{event.assoc.requestor.address}:{event.assoc.requestor.port}"
        if calling not in self.cfg.allowed_calling_aets:
            reason = (f"calling AE title {calling!r} is not in the allow-list "
                      f"{list(self.cfg.allowed_calling_aets)} (pacs.receiver.allowed_calling_aets)")
        elif called != self.cfg.ae_title:
            reason = f"called AE title {called!r} is not this receiver's {self.cfg.ae_title!r}"
        else:
            reason = "too many simultaneous associations"
        LOG.warning(f"refused association from {address}: {reason}")

    # -- batching ------------------------------------------------------------------------
    def flush_if_quiet(self, force: bool = False) -> Path | None:
        """Hand the batch over once `quiet_seconds` passed without an instance and no
        association is open (or at once with `force`, on a clean stop)."""
        with self._lock:
            if self._staging is None:
                return None
            quiet = time.monotonic() - self._last_store >= self.cfg.quiet_seconds
            busy = bool(self.server is not None and self.server.active_associations)
            if not force and (not quiet or busy):
                return None
            final = self.area.finalize(self._staging)
            self._staging = None
        if final is not None:
            self.handed_over.append(final)
            LOG.info(f"handed over batch {final.name}: "
                     f"{len(list(final.glob('*.dcm')))} instance(s) in {final}")
        return final

    def _flusher(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.flush_if_quiet()
            except Exception:  # noqa: BLE001 - keep receiving; the next pass retries
                LOG.exception("could not hand a batch over")

    def start(self) -> None:
        """Listen (non-blocking) and start the quiet-period flusher."""
        ae = AE(ae_title=self.cfg.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)  # C-ECHO: how a PACS tests a new destination
        ae.require_calling_aet = list(self.cfg.allowed_calling_aets)
        ae.require_called_aet = True
        self.server = ae.start_server(
            (self.cfg.host, self.cfg.port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, self.handle_store),
                          (evt.EVT_REJECTED, self.handle_rejected)])
        threading.Thread(target=self._flusher, name="xcam-receive-flusher", daemon=True).start()
        LOG.info(f"listening on {self.cfg.host}:{self.cfg.port} as AE {self.cfg.ae_title!r}; "
                 f"accepting {list(self.cfg.allowed_calling_aets)}; batches go to "
                 f"{self.area.incoming}")

    def stop(self, hand_over: bool = True) -> None:
        """Stop listening; hand over what is staged (a clean stop) unless told not to."""
        self._stop.set()
        if self.server is not None:
            self.server.shutdown()
        if hand_over:
            self.flush_if_quiet(force=True)


def run_receiver(cfg: ReceiverConfig, area: PacsArea, log_file: Path | None = None) -> int:
    """`xcam receive`: run until SIGINT/SIGTERM, then hand over what is staged."""
    import signal

    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for h in handlers:
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        LOG.addHandler(h)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    receiver = Receiver(cfg, area)
    receiver.start()
    stop.wait()
    LOG.info("stopping")
    receiver.stop(hand_over=True)
    return 0
