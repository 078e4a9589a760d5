"""Lifecycle through the API: germinate, incubate, blend, hold, fossilize, prune, reset."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esper.errors import FailedPreconditionError, IllegalTransitionError, InvalidArgumentError
from esper.kasmina import KasminaConfig, SeedStage, wrap
from generated.esper.oona.v1 import events_pb2
from tests.unit.kasmina.kasmina_hosts import LinearSeed, ZeroOutSeed, mlp, train_steps

S = SeedStage


def _mm(events: list | None = None, **cfg: object):
    host = mlp()
    x = torch.randn(32, 8)
    mm = wrap(host, sites=["1", "3"], example_input=x,
              config=KasminaConfig(**{"stats_interval": 1, "incubation": 2, "gate_interval": 1, "blend_duration": 2,
                                      **cfg}),
              event_sink=None if events is None else events.append)
    return host, mm, x


def _germinate(mm, slot: str = "3", seed: nn.Module | None = None) -> nn.Module:
    seed = seed or ZeroOutSeed(mm.site_signature(slot))
    mm.germinate(slot, seed, kernel_id="sha256:k", blueprint_id="bp-1", reason="test")
    return seed


def test_training_seed_learns_while_output_and_host_grads_are_bit_identical() -> None:
    torch.manual_seed(3)
    ref = mlp()
    torch.manual_seed(3)
    host, mm, x = _mm()
    mm.train()
    seed = _germinate(mm)
    assert mm.slots["3"].current_stage is S.TRAINING
    y, y_ref = mm(x), ref(x)
    assert torch.equal(y, y_ref)
    y.pow(2).mean().backward()
    y_ref.pow(2).mean().backward()
    for p, q in zip(host.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)  # the seed's input is detached: host untouched
    assert seed.out.weight.grad.abs().sum() > 0
    assert seed.out.bias.grad.abs().sum() > 0


def test_germination_is_function_preserving_in_eval() -> None:
    _host, mm, x = _mm()
    mm.eval()
    before = mm(x)
    _germinate(mm)
    assert (mm(x) - before).abs().max() <= 1e-6


def test_non_zero_seed_is_refused_and_the_slot_stays_dormant(events: list) -> None:
    _host, mm, _x = _mm(events)
    seed = ZeroOutSeed(mm.site_signature("3"))
    nn.init.normal_(seed.out.weight)
    with pytest.raises(InvalidArgumentError, match="not function-preserving"):
        _germinate(mm, seed=seed)
    assert mm.slots["3"].current_stage is S.DORMANT
    gate = [e for e in events if e.kind == "gate"][-1]
    assert gate.gate == "germination" and gate.passed is False
    assert "function-preserving" in gate.reason


def test_wrong_shape_seed_is_refused() -> None:
    _host, mm, _x = _mm()
    with pytest.raises(InvalidArgumentError, match=r"\(2, 16\) to \(2, 4\)"):
        _germinate(mm, seed=nn.Linear(16, 4))


def test_seed_that_cannot_run_on_the_site_is_refused_typed_and_leaves_no_trace(
    events: list,
) -> None:
    _host, mm, _x = _mm(events)
    # Built for 7 input features; the site carries 16: its forward raises inside torch.
    with pytest.raises(InvalidArgumentError, match=r"cannot run on the site's activation"):
        _germinate(mm, seed=nn.Linear(7, 16))
    slot = mm.slots["3"]
    assert slot.current_stage is S.DORMANT and slot.seed is None
    assert (slot.kernel_id, slot.blueprint_id) == ("", "")
    gate = [e for e in events if e.kind == "gate"][-1]
    assert gate.gate == "germination" and gate.passed is False
    assert "RuntimeError" in gate.reason
    _germinate(mm)  # the slot is still usable
    assert slot.current_stage is S.TRAINING


def test_seed_sharing_host_parameters_is_refused() -> None:
    host, mm, _x = _mm()
    with pytest.raises(InvalidArgumentError, match="host parameters"):
        _germinate(mm, "1", seed=nn.Sequential(host[2]))


def test_mechanical_auto_advance_and_events(events: list) -> None:
    host, mm, x = _mm(events)
    opt = torch.optim.SGD(host.parameters(), lr=0.01)
    mm.attach_optimizer(opt)
    _germinate(mm)
    slot = mm.slots["3"]
    stages, alphas = [], []
    for _ in range(6):
        train_steps(mm, opt, x, 1)
        stages.append(slot.current_stage)
        alphas.append(slot.alpha)
    assert stages == [S.TRAINING, S.BLENDING, S.BLENDING, S.HOLDING, S.HOLDING, S.HOLDING]
    assert alphas == [0.0, 0.0, 0.5, 1.0, 1.0, 1.0]
    transitions = [(e.from_stage, e.to_stage) for e in events if e.kind == "transition"]
    assert transitions == [(S.DORMANT, S.GERMINATED), (S.GERMINATED, S.TRAINING),
                           (S.TRAINING, S.BLENDING), (S.BLENDING, S.HOLDING)]
    gates = [(e.gate, e.passed) for e in events if e.kind == "gate"]
    assert gates == [("germination", True), ("blending", True)]
    blending = next(e for e in events if e.gate == "blending")
    assert blending.measurements["seed_grad_norm"] > 0 and "seed grad norm" in blending.reason
    assert all(e.slot_id == "3" and e.kernel_id == "sha256:k" for e in events)
    msg = blending.to_proto()
    assert isinstance(msg, events_pb2.GateEvent) and msg.passed
    hold = events[-1].to_proto()
    assert isinstance(hold, events_pb2.LifecycleEvent)
    assert (hold.from_stage, hold.to_stage, hold.alpha) == (S.BLENDING, S.HOLDING, 1.0)


def test_blending_at_half_alpha_adds_exactly_half_the_seed_output() -> None:
    host, mm, x = _mm()
    opt = torch.optim.SGD(host.parameters(), lr=0.0)
    mm.attach_optimizer(opt)
    seed = _germinate(mm, seed=LinearSeed(16))
    with torch.no_grad():
        seed.lin.weight.copy_(torch.randn(16, 16))
        seed.lin.bias.copy_(torch.randn(16))
    train_steps(mm, opt, x, 3)  # lr 0: weights stay; TRAINING → BLENDING → alpha 0.5
    assert mm.slots["3"].alpha == 0.5
    seen = {}
    host[4].register_forward_pre_hook(lambda m, a: seen.__setitem__("y", a[0]))
    mm(x)
    with torch.no_grad():
        h = host[3].forward(host[2](host[1].forward(host[0](x))))  # .forward: no slot hook
        assert torch.equal(seen["y"], h + 0.5 * seed(h))
        assert not torch.equal(seen["y"], h + 0.25 * seed(h))


def test_epoch_schedule_ramps_per_epoch() -> None:
    host, mm, x = _mm(schedule_unit="epochs", incubation=1, blend_duration=4, blend_curve="cosine")
    opt = torch.optim.SGD(host.parameters(), lr=0.01)
    mm.attach_optimizer(opt)
    _germinate(mm)
    train_steps(mm, opt, x, 5)
    assert mm.slots["3"].current_stage is S.TRAINING  # steps do not count
    mm.end_epoch()
    assert mm.slots["3"].current_stage is S.BLENDING
    alphas = []
    for _ in range(4):
        train_steps(mm, opt, x, 1)
        mm.end_epoch()
        alphas.append(round(mm.slots["3"].alpha, 6))
    assert alphas == [0.146447, 0.5, 0.853553, 1.0]
    assert mm.slots["3"].current_stage is S.HOLDING


def test_illegal_strategic_actions_raise() -> None:
    _host, mm, _x = _mm()
    with pytest.raises(IllegalTransitionError, match="prune needs"):
        mm.prune("3", "no seed")
    with pytest.raises(IllegalTransitionError, match="fossilize needs HOLDING"):
        mm.fossilize("3", "no seed")
    assert mm.legal_actions("3") == {"germinate"}
    _germinate(mm)
    assert mm.legal_actions("3") == {"prune"}
    with pytest.raises(IllegalTransitionError, match="germinate needs DORMANT"):
        _germinate(mm)
    with pytest.raises(IllegalTransitionError, match="TRAINING; fossilize needs HOLDING"):
        mm.fossilize("3", "too early")


def test_fossilized_seed_is_terminal_and_stays_in_the_forward() -> None:
    host, mm, x = _mm()
    opt = torch.optim.SGD(host.parameters(), lr=0.01)
    mm.attach_optimizer(opt)
    seed = _germinate(mm, seed=LinearSeed(16))
    train_steps(mm, opt, x, 4)
    assert mm.legal_actions("3") == {"prune", "fossilize"}
    mm.fossilize("3", "keeps helping")
    assert mm.slots["3"].current_stage is S.FOSSILIZED and mm.legal_actions("3") == set()
    with pytest.raises(IllegalTransitionError):
        mm.prune("3", "too late")
    with torch.no_grad():
        seed.lin.weight.copy_(torch.eye(16))
    mm.eval()
    seen = {}
    host[4].register_forward_pre_hook(lambda m, a: seen.__setitem__("y", a[0]))
    mm(x)
    h = host[3].forward(host[2](host[1].forward(host[0](x))))
    assert torch.allclose(seen["y"], 2 * h + seed.lin.bias, atol=1e-6)


def test_prune_embargo_reset_returns_to_dormant_and_leaves_the_optimizer(events: list) -> None:
    host, mm, x = _mm(events, embargo_epochs=2)
    opt = torch.optim.Adam(host.parameters(), lr=0.01)
    mm.attach_optimizer(opt)
    seed = _germinate(mm)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["kasmina_slot"] == "3"
    train_steps(mm, opt, x, 3)
    seed_ids = {id(p) for p in seed.parameters()}
    assert seed_ids <= {id(p) for p in opt.state}  # Adam state exists for the seed
    mm.prune("3", "not helping")
    slot = mm.slots["3"]
    assert slot.current_stage is S.EMBARGOED and slot.seed is None
    assert len(opt.param_groups) == 1
    assert not seed_ids & {id(p) for g in opt.param_groups for p in g["params"]}
    assert not seed_ids & {id(p) for p in opt.state}
    assert not host[3]._forward_hooks or mm.slots["3"]._armed
    assert mm.legal_actions("3") == set()
    train_steps(mm, opt, x, 2)  # host keeps training without the seed
    mm.end_epoch()
    assert slot.current_stage is S.EMBARGOED and slot.embargo_epochs_left == 1
    mm.end_epoch()
    assert slot.current_stage is S.RESETTING and slot.kernel_id == ""
    mm.step()
    assert slot.current_stage is S.DORMANT
    path = [e.to_stage for e in events if e.kind == "transition"][-4:]
    assert path == [S.PRUNED, S.EMBARGOED, S.RESETTING, S.DORMANT]
    _germinate(mm)  # legal again
    assert len(opt.param_groups) == 2


def test_fossilize_contribution_gate(events: list) -> None:
    host, mm, x = _mm(events, fossilize_min_contribution=0.0)
    opt = torch.optim.SGD(host.parameters(), lr=0.0)
    mm.attach_optimizer(opt)
    seed = _germinate(mm, seed=LinearSeed(16))
    train_steps(mm, opt, x, 4)
    assert mm.slots["3"].current_stage is S.HOLDING
    with pytest.raises(FailedPreconditionError, match="contribution not measured") as info:
        mm.fossilize("3", "try")
    assert info.value.reason == "GATE_FAILED"
    with torch.no_grad():
        seed.lin.bias.fill_(1.0)  # shifts the output: the seed now hurts mean(y**2)
    loss = lambda y, t: (y - t).pow(2).mean()
    target = torch.zeros(32, 4)
    contrib = mm.measure_contribution(x, target, loss)
    assert contrib["3"] < 0
    with pytest.raises(FailedPreconditionError, match="contribution -"):
        mm.fossilize("3", "try")
    fossil_gates = [e for e in events if e.gate == "fossilize"]
    assert [e.passed for e in fossil_gates] == [False, False]
    assert mm.slots["3"].current_stage is S.HOLDING


def test_two_seed_groups_leave_the_optimizer_independently() -> None:
    host, mm, x = _mm()
    opt = torch.optim.Adam(host.parameters(), lr=0.01)
    mm.attach_optimizer(opt)
    s1 = _germinate(mm, "1")
    s3 = _germinate(mm, "3")
    train_steps(mm, opt, x, 1)
    assert [g.get("kasmina_slot") for g in opt.param_groups] == [None, "1", "3"]
    mm.prune("3", "first")  # a value comparison of groups would raise on their tensors
    assert [g.get("kasmina_slot") for g in opt.param_groups] == [None, "1"]
    assert {id(p) for p in s1.parameters()} <= {id(p) for p in opt.state}
    assert not {id(p) for p in s3.parameters()} & {id(p) for p in opt.state}
    mm.prune("1", "second")
    assert len(opt.param_groups) == 1


def test_optimizer_already_holding_seed_parameters_is_refused() -> None:
    _host, mm, _x = _mm()
    _germinate(mm)
    with pytest.raises(InvalidArgumentError, match=r"mm.host.parameters\(\)"):
        mm.attach_optimizer(torch.optim.SGD(mm.parameters(), lr=0.1))
