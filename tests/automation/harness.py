"""Test harness for the automation, DVC, audit and UI tests: throw-away xcam projects,
one full tiny run shared by the session, and Dagster processes that always stop.

Imported as `automation.harness` (tests/ is on sys.path through tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from xcam_assets.procs import pids_with_env

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DVC = REPO / ".venv-dvc" / "bin" / "dvc"
CHROMIUM = Path("/usr/bin/chromium")
#: a FIXED pseudonym key for test projects only (conftest sets the same); real data
#: never uses a key from the repo
TEST_KEY = "test-only-key-not-a-secret"
_FULL_RUN_KEY = pytest.StashKey[Path]()


def nightly_defs(cron: str = "* * * * *") -> object:
    """The project's assets with the nightly condition on a per-minute tick (tests)."""
    import dagster as dg

    from xcam_assets.automation import NIGHTLY_ASSETS, nightly_condition
    from xcam_assets.definitions import ASSETS, CHECKS
    from xcam_assets.project import XcamProject

    assets = [a.map_asset_specs(lambda spec: spec.replace_attributes(
        automation_condition=nightly_condition(cron, "UTC")))
        if a.key.to_user_string() in NIGHTLY_ASSETS else a for a in ASSETS]
    return dg.Definitions(assets=assets, asset_checks=CHECKS, resources={"xcam": XcamProject()})


