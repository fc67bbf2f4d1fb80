"""Process checks from /proc: is a writer, run worker or rank still alive (Linux)."""

from __future__ import annotations

import os
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
