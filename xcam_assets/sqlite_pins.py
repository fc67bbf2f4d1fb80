"""Keep the Dagster instance's SQLite files open while a lineage runs (no Dagster here).

Dagster's SQLite storage opens a new connection for every write (an event, a run update)
and closes it at once. On a WAL database the close of the *last* connection checkpoints
the WAL into the database and deletes it: two more fsyncs and an unlink, per connection,
on top of the commit's own fsync. One event costs two to four such connections (the run's
shard, the cross-run index, the asset tables), about 50-70 ms on this project's 2-core
machine; and a run's new shard is created in rollback-journal mode, ~30 CREATE
statements each with its journal file created, synced and deleted.

`pinned_sqlite()` holds one idle connection ("pin") to each WAL database under DAGSTER_HOME
(or a given root) that the process writes to while it is active, so Dagster's closes are no
longer the last: a write costs its commit's fsync (and the folder's, on a connection's
first commit), and a new shard is put in WAL mode before Dagster creates its tables
(Dagster switches it to WAL right after anyway). Tiny lineage (tests/benchmarks/
bench_demo.py, 2026-11-29): SQLite fsyncs 2,655 -> 1,231, WAL deletions 1,950 -> 224,
time outside the steps' bodies 11.5-13.5 s -> 6.0 s. Durability is unchanged (WAL,
synchronous=FULL: every commit is on disk when it returns); the WAL is checkpointed as
usual once it passes 1000 pages, and in full when the last pin closes. A pin holds no
lock and no read snapshot (it runs one query at opening and none after), so it never
blocks a writer or a checkpoint, here or in another process (UI, daemon). A process
killed with pins open leaves a WAL that the next opener recovers, as after any crash.

Engines of other dialects (the PostgreSQL instance), databases outside `root`, and
databases not (yet) in WAL mode are left alone.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

#: at most this many files pinned at once (each pin holds 3 file descriptors; a lineage
#: over many batches has a run shard per run): the least recently written are unpinned
MAX_PINS = 32


class SqlitePins:
    def __init__(self, root: Path | None = None, max_pins: int = MAX_PINS) -> None:
        self._root = Path(root).resolve() if root is not None else None
        self.max_pins = max_pins
        self.pins: OrderedDict[str, sqlite3.Connection] = OrderedDict()
        self._lock = threading.Lock()

    def root(self) -> Path | None:
        """The folder whose databases are pinned: the one given, else DAGSTER_HOME as it
        is at each connection (`project_instance` sets it on first use)."""
        if self._root is not None:
            return self._root
        home = os.environ.get("DAGSTER_HOME")
        return Path(home).resolve() if home else None

    def on_engine_connect(self, conn: Connection) -> None:
        """SQLAlchemy `engine_connect` hook: pin the connection's database file."""
        try:
            url = conn.engine.url
            # a file database only (not ":memory:", not a "file:" URI)
            if (conn.engine.dialect.name != "sqlite" or not url.database
                    or not os.path.isabs(url.database)):
                return
            root = self.root()
            path = Path(url.database).resolve()
            if root is None or root not in path.parents:
                return
            self.pin(path)
        except Exception:  # noqa: BLE001 - a pin is an optimisation, never a failure
            return

    def pin(self, path: Path) -> bool:
        key = str(path)
        with self._lock:
            if key in self.pins:
                self.pins.move_to_end(key)
                return True
            # a database being created (a run's event-log shard) is put in WAL mode at
            # once, as Dagster does after creating its tables: its ~30 CREATE statements,
            # each its own transaction, then cost one fsync each instead of a journal
            # file created, synced and deleted (3 fsyncs) each
            new = not path.is_file() or path.stat().st_size == 0
            if new and not path.parent.is_dir():
                return False
            pin = sqlite3.connect(key, timeout=5, check_same_thread=False,
                                  isolation_level=None)
            try:
                mode = pin.execute(
                    "PRAGMA journal_mode=WAL" if new else "PRAGMA journal_mode").fetchone()[0]
                # opens the WAL index (the shared memory): the pin now counts as a reader
                pin.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlite3.Error:
                mode = None
            if str(mode).lower() != "wal":
                pin.close()
                return False
            self.pins[key] = pin
            while len(self.pins) > self.max_pins:
                _, old = self.pins.popitem(last=False)
                _close(old)
            return True

    def close(self) -> None:
        with self._lock:
            while self.pins:
                _, pin = self.pins.popitem(last=False)
                _close(pin)


def _close(pin: sqlite3.Connection) -> None:
    try:
        pin.close()
    except sqlite3.Error:
        pass


_active: list[SqlitePins] = []
_active_lock = threading.Lock()


@contextmanager
def pinned_sqlite(root: Path | str | None = None) -> Iterator[SqlitePins]:
    """Pin the WAL SQLite databases under `root` (default: DAGSTER_HOME at each
    connection) that this process connects to, until the block ends. Re-entrant: an
    inner block (a stage inside `materialize_all`) reuses the outer one's pins.
    `XCAM_SQLITE_PINS=0` turns it off (to measure: tests/benchmarks/bench_demo.py)."""
    if os.environ.get("XCAM_SQLITE_PINS", "1") == "0":
        yield SqlitePins(Path(root) if root is not None else None, max_pins=0)
        return
    with _active_lock:
        outer = _active[-1] if _active else None
        pins = outer or SqlitePins(Path(root) if root is not None else None)
        _active.append(pins)
        if outer is None:
            event.listen(Engine, "engine_connect", pins.on_engine_connect)
    try:
        yield pins
    finally:
        with _active_lock:
            _active.pop()
            if outer is None:
                event.remove(Engine, "engine_connect", pins.on_engine_connect)
                pins.close()
