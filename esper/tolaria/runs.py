"""Run store: persisted run records, per-run directories and append-only event logs.

Layout under the store root (``ctx.part_dir("tolaria")``)::

    runs.sqlite                  one row per run (state, latest metrics, worker pid)
    runs/<run_id>/config.pb      the RunConfig as serialized protobuf
    runs/<run_id>/events.log     length-prefixed serialized EventEnvelopes
    runs/<run_id>/checkpoints/   the trainer's atomic checkpoints

The event log is the run's source of truth: the worker process appends to it, the
service follows it to keep the SQLite record current and to serve ``WatchRun``.
Records are a 4-byte big-endian length followed by the envelope bytes; a record cut
short by a crash (SIGKILL mid-write) is truncated away when the log is next opened
for writing, so readers never see a torn envelope.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from esper import localdb
from esper.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from esper.fsutil import atomic_write
from generated.esper.oona.v1 import events_pb2
from generated.esper.tolaria.v1 import tolaria_service_pb2 as pb

_HEADER = struct.Struct(">I")
# An envelope bigger than this is a corrupt length prefix, not a real event.
_MAX_RECORD_BYTES = 64 * 1024 * 1024

MAX_PAGE_BYTES = 3 * 1024 * 1024
"""ListRuns stops a page before its runs exceed this many bytes, so a reply fits gRPC's
default 4 MiB receive limit whatever page_size asks for (runs with big labels included)."""
_MAX_SEQ = 2**63 - 1

TERMINAL_STATES = frozenset({pb.RUN_STATE_SUCCEEDED, pb.RUN_STATE_FAILED, pb.RUN_STATE_STOPPED})

STATE_BY_NAME: dict[str, int] = {
    "pending": pb.RUN_STATE_PENDING,
    "running": pb.RUN_STATE_RUNNING,
    "succeeded": pb.RUN_STATE_SUCCEEDED,
    "failed": pb.RUN_STATE_FAILED,
    "stopped": pb.RUN_STATE_STOPPED,
}
NAME_BY_STATE: dict[int, str] = {v: k for k, v in STATE_BY_NAME.items()}
DELIVERY_SETTLE_S = 5.0
"""How long a worker waits for the bus to acknowledge its queued events before it records
their delivery (and then its terminal state)."""
TERMINAL_STATE_NAMES = frozenset({"succeeded", "failed", "stopped"})


def complete_run_state(msg: events_pb2.RunStateChanged) -> None:
    """Fill whichever of a RunStateChanged's two forms is missing: the lowercase `state`
    string older readers know, or the `run_state` enum (both carry the same state;
    esper.oona.v1.RunState has esper.tolaria.v1.RunState's numbers)."""
    if msg.state and not msg.run_state:
        msg.run_state = STATE_BY_NAME.get(msg.state, events_pb2.RUN_STATE_UNSPECIFIED)
    elif msg.run_state and not msg.state:
        msg.state = NAME_BY_STATE.get(msg.run_state, "")


def is_terminal(env: events_pb2.EventEnvelope) -> bool:
    """Whether `env` records that its run ended (succeeded, failed or stopped)."""
    return env.WhichOneof("payload") == "run_state" and env.run_state.state in TERMINAL_STATE_NAMES


def delivery_envelope(run_id: str, stats: object, *, degradations: int, step: int = 0,
                      epoch: int = 0) -> events_pb2.EventEnvelope:
    """The `delivery` event a worker records right before its terminal state, from its
    publisher's settled counters (`esper.oona.publisher.PublisherStats`)."""
    env = new_envelope(run_id, source="tolaria", step=step, epoch=epoch)
    d = env.delivery
    d.published = stats.published  # type: ignore[attr-defined]
    d.dropped = stats.dropped  # type: ignore[attr-defined]
    d.rejected = stats.rejected  # type: ignore[attr-defined]
    d.lost = stats.lost  # type: ignore[attr-defined]
    d.undelivered = stats.undelivered  # type: ignore[attr-defined]
    d.degradations = degradations
    return env


class EventLog:
    """Append-only, length-prefixed log of one run's EventEnvelopes.

    Several processes may append (the worker while it lives, the service when it
    records that a worker died); an exclusive ``flock`` around each append keeps
    records whole and sequences strictly increasing across them.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._known_size = 0
        self._last_sequence = 0
        self._ids: dict[str, int] = {}

    # ---- writing -------------------------------------------------------------------
    def _open_for_append(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            self._known_size = -1
        return self._fd

    def _catch_up(self, fd: int) -> None:
        """Under the file lock: read what others appended and drop a torn tail."""
        size = os.fstat(fd).st_size
        if size == self._known_size:
            return
        start = max(self._known_size, 0)
        events, good_end = self.read(start)
        if good_end < size:
            os.ftruncate(fd, good_end)
        self._known_size = good_end
        for env in events:
            self._ids[env.event_id] = env.sequence
            self._last_sequence = env.sequence

    def append(self, envelope: events_pb2.EventEnvelope, *, sync: bool = False) -> tuple[int, bool]:
        """Append `envelope` under the run's next sequence; returns (sequence, appended).

        Idempotent on `event_id`: an envelope whose id is already in the log (a resumed
        worker re-emitting an event it emitted before it died) is not appended again;
        its `sequence` is set to the logged one and `appended` is False.
        `sync=True` fsyncs the file (the worker does so once per epoch and at run end).
        A RunStateChanged gets both its string and its enum form here, whoever wrote it
        (the caller's envelope too: what the worker then publishes carries both).
        """
        if envelope.WhichOneof("payload") == "run_state":
            complete_run_state(envelope.run_state)
        with self._lock:
            fd = self._open_for_append()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                self._catch_up(fd)
                if envelope.event_id in self._ids:
                    envelope.sequence = self._ids[envelope.event_id]
                    return envelope.sequence, False
                self._last_sequence += 1
                envelope.sequence = self._last_sequence
                data = envelope.SerializeToString()
                os.lseek(fd, self._known_size, os.SEEK_SET)
                os.write(fd, _HEADER.pack(len(data)) + data)
                self._known_size += _HEADER.size + len(data)
                self._ids[envelope.event_id] = envelope.sequence
                if sync:
                    os.fsync(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            return self._last_sequence, True

    def sync(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.fsync(self._fd)

    def last_sequence(self) -> int:
        """Highest sequence in the log (0 when empty), counting other writers' appends."""
        events, _ = self.read(0)
        return events[-1].sequence if events else 0

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # ---- reading -------------------------------------------------------------------
    def read(self, offset: int = 0) -> tuple[list[events_pb2.EventEnvelope], int]:
        """Whole records from byte `offset` on, and the offset just past the last one."""
        out: list[events_pb2.EventEnvelope] = []
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                buf = f.read()
        except FileNotFoundError:
            return out, offset
        pos = 0
        while pos + _HEADER.size <= len(buf):
            (n,) = _HEADER.unpack_from(buf, pos)
            if n > _MAX_RECORD_BYTES or pos + _HEADER.size + n > len(buf):
                break
            env = events_pb2.EventEnvelope()
            env.ParseFromString(buf[pos + _HEADER.size : pos + _HEADER.size + n])
            if env.WhichOneof("payload") == "run_state":
                complete_run_state(env.run_state)  # logged before the enum existed
            out.append(env)
            pos += _HEADER.size + n
        return out, offset + pos

    def replay(self, from_sequence: int = 0) -> Iterator[events_pb2.EventEnvelope]:
        events, _ = self.read(0)
        for env in events:
            if env.sequence >= from_sequence:
                yield env


def new_envelope(
    run_id: str, *, source: str, step: int = 0, epoch: int = 0, event_id: str | None = None
) -> events_pb2.EventEnvelope:
    """An envelope with id and timestamp set; its payload and sequence are filled later."""
    env = events_pb2.EventEnvelope(
        event_id=event_id or str(uuid.uuid4()), run_id=run_id, step=step, epoch=epoch, source=source
    )
    env.emitted_at.GetCurrentTime()
    return env


@dataclass(kw_only=True)
class RunRecord:
    """One row of the run table (mirrors ``tolaria.v1.Run`` plus supervision fields)."""

    run_id: str
    config: pb.RunConfig
    state: int = pb.RUN_STATE_PENDING
    epoch: int = 0
    global_step: int = 0
    val_accuracy: float = 0.0
    val_loss: float = 0.0
    parameters: int = 0
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    detail: str = ""
    degraded: list[str] = field(default_factory=list)
    last_sequence: int = 0
    request_id: str | None = None
    worker_pid: int | None = None
    restarts: int = 0
    stop_requested: bool = False
    stop_reason: str = ""
    """The reason the first StopRun gave."""
    stop_request_id: str | None = None
    """The request_id of the first StopRun (a retry with it gets the same answer)."""
    stop_requested_at: float | None = None
    launcher: str = ""
    """Which launcher started the run's worker ("local" or "kubernetes"; "" before one did)."""
    worker: str = ""
    """Where the worker runs: "pid <n>" or "job <namespace>/<name>"."""
    event_delivery: events_pb2.EventDelivery | None = None
    degradations: dict[str, int] = field(default_factory=dict)

    def to_proto(self) -> pb.Run:
        run = pb.Run(
            run_id=self.run_id,
            state=self.state,
            epoch=self.epoch,
            global_step=self.global_step,
            val_accuracy=self.val_accuracy,
            val_loss=self.val_loss,
            parameters=self.parameters,
            detail=self.detail,
            degraded=sorted(self.degraded),
            last_sequence=self.last_sequence,
            stop_requested=self.stop_requested,
            stop_reason=self.stop_reason,
            degradations=self.degradations,
            restarts=self.restarts,
            worker=self.worker,
        )
        if self.event_delivery is not None:
            run.event_delivery.CopyFrom(self.event_delivery)
        run.config.CopyFrom(effective_config(self.config))
        run.created_at.CopyFrom(_ts(self.created_at))
        run.updated_at.CopyFrom(_ts(self.updated_at))
        return run

    @property
    def ended(self) -> bool:
        return self.state in TERMINAL_STATES


def effective_config(config: pb.RunConfig) -> pb.RunConfig:
    """`config` as the run trains it: every default applied (width 1.0, decide_timeout
    0.5 s, the optimizer and budget in full, ...) instead of proto3's zero values."""
    from esper.tolaria.config import RunConfig, RunConfigError

    try:
        return RunConfig.from_proto(config).to_proto()
    except RunConfigError:
        # Stored by an older Tolaria whose rules this one no longer accepts: the record
        # must still be readable, so it is shown as it was accepted then.
        return config


def _ts(t: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT UNIQUE NOT NULL,
    request_id TEXT UNIQUE,
    config BLOB NOT NULL,
    state INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    global_step INTEGER NOT NULL,
    val_accuracy REAL NOT NULL,
    val_loss REAL NOT NULL,
    parameters INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    detail TEXT NOT NULL,
    degraded TEXT NOT NULL,
    last_sequence INTEGER NOT NULL,
    worker_pid INTEGER,
    restarts INTEGER NOT NULL,
    stop_requested INTEGER NOT NULL
)
"""
# Columns added after the first release, with the value older rows get (ALTER TABLE on open).
_ADDED_COLUMNS: dict[str, str] = {
    "stop_reason": "TEXT NOT NULL DEFAULT ''",
    "stop_request_id": "TEXT",
    "stop_requested_at": "REAL",
    "launcher": "TEXT NOT NULL DEFAULT ''",
    "worker": "TEXT NOT NULL DEFAULT ''",
    "event_delivery": "BLOB",
    "degradations": "TEXT NOT NULL DEFAULT '{}'",
}
_COLUMNS = ["run_id", "request_id", "config", "state", "epoch", "global_step", "val_accuracy", "val_loss", "parameters", "created_at", "updated_at", "detail", "degraded", "last_sequence", "worker_pid", "restarts", "stop_requested", *_ADDED_COLUMNS]


class RunStore:
    """Run records in SQLite plus one directory per run. Thread-safe; one writer process."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / "runs").mkdir(exist_ok=True)
        # A run record is the service's memory across restarts: commit durably.
        self._db = localdb.connect(root / "runs.sqlite", synchronous="FULL", isolation_level="")
        self._db.execute(_SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(runs)")}
        for name, decl in _ADDED_COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE runs ADD COLUMN {name} {decl}")
        self._db.execute("CREATE INDEX IF NOT EXISTS runs_stop_request ON runs(stop_request_id)")
        self._db.commit()
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def event_log(self, run_id: str) -> EventLog:
        return EventLog(self.run_dir(run_id) / "events.log")

    def create(self, config: pb.RunConfig, *, request_id: str | None = None) -> tuple[RunRecord, bool]:
        """Create a run (dir + config file + record). Returns (record, created).

        With a `request_id` already seen, returns that run and ``created=False`` when
        the config is the same, and raises ``AlreadyExistsError`` when it differs.
        """
        with self._lock:
            if request_id:
                rec = self._by_request_id(request_id)
                if rec is not None:
                    if rec.config.SerializeToString(deterministic=True) != config.SerializeToString(
                        deterministic=True
                    ):
                        raise AlreadyExistsError(
                            f"request_id {request_id!r} was already used for run {rec.run_id} "
                            "with a different config; use a new request_id for a new run"
                        )
                    return rec, False
            run_id = "run-" + uuid.uuid4().hex[:12]
            rec = RunRecord(run_id=run_id, config=config, request_id=request_id or None)
            d = self.run_dir(run_id)
            (d / "checkpoints").mkdir(parents=True)
            atomic_write(d / "config.pb", config.SerializeToString(deterministic=True))
            self._db.execute(
                f"INSERT INTO runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                _to_row(rec),
            )
            self._db.commit()
            return rec, True

    def by_request_id(self, request_id: str) -> RunRecord | None:
        """The run a StartRun with this request_id created, if any."""
        with self._lock:
            return self._by_request_id(request_id)

    def _by_request_id(self, request_id: str) -> RunRecord | None:
        row = self._db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM runs WHERE request_id = ?", (request_id,)
        ).fetchone()
        return None if row is None else _from_row(row)

    def get(self, run_id: str) -> RunRecord:
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"no run with id {run_id!r}; ListRuns shows the existing ones")
        return _from_row(row)

    def update(self, rec: RunRecord) -> None:
        rec.updated_at = time.time()
        with self._lock:
            cols = [c for c in _COLUMNS if c != "run_id"]
            values = _to_row(rec)[1:]
            self._db.execute(
                f"UPDATE runs SET {', '.join(c + ' = ?' for c in cols)} WHERE run_id = ?",
                (*values, rec.run_id),
            )
            self._db.commit()

    def list(
        self, *, page_size: int, page_token: str = "", state: int = pb.RUN_STATE_UNSPECIFIED
    ) -> tuple[list[RunRecord], str]:
        """Runs in creation order, `page_size` at a time but at most MAX_PAGE_BYTES of them
        (at least one); the token is opaque to callers."""
        after = 0
        if page_token:
            try:
                after = json.loads(bytes.fromhex(page_token))["after"]
            except (ValueError, KeyError, TypeError, IndexError, RecursionError):
                after = None
            # A hand-made token may hold anything JSON can: only a row number is one of ours.
            if type(after) is not int or not 0 <= after <= _MAX_SEQ:
                raise InvalidArgumentError(
                    f"page_token {page_token[:64]!r} is not one ListRuns returned; pass the "
                    "previous reply's next_page_token unchanged, or none for the first page",
                    field="page_token",
                )
        size = page_size or 50
        sql = f"SELECT seq, {', '.join(_COLUMNS)} FROM runs WHERE seq > ?"
        args: list[object] = [after]
        if state != pb.RUN_STATE_UNSPECIFIED:
            sql += " AND state = ?"
            args.append(state)
        sql += " ORDER BY seq LIMIT ?"
        args.append(size + 1)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        more = len(rows) > size
        rows = rows[:size]
        records: list[RunRecord] = []
        used = 0
        for i, r in enumerate(rows):
            rec = _from_row(r[1:])
            used += rec.to_proto().ByteSize() + 8  # the run and its framing in the reply
            if records and used > MAX_PAGE_BYTES:
                rows, more = rows[:i], True
                break
            records.append(rec)
        token = ""
        if more:
            token = json.dumps({"after": rows[-1][0]}).encode().hex()
        return records, token

    def by_stop_request_id(self, request_id: str) -> RunRecord | None:
        """The run a StopRun with this request_id stopped, if any."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM runs WHERE stop_request_id = ?", (request_id,)
            ).fetchone()
        return None if row is None else _from_row(row)

    def active(self) -> list[RunRecord]:
        """Runs not yet ended (to re-supervise after a service restart)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM runs WHERE state IN (?, ?) ORDER BY seq",
                (pb.RUN_STATE_PENDING, pb.RUN_STATE_RUNNING),
            ).fetchall()
        return [_from_row(r) for r in rows]


