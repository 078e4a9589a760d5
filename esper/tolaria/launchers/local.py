"""Workers as processes on Tolaria's machine: forked from a preloaded helper, or spawned.

"fork" (the default) keeps a helper (esper.tolaria.forkserver) that imported the worker
module and ran its `preload()`, and forks it per run: StartRun → first epoch in about a
second instead of ten. "spawn" starts a fresh interpreter. Either way a run is its own
process with its own pid, and its environment is Tolaria's minus every credential
(`worker_environment`) plus the run's own token.

A run with `world_size` N > 1 is spawned under torchrun's elastic agent:
``python -m torch.distributed.run --standalone --nproc-per-node N --max-restarts K -m
<worker module> ...`` (K: the restarts the supervisor has left for the run). The agent is
the process the supervisor watches, in a session of its own so that a kill reaches every
rank; the agent restarts all ranks when one dies, and they resume from rank 0's newest
checkpoint. Several nodes would run the same command on each node with ``--nnodes M
--node-rank i --rdzv-backend c10d --rdzv-endpoint <host:port>`` instead of ``--standalone``
(not done by this launcher: it places processes on Tolaria's machine only).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys

from esper.fsutil import pid_alive as alive  # `alive` is what the supervisor and fork server import
from esper.tolaria.forkserver import ForkedWorker, ForkServer
from esper.tolaria.launchers import LaunchSpec, Worker, worker_environment

log = logging.getLogger(__name__)


class LocalWorker(Worker):
    """A worker process this Tolaria started (its child, or the fork server's)."""

    def __init__(self, proc: subprocess.Popen[bytes] | ForkedWorker, how: str) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.name = f"pid {proc.pid}"
        self.how = how
        """"forked" or "spawned ..." (for the log)."""

    def exit_status(self) -> tuple[bool, str]:
        rc = self.proc.poll()
        if rc is None:
            return False, ""
        # A forked worker whose fork server died first: gone, status unknown.
        return True, describe_rc(None if getattr(self.proc, "lost", False) else rc)

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    async def kill(self) -> None:
        self.proc.kill()

    async def reap(self, grace_s: float) -> None:
        await asyncio.to_thread(_reap, self.proc, grace_s)


class RankedWorker(LocalWorker):
    """torchrun's elastic agent of a data-parallel run, leader of its own session: SIGTERM
    goes to the agent (which passes it to every rank: they checkpoint and stop together),
    a kill goes to the whole session, so no rank outlives it."""

    async def kill(self) -> None:
        _kill_session(self.proc.pid)

    async def reap(self, grace_s: float) -> None:
        await asyncio.to_thread(_reap_session, self.proc, grace_s)


def torchrun_command(spec: LaunchSpec) -> list[str]:
    """The elastic agent's command line for a run of `spec.world_size` ranks on this node."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={spec.world_size}", f"--max-restarts={spec.restarts_left}",
            # A dead rank is noticed within half a second (the default polls every 0.1 s,
            # which is a busy loop beside the ranks on a small machine).
            "--monitor-interval=0.5",
            "-m", spec.module, *spec.argv]


class AdoptedWorker(Worker):
    """A live worker of an earlier Tolaria process: not our child, watched by its pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.name = f"pid {pid}"

    def exit_status(self) -> tuple[bool, str]:
        return (not alive(self.pid)), describe_rc(None)

    async def terminate(self) -> None:
        if alive(self.pid):
            os.kill(self.pid, signal.SIGTERM)

    async def kill(self) -> None:
        if alive(self.pid):
            if _leads_session(self.pid):  # a data-parallel run's torchrun agent: its ranks too
                _kill_session(self.pid)
            else:
                os.kill(self.pid, signal.SIGKILL)

    async def reap(self, grace_s: float) -> None:
        return None  # not ours to wait for


class LocalLauncher:
    """Starts workers on this machine ("fork" through the fork server, or "spawn")."""

    kind = "local"
    places_gpus = False
    runs_ranks = True
    """Runs with world_size > 1 start under torchrun (see the module docstring)."""

    def __init__(self, mode: str, module: str, *, fork_wait_s: float = 60.0) -> None:
        self.mode = mode
        self.fork_wait_s = fork_wait_s
        # The helper's own environment is what every forked worker's /proc/<pid>/environ
        # shows: it gets the scrubbed one, never Tolaria's keys.
        self.forks = ForkServer(module, env=worker_environment(os.environ, {})) if mode == "fork" else None

    def start(self) -> None:
        """Start the fork server now, so it is preloaded by the time runs come."""
        if self.forks is not None:
            self.forks.start()

    async def wait_ready(self) -> None:
        """Right after the service started the fork server is still preloading: waiting for
        it beats spawning a worker that imports torch alongside it on the same cores."""
        if self.forks is not None and self.forks.alive() and not self.forks.ready():
            await asyncio.to_thread(self.forks.wait_ready, self.fork_wait_s)

    async def launch(self, spec: LaunchSpec) -> LocalWorker:
        env = worker_environment(os.environ, spec.env)
        argv = list(spec.argv)
        log_path = spec.run_dir / "worker.log"
        if spec.world_size > 1:
            return self._launch_ranks(spec, env, log_path)
        proc: subprocess.Popen[bytes] | ForkedWorker | None = None
        how = "spawned"
        if self.forks is not None:
            proc = self.forks.spawn(argv, env=env, log_path=log_path)
            how = "forked" if proc is not None else "spawned (the fork server is not ready)"
        if proc is None:
            # Both return at once (a local file, a fork+exec): no reason to leave the loop.
            out = open(log_path, "ab")  # noqa: SIM115, ASYNC230 - handed to the child
            try:
                proc = subprocess.Popen(  # noqa: ASYNC220
                    [sys.executable, "-m", spec.module, *argv], env=env, stdout=out,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            finally:
                out.close()
        return LocalWorker(proc, how)

    def _launch_ranks(self, spec: LaunchSpec, env: dict[str, str], log_path: Path) -> RankedWorker:
        # Never forked: the agent starts fresh interpreters for its ranks anyway.
        out = open(log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(torchrun_command(spec), env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            out.close()
        return RankedWorker(proc, f"spawned under torchrun ({spec.world_size} ranks)")

    async def cleanup(self, run_id: str) -> None:
        """Nothing outlives a local worker: its credential was only in its environment."""

    def close(self) -> None:
        if self.forks is not None:
            self.forks.close()


def _reap(proc: subprocess.Popen[bytes] | ForkedWorker, grace_s: float) -> None:
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        log.warning("worker pid %d still alive after its run ended; killing it", proc.pid)
        proc.kill()
        proc.wait()


def _leads_session(pid: int) -> bool:
    try:
        return os.getsid(pid) == pid
    except ProcessLookupError:
        return False


def _kill_session(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap_session(proc: subprocess.Popen[bytes] | ForkedWorker, grace_s: float) -> None:
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        log.warning("torchrun agent pid %d still alive after its run ended; killing its ranks", proc.pid)
        _kill_session(proc.pid)
        proc.wait()


def describe_rc(rc: int | None) -> str:
    if rc is None:
        return "an unknown status"
    if rc < 0:
        return f"signal {signal.Signals(-rc).name}"
    return f"status {rc}"
