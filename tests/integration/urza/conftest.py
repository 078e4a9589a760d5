"""A throwaway PostgreSQL server for Urza's storage suite.

The server runs from a temp dir as the `postgres` OS user (postgres refuses to run as
root), on a free loopback port, and is stopped and removed at the end of the session.
Missing binaries are installed by scripts/ensure_postgres.sh. Each test gets its own
database.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class PostgresServer:
    def __init__(self) -> None:
        out = subprocess.run(["bash", str(REPO / "scripts" / "ensure_postgres.sh")],
                             check=True, capture_output=True, text=True, timeout=900)
        self.bindir = Path(out.stdout.strip().splitlines()[-1])
        # Not under pytest's tmp dirs: those are 0700 root-owned and postgres could not enter.
        self.root = Path(tempfile.mkdtemp(prefix="esper-pg-"))
        self.data = self.root / "data"
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        subprocess.run(
            _as_postgres([str(self.bindir / "initdb"), "-D", str(self.data), "-U", "esper",
                          "--auth=trust", "-E", "UTF8", "--no-sync"]),
            check=True, capture_output=True, timeout=120,
        )
        self.port = 0
        last_err = b""
        for _ in range(3):  # the free port may be taken between probe and bind
            port = _free_port()
            opts = (f"-p {port} -k {self.root} -c listen_addresses=127.0.0.1 "
                    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
            res = subprocess.run(
                _as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", opts,
                              "-l", str(self.root / "server.log"), "-w", "-t", "60", "start"]),
                capture_output=True, timeout=90,
            )
            if res.returncode == 0:
                self.port = port
                break
            last_err = res.stderr + (self.root / "server.log").read_bytes()
        if not self.port:
            self.stop()
            raise RuntimeError(f"PostgreSQL did not start: {last_err.decode(errors='replace')}")
        self._dbs = itertools.count()

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://esper@127.0.0.1:{self.port}/{db}"

    def create_database(self) -> str:
        import psycopg

        name = f"urza_{os.getpid()}_{next(self._dbs)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run(
                _as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m",
                              "immediate", "-w", "stop"]),
                capture_output=True, timeout=60,
            )
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    name = postgres_server.create_database()
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)
