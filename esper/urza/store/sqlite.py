"""SQLite backend: the embedded default. WAL, one connection per thread, serialised writers.

Several threads and several processes may write at once: WAL lets readers run beside
the single writer, write transactions start with `BEGIN IMMEDIATE` (so two writers never
deadlock upgrading a read lock), and `busy_timeout` makes a writer wait its turn instead
of failing. `synchronous=FULL` makes a committed kernel survive power loss, not only a
killed process.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from esper import localdb
from esper.urza.store.migrations import LATEST_VERSION
from esper.urza.store.sql import SqlStore, Tx


class _SqliteTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(sql, tuple(params)).rowcount

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, tuple(params)).fetchall()


class SqliteStore(SqlStore):
    backend = "sqlite"
    dialect = "sqlite"

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0,
                 _migrate_upto: int = LATEST_VERSION) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._closed = False
        self._migrate(_migrate_upto)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise RuntimeError(f"SqliteStore({self.path}) is closed")
            # Transactions are begun explicitly below (isolation_level=None).
            conn = localdb.connect(self.path, synchronous="FULL",
                                   busy_timeout_s=self._busy_timeout_s, foreign_keys=True)
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def _tx(self, *, write: bool) -> Iterator[Tx]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN DEFERRED")
        try:
            yield _SqliteTx(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _migration_lock(self, tx: Tx) -> None:
        # BEGIN IMMEDIATE already holds the database's single write lock.
        return

    def close(self) -> None:
        self._closed = True
        with self._all_lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()
