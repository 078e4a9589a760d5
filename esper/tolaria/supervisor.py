"""Run supervision: one worker per run, restarted from its checkpoint when it dies.

The plain-Python core behind `TolariaService`. A worker is
``python -m esper.tolaria.worker --run-dir <dir> ...``, started by a launcher
(esper.tolaria.launchers: a local process, forked or spawned, or a Kubernetes Job); it
appends every event to the run's event log, and the supervisor folds those events into
the run record. A worker that dies without writing a terminal run state (SIGKILL, OOM,
crash) is started again with the same run dir, so it resumes from its last checkpoint;
after `max_restarts` the run is marked failed.

Each start gets a run-scoped credential (esper.runtime.auth run token: the run's id, the
scopes its calls need, an expiry) as ESPER_API_KEY; a worker never sees Tolaria's own key
or the accepted key list. Events the supervisor writes itself (pending, restarts, a stop
or failure it decides) go to the event log and, with Nats-Msg-Id dedup, to Oona.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from esper.config import from_dict
from esper.errors import (
    AlreadyExistsError,
    EsperError,
    FailedPreconditionError,
    ResourceExhaustedError,
)
from esper.runtime.auth import RunTokenSigner
from esper.tolaria.launchers import LaunchSpec, Worker
from esper.tolaria.launchers.kubernetes import KubernetesConfig
from esper.tolaria.launchers.local import AdoptedWorker, LocalLauncher, alive
from esper.tolaria.runs import (
    TERMINAL_STATE_NAMES,
    EventLog,
    RunRecord,
    RunStore,
    apply_event,
    is_terminal,
    new_envelope,
)
from generated.esper.oona.v1 import events_pb2
from generated.esper.tolaria.v1 import tolaria_service_pb2 as pb

log = logging.getLogger(__name__)

__all__ = ["TERMINAL_STATE_NAMES", "RunSupervisor", "SupervisorConfig", "worker_scopes"]

LAUNCHERS = ("fork", "spawn", "kubernetes")


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
    """Runs not yet ended at once; StartRun beyond it is RESOURCE_EXHAUSTED. Each worker
    trains on its own process, so size this to the machine's cores (or the cluster's)."""
    worker_module: str = "esper.tolaria.worker"
    """Module run as ``python -m <module> --run-dir ...``; tests swap in a scripted worker."""
    launcher: str = "fork"
    """"fork": each worker is forked from a helper that has imported the worker module
    and run its `preload()` (esper.tolaria.forkserver: StartRun → first epoch in about a
    second instead of ten); "spawn": each worker is a fresh interpreter; "kubernetes": each
    run is its own Job (esper.tolaria.launchers.kubernetes; settings under `kubernetes`).
    Locally a run is its own process either way; if the helper cannot fork, workers are
    spawned."""
    fork_wait_s: float = 60.0
    """How long a launch waits for a fork server that is still preloading (right after the
    service starts) before it spawns the worker instead."""
    kubernetes: KubernetesConfig | None = None
    """The Job launcher's settings (required with launcher "kubernetes")."""
    credential_ttl_s: float = 86400.0
    """Lifetime of the run token each worker start gets (a restart gets a new one). A run
    still training when its token expires keeps training, without growth (its calls to
    Tamiyo and Urza are refused), until a restart; size this to the longest run."""
    policy_check_timeout_s: float = 2.0
    """Deadline of StartRun's question to Tamiyo about the policy it serves; past it the
    run is accepted (the worker asks again) and its detail says so."""

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
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher={self.launcher!r}: must be 'fork' or 'spawn' (a local process) "
                             "or 'kubernetes' (a Job per run)")
        if not 0 <= self.fork_wait_s <= 600:
            raise ValueError(f"fork_wait_s={self.fork_wait_s!r}: must be in [0, 600]")
        if self.launcher == "kubernetes" and self.kubernetes is None:
            raise ValueError("launcher='kubernetes' needs its settings under 'kubernetes' "
                             "(at least the worker image: {kubernetes: {image: ...}})")
        if not 60 <= self.credential_ttl_s <= 366 * 86400:
            raise ValueError(f"credential_ttl_s={self.credential_ttl_s!r}: must be in [60, 31622400]")
        if not 0 < self.policy_check_timeout_s <= 30:
            raise ValueError(f"policy_check_timeout_s={self.policy_check_timeout_s!r}: must be in (0, 30]")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SupervisorConfig:
        return from_dict(cls, data, what="tolaria supervisor settings")


