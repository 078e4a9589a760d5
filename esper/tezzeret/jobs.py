"""Compile jobs persisted in SQLite: one job per (blueprint id, site), so compiling is
idempotent across calls and restarts."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from esper import localdb
from esper.blueprints import site_key
from esper.errors import NotFoundError
from generated.esper.common.v1 import kernel_pb2, seed_pb2
from generated.esper.tezzeret.v1 import tezzeret_service_pb2 as pb

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    blueprint_id TEXT NOT NULL,
    site_key TEXT NOT NULL,
    site BLOB NOT NULL,
    state INTEGER NOT NULL,
    kernel_id TEXT NOT NULL DEFAULT '',
    manifest BLOB,
    error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    finished_at REAL,
    UNIQUE (blueprint_id, site_key)
)
"""


def job_id_for(blueprint_id: str, site: seed_pb2.SiteSignature) -> str:
    return "cj-" + hashlib.sha256(f"{blueprint_id}|{site_key(site)}".encode()).hexdigest()[:16]


def _ts(t: float | None) -> Timestamp | None:
    if t is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


class JobStore:
    """Thread-safe; every write is its own transaction."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._db = localdb.connect(self.path, synchronous="FULL")
        self._db.execute(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def get_or_create(self, blueprint_id: str, site: seed_pb2.SiteSignature
                      ) -> tuple[pb.CompileJob, bool]:
        """The job for (blueprint, site), creating it QUEUED; (job, created)."""
        job_id = job_id_for(blueprint_id, site)
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO jobs (job_id, blueprint_id, site_key, site, state, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, blueprint_id, site_key(site), site.SerializeToString(),
                 pb.COMPILE_JOB_STATE_QUEUED, time.time()))
            created = cur.rowcount == 1
        return self.get(job_id), created

    def get(self, job_id: str) -> pb.CompileJob:
        with self._lock:
            row = self._db.execute(
                "SELECT job_id, blueprint_id, site, state, kernel_id, manifest, error, "
                "created_at, finished_at FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no compile job {job_id!r}")
        job = pb.CompileJob(job_id=row[0], blueprint_id=row[1],
                            site=seed_pb2.SiteSignature.FromString(row[2]), state=row[3],
                            kernel_id=row[4], error=row[6], created_at=_ts(row[7]))
        if row[5]:
            job.manifest.CopyFrom(kernel_pb2.KernelManifest.FromString(row[5]))
        if row[8] is not None:
            job.finished_at.CopyFrom(_ts(row[8]))
        return job

    def set_state(self, job_id: str, state: int) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET state = ?, error = '', finished_at = NULL "
                             "WHERE job_id = ?", (state, job_id))

    def succeed(self, job_id: str, kernel_id: str, manifest: kernel_pb2.KernelManifest) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state = ?, kernel_id = ?, manifest = ?, error = '', "
                "finished_at = ? WHERE job_id = ?",
                (pb.COMPILE_JOB_STATE_SUCCEEDED, kernel_id,
                 manifest.SerializeToString(deterministic=True), time.time(), job_id))

    def fail(self, job_id: str, error: str) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET state = ?, error = ?, finished_at = ? "
                             "WHERE job_id = ?",
                             (pb.COMPILE_JOB_STATE_FAILED, error[:4000], time.time(), job_id))

    def unfinished(self) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id FROM jobs WHERE state IN (?, ?)",
                (pb.COMPILE_JOB_STATE_QUEUED, pb.COMPILE_JOB_STATE_RUNNING)).fetchall()
        return [r[0] for r in rows]