def apply_event(rec: RunRecord, env: events_pb2.EventEnvelope) -> None:
    """Fold one event into the run record (the record is a view of the event log).

    Folding an event the record has already seen (its sequence is not past the record's
    `last_sequence`) changes nothing: the supervisor folds the events it writes itself at
    once and again when it next follows the log.
    """
    new = env.sequence == 0 or env.sequence > rec.last_sequence
    rec.last_sequence = max(rec.last_sequence, env.sequence)
    rec.global_step = max(rec.global_step, env.step)
    kind = env.WhichOneof("payload")
    if kind == "run_state":
        complete_run_state(env.run_state)
    if kind == "epoch_metrics":
        m = env.epoch_metrics
        rec.epoch = m.epoch
        rec.val_accuracy = m.val_accuracy
        rec.val_loss = m.val_loss
        rec.parameters = m.parameters
    elif kind == "run_state":
        if env.run_state.run_state:
            rec.state = env.run_state.run_state
        if env.run_state.state == "running":
            # A worker is live again: a restart that was reported is over.
            rec.degraded = [c for c in rec.degraded if c != "worker"]
        rec.detail = env.run_state.detail
    elif kind == "delivery":
        rec.event_delivery = events_pb2.EventDelivery()
        rec.event_delivery.CopyFrom(env.delivery)
    elif kind == "degradation":
        d = env.degradation
        if new:
            rec.degradations[d.component] = rec.degradations.get(d.component, 0) + 1
        if d.kind == "recovered":
            rec.degraded = [c for c in rec.degraded if c != d.component]
        elif d.component not in rec.degraded:
            rec.degraded.append(d.component)


