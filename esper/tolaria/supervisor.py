"""Run supervision: one worker subprocess per run, restarted from its checkpoint when it dies.

The plain-Python core behind `TolariaService`. A worker is
``python -m esper.tolaria.worker --run-dir <dir> ...``; it appends every event to the
run's event log, and the supervisor folds those events into the run record. A worker
that dies without writing a terminal run state (SIGKILL, OOM, crash) is started again
with the same run dir, so it resumes from its last checkpoint; after
`max_restarts` the run is marked failed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esper.config import reject_unknown_keys
from esper.errors import FailedPreconditionError, ResourceExhaustedError
from esper.tolaria.forkserver import ForkedWorker, ForkServer
from esper.tolaria.runs import (
    EventLog,
    RunRecord,
    RunStore,
    apply_event,
    new_envelope,
)
from generated.esper.oona.v1 import events_pb2
from generated.esper.tolaria.v1 import tolaria_service_pb2 as pb

log = logging.getLogger(__name__)

TERMINAL_STATE_NAMES = frozenset({"succeeded", "failed", "stopped"})


@dataclass(kw_only=True, frozen=True)
class SupervisorConfig:
    """How workers are started and watched."""

    max_restarts: int = 3
    """Worker deaths without a terminal state that are answered with a restart."""
    poll_interval_s: float = 0.1
    """How often the event log and the worker process are checked."""
    stop_grace_s: float = 30.0
    """Seconds a worker gets to checkpoint and exit after SIGTERM before SIGKILL."""
    max_active_runs: int = 4
    """Runs with a live worker at once; StartRun beyond it is RESOURCE_EXHAUSTED. Each
    worker trains on its own process, so size this to the machine's cores."""
    worker_module: str = "esper.tolaria.worker"
    """Module run as ``python -m <module> --run-dir ...``; tests swap in a scripted worker."""
    launcher: str = "fork"
    """"fork": each worker is forked from a helper that has imported the worker module
    and run its `preload()` (esper.tolaria.forkserver: StartRun → first epoch in about a
    second instead of ten); "spawn": each worker is a fresh interpreter. Either way a run
    is its own process; if the helper cannot fork, workers are spawned."""
    fork_wait_s: float = 60.0
    """How long a launch waits for a fork server that is still preloading (right after the
    service starts) before it spawns the worker instead."""

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts={self.max_restarts!r}: must be >= 0")
        if not 0 < self.poll_interval_s <= 5:
            raise ValueError(f"poll_interval_s={self.poll_interval_s!r}: must be in (0, 5]")
        if self.max_active_runs < 1:
            raise ValueError(f"max_active_runs={self.max_active_runs!r}: must be >= 1")
        if self.stop_grace_s <= 0:
            raise ValueError(f"stop_grace_s={self.stop_grace_s!r}: must be > 0")
        if not self.worker_module or not all(p.isidentifier() for p in self.worker_module.split(".")):
            raise ValueError(f"worker_module={self.worker_module!r}: must be a dotted module name")
        if self.launcher not in ("fork", "spawn"):
            raise ValueError(f"launcher={self.launcher!r}: must be 'fork' or 'spawn'")
        if not 0 <= self.fork_wait_s <= 600:
            raise ValueError(f"fork_wait_s={self.fork_wait_s!r}: must be in [0, 600]")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SupervisorConfig:
        reject_unknown_keys(cls, data, "tolaria supervisor settings")
        return cls(**data)


@dataclass(kw_only=True)
class _Live:
    proc: subprocess.Popen[bytes] | ForkedWorker | None
    task: asyncio.Task[None] | None = None
    offset: int = 0


