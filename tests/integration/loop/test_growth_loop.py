"""Must hold: a run grows a seed on Tamiyo's decision over gRPC with a kernel from Urza,
and a durable JetStream consumer sees every lifecycle event once, in order."""

from __future__ import annotations

import asyncio

import pytest

from esper.oona.consumer import adrain
from esper.oona.subjects import run_events_filter
from esper.urza.client import UrzaClient
from generated.esper.common.v1 import decision_pb2, seed_pb2
from generated.esper.tolaria.v1 import tolaria_service_pb2 as pb

from .conftest import kinds, tiny_config

S = seed_pb2
pytestmark = pytest.mark.integration


async def test_run_germinates_on_tamiyo_decision_and_finishes_the_seed(platform_factory):
    cfg = tiny_config()
    p = await platform_factory(cfg)
    run_id = await p.start_run(cfg)
    events = await p.watch(run_id, timeout=120)
    assert events[-1].run_state.state == "succeeded", p.worker_log(run_id)

    # Tamiyo's GERMINATE arrived over gRPC (a DecisionEvent) and named a kernel Urza holds.
    germinates = [d for e in events if e.HasField("decision") for d in e.decision.decisions
                  if d.kind == decision_pb2.DECISION_KIND_GERMINATE]
    assert germinates, kinds(events)
    assert all(d.policy == "heuristic" and d.kernel_id.startswith("sha256:") for d in germinates)

    lifecycle = [e.lifecycle for e in events if e.HasField("lifecycle")]
    by_slot: dict[str, list[int]] = {}
    for lc in lifecycle:
        by_slot.setdefault(lc.slot_id, []).append(lc.to_stage)
    grown = [s for s, stages in by_slot.items() if S.SEED_STAGE_GERMINATED in stages]
    assert grown
    # The seed trained, blended in and was then kept or removed by the controller.
    stages = by_slot[grown[0]]
    assert stages[:3] == [S.SEED_STAGE_GERMINATED, S.SEED_STAGE_TRAINING, S.SEED_STAGE_BLENDING]
    assert S.SEED_STAGE_FOSSILIZED in stages or S.SEED_STAGE_PRUNED in stages, stages
    germ = next(lc for lc in lifecycle if lc.to_stage == S.SEED_STAGE_GERMINATED)
    assert germ.kernel_id in {d.kernel_id for d in germinates}

    # Alpha rose to 1 while blending, and the parameter count grew by the seed's size.
    metrics = [e.epoch_metrics for e in events if e.HasField("epoch_metrics")]
    assert max(m.alphas[grown[0]] for m in metrics) == pytest.approx(1.0)
    assert metrics[-1].parameters > metrics[0].parameters or S.SEED_STAGE_PRUNED in stages

    # The run record agrees, and Urza got a field report for the kernel it served.
    run = await p.get_run(run_id)
    assert run.state == pb.RUN_STATE_SUCCEEDED and run.epoch == cfg.epochs and not run.degraded
    def query() -> dict:
        # A blocking client: off the event loop that serves Urza.
        with UrzaClient(p.ctx.endpoints["urza"]) as urza:
            return {r.kernel_id: r for r in urza.query_kernels(5.0, page_size=1000)[0]}

    records = await asyncio.to_thread(query)
    assert records[germ.kernel_id].stats.outcomes >= 1

    # A durable consumer on JetStream: every lifecycle event, once, in order.
    seen = await adrain(p.nats.url, run_events_filter(run_id), durable="loop-test", timeout=2.0)
    ids = [e.event_id for e in seen]
    assert len(ids) == len(set(ids))
    bus_lifecycle = [e for e in seen if e.HasField("lifecycle")]
    log_lifecycle = [e for e in events if e.HasField("lifecycle")]
    assert [e.event_id for e in bus_lifecycle] == [e.event_id for e in log_lifecycle]
    seqs = [e.sequence for e in bus_lifecycle]
    assert seqs == sorted(seqs)
    # A second pass of the same durable consumer gets nothing new: it acked everything.
    again = await adrain(p.nats.url, run_events_filter(run_id), durable="loop-test", timeout=1.0)
    assert again == []


async def test_a_run_asking_for_another_policy_than_tamiyo_serves_is_refused_at_start(platform_factory):
    # Tolaria asks Tamiyo which policy it serves before it creates the run (issue 11 point
    # 8: such a run used to be accepted and fail later): FAILED_PRECONDITION naming both.
    import grpc

    cfg = tiny_config(controller="random", epochs=3)
    p = await platform_factory(cfg)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await p.start_run(cfg)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "config.controller='random'" in e.value.details()
    assert "serves policy 'heuristic'" in e.value.details()
    assert p.tolaria is not None
    listed = await p.tolaria.ListRuns(pb.ListRunsRequest())
    assert list(listed.runs) == []  # nothing was created
