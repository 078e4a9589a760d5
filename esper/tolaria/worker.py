"""One run's training worker: ``python -m esper.tolaria.worker --run-dir <dir> --endpoints <json>``.

The supervisor (esper.tolaria.supervisor) starts one per run. It trains with the
Tolaria trainer, decides through Tamiyo, loads kernels from Urza through Kasmina's
verifying loader, appends every event to the run's event log (fsync per epoch) and
publishes it on Oona. It resumes from the newest checkpoint in ``<dir>/checkpoints``,
so a worker killed with SIGKILL and started again loses at most one checkpoint interval.
SIGTERM stops it at the next step boundary with a checkpoint.

Trace context: the supervisor passes the StartRun call's W3C ``traceparent`` in the
``TRACEPARENT`` environment variable; the worker's run span is its child, so StartRun →
Decide → GetKernel form one trace, and every Oona publish carries the context of the
span it was made in.

Data-parallel runs (`RunConfig.world_size` > 1): the launcher starts this module under
torchrun (``python -m torch.distributed.run --standalone --nproc-per-node N --max-restarts K
-m esper.tolaria.worker ...``); each rank is a process of this module and finds its rank in
torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT). Rank 0 alone asks Tamiyo and
Urza's catalog, writes the event log, publishes on Oona and writes checkpoints; the other
ranks get its decisions and seeds (`esper.grow.distributed`). A rank that dies makes its
peers' next collective fail, the elastic agent restarts all of them (up to
``--max-restarts``), and they resume from rank 0's newest checkpoint. Each rank writes
``<run-dir>/ranks/rank-<r>.json`` (pid, restart count, and at the end a digest of its
parameters: equal on every rank).

Exit status: 0 when the run reached a terminal state it recorded (succeeded, stopped,
failed by the governor or by a bad config); anything else means the worker died and the
supervisor may restart it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from esper.errors import EsperError, FailedPreconditionError
from esper.runtime import tracing
from esper.tolaria.outcomes import OutcomeReporter
from esper.tolaria.runs import (
    DELIVERY_SETTLE_S,
    EventLog,
    delivery_envelope,
    is_terminal,
    new_envelope,
    read_config,
)
from generated.esper.oona.v1 import events_pb2

log = logging.getLogger("esper.tolaria.worker")

# Events whose loss on a crash would hide what happened: fsync right after appending.
_SYNC_KINDS = frozenset({"epoch_metrics", "run_state"})


class RankEvents:
    """The event sink of a rank other than 0: its events are rank 0's too (the same
    trainer state), so rank 0 alone records them; here they are only logged."""

    publisher = None

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.observers: list[Any] = []
        self.counts: dict[str, int] = {}

    def __call__(self, env: events_pb2.EventEnvelope) -> None:
        return None

    def emit(self, **payload: Any) -> None:
        return None

    def degrade(self, component: str, kind: str, detail: str) -> None:
        log.warning("rank %d degraded: %s %s: %s", self.rank, component, kind, detail)


class RunEvents:
    """The trainer's `event_sink`: event log first (the truth), then Oona, then observers."""

    def __init__(self, run_id: str, log_: EventLog, *, publisher: Any | None = None) -> None:
        self.run_id = run_id
        self.log = log_
        self.publisher = publisher
        self.observers: list[Any] = []
        self._epoch = 0
        self._step = 0
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self._bus_degradations = 0
        self._delivery_recorded = False

    def __call__(self, env: events_pb2.EventEnvelope) -> None:
        if not env.run_id:
            env.run_id = self.run_id
        kind = env.WhichOneof("payload") or ""
        # --- supervisor (issue 10 point 5): the run's record shows how its events reached the
        # bus *before* its terminal state: wait (bounded) for the bus, record the counters.
        if kind == "degradation" and env.degradation.component == "oona":
            self._bus_degradations += 1
        if self.publisher is not None and is_terminal(env) and not self._delivery_recorded:
            self._delivery_recorded = True
            with self._lock:
                step, epoch = self._step, self._epoch
            self(delivery_envelope(self.run_id, self.publisher.settle(DELIVERY_SETTLE_S),
                                   degradations=self._bus_degradations, step=step, epoch=epoch))
        # --- end supervisor
        with self._lock:
            self._epoch = max(self._epoch, env.epoch)
            self._step = max(self._step, env.step)
        # The log gives the run-wide sequence (WatchRun's cursor) and drops repeats of an
        # event id a resumed trainer emits again; the bus gets it anyway, because the first
        # copy may not have left before the crash (JetStream dedups on the same id).
        _, new = self.log.append(env, sync=kind in _SYNC_KINDS)
        if self.publisher is not None:
            self.publisher.publish(env)
        if new:
            with self._lock:
                self.counts[kind] = self.counts.get(kind, 0) + 1
            for obs in self.observers:
                obs(env)

    def emit(self, **payload: Any) -> events_pb2.EventEnvelope:
        """Build and emit an envelope with one payload, e.g. ``emit(run_state=RunStateChanged(...))``."""
        with self._lock:
            env = new_envelope(self.run_id, source="tolaria", step=self._step, epoch=self._epoch)
        ((field, msg),) = payload.items()
        getattr(env, field).CopyFrom(msg)
        self(env)
        return env

    def degrade(self, component: str, kind: str, detail: str) -> None:
        dropped = 0
        if component == "oona" and self.publisher is not None:
            dropped = self.publisher.stats().dropped
        log.warning("degraded: %s %s: %s", component, kind, detail)
        self.emit(
            degradation=events_pb2.DegradationEvent(
                component=component, kind=kind, detail=detail, dropped=dropped
            )
        )


