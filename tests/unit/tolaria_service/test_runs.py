"""Run store: records, idempotency, pagination, and the crash-safe event log."""

from __future__ import annotations

import os

import pytest

from esper.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from esper.tolaria.runs import EventLog, RunStore, apply_event, new_envelope
from generated.esper.tolaria.v1 import tolaria_service_pb2 as pb


def _cfg(epochs: int = 3) -> pb.RunConfig:
    return pb.RunConfig(task="mnist1d", host="cnn", controller="heuristic", epochs=epochs, batch_size=64)


def test_create_is_idempotent_on_request_id(tmp_path):
    store = RunStore(tmp_path)
    rid = "6f1c2f0e-8a55-4c57-9b8e-0f2b4f1f7a11"
    a, created_a = store.create(_cfg(), request_id=rid)
    b, created_b = store.create(_cfg(), request_id=rid)
    assert created_a and not created_b
    assert a.run_id == b.run_id
    with pytest.raises(AlreadyExistsError, match=rid):
        store.create(_cfg(epochs=9), request_id=rid)
    assert (store.run_dir(a.run_id) / "config.pb").exists()


def test_records_survive_reopen_and_unknown_id_is_not_found(tmp_path):
    store = RunStore(tmp_path)
    rec, _ = store.create(_cfg())
    rec.state = pb.RUN_STATE_RUNNING
    rec.epoch = 2
    rec.degraded = ["tamiyo"]
    store.update(rec)
    store.close()
    again = RunStore(tmp_path).get(rec.run_id)
    assert again.state == pb.RUN_STATE_RUNNING and again.epoch == 2 and again.degraded == ["tamiyo"]
    assert again.config.epochs == 3
    with pytest.raises(NotFoundError, match="run-nope"):
        RunStore(tmp_path).get("run-nope")


def test_list_pages_through_all_runs_and_filters_by_state(tmp_path):
    store = RunStore(tmp_path)
    ids = [store.create(_cfg())[0].run_id for _ in range(5)]
    done = store.get(ids[1])
    done.state = pb.RUN_STATE_SUCCEEDED
    store.update(done)
    seen, token = [], ""
    while True:
        page, token = store.list(page_size=2, page_token=token)
        assert len(page) <= 2
        seen += [r.run_id for r in page]
        if not token:
            break
    assert seen == ids
    only, _ = store.list(page_size=10, state=pb.RUN_STATE_SUCCEEDED)
    assert [r.run_id for r in only] == [ids[1]]
    with pytest.raises(InvalidArgumentError) as e:
        store.list(page_size=2, page_token="zz-not-a-token")
    assert e.value.field == "page_token"


def test_event_log_sequences_replay_and_torn_tail(tmp_path):
    path = tmp_path / "events.log"
    log = EventLog(path)
    for i in range(4):
        env = new_envelope("run-x", source="tolaria", epoch=i)
        env.epoch_metrics.epoch = i
        assert log.append(env, sync=i == 3) == (i + 1, True)
    log.close()
    # A SIGKILL mid-write leaves half a record behind.
    with open(path, "ab") as f:
        f.write(b"\x00\x00\x01\x00partial")
    assert [e.sequence for e in EventLog(path).replay()] == [1, 2, 3, 4]
    assert [e.sequence for e in EventLog(path).replay(from_sequence=3)] == [3, 4]
    # A second writer (another process) continues the sequence and drops the torn tail.
    other = EventLog(path)
    env = new_envelope("run-x", source="tolaria")
    env.run_state.state = "failed"
    assert other.append(env) == (5, True)
    assert [e.sequence for e in EventLog(path).replay()] == [1, 2, 3, 4, 5]
    # The first writer sees the other's append before its own next one.
    log2 = EventLog(path)
    log2.append(new_envelope("run-x", source="tolaria"))
    assert other.append(new_envelope("run-x", source="tolaria")) == (7, True)
    assert EventLog(path).last_sequence() == 7
    assert os.path.getsize(path) == EventLog(path).read(0)[1]
    # A resumed worker re-emits an event it logged before dying: logged once, same sequence.
    again = new_envelope("run-x", source="tolaria", event_id=env.event_id)
    again.run_state.state = "failed"
    assert EventLog(path).append(again) == (5, False) and again.sequence == 5
    assert EventLog(path).last_sequence() == 7


def test_apply_event_folds_metrics_state_and_degradation(tmp_path):
    store = RunStore(tmp_path)
    rec, _ = store.create(_cfg())
    env = new_envelope(rec.run_id, source="tolaria", step=40)
    env.sequence = 7
    env.epoch_metrics.epoch = 2
    env.epoch_metrics.val_accuracy = 0.75
    env.epoch_metrics.parameters = 1234
    apply_event(rec, env)
    deg = new_envelope(rec.run_id, source="tolaria")
    deg.sequence = 8
    deg.degradation.component = "tamiyo"
    deg.degradation.kind = "unavailable"
    apply_event(rec, deg)
    assert (rec.epoch, rec.val_accuracy, rec.parameters, rec.global_step) == (2, 0.75, 1234, 40)
    assert rec.degraded == ["tamiyo"] and rec.last_sequence == 8
    deg.degradation.kind = "recovered"
    apply_event(rec, deg)
    st = new_envelope(rec.run_id, source="tolaria")
    st.run_state.state = "succeeded"
    apply_event(rec, st)
    assert rec.degraded == [] and rec.state == pb.RUN_STATE_SUCCEEDED and rec.ended
