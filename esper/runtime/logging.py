"""Structured logs: one JSON object per line on stderr.

Every record carries ts, level, logger and msg; fields passed as `extra={"fields": {...}}`
are merged in, so a call log line (the access log: one per call, whatever its outcome)
reads
`{"ts": ..., "level": "INFO", "logger": "esper.rpc", "msg": "rpc", "method": "/esper.urza.v1.UrzaService/GetBlueprint", "code": "OK", "latency_ms": 0.21, "trace_id": "...", "key_id": "1a2b3c4d"}`
(`key_id`: see `esper.runtime.auth.key_id`; "" when no key was sent, "unknown" for a key
that matches none).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import IO, Any

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


_HANDLER_MARK = "_esper_json"
_call_stream: IO[str] | None = None


def configure_logging(level: str = "INFO", stream: IO[str] | None = None) -> None:
    """Send every log record as JSON lines to `stream` (stderr by default). Idempotent.

    Raises:
        ValueError: `level` is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL.
    """
    level = level.upper()
    if level not in _LEVELS:
        raise ValueError(f"log level must be one of {_LEVELS}, got {level!r}")
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _HANDLER_MARK, False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level)
    global _call_stream
    call_log.flush()
    _call_stream = handler.stream


def log_event(logger: logging.Logger, level: int, msg: str, **fields: Any) -> None:
    """Log `msg` with structured fields (cheap when the level is disabled)."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, extra={"fields": fields})


_rpc_log = logging.getLogger("esper.rpc")


class CallLog:
    """The one-line-per-call log, written in batches.

    Going through `logging` costs ≈ 30 µs a call here (record, lock, format, write and
    flush per line) — most of the budget of a 0.4 ms round trip. When configure_logging()
    owns the output, lines of the same JSON shape are built directly and written from the
    event loop at most every 50 ms (or every 256 lines); otherwise, or outside an event
    loop, they go through the `esper.rpc` logger like any other record. Either way the
    `esper.rpc` logger's level decides whether they are written.
    """

    FLUSH_EVERY_S = 0.05
    MAX_BUFFERED = 256

    def __init__(self) -> None:
        self._buf: list[str] = []
        self._scheduled = False

    def emit(self, method: str, code: str, latency_ms: float, trace_id: str, key_id: str = "") -> None:
        """One access-log line. `method` must need no JSON escaping (a proto path does;
        pass a path a client made up through `json_safe` first)."""
        if not _rpc_log.isEnabledFor(logging.INFO):
            return
        stream = _call_stream
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if stream is None or loop is None:
            _rpc_log.info("rpc", extra={"fields": {
                "method": method, "code": code, "latency_ms": latency_ms, "trace_id": trace_id,
                "key_id": key_id}})
            return
        # method is a proto path, code a StatusCode name, trace_id and key_id hex: none
        # needs JSON escaping.
        self._buf.append(
            f'{{"ts": {time.time():.6f}, "level": "INFO", "logger": "esper.rpc", "msg": "rpc", '
            f'"method": "{method}", "code": "{code}", "latency_ms": {latency_ms}, "trace_id": "{trace_id}", '
            f'"key_id": "{key_id}"}}\n'
        )
        if len(self._buf) >= self.MAX_BUFFERED:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_later(self.FLUSH_EVERY_S, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._buf:
            return
        lines, self._buf = self._buf, []
        stream = _call_stream or sys.stderr
        stream.write("".join(lines))
        stream.flush()


call_log = CallLog()


def json_safe(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters and escaped so it can sit between JSON quotes."""
    return json.dumps(text[:limit])[1:-1]


class RateLimitedLog:
    """A log that writes at most `burst` records per `window_s` and counts the rest.

    For records a caller can trigger at will (undecodable requests): without a bound,
    anyone who can reach the port could fill the disk. The first record after a window
    with drops carries `suppressed` (how many were dropped). Not thread-safe; used from
    the event loop.
    """

    def __init__(self, logger: logging.Logger, *, burst: int = 10, window_s: float = 60.0) -> None:
        self.logger = logger
        self.burst = burst
        self.window_s = window_s
        self._window_start = -float("inf")
        self._written = 0
        self.suppressed = 0
        """Records dropped in the current window."""
        self.suppressed_total = 0

    def warning(self, msg: str, **fields: Any) -> bool:
        """Log `msg` unless this window's budget is spent; True when it was written."""
        now = time.monotonic()
        if now - self._window_start >= self.window_s:
            if self.suppressed:
                fields["suppressed"] = self.suppressed
            self._window_start, self._written, self.suppressed = now, 0, 0
        if self._written >= self.burst:
            self.suppressed += 1
            self.suppressed_total += 1
            return False
        self._written += 1
        if fields.get("suppressed"):
            msg = f"{msg} ({fields['suppressed']} similar record(s) suppressed before this one)"
        self.logger.warning(msg, extra={"fields": fields})
        return True
