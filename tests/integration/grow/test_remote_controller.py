"""The same user loop with the heuristic in process and over gRPC (TamiyoController against a
real TamiyoService on loopback) takes the same decisions and ends with the same model."""

from __future__ import annotations

import socket

import pytest
import torch

from esper.errors import AuthError, InvalidArgumentError
from esper.grow import GrowthConfig, heuristic_controller
from esper.tamiyo.client import TamiyoClient, TamiyoController
from esper.tamiyo.policy import KernelCandidate
from generated.esper.common.v1 import decision_pb2 as D
from tests.integration.grow.tamiyo_host import KEY, TamiyoThread
from tests.unit.grow.growkit import cases, evaluate, loader, make_grower, train_epoch

pytestmark = pytest.mark.integration

CASE = cases()["tabular_mlp"]
HEURISTIC = {"warmup_epochs": 1, "plateau_window": 1, "plateau_threshold": 0.5,
             "fossilize_epochs": 1, "fossilize_threshold": 0.0, "holding_patience_epochs": 2}
EPOCHS = 7


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tamiyo(tmp_path):
    t = TamiyoThread(tmp_path, {"policy": "heuristic", "heuristic": HEURISTIC})
    yield t
    t.stop()


def run(controller) -> tuple[list[list[tuple]], dict[str, torch.Tensor], list]:
    torch.manual_seed(0)
    model = CASE.build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    grower = make_grower(CASE, model, opt, controller=controller, run_id="same-run",
                         config=GrowthConfig(max_seeds=2, total_epochs=EPOCHS))
    data = loader(CASE)
    boundaries = []
    for _ in range(EPOCHS):
        tl = train_epoch(model, grower, data, opt, CASE.loss_fn)
        r = grower.end_epoch(train_loss=tl, val_loss=evaluate(model, CASE))
        boundaries.append([(D.DecisionKind.Name(d.kind), d.slot_id, d.kernel_id, d.blueprint_id, d.policy)
                           for d in r.decisions])
    return boundaries, grower.model.state_dict(), grower.history.decisions


def test_heuristic_in_process_and_over_grpc_take_the_same_decisions(tamiyo) -> None:
    local, local_state, local_hist = run(heuristic_controller(HEURISTIC))
    with TamiyoController(tamiyo.target, api_key=KEY, timeout_s=5.0) as remote_ctrl:
        remote, remote_state, remote_hist = run(remote_ctrl)
        assert remote_ctrl.last_response is not None and remote_ctrl.last_response.policy == "heuristic"
    assert remote == local
    kinds = {d["kind"] for d in local_hist}
    assert "DECISION_KIND_GERMINATE" in kinds and kinds & {"DECISION_KIND_FOSSILIZE", "DECISION_KIND_PRUNE"}
    assert [h["rejected"] for h in remote_hist] == [h["rejected"] for h in local_hist]
    for k, v in local_state.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, remote_state[k]), k


def _snapshot_and_candidates():
    from esper.grow import BuiltinKernels

    torch.manual_seed(0)
    model = CASE.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grower = make_grower(CASE, model, opt, run_id="r")
    site = grower.model.site_signature("1")
    return grower.snapshot(), {"1": BuiltinKernels(["bottleneck_mlp"]).candidates(site)}


def test_the_service_checks_the_callers_candidates(tamiyo) -> None:
    snap, offered = _snapshot_and_candidates()
    with TamiyoController(tamiyo.target, api_key=KEY, timeout_s=5.0) as c:
        with pytest.raises(InvalidArgumentError) as e:
            c.decide(snap, {"nope": offered["1"]})
        assert e.value.field == "candidates.slots[0].slot_id"
        with pytest.raises(InvalidArgumentError) as e:
            c.decide(snap, {"1": offered["1"] * 2})
        assert e.value.field == "candidates.slots[0].kernels[1].kernel_id"
        too_long = KernelCandidate(kernel_id="x" * 300, blueprint_id="bp", parameters=1)
        with pytest.raises(InvalidArgumentError) as e:
            c.decide(snap, {"1": [too_long]})
        assert "kernel_id" in e.value.field
    with (TamiyoController(tamiyo.target, api_key="wrong-key-0123456789abcdef", timeout_s=5.0) as c,
          pytest.raises(AuthError)):
        c.decide(snap, offered)


def test_a_caller_that_sends_no_candidates_still_gets_urzas_path(tamiyo) -> None:
    snap, _ = _snapshot_and_candidates()
    with TamiyoClient(tamiyo.target, api_key=KEY) as c:
        resp = c.decide(snap, timeout_s=5.0)
    (d,) = resp.decisions
    assert d.kind == D.DECISION_KIND_WAIT and "no Urza endpoint" in d.reason


def test_tamiyo_down_degrades_each_boundary_and_the_breaker_opens() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    torch.manual_seed(0)
    model = CASE.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    events: list = []
    with TamiyoController(dead, api_key=KEY, timeout_s=0.3) as ctrl:
        grower = make_grower(CASE, model, opt, controller=ctrl, events=events)
        data = loader(CASE)
        reports = []
        for _ in range(3):
            train_epoch(model, grower, data, opt, CASE.loss_fn)
            reports.append(grower.end_epoch(val_loss=1.0))
    kinds = [e.degradation.kind for e in events if e.HasField("degradation")]
    assert kinds[:2] in (["unavailable", "unavailable"], ["deadline_exceeded", "deadline_exceeded"],
                         ["unavailable", "deadline_exceeded"], ["deadline_exceeded", "unavailable"]), kinds
    assert kinds[2] == "circuit_open"  # two misses of the last four: no third wait
    assert all(e.degradation.component == "tamiyo" for e in events if e.HasField("degradation"))
    assert all(r.decisions == [] for r in reports) and not grower.live()
