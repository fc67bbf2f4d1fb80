"""Process checks from /proc: is a writer, run worker or rank still alive (Linux); and
`supervise`, which runs a command and stops its whole process tree on Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def process_alive(pid: int, start_ticks: str | None = None) -> bool:
    """Whether process `pid` runs on this host (a zombie counts as gone). With
    `start_ticks` (field 22 of /proc/<pid>/stat, see `process_start_ticks`) a later
    process that reuses the number does not count either."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (not Linux): the signal test is all there is
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return False
    return start_ticks is None or fields[19] == start_ticks


def pids_with_env(name: str, value: str | Path) -> list[int]:
    """Live processes other than this one whose environment holds ``name=value`` (e.g.
    everything a project's UI started: DAGSTER_HOME=<project>/dagster_home)."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in env and process_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def process_started_at(pid: int) -> float | None:
    """When process `pid` started, in seconds since the epoch (Linux; None elsewhere)."""
    ticks = process_start_ticks(pid)
    try:
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
    except (OSError, StopIteration):
        return None
    return None if ticks is None else btime + int(ticks) / os.sysconf("SC_CLK_TCK")


def process_start_ticks(pid: int | None = None) -> str | None:
    """When process `pid` (default: this one) started, in clock ticks after boot (Linux)."""
    try:
        stat = Path(f"/proc/{pid or os.getpid()}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


# -- process trees: `xcam ui` stops every process it started ---------------------------

def _live_parents() -> dict[int, int]:
    """pid -> parent pid of every live process (zombies left out), from /proc."""
    parents = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] not in ("Z", "X"):
            parents[int(entry.name)] = int(fields[1])
    return parents


def descendants(pid: int) -> list[tuple[int, str | None]]:
    """The live processes below `pid` (children, theirs, ...) as (pid, start ticks),
    whatever session or process group they put themselves in (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for child, parent in _live_parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append((child, process_start_ticks(child)))
            todo.append(child)
    return found


def set_child_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux prctl
    PR_SET_CHILD_SUBREAPER): a process whose parent exits is re-parented here, not to
    init, so it stays in this process's tree and can be found and stopped."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER = 36
    except (OSError, AttributeError):
        return False


def _reap(exits: dict[int, int]) -> None:
    """Collect every exited child of this process (no zombies left), noting exit codes."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        exits[pid] = os.waitstatus_to_exitcode(status)


def process_name(pid: int) -> str:
    """A short name of process `pid`: its command line, shortened ("" when gone)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    return " ".join(a.decode(errors="replace") for a in argv if a)[:100]


def stop_tree(known: list[tuple[int, str | None]], grace: float,
              exits: dict[int, int]) -> list[str]:
    """SIGTERM every process below this one (and in `known`), wait up to `grace`
    seconds, then SIGKILL what is left and wait for it to be gone. Returns the
    processes that had to be killed ("<pid> <command line>")."""
    me = os.getpid()

    def alive() -> list[tuple[int, str | None]]:
        _reap(exits)
        procs = dict(known)
        procs.update(descendants(me))
        return [(pid, ticks) for pid, ticks in procs.items()
                if pid != me and process_alive(pid, ticks)]

    for pid, _ in alive():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    left = alive()
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = alive()
    killed = []
    for pid, _ in left:
        name = process_name(pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed.append(f"{pid} {name}")
    deadline = time.monotonic() + 2.0
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = alive()
    return killed


#: how long `supervise` lets its children shut down cleanly before it kills them
STOP_GRACE_S = 2.5


def supervise(command: list[str], grace: float = STOP_GRACE_S,
              log: Callable[[str], None] = print) -> int:
    """Run `command` and, on SIGINT, SIGTERM or SIGHUP (Ctrl-C in a terminal sends SIGINT
    to the whole foreground process group; `kill`, make and process managers send
    SIGTERM to this process alone), stop it and every process it started within
    `grace` + 2 seconds: SIGTERM to the whole tree, SIGKILL after `grace`.

    Dagster's processes cannot be trusted to stop in time on their own: `dagster dev`
    waits up to 60 s for each service, the webserver for its open browser connections,
    and code servers run in the tree below them. This process becomes the subreaper of
    its descendants (`set_child_subreaper`), so a code server orphaned by its parent's
    exit is still found. Returns the command's exit code, or 128 + the signal's number.
    """
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)

    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    # handlers before the child starts: none is missed, and a SIGINT that the shell set
    # to "ignore" (a background job of a script) is not inherited as ignored
    previous = {sig: signal.signal(sig, on_signal) for sig in stop_signals}
    exits: dict[int, int] = {}
    try:
        subreaper = set_child_subreaper()
        child = subprocess.Popen(command)
        known: list[tuple[int, str | None]] = []
        next_scan = 0.0
        while not received and child.pid not in exits:
            _reap(exits)
            if not subreaper and time.monotonic() > next_scan:
                known = descendants(os.getpid())  # no subreaper: orphans must be known
                next_scan = time.monotonic() + 2.0
            time.sleep(0.1)
        if received:
            log(f"xcam: {signal.Signals(received[0]).name}: stopping {Path(command[0]).name} "
                f"and every process below it (at most {grace + 2:g} s)")
        killed = stop_tree(known, grace, exits)
        if killed:
            log(f"xcam: killed what did not stop within {grace:g} s: " + "; ".join(killed))
        child.returncode = exits.get(child.pid, child.returncode)
        return 128 + received[0] if received else (child.returncode or 0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
