"""Data-parallel runs through Tolaria: StartRun with world_size 2 → torchrun, 2 gloo ranks.

Rank 0 alone asks Tamiyo and Urza's catalog, writes the event log and checkpoints; each
rank writes `<run-dir>/ranks/rank-<r>.json` with a digest of its parameters at the end.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter

import pytest

from .conftest import tiny_config

pytestmark = pytest.mark.integration

EPOCHS = 10


def _ranks(p, run_id) -> list[dict]:
    d = p.run_dir(run_id) / "ranks"
    return [json.loads((d / f"rank-{r}.json").read_text()) for r in range(2)]


def _once(events) -> None:
    """Every event is in the log once: no two ranks (or a replay) wrote the same one."""
    ids = Counter(e.event_id for e in events)
    assert not [i for i, n in ids.items() if n > 1]
    epochs = [e.epoch_metrics.epoch for e in events if e.HasField("epoch_metrics")]
    assert epochs == list(range(1, EPOCHS + 1))
    states = Counter(e.run_state.state for e in events if e.HasField("run_state"))
    assert states["succeeded"] == 1 and states["pending"] == 1


async def test_two_rank_run_grows_and_ends_with_identical_parameters(platform_factory):
    cfg = tiny_config(epochs=EPOCHS, world_size=2)
    p = await platform_factory(cfg)
    run_id = await p.start_run(cfg)
    events = await p.watch(run_id, timeout=400)
    assert events[-1].run_state.state == "succeeded", p.worker_log(run_id)
    _once(events)
    running = [e.run_state.detail for e in events if e.HasField("run_state") and e.run_state.state == "running"]
    assert running == ["started (2 ranks)"]
    germinated = [e for e in events if e.HasField("decision")
                  and any(d.kind == 1 and i not in e.decision.rejected for i, d in enumerate(e.decision.decisions))]
    assert germinated and any(e.HasField("lifecycle") for e in events), p.worker_log(run_id)
    # Rank 1 loaded each seed from the verified cache rank 0 filled: it never asked Urza.
    assert "not in the shared cache" not in p.worker_log(run_id)
    r0, r1 = _ranks(p, run_id)
    assert r0["pid"] != r1["pid"]
    assert r0["digest"] == r1["digest"] and r0["global_step"] == r1["global_step"] > 0
    assert (await p.get_run(run_id)).config.world_size == 2


@pytest.mark.slow
@pytest.mark.skip(reason="QUARANTINED (issue 10, open): under load (two CPU hogs, a fresh-clone "
                  ".ci/run) the run never finished after the rank's SIGKILL and the test hit the "
                  "300 s timeout; it passed 4 of 4 alone. Remove this mark to run it; "
                  "the restart path must be made robust before it gates CI again")
async def test_sigkilled_rank_is_restarted_and_the_run_resumes(platform_factory):
    cfg = tiny_config(epochs=EPOCHS, world_size=2, checkpoint_every=1)
    p = await platform_factory(cfg)
    run_id = await p.start_run(cfg)
    state: dict = {}

    async def on_event(env):
        if "killed_after" in state or not env.HasField("epoch_metrics") or env.epoch_metrics.epoch < 4:
            return
        pid = _ranks(p, run_id)[1]["pid"]
        os.kill(pid, signal.SIGKILL)
        state["killed_after"] = env.epoch_metrics.epoch

    events = await p.watch(run_id, timeout=400, on_event=on_event)
    assert events[-1].run_state.state == "succeeded", p.worker_log(run_id)
    _once(events)
    killed_after = state["killed_after"]
    restarted = [e for e in events if e.HasField("degradation") and e.degradation.kind == "ranks_restarted"]
    assert len(restarted) == 1, p.worker_log(run_id)
    resumed = [e.run_state.detail for e in events if e.HasField("run_state") and e.run_state.state == "running"]
    assert len(resumed) == 2 and resumed[-1].startswith("resumed from the checkpoint after epoch ")
    from_epoch = int(resumed[-1].split("epoch ")[1].split()[0])
    # At most one checkpoint interval (1 epoch) lost: the kill came after epoch `killed_after`
    # reported, while the next epoch may have been under way.
    assert killed_after - 1 <= from_epoch <= EPOCHS, (killed_after, resumed)
    r0, r1 = _ranks(p, run_id)
    assert r0["restarts"] == r1["restarts"] == 1
    assert r0["digest"] == r1["digest"]


@pytest.mark.slow
async def test_stop_run_stops_every_rank_at_one_step_with_one_checkpoint(platform_factory):
    from generated.esper.tolaria.v1 import tolaria_service_pb2 as pb

    cfg = tiny_config(epochs=40, world_size=2)
    p = await platform_factory(cfg)
    run_id = await p.start_run(cfg)
    asked: dict = {}

    async def on_event(env):
        if "stop" not in asked and env.HasField("epoch_metrics") and env.epoch_metrics.epoch >= 2:
            asked["stop"] = True
            await p.tolaria.StopRun(pb.StopRunRequest(run_id=run_id, reason="test"))

    events = await p.watch(run_id, timeout=400, on_event=on_event)
    states = [e.run_state.state for e in events if e.HasField("run_state")]
    assert states[-1] == "stopped" and states.count("stopped") == 1, (states, p.worker_log(run_id))
    # Both ranks left the loop at the same step (SIGTERM reached them at different moments).
    r0, r1 = _ranks(p, run_id)
    assert r0["global_step"] == r1["global_step"] and r0["digest"] == r1["digest"]
    assert r0["epoch"] < 40
