"""Must hold: the run completes when Tamiyo or nats-server dies mid-run, and a SIGKILLed
worker resumes from its last checkpoint with its seeds intact."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from esper.oona.consumer import Consumer, adrain
from esper.oona.subjects import run_events_filter
from esper.tolaria.runs import RunStore
from generated.esper.common.v1 import decision_pb2, seed_pb2
from generated.esper.tolaria.v1 import tolaria_service_pb2 as pb

from .conftest import tiny_config

S = seed_pb2
pytestmark = pytest.mark.integration


def _metrics(events):
    return [e.epoch_metrics for e in events if e.HasField("epoch_metrics")]


async def test_tamiyo_killed_mid_run_run_completes_with_degradation(platform_factory):
    cfg = tiny_config(epochs=8)
    p = await platform_factory(cfg)
    run_id = await p.start_run(cfg)
    killed_after: list[int] = []

    async def on_event(env):
        if env.HasField("epoch_metrics") and env.epoch_metrics.epoch == 2 and not killed_after:
            killed_after.append(env.sequence)
            await p.stop_part("tamiyo")

    events = await p.watch(run_id, timeout=120, on_event=on_event)
    assert events[-1].run_state.state == "succeeded", p.worker_log(run_id)
    assert [m.epoch for m in _metrics(events)] == list(range(1, 9))
    after = [e for e in events if e.sequence > killed_after[0]]
    tamiyo_down = [e.degradation for e in after if e.HasField("degradation")
                   and e.degradation.component == "tamiyo"]
    # One degradation per boundary Tamiyo missed (epochs 3..7), none of them "recovered";
    # after two misses the breaker answers at once instead of waiting out the deadline.
    kinds = [d.kind for d in tamiyo_down]
    assert len(kinds) == 5 and set(kinds) <= {"unavailable", "deadline_exceeded", "circuit_open"}
    assert "circuit_open" in kinds
    # No controller decision was applied after Tamiyo went away.
    assert not [e for e in after if e.HasField("decision")
                and any(d.kind != decision_pb2.DECISION_KIND_WAIT for d in e.decision.decisions)]
    run = await p.get_run(run_id)
    assert run.state == pb.RUN_STATE_SUCCEEDED and "tamiyo" in run.degraded


async def test_nats_killed_mid_run_drops_counted_and_publishing_resumes(platform_factory):
    # Ten epochs after the restart leave the publisher time to reconnect before the run ends.
    cfg = tiny_config(epochs=16)
    p = await platform_factory(cfg, worker_args=["--oona-max-queue", "8"])
    run_id = await p.start_run(cfg)
    marks: dict[str, int] = {}

    async def kill_once_epoch_2_is_stored() -> None:
        # Kill NATS once JetStream *holds* epoch 2's metrics (not when the log has them: the
        # publisher runs behind the log), so what was stored before the kill is known.
        stored = asyncio.Event()

        def on_stored(env):
            if env.HasField("epoch_metrics") and env.epoch_metrics.epoch == 2:
                marks["killed"] = env.sequence
                stored.set()

        async with Consumer(p.nats.url, durable="kill-trigger", fetch_timeout_s=0.2,
                            subject_filter=run_events_filter(run_id)) as trigger:
            await trigger.consume(on_stored, stop=stored)
        await asyncio.to_thread(p.nats.kill)

    killer = asyncio.create_task(kill_once_epoch_2_is_stored())

    async def on_event(env):
        if env.HasField("epoch_metrics") and env.epoch_metrics.epoch == 6 and "restarted" not in marks:
            await asyncio.wait_for(killer, 60)
            marks["restarted"] = env.sequence
            await asyncio.to_thread(p.nats.start)

    events = await p.watch(run_id, timeout=150, on_event=on_event)
    assert events[-1].run_state.state == "succeeded", p.worker_log(run_id)
    assert [m.epoch for m in _metrics(events)] == list(range(1, 17))
    oona = [e.degradation for e in events if e.HasField("degradation") and e.degradation.component == "oona"]
    kinds = [d.kind for d in oona]
    assert "unavailable" in kinds and "recovered" in kinds, kinds
    assert kinds.index("unavailable") < kinds.index("recovered")
    # The queue holds 8: four epochs of events overflowed it, and the drops were counted.
    dropped = max(d.dropped for d in oona)
    assert dropped > 0
    assert "oona dropped" in events[-1].run_state.detail
    # Publishing resumed: everything logged after the publisher reconnected is on JetStream,
    # up to the final state, and so is everything from before the outage.
    seen = await adrain(p.nats.url, run_events_filter(run_id), durable="after-outage", timeout=2.0)
    on_bus = {e.event_id for e in seen}
    events_stream = [e for e in events if not e.HasField("health")]  # health goes to telemetry
    recovered_at = next(e.sequence for e in events if e.HasField("degradation")
                        and e.degradation.component == "oona" and e.degradation.kind == "recovered")
    after = [e for e in events_stream if e.sequence > recovered_at]
    assert after and all(e.event_id in on_bus for e in after)
    assert events_stream[-1].event_id in on_bus
    before = [e for e in events_stream if 1 < e.sequence <= marks["killed"]]
    assert before and all(e.event_id in on_bus for e in before)
    # What the worker logged but the bus lacks is no more than the drops it counted (the
    # service's own "pending" record is written before any worker exists and is log-only).
    missing = [e for e in events_stream[1:] if e.event_id not in on_bus]
    assert 0 < len(missing) <= dropped


async def test_sigkilled_worker_resumes_from_its_checkpoint_with_seeds_intact(platform_factory):
    cfg = tiny_config(epochs=12, checkpoint_every=1)
    p = await platform_factory(cfg)
    run_id = await p.start_run(cfg)
    store = RunStore(p.ctx.data_dir / "tolaria")
    state: dict = {}

    async def on_event(env):
        if "killed_epoch" in state or not env.HasField("epoch_metrics"):
            return
        m = env.epoch_metrics
        grown = {s: st for s, st in m.stages.items() if st != S.SEED_STAGE_DORMANT}
        if m.epoch >= 3 and grown:
            state.update(killed_epoch=m.epoch, stages=dict(m.stages), alphas=dict(m.alphas),
                         parameters=m.parameters)
            pid = store.get(run_id).worker_pid
            os.kill(pid, signal.SIGKILL)

    events = await p.watch(run_id, timeout=150, on_event=on_event)
    assert events[-1].run_state.state == "succeeded", p.worker_log(run_id)
    restarts = [e for e in events if e.HasField("degradation") and e.degradation.component == "worker"]
    assert len(restarts) == 1 and "SIGKILL" in restarts[0].degradation.detail
    resumed = [e.run_state.detail for e in events
               if e.HasField("run_state") and e.run_state.state == "running"]
    assert len(resumed) == 2 and resumed[1].startswith("resumed from the checkpoint after epoch")
    resumed_epoch = int(resumed[1].rsplit(" ", 1)[1])
    # At most one checkpoint interval of work is lost.
    assert state["killed_epoch"] - cfg.checkpoint_every <= resumed_epoch <= state["killed_epoch"]
    # Every epoch is accounted for once (repeats of the replayed epoch are the same events).
    assert [m.epoch for m in _metrics(events)] == list(range(1, 13))
    # The seeds came back as they were: the first epoch the resumed worker finished shows
    # every slot that had grown still grown (or moved on by its own lifecycle), and no
    # slot went back to DORMANT or lost its blend weight.
    first_after = next(m for m in _metrics(events) if m.epoch == state["killed_epoch"] + 1)
    order = [S.SEED_STAGE_GERMINATED, S.SEED_STAGE_TRAINING, S.SEED_STAGE_BLENDING,
             S.SEED_STAGE_HOLDING, S.SEED_STAGE_FOSSILIZED]
    for slot, before in state["stages"].items():
        if before == S.SEED_STAGE_DORMANT:
            continue
        after = first_after.stages[slot]
        if before in order and after in order:
            assert order.index(after) >= order.index(before), (slot, before, after)
            assert first_after.alphas[slot] >= state["alphas"][slot] - 1e-9
        else:
            assert after in (S.SEED_STAGE_PRUNED, S.SEED_STAGE_EMBARGOED, S.SEED_STAGE_RESETTING)
    assert first_after.parameters >= state["parameters"] or any(
        first_after.stages[s] == S.SEED_STAGE_PRUNED for s in state["stages"])
    run = await p.get_run(run_id)
    assert run.state == pb.RUN_STATE_SUCCEEDED and run.degraded == []
    store.close()


async def test_urza_down_defers_germination_until_it_is_back(platform_factory):
    cfg = tiny_config(epochs=12)
    p = await platform_factory(cfg)
    run_id = await p.start_run(cfg)
    marks: dict[str, int] = {}

    async def on_event(env):
        if not env.HasField("epoch_metrics"):
            return
        # Urza has served the run's kernel candidates by epoch 1; then it goes away.
        if env.epoch_metrics.epoch == 1 and "down" not in marks:
            marks["down"] = env.sequence
            await p.stop_part("urza")
        elif env.epoch_metrics.epoch == 4 and "up" not in marks:
            marks["up"] = env.sequence
            await p.start_part("urza")

    events = await p.watch(run_id, timeout=150, on_event=on_event)
    assert events[-1].run_state.state == "succeeded", p.worker_log(run_id)
    outage = [e for e in events if marks["down"] < e.sequence <= marks["up"]]
    urza = [e.degradation for e in outage if e.HasField("degradation") and e.degradation.component == "urza"]
    assert urza and all(d.kind in ("unavailable", "deadline_exceeded", "circuit_open") for d in urza)
    # The run's kernel source (Urza) could not offer or load a kernel, so Tamiyo, which
    # chooses among the candidates the run sends, could not germinate: nothing was attached.
    assert all("no kernel candidates" in d.detail or "not loaded" in d.detail for d in urza), urza
    rejected = [r for e in outage if e.HasField("decision") for r in e.decision.rejected.values()]
    assert all("kernel unavailable" in r for r in rejected)
    assert not [e for e in outage if e.HasField("lifecycle")]
    # Once Urza is back the deferred germination happens.
    after = [e for e in events if e.sequence > marks["up"]]
    assert any(e.HasField("lifecycle") and e.lifecycle.to_stage == S.SEED_STAGE_GERMINATED for e in after)
