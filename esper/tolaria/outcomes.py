"""Urza field reports from a run's events: one report per seed, when it is fossilized or
pruned or the run ends (`esper.urza.v1.FieldReport`, Karn's and Tamiyo's training data).

`OutcomeReporter.observe` is an observer of the worker's event sink: lifecycle events
start and end seeds, `health` snapshots carry their last measured contribution and size,
`epoch_metrics` the accuracy the report's delta is taken against, and a governor
rollback marks the live seeds as rolled back. A failed report becomes a degradation
event, never an exception in training; each report's request id is
`uuid5(run, slot, germinated epoch, fate)`, so a resumed worker's repeat is recorded once.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from esper.errors import DeadlineExceededError, EsperError, UnavailableError
from generated.esper.common.v1 import health_pb2, seed_pb2
from generated.esper.oona.v1 import events_pb2
from generated.esper.urza.v1 import urza_service_pb2 as urza_pb

Degrade = Callable[[str, str, str], None]
"""(component, kind, detail) → records a DegradationEvent."""


def _kind_of(exc: BaseException) -> str:
    if isinstance(exc, DeadlineExceededError):
        return "deadline_exceeded"
    if isinstance(exc, UnavailableError):
        return "unavailable"
    return "error"


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
        if kind == "health":
            self.observe_snapshot(env.health)
        elif kind == "epoch_metrics":
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