def _to_row(rec: RunRecord) -> tuple[object, ...]:
    return (
        rec.run_id,
        rec.request_id,
        rec.config.SerializeToString(deterministic=True),
        rec.state,
        rec.epoch,
        rec.global_step,
        rec.val_accuracy,
        rec.val_loss,
        rec.parameters,
        rec.created_at,
        rec.updated_at,
        rec.detail,
        json.dumps(rec.degraded),
        rec.last_sequence,
        rec.worker_pid,
        rec.restarts,
        int(rec.stop_requested),
        rec.stop_reason,
        rec.stop_request_id,
        rec.stop_requested_at,
        rec.launcher,
        rec.worker,
        None if rec.event_delivery is None else rec.event_delivery.SerializeToString(deterministic=True),
        json.dumps(rec.degradations, sort_keys=True),
    )


def _from_row(row: tuple) -> RunRecord:
    d = dict(zip(_COLUMNS, row, strict=True))
    cfg = pb.RunConfig()
    cfg.ParseFromString(d["config"])
    return RunRecord(
        run_id=d["run_id"],
        request_id=d["request_id"],
        config=cfg,
        state=d["state"],
        epoch=d["epoch"],
        global_step=d["global_step"],
        val_accuracy=d["val_accuracy"],
        val_loss=d["val_loss"],
        parameters=d["parameters"],
        created_at=d["created_at"],
        updated_at=d["updated_at"],
        detail=d["detail"],
        degraded=json.loads(d["degraded"]),
        last_sequence=d["last_sequence"],
        worker_pid=d["worker_pid"],
        restarts=d["restarts"],
        stop_requested=bool(d["stop_requested"]),
        stop_reason=d["stop_reason"],
        stop_request_id=d["stop_request_id"],
        stop_requested_at=d["stop_requested_at"],
        launcher=d["launcher"],
        worker=d["worker"],
        event_delivery=(None if d["event_delivery"] is None
                        else events_pb2.EventDelivery.FromString(d["event_delivery"])),
        degradations={str(k): int(v) for k, v in json.loads(d["degradations"]).items()},
    )


def read_config(run_dir: Path) -> pb.RunConfig:
    cfg = pb.RunConfig()
    cfg.ParseFromString((run_dir / "config.pb").read_bytes())
    return cfg
