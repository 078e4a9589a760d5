"""Health statistics, gates on measured signals, counterfactual contribution, clipping."""

from __future__ import annotations

import math

import pytest
import torch

from esper.errors import InvalidArgumentError
from esper.kasmina import KasminaConfig, SeedStage, SlotHealthData, wrap
from generated.esper.common.v1 import health_pb2
from tests.unit.kasmina.kasmina_hosts import LinearSeed, ZeroOutSeed, mlp, train_steps


def _mm(events: list | None = None, **cfg: object):
    host = mlp()
    x = torch.randn(32, 8)
    mm = wrap(host, sites=["1", "3"], example_input=x,
              config=KasminaConfig(**{"stats_interval": 1, "incubation": 3, "gate_interval": 2, "blend_duration": 2,
                                      **cfg}),
              event_sink=None if events is None else events.append)
    return host, mm, x


def test_health_field_names_match_the_proto() -> None:
    names = [f.name for f in health_pb2.SlotHealth.DESCRIPTOR.fields]
    assert list(SlotHealthData.__dataclass_fields__) == names


def test_health_statistics_equal_direct_computation() -> None:
    host, mm, x = _mm()
    opt = torch.optim.SGD(host.parameters(), lr=0.0)  # fixed weights: every step is alike
    mm.attach_optimizer(opt)
    seed = mm.slots["3"]
    mm.germinate("3", ZeroOutSeed(mm.site_signature("3")), kernel_id="k", blueprint_id="b")
    train_steps(mm, opt, x, 2)
    opt.zero_grad()
    with torch.no_grad():
        h1 = host[1].forward(host[0](x))
        h3 = host[3].forward(host[2](h1))
    mm(x).pow(2).mean().backward()
    host_gn = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in host[0].parameters()]))
    seed_gn = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in seed.seed.parameters()]))
    by_id = {h.slot_id: h for h in mm.health()}
    # slot "1" is a ReLU: no parameters of its own, so no host gradient norm
    assert by_id["1"].activation_mean == pytest.approx(h1.mean().item(), rel=1e-5)
    assert by_id["1"].activation_std == pytest.approx(
        math.sqrt(h1.pow(2).mean().item() - h1.mean().item() ** 2), rel=1e-4)
    # A parameterless site reports the gradient at its output (test_host_grad_signal.py).
    assert by_id["1"].host_parameters == 0 and by_id["1"].host_grad_norm > 0.0
    h = by_id["3"]
    assert h.activation_mean == pytest.approx(h3.mean().item(), rel=1e-5)
    assert h.seed_grad_norm == pytest.approx(seed_gn.item(), rel=1e-5)
    assert (h.stage, h.kernel_id, h.blueprint_id, h.depth, h.finite) == (
        SeedStage.TRAINING, "k", "b", 1, True)
    assert h.seed_parameters == sum(p.numel() for p in seed.seed.parameters())
    assert h.steps_in_stage == 2
    assert host_gn.item() > 0  # host[0] is not a site; its norm is not in any slot
    proto = h.to_proto()
    assert proto.slot_id == "3" and proto.stage == int(SeedStage.TRAINING)
    assert proto.site.channels == 16


def test_host_grad_norm_of_a_parametrised_site() -> None:
    host = mlp()
    x = torch.randn(32, 8)
    mm = wrap(host, sites=["2"], example_input=x, config=KasminaConfig(stats_interval=1))
    opt = torch.optim.SGD(host.parameters(), lr=0.0)
    train_steps(mm, opt, x, 3)
    expected = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in host[2].parameters()])).item()
    (health,) = mm.health()
    assert health.host_grad_norm == pytest.approx(expected, rel=1e-5)
    assert health.host_parameters == 16 * 16 + 16


def test_end_epoch_closes_the_window_and_health_reports_it() -> None:
    host, mm, x = _mm(stats_interval=2)
    opt = torch.optim.SGD(host.parameters(), lr=0.0)
    train_steps(mm, opt, x, 4)
    slot = mm.slots["1"]
    assert slot._counts[0][0] == 2  # forwards before steps 2 and 4 only
    closed = mm.end_epoch()
    assert slot._counts[0] == [0, 0, 0]
    assert [h.activation_mean for h in closed] == [h.activation_mean for h in mm.health()]
    assert closed[0].activation_mean != 0.0


def test_blending_gate_fails_on_a_seed_without_gradient(events: list) -> None:
    host, mm, x = _mm(events)
    opt = torch.optim.SGD(host.parameters(), lr=0.01)
    mm.attach_optimizer(opt)
    seed = ZeroOutSeed(mm.site_signature("3"))
    for p in seed.parameters():
        p.requires_grad_(False)
    mm.germinate("3", seed, kernel_id="k", blueprint_id="b")
    train_steps(mm, opt, x, 7)
    assert mm.slots["3"].current_stage is SeedStage.TRAINING
    gates = [e for e in events if e.gate == "blending"]
    # evaluated after incubation (step 3) and every gate_interval (2) steps after
    assert [e.step for e in gates] == [3, 5, 7] and not any(e.passed for e in gates)
    assert "no seed gradient measured" in gates[0].reason


