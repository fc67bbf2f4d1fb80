"""Real servers for the PACS tests: Orthanc (Debian's `orthanc` + `orthanc-dicomweb`,
installed by `make orthanc`) on 127.0.0.1 with HTTP basic auth, and `xcam receive` as a
subprocess; plus a pynetdicom C-STORE SCU and demo-cohort helpers."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
import requests
from automation.harness import free_port
from automation.harness import wait_for as _wait_for

ORTHANC_USER, ORTHANC_PASSWORD = "xcam-test", "test-only-password"
PLUGIN_GLOBS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so*",
                "/usr/lib/orthanc/plugins/libOrthancDicomWeb.so*",
                "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so*")
CR, DX = "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
XCAM = Path(sys.executable).parent / "xcam"


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             interval: float = 0.1) -> object:
    """`automation.harness.wait_for` with the predicate first, as these tests call it."""
    return _wait_for(what, predicate, timeout, interval=interval)


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.path.exists(p)), None)


def dicomweb_plugin() -> str | None:
    for pattern in PLUGIN_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


@dataclass
class Orthanc:
    """One Orthanc server of the test's own: config, storage and ports in `workdir`."""

    workdir: Path
    binary: str
    plugin: str
    http_port: int = 0
    dicom_port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return ORTHANC_USER, ORTHANC_PASSWORD

    def start(self) -> Orthanc:
        """Start (or restart, same storage and ports) and wait until the plugin serves."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.http_port = self.http_port or free_port()
        self.dicom_port = self.dicom_port or free_port()
        config = {
            "Name": "xcam-test-pacs", "DicomAet": "TESTPACS",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
            "RegisteredUsers": {ORTHANC_USER: ORTHANC_PASSWORD},
            "Plugins": [self.plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        log = open(self.workdir / "orthanc.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen([self.binary, str(path)], stdout=log, stderr=log,
                                     cwd=self.workdir, start_new_session=True)

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited {self.proc.returncode}: "
                                   f"{(self.workdir / 'orthanc.log').read_text()[-2000:]}")
            try:
                r = requests.get(f"{self.dicomweb_url}/studies", auth=self.auth, timeout=2)
                return r.status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(ready, 60, "Orthanc's DICOMweb plugin")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def upload(self, files: list[Path] | list[bytes]) -> list[str]:
        """POST each DICOM file to Orthanc's REST `/instances`; returns Orthanc's ids."""
        ids = []
        for f in files:
            data = f if isinstance(f, bytes) else Path(f).read_bytes()
            r = requests.post(f"{self.url}/instances", data=data, auth=self.auth, timeout=30)
            r.raise_for_status()
            assert r.json()["Status"] == "Success", r.json()
            ids.append(r.json()["ID"])
        return ids


def restamp(path: Path, **attrs: str) -> bytes:
    """The file's bytes with some attributes changed (e.g. today's StudyDate, another
    BodyPartExamined): a study that is new to the PACS, or one the query must skip."""
    ds = pydicom.dcmread(path)
    for key, value in attrs.items():
        setattr(ds, key, value)
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def store_scu(port: int, files: list[Path] | list[pydicom.Dataset], calling: str = "XCAMTEST",
              called: str = "XCAM", after_each: Callable[[int, int], None] | None = None
              ) -> tuple[bool, list[int | None]]:
    """Send instances in one association with pynetdicom's C-STORE SCU; returns
    (association accepted, status of each instance: None when the association broke)."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for uid in (CR, DX, SECONDARY_CAPTURE):
        ae.add_requested_context(uid, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return False, []
    statuses: list[int | None] = []
    try:
        for i, item in enumerate(files):
            ds = item if isinstance(item, pydicom.Dataset) else pydicom.dcmread(item)
            try:
                status = assoc.send_c_store(ds)
            except (RuntimeError, ValueError, OSError):
                status = None
            code = int(status.Status) if status and "Status" in status else None
            statuses.append(code)
            if code is None:
                break
            if after_each is not None:
                after_each(i, code)
    finally:
        if assoc.is_established:
            assoc.release()
    return True, statuses


def echo(port: int, calling: str = "XCAMTEST", called: str = "XCAM") -> int | None:
    """C-ECHO status, None when no association (a DICOM "ping", as a PACS tests a node; a
    bare TCP probe would leave the SCP waiting for an association request)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status and "Status" in status else None
    finally:
        assoc.release()


@dataclass
class ReceiverProcess:
    """`xcam receive` as a subprocess of the test (its own session, killed at the end)."""

    env: dict[str, str]
    port: int
    log: Path
    quiet_seconds: float = 1.0
    allow: tuple[str, ...] = ("XCAMTEST",)
    proc: subprocess.Popen | None = None

    def start(self) -> ReceiverProcess:
        args = [str(XCAM), "receive", "--port", str(self.port), "--ae-title", "XCAM",
                "--quiet-seconds", str(self.quiet_seconds)]
        for aet in self.allow:
            args += ["--allow-aet", aet]
        out = open(self.log, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(args, env=self.env, stdout=out, stderr=out,
                                     start_new_session=True)

        def listening() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"xcam receive exited {self.proc.returncode}: "
                                   f"{self.log.read_text()[-3000:]}")
            return echo(self.port) == 0x0000

        wait_for(listening, 120, "xcam receive to answer C-ECHO", interval=0.3)
        return self

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int | None:
        """SIGTERM (a clean stop hands over what is staged); SIGKILL after 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)


def batch_contents(folder: Path) -> dict[str, bytes]:
    """Name -> bytes of every file of a batch folder (the marker included)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def incoming_batches(incoming: Path) -> list[Path]:
    return sorted(p for p in incoming.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if incoming.is_dir() else []
