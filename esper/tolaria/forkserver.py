"""A warm launcher for run workers: one process per run, forked from a preloaded parent.

Spawning `python -m esper.tolaria.worker` costs seconds before the first step (importing
torch and the platform, generating the built-in data sets) — most of StartRun's latency.
`ForkServer` keeps one long-lived helper process (``python -m esper.tolaria.forkserver``)
that has imported the worker module and run its `preload()` hook, and forks it once per
run. Each run is still its own process with its own pid: SIGTERM/SIGKILL, restarts and
adoption by a restarted service work as with a spawned worker.

The helper speaks JSON lines over its stdin/stdout: requests
``{"op": "spawn", "id": n, "module", "argv", "env", "log"}``; replies ``{"op": "ready"}``
(preload done), ``{"op": "spawned", "id": n, "pid"}``, ``{"op": "error", "id": n,
"error"}``, and ``{"op": "exited", "pid", "status"}`` (Popen's convention: -N for signal N)
when a child ends. It is single-threaded and never touches torch itself, so forking it is
safe; it exits when its stdin closes (its children keep running, as spawned workers do).

While the helper preloads (~10 s after the service starts) a launch waits for it; if it
died, workers are spawned the old way (and a new helper starts), and the log says so.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

SPAWN_REPLY_TIMEOUT_S = 5.0
"""How long a spawn request may wait for the helper's fork (normally milliseconds)."""


