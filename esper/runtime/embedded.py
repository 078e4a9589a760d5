"""A whole platform for one command: `esper up` as a child process.

    with EmbeddedPlatform(data_dir, env={"ESPER_TEZZERET_BENCHMARK_ITERS": "0"}).start(120) as p:
        karn = KarnClient(p.endpoints["karn"], p.api_key)

For commands that need the services but not a platform someone runs (`esper karn evolve
--embedded`, the demo): the services run exactly as `esper up` runs them, in their own
process, and the command is a client like any other. `env` is added to the child's
environment (`ESPER_<PART>_<KEY>` settings); no config file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

from esper.errors import UnavailableError
from esper.runtime.endpoints import PlatformInfo


class EmbeddedPlatform:
    """`esper up` as a child process; `endpoints`, `api_key` and `nats_url` once it serves."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None,
                 log_path: Path | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.env = dict(env or {})
        self.log_path = log_path or self.data_dir / "platform.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoints: dict[str, str] = {}
        self.api_key: str | None = None
        self.nats_url: str | None = None

    def start(self, timeout_s: float) -> Self:
        """Start `esper up` and wait until it serves (its endpoints file appears).

        Raises:
            UnavailableError: it exited first, or did not serve within `timeout_s` (then it
                is stopped); its log says why.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        PlatformInfo.path(self.data_dir).unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "esper.cli", "up", "--data-dir", str(self.data_dir)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
            )
        deadline = time.monotonic() + timeout_s
        while (info := PlatformInfo.read(self.data_dir)) is None:
            if self.proc.poll() is not None:
                raise UnavailableError(
                    f"`esper up` exited with {self.proc.returncode} before serving; see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise UnavailableError(f"`esper up` did not serve within {timeout_s:.0f}s; see {self.log_path}")
            time.sleep(0.2)
        self.endpoints = dict(info.endpoints)
        self.nats_url = info.nats_url
        self.api_key = info.admin_key()
        return self

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM (NOT_SERVING → drain → the run supervisor checkpoints its workers →
        exit), then SIGKILL after `grace_s`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["EmbeddedPlatform"]