def make_project(root: Path, with_code: bool = False) -> Path:
    """A fresh xcam checkout in `root`: resources/, the instance config, and with
    `with_code` what DVC tracks as code (dvc.yaml, .dvcignore, xcam_assets/)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "resources", root / "resources")
    (root / "dagster_home").mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", root / "dagster_home" / "dagster.yaml")
    if with_code:
        for name in ("dvc.yaml", ".dvcignore"):
            shutil.copy(REPO / name, root / name)
        shutil.copytree(REPO / "xcam_assets", root / "xcam_assets",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return root


def project_env(root: Path, **extra: str) -> dict[str, str]:
    """The environment of a process working on project `root` (tiny profile)."""
    env = dict(os.environ)
    for name in ("XCAM_STUDY", "XCAM_DATA_DIR", "DVC_STAGE", "XCAM_DVC_LOCK_HELD"):
        env.pop(name, None)
    env.update({"XCAM_ROOT": str(root), "XCAM_DATA_DIR": str(root / "data"),
                "DAGSTER_HOME": str(root / "dagster_home"), "XCAM_PROFILE": "tiny",
                "XCAM_PSEUDONYM_KEY": TEST_KEY, "GX_ANALYTICS_ENABLED": "false",
                "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "XCAM_LOG_LEVEL": "WARNING",
                "OPENBLAS_NUM_THREADS": "1"})
    env.update(extra)
    return env


def xcam(root: Path, *args: str, timeout: float = 600, **extra: str) -> str:
    """Run the `xcam` CLI on project `root`; fail the test with its output on error."""
    proc = subprocess.run([str(BIN / "xcam"), *args], cwd=root, env=project_env(root, **extra),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        pytest.fail(f"xcam {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-5000:]}")
    return proc.stdout


def dvc(root: Path, *args: str, timeout: float = 600) -> str:
    """Run DVC (its own environment) in project `root`."""
    if not DVC.exists():
        pytest.skip(f"DVC is not installed at {DVC} (make setup)")
    proc = subprocess.run([str(DVC), *args], cwd=root, env=project_env(root),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        pytest.fail(f"dvc {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    return proc.stdout


def full_tiny_run(request: pytest.FixtureRequest, factory: pytest.TempPathFactory) -> Path:
    """One project per test session holding a complete tiny run of the whole lineage,
    made as a user does it: `dvc init`, a local remote, then `xcam demo` (demo cohort,
    every asset, `dvc commit` + `dvc push`). Tests copy it (`copy_project`)."""
    stash = request.config.stash
    if _FULL_RUN_KEY in stash:
        return stash[_FULL_RUN_KEY]
    reuse = os.environ.get("XCAM_TEST_FULL_RUN")  # developer shortcut: a finished full run
    if reuse:
        stash[_FULL_RUN_KEY] = Path(reuse)
        return stash[_FULL_RUN_KEY]
    root = make_project(factory.mktemp("full-run") / "project", with_code=True)
    dvc(root, "init", "--no-scm", "-q")
    dvc(root, "remote", "add", "-d", "local", str(root.parent / "dvc-remote"))
    dvc(root, "config", "core.analytics", "false")
    started = time.monotonic()
    xcam(root, "demo", timeout=900)
    print(f"\nfull tiny run (xcam demo) in {root}: {time.monotonic() - started:.0f}s")
    stash[_FULL_RUN_KEY] = root
    return root


def copy_project(src: Path, dst: Path) -> Path:
    """A copy of a project (data, instance, DVC cache); nothing may be running in `src`."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, predicate: Callable[[], object], timeout: float,
             interval: float = 1.0, logs: list[Path] | None = None) -> object:
    """Poll until `predicate()` is truthy; fail naming `what` (and log tails) on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    tails = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}"
                      for p in (logs or []) if p.exists())
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")


class Processes:
    """Dagster processes started in their own sessions and stopped by process group
    (SIGTERM, then SIGKILL), with any process they left behind in the project's
    DAGSTER_HOME found through /proc and ended by its id."""

    def __init__(self, root: Path, logs: Path) -> None:
        self.root, self.logs = root, logs
        self.procs: list[subprocess.Popen] = []
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, *args: str, **extra: str) -> Path:
        log = self.logs / f"{name}.log"
        fh = open(log, "wb")  # noqa: SIM115 - kept open for the process's lifetime
        self.procs.append(subprocess.Popen(
            args, cwd=self.root, env=project_env(self.root, **extra), stdout=fh,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True))
        return log

    def _leftovers(self) -> list[int]:
        return pids_with_env("DAGSTER_HOME", self.root / "dagster_home")

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 8
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for pid in self._leftovers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not [p for p in self._leftovers()
                    if Path(f"/proc/{p}/stat").exists()
                    and Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"], \
            "Dagster processes survived the stop"


@contextlib.contextmanager
def dagster_services(root: Path, logs: Path, webserver: bool = False,
                     **extra: str) -> Iterator[dict[str, object]]:
    """A code server (the project's definitions), the daemon and optionally the
    webserver, on 127.0.0.1 free ports, against the project's instance."""
    procs = Processes(root, logs)
    grpc_port = free_port()
    workspace = root / "workspace-test.yaml"
    workspace.write_text("load_from:\n  - grpc_server:\n      host: 127.0.0.1\n"
                         f"      port: {grpc_port}\n      location_name: xcam\n")
    info: dict[str, object] = {"procs": procs, "logs": []}
    try:
        code_log = procs.start("code-server", str(BIN / "dagster"), "code-server", "start",
                               "-h", "127.0.0.1", "-p", str(grpc_port),
                               "-m", "xcam_assets.definitions",
                               # import the checkout's code, not a project's copy of it
                               "-d", str(REPO), **extra)
        info["logs"].append(code_log)
        wait_for("the code server", lambda: _grpc_ping(grpc_port), 120, logs=[code_log])
        info["logs"].append(procs.start("daemon", str(BIN / "dagster-daemon"), "run",
                                        "-w", str(workspace), **extra))
        if webserver:
            port = free_port()
            log = procs.start("webserver", str(BIN / "dagster-webserver"), "-h", "127.0.0.1",
                              "-p", str(port), "-w", str(workspace), **extra)
            info["logs"].append(log)
            url = f"http://127.0.0.1:{port}"
            wait_for("the webserver", lambda: _http_ok(f"{url}/server_info"), 120, logs=[log])
            info["url"] = url
        yield info
    finally:
        procs.stop()


def _grpc_ping(port: int) -> bool:
    from dagster._grpc.client import DagsterGrpcClient

    try:
        DagsterGrpcClient(port=port, host="127.0.0.1").ping("xcam")
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def graphql(url: str, query: str, variables: dict | None = None) -> dict:
    """POST a GraphQL query to the webserver; return `data` (fail on errors)."""
    import json
    import urllib.request

    req = urllib.request.Request(f"{url}/graphql", data=json.dumps(
        {"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        body = json.loads(resp.read())
    if body.get("errors"):
        pytest.fail(f"GraphQL errors: {body['errors']}")
    return body["data"]


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def chromium_page(width: int = 1600, height: int = 1000) -> Iterator[object]:
    """A page of headless Debian Chromium driven by Playwright (skip when neither is
    installed: `make setup` / .ci/run install them)."""
    if not CHROMIUM.exists():
        pytest.skip(f"no browser: {CHROMIUM} is absent (apt-get install chromium; "
                    "`make test` installs it when run as root)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="the playwright package is not installed")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            browser.close()
