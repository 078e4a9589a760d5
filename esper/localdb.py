"""Opening the SQLite files that Esper's services keep locally (Urza's embedded store,
Tezzeret's jobs, Tolaria's runs, Karn's request log, Oona's seen-set).

Every one of them is opened in WAL mode, so readers run beside the single writer, with a
busy timeout, so a writer waits its turn instead of failing. Switching a fresh file to
WAL needs an exclusive lock, and SQLite answers SQLITE_BUSY at once -- without calling
its busy handler -- when another connection holds a write lock (its deadlock avoidance).
That is exactly what happens when several threads or processes open a fresh database
together, so `connect` retries the switch with jittered backoff within the busy timeout.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Literal

from tenacity import Retrying, retry_if_exception, stop_after_delay
from tenacity.wait import wait_random_exponential

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]


def connect(path: str | Path, *, synchronous: Synchronous = "FULL",
            busy_timeout_s: float = 30.0, isolation_level: str | None = None,
            foreign_keys: bool = False) -> sqlite3.Connection:
    """A connection to `path` in WAL mode, usable from any thread (callers serialise).

    `isolation_level=None` (the default) leaves transactions to explicit BEGIN/COMMIT;
    pass "" for the sqlite3 module's implicit transactions.
    """
    conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=isolation_level,
                           check_same_thread=False)
    try:
        _ensure_wal(conn, path, busy_timeout_s)
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        if foreign_keys:
            conn.execute("PRAGMA foreign_keys=ON")
    except BaseException:
        conn.close()
        raise
    return conn


def _ensure_wal(conn: sqlite3.Connection, path: str | Path, busy_timeout_s: float) -> None:
    if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
        return
    mode = ""
    for attempt in Retrying(
        retry=retry_if_exception(_is_busy),
        wait=wait_random_exponential(multiplier=0.005, max=0.25),
        stop=stop_after_delay(busy_timeout_s), reraise=True,
    ):
        with attempt:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower()
    if mode != "wal":
        raise sqlite3.OperationalError(
            f"{path}: could not switch to WAL journal mode (got {mode!r}); WAL needs a "
            "local filesystem with shared-memory support")


def _is_busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc) or "busy" in str(exc))
