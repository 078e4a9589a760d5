"""Grower in the user's own loop: any model, any optimizer, any loss, misuse, degradation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from esper.errors import ConfigError, FailedPreconditionError, NotFoundError, UnavailableError
from esper.grow import BuiltinKernels, Grower, GrowthConfig, fixed_controller, heuristic_controller
from esper.kasmina import SeedStage
from generated.esper.common.v1 import decision_pb2 as D
from tests.unit.grow.growkit import (
    FAST,
    cases,
    evaluate,
    held_out,
    loader,
    make_grower,
    train_epoch,
)

CASES = cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_seed_grows_and_fossilizes_in_any_model(name: str) -> None:
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    events: list = []
    grower = make_grower(case, model, opt, events=events)
    data = loader(case)
    x, _ = held_out(case)
    train_epoch(model, grower, data, opt, case.loss_fn)
    model.eval()
    with torch.no_grad():
        before = model(x)
    report = grower.end_epoch(val_loss=evaluate(model, case))
    assert [D.DecisionKind.Name(d.kind) for d in report.applied] == ["DECISION_KIND_GERMINATE"]
    slot_id = report.applied[0].slot_id
    model.eval()
    with torch.no_grad():
        assert (model(x) - before).abs().max() <= 1e-6  # function-preserving insertion
    seed = grower.model.slots[slot_id].seed
    start = [p.detach().clone() for p in seed.parameters()]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in seed.parameters())
    stages = []
    for _ in range(4):
        train_epoch(model, grower, data, opt, case.loss_fn)
        stages.append(grower.end_epoch(val_loss=evaluate(model, case)).stages[slot_id])
    assert stages[-1] == "FOSSILIZED", stages
    assert any(not torch.equal(a, b) for a, b in zip(start, seed.parameters(), strict=True))
    kinds = [e.WhichOneof("payload") for e in events]
    assert {"lifecycle", "gate", "health", "decision", "epoch_metrics"} <= set(kinds)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert all(e.run_id == grower.run_id and e.event_id == f"{grower.run_id}/{e.sequence}"
               for e in events)


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01),
    lambda p: torch.optim.RMSprop(p, lr=1e-3),
    lambda p: torch.optim.Adagrad(p, lr=0.05),
], ids=["SGD", "Adam", "AdamW", "RMSprop", "Adagrad"])
def test_any_optimizer_trains_the_seed_and_forgets_it_at_prune(make_opt) -> None:
    case = CASES["tabular_mlp"]
    torch.manual_seed(0)
    model = case.build()
    opt = make_opt(model.parameters())
    grower = make_grower(case, model, opt, controller=fixed_controller(germinate_epochs=(1,)))
    data = loader(case)
    train_epoch(model, grower, data, opt, case.loss_fn)
    grower.end_epoch(val_loss=evaluate(model, case))
    (slot_id,) = grower.live()
    seed = grower.model.slots[slot_id].seed
    start = [p.detach().clone() for p in seed.parameters()]
    train_epoch(model, grower, data, opt, case.loss_fn)
    assert any(not torch.equal(a, b) for a, b in zip(start, seed.parameters(), strict=True))
    assert any(p in opt.state for p in seed.parameters())
    rejected = grower.apply([D.Decision(kind=D.DECISION_KIND_PRUNE, slot_id=slot_id, reason="test")])
    assert rejected == {}
    assert len(opt.param_groups) == 1 and not any(p in opt.state for p in seed.parameters())
    train_epoch(model, grower, data, opt, case.loss_fn)
    grower.end_epoch(val_loss=evaluate(model, case))


def test_heuristic_grows_on_a_plateau_and_reports_why() -> None:
    case = CASES["tabular_mlp"]
    torch.manual_seed(0)
    model = case.build()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)  # learns ~nothing: a plateau at once
    grower = make_grower(case, model, opt, controller=heuristic_controller(
        warmup_epochs=1, plateau_window=1, plateau_threshold=0.05))
    data = loader(case)
    reports = []
    for _ in range(3):
        tl = train_epoch(model, grower, data, opt, case.loss_fn)
        reports.append(grower.end_epoch(train_loss=tl, val_loss=evaluate(model, case)))
    germinated = [d for r in reports for d in r.applied if d.kind == D.DECISION_KIND_GERMINATE]
    assert len(germinated) == 1 and "plateau" in germinated[0].reason
    assert reports[0].snapshot.val_loss_history and reports[0].snapshot.graph.nodes
    assert grower.history.decisions[0]["kind"] == "DECISION_KIND_GERMINATE"


def test_the_snapshot_holds_the_graph_history_budget_and_contribution() -> None:
    case = CASES["transformer"]
    torch.manual_seed(0)
    model = case.build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    grower = make_grower(case, model, opt, config=GrowthConfig(max_seeds=1, max_added_parameters=10**6,
                                                               total_epochs=9, task="toy"))
    data = loader(case)
    snaps = []
    for _ in range(4):
        tl = train_epoch(model, grower, data, opt, case.loss_fn)
        snaps.append(grower.end_epoch(train_loss=tl, val_loss=1.0, val_accuracy=0.5).snapshot)
    last = snaps[-1]
    assert (last.epoch, last.total_epochs, last.task) == (4, 9, "toy")
    assert list(last.train_loss_history) == grower.history.train_loss and len(last.val_loss_history) == 4
    assert last.seeds_left == 0 and last.host_parameters == sum(p.numel() for p in model.parameters())
    slot_nodes = [n for n in last.graph.nodes if n.kind == "slot"]
    assert [n.slot_id for n in slot_nodes] == ["encoder.layers.0", "encoder.layers.1"]
    assert len(last.graph.edges) == len(last.graph.nodes) - 1
    live = next(s for s in last.slots if s.stage != 1)
    assert live.contribution_measured and math.isfinite(live.contribution)
    assert last.parameters_left == 10**6 - live.seed_parameters


def test_step_never_called_is_an_error_at_the_boundary() -> None:
    case = CASES["tabular_mlp"]
    model = case.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grower = make_grower(case, model, opt)
    train_epoch(model, None, loader(case), opt, case.loss_fn)  # forgot grower.step()
    with pytest.raises(FailedPreconditionError, match=r"grower.step\(\) was not called") as e:
        grower.end_epoch(val_loss=1.0)
    assert e.value.reason == "NO_STEP" and "stepped 4 times" in str(e.value)


def test_seeds_outside_the_stepped_optimizer_are_an_error_at_the_boundary() -> None:
    case = CASES["tabular_mlp"]
    model = case.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grower = make_grower(case, model, opt)
    data = loader(case)
    train_epoch(model, grower, data, opt, case.loss_fn)
    grower.end_epoch(val_loss=1.0)
    assert grower.live()
    # The user rebuilds the optimizer and keeps stepping it: the seed would never train.
    fresh = torch.optim.SGD(model.parameters(), lr=0.1)
    train_epoch(model, grower, data, fresh, case.loss_fn)
    with pytest.raises(FailedPreconditionError, match="never stepped") as e:
        grower.end_epoch(val_loss=1.0)
    assert e.value.reason == "OPTIMIZER_NOT_STEPPED"
    # A seed group removed by hand from the managed optimizer.
    grower.attach_optimizer(fresh)
    del fresh.param_groups[1]
    train_epoch(model, grower, data, fresh, case.loss_fn)
    with pytest.raises(FailedPreconditionError, match=r"in no param group") as e:
        grower.end_epoch(val_loss=1.0)
    assert e.value.reason == "SEED_NOT_OPTIMIZED"


def test_bad_arguments_name_what_is_wrong() -> None:
    case = CASES["tabular_mlp"]
    model = case.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="needs kernels="):
        Grower(model, sites=["1"], example_input=case.x[:2], optimizer=opt,
               loss_fn=case.loss_fn, held_out=held_out(case), controller=fixed_controller())
    with pytest.raises(ConfigError, match="held_out"):
        Grower(model, sites=["1"], example_input=case.x[:2], optimizer=opt,
               controller=fixed_controller(), kernels=BuiltinKernels())
    with pytest.raises(ConfigError, match="matches no module"):
        Grower(model, sites=["nope"], example_input=case.x[:2], optimizer=opt)
    with pytest.raises(ValueError, match="GrowthConfig.max_seeds"):
        GrowthConfig(max_seeds=-1)
    with pytest.raises(ConfigError, match="GrowthConfig.max_seeds"):
        GrowthConfig.from_dict({"max_seeds": -1})
    with pytest.raises(ConfigError, match="unknown GrowthConfig key"):
        GrowthConfig.from_dict({"max_seed": 1})
    with pytest.raises(ConfigError, match="not a torch.optim.lr_scheduler"):
        Grower(model, sites=["1"], example_input=case.x[:2], optimizer=opt, scheduler=object())
    grower = Grower(model, sites=["1"], example_input=case.x[:2], optimizer=opt)
    train_epoch(model, grower, loader(case), opt, case.loss_fn)
    with pytest.raises(ConfigError, match="val_loss=nan is not finite"):
        grower.end_epoch(val_loss=float("nan"))


class _Failing:
    component = "urza"

    def __init__(self, inner: BuiltinKernels) -> None:
        self.inner, self.down = inner, True

    def candidates(self, site):
        if self.down:
            raise UnavailableError("Urza is down")
        return self.inner.candidates(site)

    def load(self, kernel_id, site=None):
        return self.inner.load(kernel_id, site)


class _DownController:
    component = "tamiyo"

    def decide(self, snapshot, candidates):
        raise UnavailableError("Tamiyo is down", reason="CIRCUIT_OPEN")


def test_a_failing_source_or_controller_degrades_the_boundary_and_training_goes_on() -> None:
    case = CASES["tabular_mlp"]
    model = case.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    events: list = []
    source = _Failing(BuiltinKernels(["bottleneck_mlp"]))
    grower = Grower(model, sites=case.sites, example_input=case.x[:4], optimizer=opt,
                    loss_fn=case.loss_fn, held_out=held_out(case), kasmina=FAST,
                    controller=fixed_controller(germinate_epochs=(1, 2)), kernels=source,
                    event_sink=events.append)
    data = loader(case)
    train_epoch(model, grower, data, opt, case.loss_fn)
    r1 = grower.end_epoch(val_loss=1.0)
    assert not r1.applied and r1.degraded and "urza unavailable" in r1.degraded[0]
    source.down = False
    train_epoch(model, grower, data, opt, case.loss_fn)
    r2 = grower.end_epoch(val_loss=1.0)
    assert [d.kind for d in r2.applied] == [D.DECISION_KIND_GERMINATE]
    assert any("recovered" in d for d in r2.degraded)
    degr = [(e.degradation.component, e.degradation.kind) for e in events if e.HasField("degradation")]
    assert degr == [("urza", "unavailable"), ("urza", "recovered")]

    grower.controller = _DownController()
    train_epoch(model, grower, data, opt, case.loss_fn)
    r3 = grower.end_epoch(val_loss=1.0)
    assert r3.decisions == []
    assert r3.degraded == ["tamiyo circuit_open: no growth decision this boundary: Tamiyo is down"]


def test_decisions_that_cannot_apply_are_rejected_with_a_reason() -> None:
    case = CASES["tabular_mlp"]
    model = case.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kernels = BuiltinKernels(["bottleneck_mlp"])
    grower = Grower(model, sites=case.sites, example_input=case.x[:4], optimizer=opt,
                    loss_fn=case.loss_fn, held_out=held_out(case), kasmina=FAST,
                    controller=fixed_controller(), kernels=kernels,
                    config=GrowthConfig(max_seeds=1, max_added_parameters=10))
    site = grower.model.site_signature("1")
    kid = kernels.candidates(site)[0].kernel_id
    g = D.DECISION_KIND_GERMINATE
    rejected = grower.apply([
        D.Decision(kind=g, slot_id="nope", kernel_id=kid),
        D.Decision(kind=D.DECISION_KIND_FOSSILIZE, slot_id="1"),
        D.Decision(kind=g, slot_id="1", kernel_id="local:bp-0000:NC:16:-:FLOAT32"),
        D.Decision(kind=g, slot_id="1", kernel_id=kid),
    ])
    assert "no slot 'nope'" in rejected[0]
    assert rejected[1].startswith("ILLEGAL_TRANSITION")
    assert rejected[2].startswith("kernel unavailable")
    assert "more than the 10 left" in rejected[3]
    with pytest.raises(NotFoundError):
        kernels.load("sha256:abc")
    assert all(s.current_stage is SeedStage.DORMANT for s in grower.model.slots.values())


def test_the_last_boundary_asks_no_controller() -> None:
    case = CASES["tabular_mlp"]
    model = case.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grower = make_grower(case, model, opt, controller=fixed_controller(germinate_epochs=(1, 2)),
                         config=GrowthConfig(total_epochs=1))
    train_epoch(model, grower, loader(case), opt, case.loss_fn)
    report = grower.end_epoch(val_loss=1.0)
    assert report.snapshot is None and report.decisions == [] and not grower.live()


def test_the_model_stays_usable_as_before_and_growth_does_not_touch_the_rng() -> None:
    case = CASES["residual_mlp"]
    torch.manual_seed(0)
    model = case.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    class Noisy(BuiltinKernels):
        def load(self, kernel_id, site=None):
            torch.rand(100)  # a source that draws random numbers
            return super().load(kernel_id, site)

    grower = Grower(model, sites=case.sites, example_input=case.x[:4], optimizer=opt,
                    loss_fn=case.loss_fn, held_out=held_out(case), kasmina=FAST,
                    controller=fixed_controller(germinate_epochs=(1,)), kernels=Noisy(["lowrank_adapter"]))
    train_epoch(model, grower, loader(case), opt, case.loss_fn)
    state = torch.get_rng_state()
    grower.end_epoch(val_loss=1.0)
    assert grower.live() and torch.equal(state, torch.get_rng_state())
    assert isinstance(grower.model.host, nn.Module) and grower.model.host is model
