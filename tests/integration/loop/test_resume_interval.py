"""A SIGKILLed worker checkpointing every 3 epochs resumes from exactly its newest checkpoint.

With a checkpoint every epoch, "resumed from the newest checkpoint", "resumed from the
oldest one kept" and "checkpointed half as often" are all within one interval of the kill.
Here the interval is 3 and the worker is frozen (SIGSTOP) before it is killed, so the
epochs it completed are known from its own events, and so is the one checkpoint it must
resume from: the last multiple of 3 it completed.

Written against the run's public surface: StartRun, WatchRun's events, GetRun (whose
`epoch` is the last epoch the worker reported), and the worker as a process.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from esper.tolaria.runs import RunStore

from .conftest import tiny_config

pytestmark = pytest.mark.integration

EVERY = 3
EPOCHS = 14
KILL_AFTER = 10  # past two checkpoints (6, 9): the newest and the oldest kept differ


def _metrics(events):
    return [e for e in events if e.HasField("epoch_metrics")]


async def test_sigkilled_worker_resumes_from_its_newest_checkpoint_at_interval_3(platform_factory):
    cfg = tiny_config(epochs=EPOCHS, checkpoint_every=EVERY)
    p = await platform_factory(cfg)
    run_id = await p.start_run(cfg)
    store = RunStore(p.ctx.data_dir / "tolaria")
    state: dict = {}

    async def on_event(env):
        if "done" in state or not env.HasField("epoch_metrics") or env.epoch_metrics.epoch < KILL_AFTER:
            return
        pid = store.get(run_id).worker_pid
        os.kill(pid, signal.SIGSTOP)
        # Frozen: every epoch it finished is in the log (the worker writes its events
        # synchronously), so GetRun's epoch is exactly what it completed. At a multiple of 3
        # it may be between the epoch's metrics and its checkpoint; let it run on a little.
        while (done := (await p.get_run(run_id)).epoch) % EVERY == 0:
            os.kill(pid, signal.SIGCONT)
            await asyncio.sleep(0.02)
            os.kill(pid, signal.SIGSTOP)
        state["done"] = done
        os.kill(pid, signal.SIGKILL)

    events = await p.watch(run_id, timeout=180, on_event=on_event)
    store.close()
    assert events[-1].run_state.state == "succeeded", p.worker_log(run_id)
    done = state["done"]
    assert KILL_AFTER <= done < EPOCHS
    expected = EVERY * (done // EVERY)
    restarts = [e for e in events if e.HasField("degradation") and e.degradation.component == "worker"]
    assert len(restarts) == 1 and "SIGKILL" in restarts[0].degradation.detail
    resumed = [e.run_state.detail for e in events
               if e.HasField("run_state") and e.run_state.state == "running"]
    assert resumed[-1] == f"resumed from the checkpoint after epoch {expected}", (done, resumed)
    # The replayed epochs (expected+1 .. done) re-emit their first event ids, which the log
    # keeps once; what the resumed worker adds starts after the kill.
    after = [m.epoch_metrics.epoch for m in _metrics(events) if m.sequence > restarts[0].sequence]
    assert after == list(range(done + 1, EPOCHS + 1)), (done, after)
    # Every epoch is accounted for once (the replayed ones carry their first event ids).
    assert [m.epoch_metrics.epoch for m in _metrics(events)] == list(range(1, EPOCHS + 1))