class RunSupervisor:
    """Starts, watches, restarts and stops run workers. Lives on one asyncio loop."""

    def __init__(
        self,
        store: RunStore,
        *,
        endpoints: dict[str, str],
        nats_url: str | None,
        api_key: str | None,
        validate: Callable[[pb.RunConfig], None],
        config: SupervisorConfig | None = None,
        worker_args: list[str] | None = None,
    ) -> None:
        self.store = store
        self.endpoints = endpoints
        self.nats_url = nats_url
        self.api_key = api_key
        self.validate = validate
        self.config = config or SupervisorConfig()
        self.worker_args = worker_args or []
        self._live: dict[str, _Live] = {}
        self._closing = False
        self.forks = ForkServer(self.config.worker_module) if self.config.launcher == "fork" else None

    def start(self) -> None:
        """Start the fork server now, so it is preloaded by the time runs come."""
        if self.forks is not None:
            self.forks.start()

    # ---- lifecycle of the supervisor itself ----------------------------------------
    async def resume_active(self) -> None:
        """After a service restart: watch runs that were still going, restarting dead workers."""
        for rec in self.store.active():
            pid = rec.worker_pid
            if pid is not None and _alive(pid):
                # Not our child: it cannot be waited on, only watched until it is gone.
                self._watch(rec.run_id, None)
            else:
                rec.restarts += 1
                self.store.update(rec)
                env = new_envelope(rec.run_id, source="tolaria", step=rec.global_step, epoch=rec.epoch)
                env.degradation.component = "worker"
                env.degradation.kind = "restarted"
                env.degradation.detail = (
                    f"the service restarted and worker pid {rec.worker_pid} was gone; "
                    "resuming from the last checkpoint")
                self._append(rec, env)
                await self._spawn(rec, traceparent=None, why="after a service restart")

    async def close(self) -> None:
        """Ask every worker to checkpoint and stop, then wait for them."""
        self._closing = True
        for run_id, live in list(self._live.items()):
            rec = self.store.get(run_id)
            if live.proc is not None and live.proc.poll() is None:
                rec.stop_requested = True
                self.store.update(rec)
                live.proc.send_signal(signal.SIGTERM)
        for live in list(self._live.values()):
            if live.task is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(live.task), self.config.stop_grace_s)
                except TimeoutError:
                    if live.proc is not None:
                        log.warning("worker pid %s ignored SIGTERM; killing it", live.proc.pid)
                        live.proc.kill()
                    live.task.cancel()
        if self.forks is not None:
            await asyncio.to_thread(self.forks.close)

    # ---- RPC cores ----------------------------------------------------------------
    async def start_run(
        self, config: pb.RunConfig, *, request_id: str | None, traceparent: str | None
    ) -> RunRecord:
        if self._closing:
            raise FailedPreconditionError("the Tolaria service is shutting down; retry elsewhere")
        self.validate(config)
        # A retried StartRun (same request_id) gets its run back even when the pool is full.
        # No await between this check and taking the slot (`_live`): two calls cannot both
        # take the last one.
        replay = bool(request_id) and self.store.by_request_id(request_id) is not None
        if not replay and len(self._live) >= self.config.max_active_runs:
            raise ResourceExhaustedError(
                f"{len(self._live)} runs are already active, the most this Tolaria runs at "
                f"once (tolaria.supervisor.max_active_runs={self.config.max_active_runs}); "
                "retry when one ends, stop one with StopRun, or raise the limit")
        rec, created = self.store.create(config, request_id=request_id)
        if created:
            env = new_envelope(rec.run_id, source="tolaria")
            env.run_state.state = "pending"
            env.run_state.detail = "accepted; starting a worker"
            self._append(rec, env)
            self._live[rec.run_id] = _Live(proc=None)
            await self._spawn(rec, traceparent=traceparent, why="")
        return self.store.get(rec.run_id)

    def get_run(self, run_id: str) -> RunRecord:
        """The run as of its last logged event (WatchRun may already have shown it)."""
        rec = self.store.get(run_id)
        live = self._live.get(run_id)
        if live is not None:
            # Same loop as the monitor: folding the unread tail here cannot race it.
            live.offset = self._fold(rec, self.store.event_log(run_id), live.offset)
        return rec

    def list_runs(self, *, page_size: int, page_token: str, state: int) -> tuple[list[RunRecord], str]:
        """A page of runs, every live run's record brought up to its log first."""
        for run_id in list(self._live):
            self.get_run(run_id)
        return self.store.list(page_size=page_size, page_token=page_token, state=state)

    async def stop_run(self, run_id: str, reason: str) -> RunRecord:
        rec = self.get_run(run_id)
        if rec.ended:
            raise FailedPreconditionError(
                f"run {run_id} already ended in state {pb.RunState.Name(rec.state)}; "
                "only pending or running runs can be stopped"
            )
        rec.stop_requested = True
        self.store.update(rec)
        live = self._live.get(run_id)
        if live is not None and live.proc is not None and live.proc.poll() is None:
            # The worker checkpoints at its next step boundary and records "stopped".
            live.proc.send_signal(signal.SIGTERM)
        elif rec.worker_pid is not None and _alive(rec.worker_pid):
            os.kill(rec.worker_pid, signal.SIGTERM)
        else:
            env = new_envelope(run_id, source="tolaria")
            env.run_state.state = "stopped"
            env.run_state.detail = reason or "stopped before a worker was running"
            self._append(rec, env)
        return self.store.get(run_id)

    async def watch(self, run_id: str, from_sequence: int) -> AsyncIterator[events_pb2.EventEnvelope]:
        """Replay the run's events from `from_sequence`, then follow until the run ends."""
        rec = self.store.get(run_id)
        elog = self.store.event_log(run_id)
        offset = 0
        while True:
            events, offset = elog.read(offset)
            for env in events:
                if env.sequence < from_sequence:
                    continue
                yield env
                if env.WhichOneof("payload") == "run_state" and env.run_state.state in TERMINAL_STATE_NAMES:
                    return
            if not events:
                rec = self.store.get(run_id)
                if rec.ended and rec.last_sequence < from_sequence:
                    return
                await asyncio.sleep(self.config.poll_interval_s)

    # ---- workers ------------------------------------------------------------------
    async def _spawn(self, rec: RunRecord, *, traceparent: str | None, why: str) -> None:
        if self.forks is not None and self.forks.alive() and not self.forks.ready():
            # Right after the service started, the fork server is still preloading: waiting
            # for it beats spawning a worker that imports torch alongside it on the same cores.
            await asyncio.to_thread(self.forks.wait_ready, self.config.fork_wait_s)
            rec = self.store.get(rec.run_id)
            if rec.ended or self._closing:  # stopped (or shutting down) while it waited
                live = self._live.get(rec.run_id)
                if live is not None and live.task is None:
                    self._live.pop(rec.run_id, None)
                return
        run_dir = self.store.run_dir(rec.run_id)
        cmd = [
            sys.executable,
            "-m",
            self.config.worker_module,
            "--run-dir",
            str(run_dir),
            "--endpoints",
            json.dumps(self.endpoints),
            *self.worker_args,
        ]
        if self.nats_url:
            cmd += ["--nats-url", self.nats_url]
        env = dict(os.environ)
        if self.api_key:
            env["ESPER_API_KEY"] = self.api_key
        if traceparent:
            env["TRACEPARENT"] = traceparent
            (run_dir / "traceparent").write_text(traceparent)
        elif (run_dir / "traceparent").exists():
            # A restarted worker stays in the trace of the StartRun that created the run.
            env["TRACEPARENT"] = (run_dir / "traceparent").read_text().strip()
        proc: subprocess.Popen[bytes] | ForkedWorker | None = None
        if self.forks is not None:
            proc = self.forks.spawn(cmd[3:], env=env, log_path=run_dir / "worker.log")
            how = "forked" if proc is not None else "spawned (the fork server is not ready)"
        else:
            how = "spawned"
        if proc is None:
            # Both return at once (a local file, a fork+exec): no reason to leave the loop.
            out = open(run_dir / "worker.log", "ab")  # noqa: SIM115, ASYNC230 - handed to the child
            try:
                proc = subprocess.Popen(  # noqa: ASYNC220
                    cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            finally:
                out.close()
        rec = self.store.get(rec.run_id)
        rec.worker_pid = proc.pid
        self.store.update(rec)
        log.info("run %s: worker pid %d %s %s", rec.run_id, proc.pid, how, why)
        self._watch(rec.run_id, proc)

    def _watch(self, run_id: str, proc: subprocess.Popen[bytes] | ForkedWorker | None) -> None:
        live = self._live.get(run_id)
        if live is None:
            live = self._live[run_id] = _Live(proc=proc)
        else:
            live.proc = proc
        if live.task is None or live.task.done():
            live.task = asyncio.get_running_loop().create_task(self._monitor(run_id))

    def worker_pid(self, run_id: str) -> int | None:
        live = self._live.get(run_id)
        if live is None or live.proc is None:
            return None
        return live.proc.pid

    async def _monitor(self, run_id: str) -> None:
        live = self._live[run_id]
        elog = self.store.event_log(run_id)
        while True:
            rec = self.store.get(run_id)
            live.offset = self._fold(rec, elog, live.offset)
            if rec.ended:
                if live.proc is not None:
                    await asyncio.to_thread(_reap, live.proc, self.config.stop_grace_s)
                self._live.pop(run_id, None)
                return
            exited, rc = _exited(live, rec)
            if not exited:
                await asyncio.sleep(self.config.poll_interval_s)
                continue
            # The worker may have appended its last events just before exiting.
            live.offset = self._fold(rec, elog, live.offset)
            if rec.ended:
                continue
            why = f"worker pid {rec.worker_pid} exited with {_describe_rc(rc)} before the run ended"
            if self._closing:
                return
            if rec.stop_requested:
                self._finish(rec, "stopped", why + "; stop was requested")
            elif rec.restarts < self.config.max_restarts:
                rec.restarts += 1
                self.store.update(rec)
                env = new_envelope(run_id, source="tolaria", step=rec.global_step, epoch=rec.epoch)
                env.degradation.component = "worker"
                env.degradation.kind = "restarted"
                env.degradation.detail = (
                    f"{why}; restart {rec.restarts}/{self.config.max_restarts} from the last checkpoint"
                )
                self._append(rec, env)
                # _spawn hands the new process to this monitor (live.proc), which goes on.
                await self._spawn(rec, traceparent=None, why=f"(restart {rec.restarts})")
            else:
                self._finish(rec, "failed", why + f"; gave up after {rec.restarts} restarts")

    def _fold(self, rec: RunRecord, elog: EventLog, offset: int) -> int:
        events, new_offset = elog.read(offset)
        if events:
            for env in events:
                apply_event(rec, env)
            self.store.update(rec)
        return new_offset

    def _finish(self, rec: RunRecord, state: str, detail: str) -> None:
        env = new_envelope(rec.run_id, source="tolaria", step=rec.global_step, epoch=rec.epoch)
        env.run_state.state = state
        env.run_state.detail = detail
        self._append(rec, env)

    def _append(self, rec: RunRecord, env: events_pb2.EventEnvelope) -> None:
        """Record an event of the service's own (only while no worker is writing)."""
        elog = self.store.event_log(rec.run_id)
        try:
            elog.append(env, sync=True)
        finally:
            elog.close()
        fresh = self.store.get(rec.run_id)
        apply_event(fresh, env)
        self.store.update(fresh)
        apply_event(rec, env)


def _alive(pid: int) -> bool:
    """Whether `pid` is a running process (a zombie, exited but not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # /proc/<pid>/stat: "pid (comm) S ..."; comm may hold spaces, the state follows ")".
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no procfs: kill(0) is all we know
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _exited(live: _Live, rec: RunRecord) -> tuple[bool, int | None]:
    if live.proc is not None:
        rc = live.proc.poll()
        if rc is None:
            return False, None
        # A forked worker whose fork server died first: gone, status unknown.
        return True, None if getattr(live.proc, "lost", False) else rc
    return (rec.worker_pid is None or not _alive(rec.worker_pid)), None


def _reap(proc: subprocess.Popen[bytes] | ForkedWorker, grace_s: float) -> None:
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        log.warning("worker pid %d still alive after its run ended; killing it", proc.pid)
        proc.kill()
        proc.wait()


def _describe_rc(rc: int | None) -> str:
    if rc is None:
        return "an unknown status"
    if rc < 0:
        return f"signal {signal.Signals(-rc).name}"
    return f"status {rc}"

