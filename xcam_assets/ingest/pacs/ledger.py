"""The PACS ledger: every instance the puller or the receiver took in, so nothing is
fetched or stored twice and nothing acknowledged is lost across a restart.

One SQLite file, `data/incoming/.xcam-pacs/ledger.sqlite` (beside the raw data it
describes: it holds SOP Instance UIDs, so it lives in the access-controlled drop zone,
never in an artifact). A row is keyed by (SOP Instance UID, sha256 of the stored bytes)
and is `staged` (its file is durably in a staging folder) or `committed` (its batch was
renamed into `data/incoming/` complete). A row is written only after its file is on
disk, so a row always means a file; a file without a row is re-fetched / re-sent and
lands under the same name. WAL + synchronous=FULL: a committed transaction survives
kill -9 and power loss.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    source TEXT NOT NULL,
    batch TEXT NOT NULL,
    file TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('staged', 'committed')),
    at TEXT NOT NULL,
    PRIMARY KEY (sop_uid, sha256)
);
CREATE INDEX IF NOT EXISTS instances_batch ON instances (batch);
"""


@dataclass(frozen=True)
class LedgerRow:
    sop_uid: str
    sha256: str
    size: int
    source: str
    batch: str
    file: str
    state: str


class Ledger:
    """Thread-safe (one lock, one short connection per call: the receiver stores from
    one thread per association) and process-safe (SQLite's own locking)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = sqlite3.connect(self.path, timeout=30)
            try:
                db.execute("PRAGMA synchronous=FULL")
                with db:  # one transaction: committed on success, rolled back on error
                    yield db
            finally:
                db.close()

    def has_uid(self, sop_uid: str) -> bool:
        """Any version of this instance taken in (the puller cannot know the bytes before
        fetching: an instance whose UID it already holds is not fetched again)."""
        with self._connect() as db:
            return db.execute("SELECT 1 FROM instances WHERE sop_uid = ? LIMIT 1",
                              (sop_uid,)).fetchone() is not None

    def get(self, sop_uid: str, sha256: str) -> LedgerRow | None:
        with self._connect() as db:
            row = db.execute("SELECT sop_uid, sha256, size, source, batch, file, state "
                             "FROM instances WHERE sop_uid = ? AND sha256 = ?",
                             (sop_uid, sha256)).fetchone()
        return LedgerRow(*row) if row else None

    def versions(self, sop_uid: str) -> set[str]:
        """The sha256 of every version of this instance taken in."""
        with self._connect() as db:
            return {r[0] for r in db.execute("SELECT sha256 FROM instances WHERE sop_uid = ?",
                                             (sop_uid,))}

    def record_staged(self, sop_uid: str, sha256: str, size: int, source: str, batch: str,
                      file: str) -> None:
        """After the file is durably in staging: the instance is now acknowledged."""
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, 'staged', ?)",
                       (sop_uid, sha256, size, source, batch, file,
                        datetime.now(UTC).isoformat(timespec="seconds")))

    def commit_batch(self, batch: str) -> int:
        """The batch folder is complete in data/incoming/: its rows become committed."""
        with self._connect() as db:
            return db.execute("UPDATE instances SET state = 'committed' "
                              "WHERE batch = ? AND state = 'staged'", (batch,)).rowcount

    def staged_batches(self) -> list[str]:
        with self._connect() as db:
            return [r[0] for r in db.execute(
                "SELECT DISTINCT batch FROM instances WHERE state = 'staged' ORDER BY batch")]

    def rows(self, batch: str | None = None) -> list[LedgerRow]:
        query = "SELECT sop_uid, sha256, size, source, batch, file, state FROM instances"
        with self._connect() as db:
            cur = (db.execute(query + " WHERE batch = ? ORDER BY file", (batch,)) if batch
                   else db.execute(query + " ORDER BY batch, file"))
            return [LedgerRow(*r) for r in cur]

    def count(self, source: str | None = None, state: str | None = None) -> int:
        clauses, args = [], []
        for column, value in (("source", source), ("state", state)):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._connect() as db:
            return db.execute(f"SELECT COUNT(*) FROM instances{where}", args).fetchone()[0]
