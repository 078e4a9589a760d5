"""Tamiyo is safe to replicate: two independent Tamiyo services answering alternate
boundaries of one run take the same decisions as one service, because the run's slot
history travels in every snapshot (`HealthSnapshot.slot_records`), not in a replica's memory."""

from __future__ import annotations

import pytest
import torch

from esper.grow import GrowthConfig
from esper.tamiyo.client import TamiyoController
from generated.esper.common.v1 import decision_pb2 as D
from tests.integration.grow.tamiyo_host import KEY, TamiyoThread
from tests.unit.grow.growkit import cases, evaluate, loader, make_grower, train_epoch

pytestmark = pytest.mark.integration

CASE = cases()["tabular_mlp"]
# Fossilizing needs 2 consecutive qualifying HOLDING boundaries: a replica that saw only
# every other boundary would never count 2.
HEURISTIC = {"warmup_epochs": 1, "plateau_window": 1, "plateau_threshold": 0.5,
             "fossilize_epochs": 2, "fossilize_threshold": 0.0, "holding_patience_epochs": 4}
EPOCHS = 8


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def replicas(tmp_path):
    ts = [TamiyoThread(tmp_path / f"r{i}", {"policy": "heuristic", "heuristic": HEURISTIC})
          for i in range(3)]
    yield ts
    for t in ts:
        t.stop()


class RoundRobin:
    """One controller over several replicas, the next one at every boundary (what a
    client-side round-robin or a load balancer without stickiness does; both Decides of a
    boundary that probes go to the same one here, which does not matter to the result)."""

    component = "tamiyo"
    uses_probes = True

    def __init__(self, controllers, *, strip_history: bool = False) -> None:
        self.controllers = controllers
        self.strip_history = strip_history
        self.calls = 0
        self.answered_by: list[int] = []

    def decide(self, snapshot, candidates):
        if self.strip_history:  # what a client from before slot histories sends
            snapshot = type(snapshot).FromString(snapshot.SerializeToString())
            snapshot.slot_history = False
            snapshot.ClearField("slot_records")
        i = snapshot.epoch % len(self.controllers)
        self.calls += 1
        self.answered_by.append(i)
        return self.controllers[i].decide(snapshot, candidates)


def run(controller):
    torch.manual_seed(0)
    model = CASE.build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    grower = make_grower(CASE, model, opt, controller=controller, run_id="one-run",
                         config=GrowthConfig(max_seeds=2, total_epochs=EPOCHS))
    data = loader(CASE)
    out = []
    for _ in range(EPOCHS):
        tl = train_epoch(model, grower, data, opt, CASE.loss_fn)
        r = grower.end_epoch(train_loss=tl, val_loss=evaluate(model, CASE))
        out.append([(D.DecisionKind.Name(d.kind), d.slot_id, d.kernel_id) for d in r.applied])
    return out, grower


def test_alternating_replicas_decide_as_one_instance(replicas) -> None:
    a, b, c = (TamiyoController(t.target, api_key=KEY, timeout_s=10.0) for t in replicas)
    with a, b, c:
        single, g1 = run(RoundRobin([a]))
        rr = RoundRobin([b, c])
        alternating, g2 = run(rr)
    assert set(rr.answered_by) == {0, 1}
    kinds = [k for boundary in single for k, _, _ in boundary]
    assert "DECISION_KIND_GERMINATE" in kinds and "DECISION_KIND_FOSSILIZE" in kinds
    assert alternating == single
    assert g1.fossilized() == g2.fossilized()
    for k, v in g1.model.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, g2.model.state_dict()[k]), k


def test_without_the_history_in_the_snapshot_replicas_would_disagree(replicas) -> None:
    # The same alternation with what an old client sends: each replica remembers only the
    # boundaries it answered, so no seed ever shows 2 consecutive HOLDING epochs to one
    # of them. (Why the history belongs in the snapshot.)
    a, b, c = (TamiyoController(t.target, api_key=KEY, timeout_s=10.0) for t in replicas)
    with a, b, c:
        single, _ = run(RoundRobin([a], strip_history=True))
        alternating, _ = run(RoundRobin([b, c], strip_history=True))
    assert any(k == "DECISION_KIND_FOSSILIZE" for boundary in single for k, _, _ in boundary)
    assert not any(k == "DECISION_KIND_FOSSILIZE" for boundary in alternating for k, _, _ in boundary)
    assert alternating != single
