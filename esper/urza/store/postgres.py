"""PostgreSQL backend (psycopg 3) for the distributed deployment.

Connections come from a small pool owned by the store: a connection is checked out
for one transaction and returned; a broken one is discarded, not reused. READ
COMMITTED is enough: every multi-row invariant (a report and its kernel's stats) is
written in one transaction whose upsert locks the stats row.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg

from esper.errors import ConfigError, UnavailableError
from esper.urza.store.migrations import LATEST_VERSION
from esper.urza.store.sql import SqlStore, Tx

# pg_advisory_xact_lock key for schema migrations: any constant shared by every opener.
_MIGRATION_LOCK_KEY = 0x5552_5A41  # "URZA"


class _PgTx:
    def __init__(self, conn: psycopg.Connection) -> None:
        self._cur = conn.cursor()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        self._cur.execute(_pg(sql), tuple(params))
        return self._cur.rowcount

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self._cur.execute(_pg(sql), tuple(params))
        return self._cur.fetchall()


def _pg(sql: str) -> str:
    # The shared SQL uses "?" placeholders and contains no literal "?" or "%".
    return sql.replace("?", "%s")


class PostgresStore(SqlStore):
    backend = "postgres"
    dialect = "postgres"

    def __init__(self, url: str, *, max_connections: int = 8, connect_timeout_s: float = 10.0,
                 _migrate_upto: int = LATEST_VERSION) -> None:
        if not url.startswith(("postgresql://", "postgres://")):
            raise ConfigError(
                f"database_url={url!r}: PostgresStore needs a postgresql:// URL"
            )
        if max_connections < 1:
            raise ConfigError(f"max_connections={max_connections}: must be >= 1")
        self.url = url
        self._connect_timeout_s = connect_timeout_s
        self._idle: queue.LifoQueue[psycopg.Connection] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._closed = False
        self._migrate(_migrate_upto)

    def _checkout(self) -> psycopg.Connection:
        if self._closed:
            raise RuntimeError("PostgresStore is closed")
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                break
            if not conn.closed and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                return conn
            conn.close()
        try:
            return psycopg.connect(self.url, autocommit=True,
                                   connect_timeout=max(1, int(self._connect_timeout_s)))
        except psycopg.OperationalError as exc:
            raise UnavailableError(f"cannot connect to Urza's PostgreSQL: {exc}") from exc

    @contextmanager
    def _tx(self, *, write: bool) -> Iterator[Tx]:
        self._slots.acquire()
        try:
            conn = self._checkout()
            healthy = False
            try:
                with conn.transaction():
                    yield _PgTx(conn)
                healthy = True
            except psycopg.OperationalError as exc:
                raise UnavailableError(f"Urza's PostgreSQL failed mid-transaction: {exc}") from exc
            finally:
                if healthy or (not conn.closed and not conn.broken):
                    self._idle.put(conn)
                else:
                    conn.close()
        finally:
            self._slots.release()

    def _migration_lock(self, tx: Tx) -> None:
        tx.query("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK_KEY,))

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return