def test_blending_gate_fails_on_a_vanishing_seed_gradient(events: list) -> None:
    host, mm, x = _mm(events, gate_min_seed_grad_norm=1e3)
    opt = torch.optim.SGD(host.parameters(), lr=0.01)
    mm.attach_optimizer(opt)
    mm.germinate("3", ZeroOutSeed(mm.site_signature("3")), kernel_id="k", blueprint_id="b")
    train_steps(mm, opt, x, 3)
    (gate,) = [e for e in events if e.gate == "blending"]
    assert gate.passed is False and "outside [1e+03" in gate.reason
    assert 0 < gate.measurements["seed_grad_norm"] < 1e3


def test_blending_gate_fails_on_non_finite_values(events: list) -> None:
    host, mm, x = _mm(events)
    opt = torch.optim.SGD(host.parameters(), lr=0.0)
    mm.attach_optimizer(opt)
    seed = LinearSeed(16)
    mm.germinate("3", seed, kernel_id="k", blueprint_id="b")
    with torch.no_grad():
        seed.lin.bias[0] = float("inf")
    train_steps(mm, opt, x, 3)
    (gate,) = [e for e in events if e.gate == "blending"]
    assert gate.passed is False and "non-finite" in gate.reason
    assert mm.health()[1].finite is False


def test_contribution_is_the_counterfactual_loss_difference() -> None:
    host, mm, x = _mm()
    opt = torch.optim.SGD(host.parameters(), lr=0.0)
    mm.attach_optimizer(opt)
    seed = LinearSeed(16)
    mm.germinate("3", seed, kernel_id="k", blueprint_id="b")
    assert mm.measure_contribution(x, None, lambda y, t: y.sum()) == {}  # TRAINING: no effect
    train_steps(mm, opt, x, 5)
    assert mm.slots["3"].current_stage is SeedStage.HOLDING
    with torch.no_grad():
        seed.lin.weight.copy_(torch.eye(16))  # y_site = 2h
    mm.eval()
    with torch.no_grad():
        h = host[3].forward(host[2](host[1].forward(host[0](x))))
        target = host[4](2 * h)
        without = (host[4](h) - target).pow(2).mean().item()
    loss = lambda y, t: (y - t).pow(2).mean()
    mm.train()
    contrib = mm.measure_contribution(x, target, loss)
    assert contrib["3"] == pytest.approx(without, rel=1e-5) and contrib["3"] > 0
    assert mm.training  # mode restored
    h3 = mm.health()[1]
    assert h3.contribution_measured and h3.contribution == contrib["3"]


def test_measure_contribution_restores_each_module_s_own_mode() -> None:
    host, mm, x = _mm()
    opt = torch.optim.SGD(host.parameters(), lr=0.0)
    mm.attach_optimizer(opt)
    mm.germinate("3", LinearSeed(16), kernel_id="k", blueprint_id="b")
    train_steps(mm, opt, x, 5)
    assert mm.slots["3"].current_stage is SeedStage.HOLDING
    mm.train()
    host[0].eval()  # e.g. a frozen block the caller keeps in eval mode while training
    mm.measure_contribution(x, None, lambda y, t: y.sum())
    assert host[0].training is False
    assert host[2].training is True and mm.training is True


def test_host_and_seed_gradients_are_clipped_separately() -> None:
    host, mm, x = _mm()
    opt = torch.optim.SGD(host.parameters(), lr=0.0)
    mm.attach_optimizer(opt)
    mm.germinate("3", ZeroOutSeed(mm.site_signature("3")), kernel_id="k", blueprint_id="b")
    mm(x).pow(2).mean().mul(1e3).backward()
    seeds = list(mm.seed_parameters())
    host_before = torch.nn.utils.get_total_norm([p.grad for p in host.parameters()])
    seed_before = torch.nn.utils.get_total_norm([p.grad for p in seeds])
    hn, sn = mm.clip_grad_norms(0.5, 0.25)
    assert hn.item() == pytest.approx(host_before.item()) and host_before > 0.5
    assert sn.item() == pytest.approx(seed_before.item()) and seed_before > 0.25
    assert torch.nn.utils.get_total_norm([p.grad for p in host.parameters()]).item() == (
        pytest.approx(0.5, rel=1e-4))
    assert torch.nn.utils.get_total_norm([p.grad for p in seeds]).item() == pytest.approx(
        0.25, rel=1e-4)
    with pytest.raises(InvalidArgumentError, match="seed_max=0"):
        mm.clip_grad_norms(1.0, 0)


def test_measure_contribution_does_not_disturb_statistics() -> None:
    host, mm, x = _mm()
    opt = torch.optim.SGD(host.parameters(), lr=0.0)
    mm.attach_optimizer(opt)
    mm.germinate("3", LinearSeed(16), kernel_id="k", blueprint_id="b")
    train_steps(mm, opt, x, 5)
    counts = [list(mm.slots[s]._counts[0]) for s in ("1", "3")]
    acc = mm.slots["3"].acc.clone()
    assert set(mm.measure_contribution(x, None, lambda y, t: y.sum())) == {"3"}
    assert [mm.slots[s]._counts[0] for s in ("1", "3")] == counts
    assert torch.equal(mm.slots["3"].acc, acc)
