"""The worker's links to the control plane: Tamiyo decides, Urza serves kernels and hears outcomes.

* `RemoteController` (the trainer's `Controller`) and `RemoteKernelProvider` (its
  `KernelProvider`) add a circuit breaker and a trace span around each remote call and
  raise an `EsperError` when the dependency cannot answer (unreachable, deadline passed,
  breaker open). The trainer then continues without growth or defers the germination and
  records a DegradationEvent (and "recovered" once it answers again), so each outage is
  reported exactly once per boundary, by one component (DESIGN.md §6).
* `OutcomeReporter` sends a field report per seed to Urza when it is fossilized or pruned
  or the run ends; failures become degradation events, never exceptions in training.

The remote calls themselves are injected (`decide`, `load`, `record`) so these classes
hold only the policy (deadline, breaker, reporting) and work with any client.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from torch import nn

from esper.errors import DeadlineExceededError, EsperError, UnavailableError
from esper.runtime import tracing
from esper.runtime.breaker import BreakerConfig, CircuitBreaker
from generated.esper.common.v1 import decision_pb2, health_pb2, seed_pb2
from generated.esper.oona.v1 import events_pb2
from generated.esper.urza.v1 import urza_service_pb2 as urza_pb

log = logging.getLogger(__name__)

Degrade = Callable[[str, str, str], None]
"""(component, kind, detail) → records a DegradationEvent."""

# One call per epoch boundary: a short window, so a dead Tamiyo stops costing a whole
# deadline per epoch after two misses; a half-open trial then finds out when it is back.
CONTROL_BREAKER = BreakerConfig(
    failure_rate_threshold=50.0, window_size=4, minimum_calls=2, open_wait_s=3.0, half_open_calls=1
)

def _tracer() -> trace.Tracer:
    """The process's configured tracer (spans exported), else the API's no-op one, which
    still carries the caller's trace context through to the gRPC calls below it."""
    return tracing.tracer() or trace.get_tracer("esper.tolaria.worker")


def _kind_of(exc: BaseException) -> str:
    if isinstance(exc, DeadlineExceededError):
        return "deadline_exceeded"
    if isinstance(exc, UnavailableError):
        return "unavailable"
    return "error"


class RemoteController:
    """Tolaria's `Controller`: Tamiyo's decisions over gRPC within the run's deadline."""

    def __init__(
        self,
        decide: Callable[[health_pb2.HealthSnapshot, float], Sequence[decision_pb2.Decision]],
        *,
        timeout_s: float,
        breaker: CircuitBreaker | None = None,
        on_snapshot: Callable[[health_pb2.HealthSnapshot], None] | None = None,
    ) -> None:
        self._decide = decide
        self.timeout_s = timeout_s
        self.breaker = breaker or CircuitBreaker("tamiyo", CONTROL_BREAKER)
        self._on_snapshot = on_snapshot
        self.last_latency_ms = 0.0

    def decide(self, snapshot: health_pb2.HealthSnapshot) -> list[decision_pb2.Decision]:
        """Tamiyo's decisions; raises `UnavailableError`/`DeadlineExceededError` when it has none."""
        if self._on_snapshot is not None:
            self._on_snapshot(snapshot)
        t0 = time.perf_counter()
        with _tracer().start_as_current_span("tolaria.decide") as span:
            span.set_attribute("esper.run_id", snapshot.run_id)
            span.set_attribute("esper.epoch", snapshot.epoch)
            try:
                with self.breaker.guard():
                    return list(self._decide(snapshot, self.timeout_s))
            except EsperError as e:
                span.set_attribute("esper.degraded", _kind_of(e))
                raise
            finally:
                self.last_latency_ms = 1e3 * (time.perf_counter() - t0)


class RemoteKernelProvider:
    """Tolaria's `KernelProvider`: verified kernels from Kasmina's loader, fetched from Urza."""

    def __init__(self, load: Callable[[str, float], nn.Module], *, timeout_s: float,
                 breaker: CircuitBreaker | None) -> None:
        """`breaker`: None where the fetch behind `load` has its own (the Urza client's)."""
        self._load = load
        self.timeout_s = timeout_s
        self.breaker = breaker

    def load(self, kernel_id: str, site: seed_pb2.SiteSignature | None = None) -> nn.Module:
        """The module for `kernel_id` (cached or fetched); `UnavailableError` defers germination.

        `site` is not needed to fetch: the loader checks the artifact against its own
        manifest, and Kasmina checks the module against the slot at germination.
        """
        with _tracer().start_as_current_span("tolaria.load_kernel") as span:
            span.set_attribute("esper.kernel_id", kernel_id)
            if self.breaker is None:
                return self._load(kernel_id, self.timeout_s)
            with self.breaker.guard():
                return self._load(kernel_id, self.timeout_s)


