"""Parallel slots × every parallel-slot blueprint × every host site it fits: insertion is
function-preserving, every stage's forward and backward is `y = m(x) + alpha * s(x)`
(checked against hooks written here, not Kasmina's), the incubator isolates the host,
checkpoints round-trip, and the CuPy blend agrees with torch (GPU only)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from esper.blueprints import build_module, builtin_blueprints, slot_kinds, supports
from esper.errors import InvalidArgumentError
from esper.kasmina import KasminaConfig, SeedStage, SlotKind, wrap
from generated.esper.common.v1 import seed_pb2
from tests.unit.kasmina.kasmina_hosts import HOSTS, PARALLEL_SITES, mlp

PARALLEL_BLUEPRINTS = [bp for bp in builtin_blueprints()
                       if seed_pb2.SLOT_KIND_PARALLEL in slot_kinds(bp)]
CFG = KasminaConfig(stats_interval=1, incubation=3, gate_interval=1, blend_duration=4)


def _build(host_name: str, config: KasminaConfig = CFG, init: int = 0, resolver=None):
    factory, example, sites = HOSTS[host_name]
    torch.manual_seed(init)
    host = factory()
    torch.manual_seed(100)
    x = example()
    mm = wrap(host, sites=sites, parallel=PARALLEL_SITES[host_name], example_input=x,
              config=config, kernel_resolver=resolver)
    return host, mm, x


def _cases() -> list[tuple[str, str, object]]:
    out = []
    for bp in PARALLEL_BLUEPRINTS:
        for host_name in HOSTS:
            mm = _build(host_name)[1]
            for slot_id, slot in mm.slots.items():
                if slot.kind is SlotKind.PARALLEL and supports(bp, mm.site_signature(slot_id)):
                    out.append((host_name, slot_id, bp))
    return out


CASES = _cases()
IDS = [f"{bp.name}-{h}-{s}" for h, s, bp in CASES]
# The slower whole-run tests take each blueprint at its first site only.
FIRST = [c for i, c in enumerate(CASES) if all(c[2] is not d[2] for d in CASES[:i])]
FIRST_IDS = [f"{bp.name}-{h}-{s}" for h, s, bp in FIRST]


def test_every_parallel_blueprint_has_a_case_and_no_output_slot_takes_one() -> None:
    assert {bp.name for _, _, bp in CASES} == {bp.name for bp in PARALLEL_BLUEPRINTS}
    assert len(PARALLEL_BLUEPRINTS) >= 5
    for host_name in HOSTS:
        mm = _build(host_name)[1]
        for slot_id, slot in mm.slots.items():
            if slot.kind is SlotKind.OUTPUT:
                sig = mm.site_signature(slot_id)
                takers = [bp.name for bp in PARALLEL_BLUEPRINTS if supports(bp, sig)
                          and seed_pb2.SLOT_KIND_UNSPECIFIED not in slot_kinds(bp)]
                assert takers == [], (host_name, slot_id)


def _module_names(host: nn.Module, slot) -> list[str]:
    names = {id(m): n for n, m in host.named_modules()}
    return [names[id(m)] for m in slot.site_modules]


def _reference(host_name: str, host: nn.Module, names: list[str], seed: nn.Module | None,
               how: str, alpha: float) -> tuple[nn.Module, nn.Module | None]:
    """A copy of the host (and seed) computing the slot by hooks written here:
    how = "host" (no seed), "straight_through" (value m(x), seed learns from dL/dy),
    "blend_detached" (m(x) + alpha * s(x.detach())) or "full" (m(x) + s(x))."""
    ref = HOSTS[host_name][0]()
    ref.load_state_dict(host.state_dict())
    if how == "host":
        return ref, None
    s = copy.deepcopy(seed)
    mods = dict(ref.named_modules())
    stash: dict[str, torch.Tensor] = {}

    def pre(_m: nn.Module, args: tuple) -> None:
        stash["x"] = args[0]

    def post(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = stash.pop("x")
        if how == "straight_through":
            v = s(x.detach())
            return out + (v - v.detach())
        if how == "blend_detached":
            return out + alpha * s(x.detach())
        return out + s(x)

    mods[names[0]].register_forward_pre_hook(pre)
    mods[names[-1]].register_forward_hook(post)
    return ref, s


def _grads(model: nn.Module, params: list[nn.Parameter], x: torch.Tensor
           ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    for p in params:
        p.grad = None
    y = model(x)
    y.pow(2).mean().backward()
    return y.detach(), [None if p.grad is None else p.grad.clone() for p in params]


def _check_stage(host_name: str, host: nn.Module, mm, slot_id: str, x: torch.Tensor,
                 how: str, exact: bool) -> None:
    slot = mm.slots[slot_id]
    names = _module_names(host, slot)
    ref, ref_seed = _reference(host_name, host, names, slot.seed, how, slot.alpha)
    mm.train()
    ref.train()
    seed_params = list(slot.seed.parameters()) if slot.seed is not None else []
    y, g = _grads(mm, list(host.parameters()) + seed_params, x)
    ref_params = list(ref.parameters()) + (list(ref_seed.parameters()) if ref_seed else [])
    y_ref, g_ref = _grads(ref, ref_params, x)
    if exact:
        assert torch.equal(y, y_ref), slot.current_stage
    else:
        torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    n_host = len(list(host.parameters()))
    compared = g if ref_seed is not None else g[:n_host]  # "host": the bare host's grads
    for i, (a, b) in enumerate(zip(compared, g_ref, strict=True)):
        assert (a is None) == (b is None), (slot.current_stage, i)
        if a is None:
            continue
        if exact and i < n_host:
            assert torch.equal(a, b), (slot.current_stage, "host grad", i)
        else:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    if seed_params:
        assert any(gr is not None and gr.abs().sum() > 0 for gr in g[n_host:]), "seed learns"


def _train(mm, opt: torch.optim.Optimizer, x: torch.Tensor, n: int) -> None:
    mm.train()
    for _ in range(n):
        opt.zero_grad()
        mm(x).pow(2).mean().backward()
        opt.step()
        mm.step()


def _germinate(mm, slot_id: str, bp, seed: int = 1) -> nn.Module:
    module = build_module(bp, mm.site_signature(slot_id), seed=seed)
    mm.germinate(slot_id, module, kernel_id=f"local:{bp.blueprint_id}:{slot_id}",
                 blueprint_id=bp.blueprint_id)
    return module


@pytest.mark.parametrize(("host_name", "slot_id", "bp"), CASES, ids=IDS)
def test_insertion_is_function_preserving(host_name: str, slot_id: str, bp) -> None:
    _host, mm, x = _build(host_name)
    mm.eval()
    with torch.no_grad():
        before = mm(x)
    _germinate(mm, slot_id, bp)
    with torch.no_grad():
        assert (mm(x) - before).abs().max().item() <= 1e-6
    # Straight to alpha 1 (what HOLDING computes): still the host's output at init.
    mm.slots[slot_id]._stage = SeedStage.HOLDING
    with torch.no_grad():
        assert (mm(x) - before).abs().max().item() <= 1e-6


@pytest.mark.parametrize(("host_name", "slot_id", "bp"), CASES, ids=IDS)
def test_every_stage_forward_and_backward(host_name: str, slot_id: str, bp) -> None:
    host, mm, x = _build(host_name)
    opt = torch.optim.SGD(host.parameters(), lr=0.05)
    mm.attach_optimizer(opt)
    _germinate(mm, slot_id, bp)
    slot = mm.slots[slot_id]
    assert slot.current_stage is SeedStage.TRAINING
    _check_stage(host_name, host, mm, slot_id, x, "straight_through", exact=True)
    _check_stage(host_name, host, mm, slot_id, x, "host", exact=True)  # = the bare host
    _train(mm, opt, x, 4)  # gate after 3 steps, then one step of the ramp
    assert slot.current_stage is SeedStage.BLENDING and 0 < slot.alpha < 1
    _check_stage(host_name, host, mm, slot_id, x, "blend_detached", exact=False)
    _train(mm, opt, x, 3)
    assert slot.current_stage is SeedStage.HOLDING and slot.alpha == 1.0
    _check_stage(host_name, host, mm, slot_id, x, "full", exact=False)
    contribution = mm.measure_contribution(x, torch.zeros_like(mm(x)),
                                           lambda y, t: (y - t).pow(2).mean())
    assert slot_id in contribution and contribution[slot_id] != 0.0
    mm.fossilize(slot_id, "test")
    assert slot.current_stage is SeedStage.FOSSILIZED
    _check_stage(host_name, host, mm, slot_id, x, "full", exact=False)


@pytest.mark.parametrize(("host_name", "slot_id", "bp"), FIRST, ids=FIRST_IDS)
def test_pruned_parallel_slot_is_the_host_again(host_name: str, slot_id: str, bp) -> None:
    host, mm, x = _build(host_name)
    opt = torch.optim.SGD(host.parameters(), lr=0.05)
    mm.attach_optimizer(opt)
    seed = _germinate(mm, slot_id, bp)
    _train(mm, opt, x, 5)
    mm.prune(slot_id, "test")
    assert mm.slots[slot_id].current_stage is SeedStage.EMBARGOED
    assert all(id(p) not in {id(q) for g in opt.param_groups for q in g["params"]}
               for p in seed.parameters())
    _check_stage(host_name, host, mm, slot_id, x, "host", exact=True)


@pytest.mark.parametrize(("host_name", "slot_id", "bp"), FIRST, ids=FIRST_IDS)
def test_incubator_isolates_the_host_after_the_seed_has_learned(host_name: str, slot_id: str,
                                                                 bp) -> None:
    host, mm, x = _build(host_name, KasminaConfig(stats_interval=1, incubation=1000))
    opt = torch.optim.SGD(host.parameters(), lr=0.1)
    mm.attach_optimizer(opt)
    seed = _germinate(mm, slot_id, bp)
    initial = copy.deepcopy(seed.state_dict())
    _train(mm, opt, x, 5)
    slot = mm.slots[slot_id]
    assert slot.current_stage is SeedStage.TRAINING
    # The seed learned: its weights moved and it now has something to add...
    assert any(not torch.equal(v, initial[k]) for k, v in seed.state_dict().items())
    probe_out = seed(slot.probe)
    assert probe_out.abs().max() > 0
    # ...yet the host computes, and is taught, exactly as if it were not wrapped.
    ref = HOSTS[host_name][0]()
    ref.load_state_dict(host.state_dict())
    y, g = _grads(mm, list(host.parameters()), x)
    y_ref, g_ref = _grads(ref, list(ref.parameters()), x)
    assert torch.equal(y, y_ref)
    for a, b in zip(g, g_ref, strict=True):
        assert torch.equal(a, b)


class _Resolver:
    def __init__(self, mm, slot_id: str, bp) -> None:
        self.sig, self.bp, self.calls = mm.site_signature(slot_id), bp, []

    def __call__(self, kernel_id: str) -> nn.Module:
        self.calls.append(kernel_id)
        return build_module(self.bp, self.sig, seed=99)  # weights come from the checkpoint


@pytest.mark.parametrize(("host_name", "slot_id", "bp"), FIRST, ids=FIRST_IDS)
def test_checkpoint_round_trip_mid_blend(host_name: str, slot_id: str, bp) -> None:
    host, mm, x = _build(host_name)
    opt = torch.optim.Adam(host.parameters(), lr=0.01)
    mm.attach_optimizer(opt)
    _germinate(mm, slot_id, bp)
    _train(mm, opt, x, 5)
    slot = mm.slots[slot_id]
    assert slot.current_stage is SeedStage.BLENDING
    state, opt_state = mm.state_dict(), copy.deepcopy(opt.state_dict())
    assert state[f"seed_slots.{slot_id.replace('.', '-')}._extra_state"]["kind"] == "parallel"

    resolver = _Resolver(mm, slot_id, bp)
    host2, mm2, _ = _build(host_name, init=7, resolver=resolver)
    mm2.load_state_dict(state)
    assert resolver.calls == [slot.kernel_id]
    opt2 = torch.optim.Adam(host2.parameters(), lr=0.01)
    mm2.attach_optimizer(opt2)
    opt2.load_state_dict(opt_state)
    s2 = mm2.slots[slot_id]
    assert (s2.kind, s2.current_stage, s2.alpha, s2.steps_in_stage, s2.blueprint_id) == (
        slot.kind, slot.current_stage, slot.alpha, slot.steps_in_stage, slot.blueprint_id)
    mm.eval(), mm2.eval()
    assert torch.equal(mm(x), mm2(x))
    _train(mm, opt, x, 3)
    _train(mm2, opt2, x, 3)
    mm.eval(), mm2.eval()
    assert torch.equal(mm(x), mm2(x))
    assert s2.current_stage is slot.current_stage


def test_a_parallel_checkpoint_does_not_load_into_an_output_slot() -> None:
    bp = next(b for b in PARALLEL_BLUEPRINTS if b.name == "lora_r4")
    x = torch.randn(8, 8)
    torch.manual_seed(0)
    mm = wrap(mlp(), parallel=["2"], example_input=x)  # Linear 16 → 16: fits either kind
    _germinate(mm, "2", bp)
    state = mm.state_dict()
    calls: list[str] = []

    def resolver(kernel_id: str) -> nn.Module:
        calls.append(kernel_id)
        return build_module(bp, mm.site_signature("2"))

    other = wrap(mlp(), sites=["2"], example_input=x, kernel_resolver=resolver)
    with pytest.raises(InvalidArgumentError, match="checkpoint holds a parallel slot here, the "
                                                   "model has a output slot"):
        other.load_state_dict(state)
    assert calls == []  # refused before any seed was built for it


def test_germination_gate_checks_the_output_shape_of_a_parallel_seed() -> None:
    mm = wrap(mlp(), parallel=["0:2"], example_input=torch.randn(4, 8))
    wrong = nn.Linear(8, 8)  # reads the span's input (8) but returns 8, not 16
    nn.init.zeros_(wrong.weight), nn.init.zeros_(wrong.bias)
    with pytest.raises(InvalidArgumentError, match=r"seed maps \(2, 8\) to \(2, 8\).*\(2, 16\)"):
        mm.germinate("0:2", wrong, kernel_id="k", blueprint_id="b")
    reads_output = nn.Linear(16, 16)
    with pytest.raises(InvalidArgumentError, match="cannot run on the site's module input"):
        mm.germinate("0:2", reads_output, kernel_id="k", blueprint_id="b")
    assert mm.slots["0:2"].current_stage is SeedStage.DORMANT


# ---- GPU: the fused CuPy blend on a parallel slot ---------------------------------------


def _cupy_or_skip() -> None:
    cupy_backend = pytest.importorskip("esper.kasmina.backends.cupy_backend")
    if not cupy_backend.available():
        pytest.skip("cupy sees no CUDA device")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["width8_relu", "lora_r4"])
def test_gpu_parallel_blend_cupy_matches_torch(name: str) -> None:
    _cupy_or_skip()
    bp = next(b for b in PARALLEL_BLUEPRINTS if b.name == name)
    results: dict[str, tuple] = {}
    for backend in ("torch", "cupy"):
        torch.manual_seed(0)
        host = mlp().cuda()
        x = torch.randn(64, 8, device="cuda")
        mm = wrap(host, parallel=["0:2"], example_input=x,
                  config=KasminaConfig(stats_interval=1, incubation=2, gate_interval=1,
                                       blend_duration=1000, blend_backend=backend))
        opt = torch.optim.SGD(host.parameters(), lr=0.05)
        mm.attach_optimizer(opt)
        _germinate(mm, "0:2", bp)
        _train(mm, opt, x, 4)
        assert mm.slots["0:2"].current_stage is SeedStage.BLENDING
        params = list(mm.parameters())
        y, g = _grads(mm, params, x)
        results[backend] = (y, g)
    torch.testing.assert_close(results["cupy"][0], results["torch"][0], atol=1e-6, rtol=1e-5)
    for a, b in zip(results["cupy"][1], results["torch"][1], strict=True):
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