class ForkedWorker:
    """A worker forked by the helper: the parts of `subprocess.Popen` the supervisor uses.

    Its exit status arrives from the helper (which is its parent). If the helper died
    first, the status is lost: `poll()` then reports the process gone once it is, and
    `lost` is True.
    """

    def __init__(self, pid: int, helper: subprocess.Popen[bytes]) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.lost = False
        self._helper = helper
        """The helper that forked it (a restarted helper knows nothing of this child)."""
        self._done = threading.Event()

    def _exited(self, status: int) -> None:
        self.returncode = status
        self._done.set()

    def poll(self) -> int | None:
        if self.returncode is None and self._helper.poll() is not None:
            from esper.tolaria.launchers.local import alive  # here: that module imports this one

            if not alive(self.pid):
                self.lost = True
                self._exited(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(f"worker pid {self.pid}", timeout or 0.0)
            self._done.wait(0.05 if left is None else min(0.05, left))
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The supervisor's side: starts the helper, asks it to fork, hears exit statuses."""

    def __init__(self, module: str, *, env: dict[str, str] | None = None) -> None:
        self.module = module
        self.env = dict(os.environ) if env is None else dict(env)
        """The helper's environment (forked workers get their own, but /proc/<pid>/environ
        of a fork shows the helper's: the launcher passes one without credentials)."""
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._replies: dict[int, dict[str, Any]] = {}
        self._reply_cv = threading.Condition()
        self._workers: dict[int, ForkedWorker] = {}
        self._early_exits: dict[int, int] = {}
        self._next_id = 0
        self._reader: threading.Thread | None = None
        self._failed_preloads = 0

    MAX_FAILED_PRELOADS = 2
    """Helpers that may die before ever being ready before no new one is started (a preload
    that fails, fails again: every run would pay for a doomed helper)."""

    def start(self) -> None:
        """Start the helper (it preloads in the background); a no-op while one runs."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return
            if self._proc is not None and not self._ready.is_set():
                self._failed_preloads += 1
            if self._failed_preloads >= self.MAX_FAILED_PRELOADS:
                if self._failed_preloads == self.MAX_FAILED_PRELOADS:
                    self._failed_preloads += 1
                    log.error("fork server: %d helpers died while preloading %s; workers are "
                              "spawned from now on (see the service's log for why)",
                              self.MAX_FAILED_PRELOADS, self.module)
                return
            self._ready.clear()
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "esper.tolaria.forkserver", self.module],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, env=self.env)
            self._reader = threading.Thread(target=self._read, args=(self._proc,),
                                            name="forkserver-reader", daemon=True)
            self._reader.start()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def ready(self) -> bool:
        return self._ready.is_set() and self.alive()

    def wait_ready(self, timeout: float) -> bool:
        """Block until the helper is ready (True), dies, or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        while not self._ready.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
            if not self.alive() or time.monotonic() >= deadline:
                return False
        return self.alive()

    def spawn(self, argv: Sequence[str], *, env: dict[str, str], log_path: Path) -> ForkedWorker | None:
        """Fork a worker running `python -m <module> *argv`; None when the helper cannot
        (not ready yet, or dead: it is restarted for the next run)."""
        if not self.ready():
            if not self.alive():
                self.start()
            return None
        with self._lock:
            self._next_id += 1
            rid = self._next_id
            proc = self._proc
        assert proc is not None and proc.stdin is not None
        request = {"op": "spawn", "id": rid, "module": self.module, "argv": list(argv),
                   "env": env, "log": str(log_path)}
        try:
            proc.stdin.write((json.dumps(request) + "\n").encode())
            proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            log.warning("fork server: request failed (%s); spawning instead", e)
            return None
        with self._reply_cv:
            ok = self._reply_cv.wait_for(lambda: rid in self._replies or not self.alive(),
                                         SPAWN_REPLY_TIMEOUT_S)
            reply = self._replies.pop(rid, None)
        if not ok or reply is None:
            log.warning("fork server: no answer to spawn request %d; spawning instead", rid)
            return None
        if reply["op"] != "spawned":
            log.warning("fork server: could not fork (%s); spawning instead", reply.get("error"))
            return None
        pid = int(reply["pid"])
        with self._lock:
            worker = self._workers[pid] = ForkedWorker(pid, proc)
            if pid in self._early_exits:  # it ended before this thread registered it
                worker._exited(self._early_exits.pop(pid))
        return worker

    def close(self, timeout: float = 5.0) -> None:
        """Stop the helper now (its children keep running; it holds no state of its own).

        It is terminated rather than asked: one still preloading would not read its stdin
        for seconds, and a service's shutdown must not wait for that.
        """
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._reader is not None:
            self._reader.join(timeout)

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            try:
                msg = json.loads(raw)
            except ValueError:
                log.warning("fork server: unreadable line %r", raw[:200])
                continue
            op = msg.get("op")
            if op == "ready":
                log.info("fork server pid %d ready (preloaded %s)", proc.pid, self.module)
                self._ready.set()
            elif op in ("spawned", "error"):
                with self._reply_cv:
                    self._replies[int(msg["id"])] = msg
                    self._reply_cv.notify_all()
            elif op == "exited":
                pid, status = int(msg["pid"]), int(msg["status"])
                with self._lock:
                    worker = self._workers.pop(pid, None)
                    if worker is None:
                        self._early_exits[pid] = status
                if worker is not None:
                    worker._exited(status)
        with self._reply_cv:
            self._reply_cv.notify_all()  # a spawn waiting on a dead helper gives up now
        log.info("fork server pid %d exited with %s", proc.pid, proc.wait())


# ---- the helper process -----------------------------------------------------------------

def _child(module: str, argv: list[str], env: dict[str, str], log_path: str, protocol_fd: int) -> None:
    """In the forked child: become `python -m module *argv`; never returns."""
    code = 1
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # replaces the helper's request pipe
        os.close(devnull)
        os.close(protocol_fd)
        logfd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(logfd, 1)
        os.dup2(logfd, 2)
        os.close(logfd)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own stdin
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = [module, *argv]
        import runpy

        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, int | None):
                print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - report anything, as an interpreter would
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _reply(out: IO[bytes], msg: dict[str, Any]) -> None:
    out.write((json.dumps(msg) + "\n").encode())
    out.flush()


def serve(module: str) -> int:
    """The helper's main loop (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # preload output goes to stderr, not into the protocol
    mod = importlib.import_module(module)
    preload = getattr(mod, "preload", None)
    if callable(preload):
        preload()
    # Everything preloaded is permanent: without this a child's first full collection walks
    # the whole inherited heap (0.7 s measured) and unshares its copy-on-write pages.
    gc.freeze()
    _reply(out, {"op": "ready"})
    stdin = sys.stdin.buffer
    buf = b""
    children: set[int] = set()
    while True:
        readable, _, _ = select.select([stdin], [], [], 0.05)
        if readable:
            chunk = os.read(stdin.fileno(), 65536)
            if not chunk:
                return 0  # the supervisor is gone
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                try:
                    pid = os.fork()
                except OSError as e:
                    _reply(out, {"op": "error", "id": req["id"], "error": str(e)})
                    continue
                if pid == 0:
                    _child(req["module"], req["argv"], req["env"], req["log"], out.fileno())
                children.add(pid)
                _reply(out, {"op": "spawned", "id": req["id"], "pid": pid})
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            children.discard(pid)
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            _reply(out, {"op": "exited", "pid": pid, "status": code})


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1]))