# ---- remote links ---------------------------------------------------------------------------
class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, d: grpc.ClientCallDetails, metadata: list[tuple[str, str]]) -> None:
        self.method, self.timeout, self.credentials = d.method, d.timeout, d.credentials
        self.metadata = metadata
        self.wait_for_ready = getattr(d, "wait_for_ready", None)
        self.compression = getattr(d, "compression", None)


class TraceContextInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                              grpc.StreamUnaryClientInterceptor):
    """Puts the caller's W3C trace context in each call's metadata, and nothing else.

    For the Urza client, which must run on a plain channel (no channel-level retries: they
    left server streams hanging past their deadline after a SIGKILL, see
    esper/urza/client.py) and so gets none of `esper.runtime.client`'s interceptors; without
    this the worker's GetKernel and RecordOutcome calls would start traces of their own.
    """

    @staticmethod
    def _details(d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = list(d.metadata or ())
        tracing.inject(metadata)
        return _CallDetails(d, metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def urza_channel(target: str) -> grpc.Channel:
    """The Urza client's own plain channel, plus trace-context propagation."""
    from esper.urza.client import _CHANNEL_OPTIONS

    return grpc.intercept_channel(grpc.insecure_channel(target, options=_CHANNEL_OPTIONS),
                                  TraceContextInterceptor())


def served_policy(controller: Any, timeout_s: float, events: RunEvents) -> str | None:
    """The policy Tamiyo serves, or None (with a degradation event) when it cannot be asked."""
    try:
        return controller.policy_info(max(timeout_s, 2.0)).policy
    except EsperError as e:
        events.degrade("tamiyo", e.reason.lower(),
                       f"could not ask Tamiyo which policy it serves ({e}); the run goes on and "
                       "grows only when Tamiyo answers")
        return None


class TracedKernels:
    """The run's `KernelSource`: Urza's kernels (`esper.urza.source.UrzaKernels`), each call
    in a span of the run's trace; the grower records their degradations as Urza's."""

    component = "urza"

    def __init__(self, source: Any) -> None:
        self.source = source

    def candidates(self, site: Any) -> list[Any]:
        with _tracer().start_as_current_span("tolaria.kernel_candidates"):
            return self.source.candidates(site)

    def load(self, kernel_id: str, site: Any = None) -> Any:
        with _tracer().start_as_current_span("tolaria.load_kernel") as span:
            span.set_attribute("esper.kernel_id", kernel_id)
            return self.source.load(kernel_id, site)


def _tracer() -> trace.Tracer:
    """The process's configured tracer, else the API's no-op one (which still carries the
    caller's trace context through to the gRPC calls below it)."""
    return tracing.tracer() or trace.get_tracer("esper.tolaria.worker")


def preload() -> None:
    """What the fork server (esper.tolaria.forkserver) runs once before it forks workers:
    the imports a run needs and the built-in jobs' data, so that a forked worker starts
    training at once. It must leave no threads or open channels behind (fork safety):
    imports and pure-numpy data generation only."""
    import torch

    # The first optimizer a process builds imports torch._dynamo (seconds): do it here,
    # on a parameter that never sees a step (no autograd or intra-op threads are started).
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    import esper.blueprints.artifact
    import esper.jobs.registry
    import esper.kasmina.loader
    import esper.oona.publisher
    import esper.tamiyo.client
    import esper.tezzeret.client
    import esper.tolaria.governor
    import esper.tolaria.trainer
    import esper.urza.source  # noqa: F401
    from esper import tasks
    from esper.jobs.registry import installed_entry_points

    installed_entry_points()
    tasks.warm()


# ---- main ---------------------------------------------------------------------------------
def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m esper.tolaria.worker", description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, required=True, help="the run's directory (config.pb, events.log)")
    ap.add_argument("--endpoints", required=True, help='JSON {"tamiyo": "host:port", "urza": ...}')
    ap.add_argument("--nats-url", default=None, help="Oona (NATS) URL; omitted: events only in the log")
    ap.add_argument("--trusted-keys", type=Path, default=None,
                    help="directory of trusted kernel-signing public keys, *.pub / *.pem "
                         "(default: $ESPER_TRUSTED_KEYS_DIR, else <data-dir>/trusted_keys, "
                         "where Tezzeret publishes its key)")
    ap.add_argument("--kernel-cache", type=Path, default=None,
                    help="verified-kernel disk cache (default: <run-dir>/../../kernel-cache)")
    ap.add_argument("--oona-max-queue", type=int, default=10_000,
                    help="events buffered while NATS is down before the oldest are dropped (counted)")
    ap.add_argument("--jobs", default=None,
                    help='JSON {"name": "package.module:function"}: the operator\'s own jobs '
                         "(tolaria.jobs), on top of the built-in ones and installed entry points")
    ap.add_argument("--compile-wait-s", type=float, default=60.0,
                    help="how long the first epoch boundary waits for kernels Tezzeret compiles "
                         "on demand for the run's sites before germination there is deferred")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="intra-op threads for torch (default 1: the hosts are tiny, and more "
                         "threads than cores shared with other runs slow each step down many-fold)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from esper.tolaria.config import RunConfig, RunConfigError

    torch.set_num_threads(args.torch_threads)

    run_dir: Path = args.run_dir
    run_id = run_dir.name
    endpoints: dict[str, str] = json.loads(args.endpoints)
    api_key = os.environ.get("ESPER_API_KEY") or None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    tracing.setup_tracing("esper-tolaria-worker")
    parent = propagate.extract({"traceparent": os.environ["TRACEPARENT"]}) if os.environ.get("TRACEPARENT") else None
    token = otel_context.attach(parent) if parent is not None else None

    ddp = _join_ranks()
    elog = EventLog(run_dir / "events.log") if ddp.is_main else None
    events: RunEvents | RankEvents = RunEvents(run_id, elog) if elog is not None else RankEvents(ddp.rank)
    publisher = None
    if args.nats_url and ddp.is_main:
        from esper.oona.publisher import Publisher

        publisher = Publisher(args.nats_url, max_queue=args.oona_max_queue,
                              on_degraded=lambda kind, detail: events.degrade("oona", kind, detail))
        events.publisher = publisher

    tracer = tracing.tracer() or trace.get_tracer("esper.tolaria.worker")
    exit_code = 0
    try:
        with tracer.start_as_current_span("tolaria.worker.run") as span:
            span.set_attribute("esper.run_id", run_id)
            try:
                cfg = RunConfig.from_proto(read_config(run_dir))
            except RunConfigError as e:
                events.emit(run_state=events_pb2.RunStateChanged(state="failed", detail=f"bad config: {e}"))
                return 0
            exit_code = _train(cfg, run_id, run_dir, args, endpoints, api_key, events, stop, ddp)
    finally:
        if publisher is not None:
            publisher.flush(5.0)
            stats = publisher.close(5.0)
            log.info("oona: %s", stats)
        if elog is not None:
            elog.close()
        if token is not None:
            otel_context.detach(token)
        tracing.force_flush(5000)
        tracing.shutdown_tracing()
    return exit_code


def _join_ranks() -> Any:
    """This process's place in a data-parallel run: under torchrun (WORLD_SIZE > 1) it joins
    the process group torchrun's environment describes; alone, a group of one."""
    import torch
    import torch.distributed as dist

    from esper.grow.distributed import DistributedGrowth

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        # NCCL when the rank has a GPU of its own (LOCAL_RANK); gloo on CPU. The timeout
        # bounds how long a rank waits for a peer that hangs (a dead one fails at once).
        if torch.cuda.is_available() and torch.cuda.device_count() > int(os.environ.get("LOCAL_RANK", "0")):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=300))
    return DistributedGrowth()