def worker_scopes(controller: str, endpoints: dict[str, str]) -> tuple[str, ...]:
    """The scopes a run's worker calls need (its run token grants these and nothing else):
    Tamiyo GetPolicyInfo/Decide (read); Urza GetKernel/QueryKernels (read), RecordOutcome
    (write); Tezzeret EnsureKernels (write) for kernels compiled on demand. A run without a controller calls nobody."""
    if controller == "none":
        return ()
    scopes = ["tamiyo:read", "urza:read", "urza:write"]
    if "tezzeret" in endpoints:
        scopes += ["tezzeret:write"]
    return tuple(scopes)


@dataclass(kw_only=True)
class _Live:
    worker: Worker | None
    task: asyncio.Task[None] | None = None
    offset: int = 0

    @property
    def proc(self) -> Worker | None:
        return self.worker


@dataclass(kw_only=True)
class _PolicyCache:
    served: str | None = None
    at: float = field(default=-1e9)


class RunSupervisor:
    """Starts, watches, restarts and stops run workers. Lives on one asyncio loop."""

    POLICY_CACHE_S = 5.0
    """How long an answer of Tamiyo's about its policy is reused by later StartRuns."""

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
        signer: RunTokenSigner | None = None,
        launcher: Any | None = None,
    ) -> None:
        """Args:
            api_key: Tolaria's own key, for its own calls (Tamiyo's GetPolicyInfo); None:
                auth is off, and workers get no credential either.
            signer: mints each worker's run token (required when `api_key` is set).
            launcher: a launcher object (tests pass a Kubernetes launcher over a fake API);
                None: the one `config.launcher` names.
        """
        self.store = store
        self.endpoints = endpoints
        self.nats_url = nats_url
        self.api_key = api_key
        self.validate = validate
        self.config = config or SupervisorConfig()
        self.worker_args = worker_args or []
        self.signer = signer
        if launcher is None:
            if self.config.launcher == "kubernetes":
                from esper.tolaria.launchers.kubernetes import KubernetesLauncher

                assert self.config.kubernetes is not None  # SupervisorConfig checks it
                launcher = KubernetesLauncher(self.config.kubernetes, stop_grace_s=self.config.stop_grace_s)
            else:
                launcher = LocalLauncher(self.config.launcher, self.config.worker_module,
                                         fork_wait_s=self.config.fork_wait_s)
        self.launcher = launcher
        self._live: dict[str, _Live] = {}
        self._closing = False
        self.publisher: Any | None = None
        self._tamiyo: Any | None = None
        self._policy = _PolicyCache()

    @property
    def forks(self) -> Any | None:
        """The local launcher's fork server (None for "spawn" and "kubernetes")."""
        return getattr(self.launcher, "forks", None)

    def start(self) -> None:
        """Start what runs beside the runs: the fork server (so it is preloaded by the time
        runs come) and the publisher of the supervisor's own events."""
        self.launcher.start()
        if self.nats_url and self.publisher is None:
            from esper.oona.publisher import Publisher

            self.publisher = Publisher(self.nats_url, name="esper-tolaria-supervisor",
                                       on_degraded=self._bus_degraded)

    @staticmethod
    def _bus_degraded(kind: str, detail: str) -> None:
        # The supervisor's own events are in each run's log whatever the bus does; the
        # workers record their own outages in their runs.
        log.warning("oona (supervisor events): %s: %s", kind, detail)

    # ---- lifecycle of the supervisor itself ----------------------------------------
    async def resume_active(self) -> None:
        """After a service restart: watch runs that were still going, restarting dead workers."""
        for rec in self.store.active():
            worker = await self._adopt(rec)
            if worker is not None:
                self._watch(rec.run_id, worker)
                continue
            rec.restarts += 1
            self.store.update(rec)
            env = new_envelope(rec.run_id, source="tolaria", step=rec.global_step, epoch=rec.epoch)
            env.degradation.component = "worker"
            env.degradation.kind = "restarted"
            env.degradation.detail = (
                f"the service restarted and worker {rec.worker or rec.worker_pid} was gone; "
                "resuming from the last checkpoint")
            self._append(rec, env)
            self._live[rec.run_id] = _Live(worker=None)
            await self._spawn(rec, traceparent=None, why="after a service restart")

    async def _adopt(self, rec: RunRecord) -> Worker | None:
        """The worker an earlier Tolaria process started for `rec`, if it still runs."""
        if rec.launcher == "kubernetes":
            if self.launcher.kind != "kubernetes":
                log.warning("run %s was started as a Kubernetes Job, but this Tolaria launches "
                            "locally: its Job (if any) is not watched; restarting it here", rec.run_id)
                return None
            return await self.launcher.adopt(rec.run_id, restarts=rec.restarts)
        if rec.worker_pid is not None and alive(rec.worker_pid):
            # Not our child: it cannot be waited on, only watched until it is gone.
            return AdoptedWorker(rec.worker_pid)
        return None

    async def close(self) -> None:
        """Shut down: local workers are asked to checkpoint and stop (and awaited); Jobs go
        on without this process and are adopted by the next one."""
        self._closing = True
        if not getattr(self.launcher, "survives_service_restart", False):
            for run_id, live in list(self._live.items()):
                w = live.worker
                if w is not None and not w.exit_status()[0]:
                    rec = self.store.get(run_id)
                    rec.stop_requested = True
                    self.store.update(rec)
                    await w.terminate()
        for live in list(self._live.values()):
            if live.task is None:
                continue
            if getattr(self.launcher, "survives_service_restart", False):
                live.task.cancel()
                continue
            try:
                await asyncio.wait_for(asyncio.shield(live.task), self.config.stop_grace_s)
            except TimeoutError:
                if live.worker is not None:
                    log.warning("worker %s ignored SIGTERM; killing it", live.worker.name)
                    await live.worker.kill()
                live.task.cancel()
        await asyncio.to_thread(self.launcher.close)
        if self._tamiyo is not None:
            await self._tamiyo.close()
        if self.publisher is not None:
            stats = await asyncio.to_thread(self.publisher.close, 2.0)
            log.info("oona (supervisor events): %s", stats)

    # ---- RPC cores ----------------------------------------------------------------
    async def start_run(
        self, config: pb.RunConfig, *, request_id: str | None, traceparent: str | None
    ) -> RunRecord:
        from esper.tolaria.config import RunConfig

        if self._closing:
            raise FailedPreconditionError("the Tolaria service is shutting down; retry elsewhere")
        self.validate(config)
        cfg = RunConfig.from_proto(config)
        replay = bool(request_id) and self.store.by_request_id(request_id) is not None
        note = ""
        if not replay:
            if cfg.resources.gpus and not self.launcher.places_gpus:
                raise FailedPreconditionError(
                    f"config.resources.gpus={cfg.resources.gpus}: this Tolaria starts workers on "
                    f"its own machine (launcher {self.config.launcher!r}), which places no GPU; "
                    "use a Tolaria with the kubernetes launcher, or ask for no GPU",
                    metadata={"field": "config.resources.gpus", "launcher": self.config.launcher})
            if cfg.world_size > 1 and not getattr(self.launcher, "runs_ranks", False):
                raise FailedPreconditionError(
                    f"config.world_size={cfg.world_size}: the {self.config.launcher!r} launcher runs "
                    "one training process per run; use the local launcher (fork or spawn) for "
                    "data-parallel runs, or world_size 1",
                    metadata={"field": "config.world_size", "launcher": self.config.launcher})
            note = await self._check_controller(cfg.controller)
        # No await between this check and taking the slot (`_live`): two calls cannot both
        # take the last one. A retried StartRun (same request_id) gets its run back even
        # when the pool is full.
        active = self._active_count()
        if not replay and active >= self.config.max_active_runs:
            raise ResourceExhaustedError(
                f"{active} runs are already active, the most this Tolaria runs at "
                f"once (tolaria.supervisor.max_active_runs={self.config.max_active_runs}); "
                "retry when one ends, stop one with StopRun, or raise the limit")
        rec, created = self.store.create(config, request_id=request_id)
        if created:
            env = new_envelope(rec.run_id, source="tolaria")
            env.run_state.state = "pending"
            env.run_state.detail = "accepted; starting a worker" + (f"; {note}" if note else "")
            self._append(rec, env)
            self._live[rec.run_id] = _Live(worker=None)
            await self._spawn(rec, traceparent=traceparent, why="")
        return self.store.get(rec.run_id)

    def _active_count(self) -> int:
        """Runs holding a slot: live ones whose log has no terminal state yet. Each live log's
        tail is folded first, so a run that just ended never counts while its worker is
        still exiting (flushing the bus, closing traces: seconds)."""
        n = 0
        for run_id in list(self._live):
            if not self.get_run(run_id).ended:
                n += 1
        return n

    async def _check_controller(self, controller: str) -> str:
        """Refuse a controller the platform's Tamiyo does not serve; "" when it does, or a
        note for the run's detail when Tamiyo could not be asked.

        Raises:
            FailedPreconditionError: Tamiyo serves another policy (metadata field
                "config.controller").
        """
        if controller == "none" or "tamiyo" not in self.endpoints:
            return ""
        served, note = await self._served_policy()
        if served is not None and served != controller:
            raise FailedPreconditionError(
                f"config.controller={controller!r}: the platform's Tamiyo at "
                f"{self.endpoints['tamiyo']} serves policy {served!r}; ask for controller "
                f"{served!r} (or 'none'), or run a Tamiyo that serves {controller!r}",
                reason="CONTROLLER_NOT_SERVED",
                metadata={"field": "config.controller", "servedPolicy": served,
                          "requestedController": controller})
        return note

    async def _served_policy(self) -> tuple[str | None, str]:
        now = time.monotonic()
        if self._policy.served is not None and now - self._policy.at < self.POLICY_CACHE_S:
            return self._policy.served, ""
        from esper.tamiyo.client import AsyncTamiyoClient

        if self._tamiyo is None:
            self._tamiyo = AsyncTamiyoClient(self.endpoints["tamiyo"], api_key=self.api_key,
                                             timeout_s=self.config.policy_check_timeout_s)
        try:
            resp = await self._tamiyo.policy_info()
        except EsperError as err:
            return None, (f"could not ask Tamiyo which policy it serves ({err.reason}: {err}); "
                          "the worker asks again when it starts")
        self._policy = _PolicyCache(served=resp.policy, at=now)
        return resp.policy, ""

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

    async def stop_run(self, run_id: str, reason: str, *, request_id: str | None = None) -> RunRecord:
        """Ask the run's worker to stop; the record says so (`stop_requested`, the first
        reason). A retry (same `request_id`) gets the run back whatever happened since.

        Raises:
            NotFoundError: no such run.
            AlreadyExistsError: `request_id` stopped another run.
            FailedPreconditionError: the run already ended (and this is no retry).
        """
        if request_id:
            prior = self.store.by_stop_request_id(request_id)
            if prior is not None:
                if prior.run_id != run_id:
                    raise AlreadyExistsError(
                        f"request_id {request_id!r} was already used to stop run {prior.run_id}; "
                        "use a new request_id for another StopRun")
                return self.get_run(run_id)
        rec = self.get_run(run_id)
        if rec.ended:
            raise FailedPreconditionError(
                f"run {run_id} already ended in state {pb.RunState.Name(rec.state)}; "
                "only pending or running runs can be stopped"
            )
        if not rec.stop_requested:
            rec.stop_requested = True
            rec.stop_reason = reason
            rec.stop_requested_at = time.time()
        if request_id and rec.stop_request_id is None:
            rec.stop_request_id = request_id
        self.store.update(rec)
        live = self._live.get(run_id)
        if live is not None and live.worker is not None and not live.worker.exit_status()[0]:
            # The worker checkpoints at its next step boundary and records "stopped".
            await live.worker.terminate()
        elif live is None and rec.worker_pid is not None and alive(rec.worker_pid):
            await AdoptedWorker(rec.worker_pid).terminate()
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
                if is_terminal(env):
                    return
            if not events:
                rec = self.store.get(run_id)
                if rec.ended and rec.last_sequence < from_sequence:
                    return
                await asyncio.sleep(self.config.poll_interval_s)

    # ---- workers ------------------------------------------------------------------
    async def _spawn(self, rec: RunRecord, *, traceparent: str | None, why: str) -> None:
        from esper.tolaria.config import RunConfig

        await self.launcher.wait_ready()
        rec = self.store.get(rec.run_id)
        if rec.ended or self._closing:  # stopped (or shutting down) while it waited
            live = self._live.get(rec.run_id)
            if live is not None and live.task is None:
                self._live.pop(rec.run_id, None)
            return
        run_dir = self.store.run_dir(rec.run_id)
        argv = ["--run-dir", str(run_dir), "--endpoints", json.dumps(self.endpoints), *self.worker_args]
        if self.nats_url:
            argv += ["--nats-url", self.nats_url]
        cfg = RunConfig.from_proto(rec.config)
        env: dict[str, str] = {}
        scopes = worker_scopes(cfg.controller, self.endpoints)
        if self.api_key is not None and scopes:
            assert self.signer is not None  # create_service refuses auth without one
            env["ESPER_API_KEY"] = self.signer.mint(rec.run_id, scopes, self.config.credential_ttl_s)
        if traceparent:
            env["TRACEPARENT"] = traceparent
            (run_dir / "traceparent").write_text(traceparent)
        elif (run_dir / "traceparent").exists():
            # A restarted worker stays in the trace of the StartRun that created the run.
            env["TRACEPARENT"] = (run_dir / "traceparent").read_text().strip()
        spec = LaunchSpec(run_id=rec.run_id, run_dir=run_dir, module=self.config.worker_module,
                          argv=tuple(argv), env=env, resources=cfg.resources, attempt=rec.restarts + 1,
                          restarts_left=max(self.config.max_restarts - rec.restarts, 0),
                          world_size=cfg.world_size)
        try:
            worker = await self.launcher.launch(spec)
        except EsperError as e:
            # The launcher's API refused (quota, RBAC, a bad image setting): a restart would
            # be refused the same way.
            log.error("run %s: could not start a worker: %s", rec.run_id, e)
            self._finish(self.store.get(rec.run_id), "failed", f"could not start a worker: {e}")
            live = self._live.get(rec.run_id)
            if live is not None and live.task is None:
                self._live.pop(rec.run_id, None)
            await self.launcher.cleanup(rec.run_id)
            return
        rec = self.store.get(rec.run_id)
        rec.worker_pid = worker.pid
        rec.worker = worker.name
        rec.launcher = self.launcher.kind
        self.store.update(rec)
        log.info("run %s: worker %s %s %s", rec.run_id, worker.name,
                 getattr(worker, "how", "started"), why)
        self._watch(rec.run_id, worker)

    def _watch(self, run_id: str, worker: Worker) -> None:
        live = self._live.get(run_id)
        if live is None:
            live = self._live[run_id] = _Live(worker=worker)
        else:
            live.worker = worker
        if live.task is None or live.task.done():
            live.task = asyncio.get_running_loop().create_task(self._monitor(run_id))

    def worker_pid(self, run_id: str) -> int | None:
        live = self._live.get(run_id)
        if live is None or live.worker is None:
            return None
        return live.worker.pid

    async def _monitor(self, run_id: str) -> None:
        live = self._live[run_id]
        elog = self.store.event_log(run_id)
        while True:
            rec = self.store.get(run_id)
            live.offset = self._fold(rec, elog, live.offset)
            worker = live.worker
            assert worker is not None  # _watch hands the monitor a worker
            if rec.ended:
                await worker.reap(self.config.stop_grace_s)
                self._live.pop(run_id, None)
                # The run's credential dies with it (a Job's Secret; locally it was only in
                # the worker's environment).
                await self.launcher.cleanup(run_id)
                return
            await worker.refresh()
            for death in worker.take_restarts():
                rec.restarts += 1
                self.store.update(rec)
                self._degrade(rec, "worker", "restarted",
                              f"{death}; restart {rec.restarts}/{self.config.max_restarts} from "
                              f"the last checkpoint ({worker.name} started a new pod)")
            for kind, detail in worker.take_notices():
                self._degrade(rec, self.launcher.kind, kind, detail)
            gone, how = worker.exit_status()
            if not gone:
                await asyncio.sleep(self.config.poll_interval_s)
                continue
            # The worker may have appended its last events just before exiting.
            live.offset = self._fold(rec, elog, live.offset)
            if rec.ended:
                continue
            why = f"worker {worker.name} exited with {how} before the run ended"
            if self._closing:
                return
            if rec.stop_requested:
                self._finish(rec, "stopped", why + "; stop was requested")
            elif worker.fatal:
                self._finish(rec, "failed", why)
            elif rec.restarts < self.config.max_restarts:
                rec.restarts += 1
                self.store.update(rec)
                self._degrade(rec, "worker", "restarted",
                              f"{why}; restart {rec.restarts}/{self.config.max_restarts} from the "
                              "last checkpoint")
                # _spawn hands the new worker to this monitor (live.worker), which goes on.
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

    def _degrade(self, rec: RunRecord, component: str, kind: str, detail: str) -> None:
        env = new_envelope(rec.run_id, source="tolaria", step=rec.global_step, epoch=rec.epoch)
        env.degradation.component = component
        env.degradation.kind = kind
        env.degradation.detail = detail
        self._append(rec, env)

    def _finish(self, rec: RunRecord, state: str, detail: str) -> None:
        env = new_envelope(rec.run_id, source="tolaria", step=rec.global_step, epoch=rec.epoch)
        env.run_state.state = state
        env.run_state.detail = detail
        self._append(rec, env)

    def _append(self, rec: RunRecord, env: events_pb2.EventEnvelope) -> None:
        """Record an event of the service's own: the run's log first (the truth), then the
        bus (its event id is the Nats-Msg-Id: a repeat is stored once)."""
        elog = self.store.event_log(rec.run_id)
        try:
            elog.append(env, sync=True)
        finally:
            elog.close()
        fresh = self.store.get(rec.run_id)
        apply_event(fresh, env)
        self.store.update(fresh)
        apply_event(rec, env)
        if self.publisher is not None:
            self.publisher.publish(env)