@dataclass(kw_only=True)
class _LiveSeed:
    kernel_id: str
    blueprint_id: str
    germinated_epoch: int
    accuracy_at_germination: float
    contribution: float = 0.0
    parameters: int = 0
    rolled_back: bool = False


_FATES = {
    seed_pb2.SEED_STAGE_FOSSILIZED: urza_pb.SEED_FATE_FOSSILIZED,
    seed_pb2.SEED_STAGE_PRUNED: urza_pb.SEED_FATE_PRUNED,
}
_LIVE = {
    seed_pb2.SEED_STAGE_GERMINATED,
    seed_pb2.SEED_STAGE_TRAINING,
    seed_pb2.SEED_STAGE_BLENDING,
    seed_pb2.SEED_STAGE_HOLDING,
}


class OutcomeReporter:
    """Turns the run's events into Urza field reports (one per seed, idempotent per seed)."""

    def __init__(self, run_id: str, task: str, record: Callable[[urza_pb.RecordOutcomeRequest, float], Any],
                 *, degrade: Degrade, timeout_s: float = 2.0) -> None:
        self.run_id = run_id
        self.task = task
        self._record = record
        self._degrade = degrade
        self.timeout_s = timeout_s
        self._live: dict[str, _LiveSeed] = {}
        self._accuracy = 0.0
        self._lock = threading.Lock()
        self.sent: list[urza_pb.FieldReport] = []

    def observe_snapshot(self, snapshot: health_pb2.HealthSnapshot) -> None:
        with self._lock:
            for s in snapshot.slots:
                seed = self._live.get(s.slot_id)
                if seed is not None:
                    if s.contribution_measured:
                        seed.contribution = s.contribution
                    seed.parameters = s.seed_parameters

    def observe(self, env: events_pb2.EventEnvelope) -> None:
        kind = env.WhichOneof("payload")
        if kind == "epoch_metrics":
            self._accuracy = env.epoch_metrics.val_accuracy
        elif kind == "degradation" and env.degradation.component == "governor":
            with self._lock:
                for seed in self._live.values():
                    seed.rolled_back = True
        elif kind == "lifecycle":
            lc = env.lifecycle
            if lc.to_stage == seed_pb2.SEED_STAGE_GERMINATED:
                with self._lock:
                    self._live[lc.slot_id] = _LiveSeed(
                        kernel_id=lc.kernel_id,
                        blueprint_id=lc.blueprint_id,
                        germinated_epoch=env.epoch,
                        accuracy_at_germination=self._accuracy,
                    )
            elif lc.to_stage in _FATES:
                self._finish(lc.slot_id, _FATES[lc.to_stage], env.epoch)

    def run_ended(self, epoch: int) -> None:
        for slot_id in list(self._live):
            self._finish(slot_id, urza_pb.SEED_FATE_RUN_ENDED, epoch)

    def _finish(self, slot_id: str, fate: int, epoch: int) -> None:
        with self._lock:
            seed = self._live.pop(slot_id, None)
        if seed is None or not seed.kernel_id:
            return
        report = urza_pb.FieldReport(
            kernel_id=seed.kernel_id,
            run_id=self.run_id,
            slot_id=slot_id,
            task=self.task,
            contribution=seed.contribution,
            accuracy_delta=self._accuracy - seed.accuracy_at_germination,
            fate=fate,
            germinated_epoch=seed.germinated_epoch,
            ended_epoch=epoch,
            parameters=seed.parameters,
            rolled_back=seed.rolled_back,
        )
        report.recorded_at.GetCurrentTime()
        # Same seed, same fate → same id: a resumed worker's repeat is recorded once.
        rid = uuid.uuid5(
            uuid.NAMESPACE_URL, f"esper:{self.run_id}:{slot_id}:{seed.germinated_epoch}:{fate}"
        )
        req = urza_pb.RecordOutcomeRequest(request_id=str(rid), report=report)
        try:
            self._record(req, self.timeout_s)
        except EsperError as e:
            self._degrade("urza", _kind_of(e), f"field report for {slot_id} not recorded: {e}")
            return
        self.sent.append(report)