def _rank_record(run_dir: Path, ddp: Any, **facts: Any) -> None:
    """Update `<run-dir>/ranks/rank-<r>.json` (what each rank is and ended with)."""
    path = run_dir / "ranks" / f"rank-{ddp.rank}.json"
    path.parent.mkdir(exist_ok=True)
    record = json.loads(path.read_text()) if path.exists() else {}
    record.update(facts)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, sort_keys=True))
    tmp.replace(path)


def parameter_digest(module: Any) -> str:
    """SHA-256 over the names and bytes of `module`'s parameters and persistent buffers."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in sorted((k, v) for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _train(cfg: Any, run_id: str, run_dir: Path, args: argparse.Namespace, endpoints: dict[str, str],
           api_key: str | None, events: RunEvents | RankEvents, stop: threading.Event, ddp: Any) -> int:
    """Build the run (kernel source, controller, job, trainer), then train it.

    Everything that can fail for a reason a restart would not cure (a missing endpoint or
    key directory, a job that raises, Tamiyo serving another policy) ends the run FAILED
    with the reason in its detail, instead of crashing into a restart loop. With several
    ranks every rank sets up, then they agree (the first rank's failure fails the run for
    all) before any of them trains.
    """
    from esper.jobs import JobBuildError, JobConfigError
    from esper.jobs.registry import JobRegistry
    from esper.tamiyo.client import TamiyoController
    from esper.tolaria.governor import RunDivergedError
    from esper.tolaria.trainer import build_job, build_trainer

    closers: list[Any] = []

    def fail(detail: str) -> int:
        events.emit(run_state=events_pb2.RunStateChanged(state="failed", detail=detail))
        return 0

    try:
        failure, trainer, source, outcomes = "", None, None, None
        try:
            source = _kernel_source(cfg, run_dir, args, endpoints, api_key, events, closers, ddp.rank)
            urza = source.urza if source is not None else None
            outcomes = OutcomeReporter(
                run_id, cfg.job_name,
                (lambda req, t: urza.record_outcome(req.report, t, request_id=req.request_id))
                if urza is not None else (lambda req, t: None),
                degrade=events.degrade,
            )
            events.observers.append(outcomes.observe)
            controller = None
            if cfg.controller != "none":
                if "tamiyo" not in endpoints:
                    raise FailedPreconditionError(f"no endpoint for 'tamiyo'; the worker got {sorted(endpoints)}")
                controller = TamiyoController(endpoints["tamiyo"], api_key=api_key,
                                              timeout_s=cfg.decide_timeout_s)
                closers.append(controller)
                # Rank 0 alone talks to Tamiyo; the others' controllers are only ever
                # asked through it (esper.grow.distributed).
                served = served_policy(controller, cfg.decide_timeout_s, events) if ddp.is_main else None
                if served is not None and served != cfg.controller:
                    # Training under another policy than the one asked for would be a silent lie.
                    failure = (
                        f"the run asks for controller {cfg.controller!r} but Tamiyo at "
                        f"{endpoints['tamiyo']} serves {served!r}; start Tamiyo with that policy or "
                        "change the run's controller")
            if not failure:
                try:
                    job = build_job(cfg, JobRegistry.discover(json.loads(args.jobs) if args.jobs else None))
                except (JobBuildError, JobConfigError) as e:
                    # The job's own code failed (or its registration changed since StartRun):
                    # deterministic, so the run fails with the job's error instead of restarting.
                    log.exception("run %s: building job %r failed", run_id, cfg.job_name)
                    failure = str(e)
            if not failure:
                trainer = build_trainer(
                    cfg,
                    run_id=run_id,
                    job=job,
                    kernels=TracedKernels(source) if source is not None else None,
                    controller=controller,
                    event_sink=events,
                    checkpoint_dir=run_dir / "checkpoints",
                    stop=stop,
                    distributed=ddp,
                )
        except EsperError as e:
            log.exception("run %s: setting up failed", run_id)
            failure = f"{type(e).__name__}: {e}"
        failure = ddp.first_failure(failure)
        if failure:
            return fail(failure)
        assert trainer is not None and outcomes is not None
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if ddp.active:
            _rank_record(run_dir, ddp, pid=os.getpid(), world_size=ddp.world_size, restarts=restarts)
        resumed = trainer.resume()
        if ddp.active and restarts:
            events.degrade("worker", "ranks_restarted",
                           f"torchrun's elastic agent restarted all {ddp.world_size} ranks "
                           f"({restarts} time(s)) after a rank died; they resume from rank 0's "
                           "newest checkpoint")
        detail = f"resumed from the checkpoint after epoch {trainer.epoch}" if resumed else "started"
        if ddp.active:
            detail += f" ({ddp.world_size} ranks)"
        events.emit(run_state=events_pb2.RunStateChanged(state="running", detail=detail))
        if source is not None and ddp.is_main:
            _ensure_kernels(source, trainer, events)
        try:
            result = trainer.run()
        except RunDivergedError as e:
            return fail(str(e))
        if ddp.active:
            _rank_record(run_dir, ddp, digest=parameter_digest(trainer.model), epoch=trainer.epoch,
                         global_step=trainer.global_step)
        if not result.completed:
            detail = f"stopped after {result.global_step} steps (epoch {trainer.epoch}) on request; checkpoint written"
            events.emit(run_state=events_pb2.RunStateChanged(state="stopped", detail=detail))
            return 0
        if ddp.is_main:
            outcomes.run_ended(trainer.epoch)
        detail = (f"{result.epochs} epochs in {result.wall_seconds:.1f} s; test accuracy "
                  f"{100 * result.test_accuracy:.2f}%, {result.parameters:,} parameters, "
                  f"{len(result.fossilized)} seed(s) fossilized")
        if events.publisher is not None and events.publisher.stats().dropped:
            detail += f"; oona dropped {events.publisher.stats().dropped} event(s) while NATS was down"
        events.emit(run_state=events_pb2.RunStateChanged(state="succeeded", detail=detail))
        return 0
    except EsperError as e:
        # A typed error is deterministic (bad config, missing key): restarting cannot help.
        log.exception("run %s failed", run_id)
        return fail(f"{type(e).__name__}: {e}")
    finally:
        for c in closers:
            c.close()


def _kernel_source(cfg: Any, run_dir: Path, args: argparse.Namespace, endpoints: dict[str, str],
                   api_key: str | None, events: RunEvents | RankEvents, closers: list[Any],
                   rank: int = 0) -> Any:
    """Urza's kernels through Kasmina's verifying loader, Tezzeret compiling what Urza
    lacks; None for a run without a controller (it loads no kernel)."""
    from esper.blueprints.artifact import TrustedKeys
    from esper.kasmina.loader import KernelLoader
    from esper.tezzeret.client import TezzeretClient
    from esper.urza.client import UrzaClient, fetcher
    from esper.urza.source import UrzaKernels

    if cfg.controller == "none":
        return None
    if "urza" not in endpoints:
        raise FailedPreconditionError(f"no endpoint for 'urza'; the worker got {sorted(endpoints)}")
    data_dir = run_dir.parent.parent.parent
    keys_dir = args.trusted_keys or Path(os.environ.get("ESPER_TRUSTED_KEYS_DIR") or data_dir / "trusted_keys")
    urza = UrzaClient(endpoints["urza"], api_key, channel=urza_channel(endpoints["urza"]))
    closers.append(urza)
    fetch = fetcher(urza)
    if rank != 0:
        fetch = _logged_fetch(fetch, rank)
    loader = KernelLoader(fetch, TrustedKeys.from_dir(keys_dir),
                          args.kernel_cache or run_dir.parent.parent / "kernel-cache")
    tezzeret = None
    if "tezzeret" in endpoints:
        tezzeret = TezzeretClient(endpoints["tezzeret"], api_key)
        closers.append(tezzeret)
    return UrzaKernels(urza, loader, tezzeret=tezzeret, timeout_s=max(cfg.decide_timeout_s, 5.0),
                       compile_wait_s=args.compile_wait_s,
                       on_event=lambda kind, detail: events.degrade("kernels", kind, detail))


def _logged_fetch(fetch: Any, rank: int) -> Any:
    """A rank other than 0 loads a kernel after rank 0 put it in the shared verified cache, so
    it should never reach Urza; when it does (a cache on another disk), the log says so."""

    def logged(kernel_id: str, timeout_s: float) -> bytes:
        log.warning("rank %d: kernel %s not in the shared cache; fetching it from Urza", rank, kernel_id)
        return fetch(kernel_id, timeout_s)

    return logged


def _ensure_kernels(source: Any, trainer: Any, events: RunEvents) -> None:
    """Ask for kernels for every seed site Urza has none for (compiled while training runs)."""
    sites = [trainer.model.site_signature(slot) for slot in trainer.model.slots]
    try:
        source.ensure_all(sites)
    except EsperError as e:
        events.degrade("kernels", e.reason.lower(),
                       f"could not check or request kernels for the run's sites: {e}")


if __name__ == "__main__":
    sys.exit(main())
