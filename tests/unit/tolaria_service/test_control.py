"""The worker's control links degrade visibly: WAIT when Tamiyo is gone, breaker, recovery."""

from __future__ import annotations

import socket
import time
from concurrent import futures

import grpc
import pytest

from esper.errors import UnavailableError
from esper.runtime.breaker import BreakerState, CircuitBreaker
from esper.runtime.client import sync_channel
from esper.tolaria.control import (
    CONTROL_BREAKER,
    OutcomeReporter,
    RemoteController,
    RemoteKernelProvider,
)
from esper.tolaria.runs import new_envelope
from esper.tolaria.worker import tamiyo_decide
from generated.esper.common.v1 import decision_pb2, health_pb2, seed_pb2
from generated.esper.tamiyo.v1 import tamiyo_service_pb2 as tpb
from generated.esper.tamiyo.v1 import tamiyo_service_pb2_grpc as trpc
from generated.esper.urza.v1 import urza_service_pb2 as upb


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Germinate(trpc.TamiyoServiceServicer):
    def Decide(self, request, context):
        return tpb.DecideResponse(decisions=[decision_pb2.Decision(
            kind=decision_pb2.DECISION_KIND_GERMINATE, slot_id=request.snapshot.slots[0].slot_id)])


def _snapshot() -> health_pb2.HealthSnapshot:
    snap = health_pb2.HealthSnapshot(run_id="run-c", epoch=3)
    snap.slots.add(slot_id="body.1", stage=seed_pb2.SEED_STAGE_DORMANT)
    return snap


def test_controller_raises_while_tamiyo_is_down_breaker_opens_then_recovers():
    port = _free_port()
    ctl = RemoteController(tamiyo_decide(sync_channel(f"127.0.0.1:{port}")), timeout_s=0.3)
    for _ in range(2):
        with pytest.raises(UnavailableError):  # DeadlineExceededError is one too
            ctl.decide(_snapshot())
    # Two failures open the breaker: the next boundary costs no network round trip.
    assert ctl.breaker.state == BreakerState.OPEN
    rejected = ctl.breaker.rejected_calls
    with pytest.raises(UnavailableError):
        ctl.decide(_snapshot())
    assert ctl.breaker.rejected_calls == rejected + 1  # refused without a call
    assert ctl.last_latency_ms < 250  # well inside the 0.3 s timeout
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trpc.add_TamiyoServiceServicer_to_server(_Germinate(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                out = ctl.decide(_snapshot())
                break
            except UnavailableError:
                assert time.monotonic() < deadline, "breaker never let a trial call through"
                time.sleep(0.5)
        assert out[0].kind == decision_pb2.DECISION_KIND_GERMINATE and out[0].slot_id == "body.1"
        assert ctl.breaker.state == BreakerState.CLOSED
    finally:
        server.stop(0)


def test_kernel_provider_breaker_counts_urza_failures():
    calls = []

    def load(kernel_id, timeout_s):
        calls.append(kernel_id)
        raise UnavailableError(f"Urza at 127.0.0.1:1 is unreachable (kernel {kernel_id})")

    prov = RemoteKernelProvider(load, timeout_s=0.1, breaker=CircuitBreaker("urza", CONTROL_BREAKER))
    for _ in range(3):
        with pytest.raises(UnavailableError):
            prov.load("sha256:" + "a" * 64, None)
    assert len(calls) == 2 and prov.breaker.state == BreakerState.OPEN


def test_outcome_reporter_sends_one_report_per_seed_with_its_fate():
    sent: list[upb.RecordOutcomeRequest] = []
    rep = OutcomeReporter("run-o", "mnist1d", lambda req, t: sent.append(req), degrade=lambda *a: None)
    kid = "sha256:" + "b" * 64

    def lc(slot, to, epoch):
        env = new_envelope("run-o", source="kasmina", epoch=epoch)
        env.lifecycle.slot_id, env.lifecycle.to_stage, env.lifecycle.kernel_id = slot, to, kid
        return env

    m = new_envelope("run-o", source="tolaria", epoch=2)
    m.epoch_metrics.val_accuracy = 0.5
    rep.observe(m)
    rep.observe(lc("a", seed_pb2.SEED_STAGE_GERMINATED, 2))
    rep.observe(lc("b", seed_pb2.SEED_STAGE_GERMINATED, 2))
    snap = health_pb2.HealthSnapshot(run_id="run-o", epoch=5)
    snap.slots.add(slot_id="a", contribution=0.2, contribution_measured=True, seed_parameters=99)
    rep.observe_snapshot(snap)
    m.epoch_metrics.val_accuracy = 0.7
    rep.observe(m)
    rep.observe(lc("a", seed_pb2.SEED_STAGE_FOSSILIZED, 6))
    rep.run_ended(8)
    fates = {r.report.slot_id: r.report for r in sent}
    assert fates["a"].fate == upb.SEED_FATE_FOSSILIZED and fates["a"].contribution == 0.2
    assert fates["a"].parameters == 99 and abs(fates["a"].accuracy_delta - 0.2) < 1e-9
    assert fates["b"].fate == upb.SEED_FATE_RUN_ENDED and fates["b"].ended_epoch == 8
    assert len(sent) == 2 and len({r.request_id for r in sent}) == 2
