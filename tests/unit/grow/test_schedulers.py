"""Every scheduler in torch.optim.lr_scheduler keeps working across germinate and prune.

For each class: a seed germinates, the scheduler steps, a second seed germinates, the first
is pruned, the scheduler steps again; at every step each seed group's lr must equal the
lr of a group with the same base that was there from step 0 (here: the host group's, as
`seed_lr` is None; with `seed_lr` set, that lr scaled by seed_lr / host lr).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.optim import lr_scheduler as L

from esper.grow import BuiltinKernels, Grower, KasminaConfig
from esper.kasmina import wrap
from generated.esper.common.v1 import decision_pb2 as D
from tests.unit.grow.growkit import cases, held_out

CASE = cases()["tabular_mlp"]
STEPS = 30


def schedulers(opt: torch.optim.Optimizer) -> dict:
    return {
        "LambdaLR": lambda: L.LambdaLR(opt, lambda e: 0.95 ** e),
        "MultiplicativeLR": lambda: L.MultiplicativeLR(opt, lambda e: 0.97),
        "StepLR": lambda: L.StepLR(opt, step_size=4, gamma=0.5),
        "MultiStepLR": lambda: L.MultiStepLR(opt, milestones=[3, 9, 20], gamma=0.5),
        "ConstantLR": lambda: L.ConstantLR(opt, factor=0.5, total_iters=12),
        "LinearLR": lambda: L.LinearLR(opt, start_factor=0.2, total_iters=15),
        "ExponentialLR": lambda: L.ExponentialLR(opt, gamma=0.93),
        "PolynomialLR": lambda: L.PolynomialLR(opt, total_iters=40, power=2.0),
        "CosineAnnealingLR": lambda: L.CosineAnnealingLR(opt, T_max=25, eta_min=1e-3),
        "CosineAnnealingWarmRestarts": lambda: L.CosineAnnealingWarmRestarts(opt, T_0=5, T_mult=2, eta_min=1e-3),
        "CyclicLR": lambda: L.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=4),
        "OneCycleLR": lambda: L.OneCycleLR(opt, max_lr=0.1, total_steps=STEPS + 5),
        "SequentialLR": lambda: L.SequentialLR(opt, [L.LinearLR(opt, 0.1, total_iters=5),
                                                     L.LambdaLR(opt, lambda e: 0.9 ** e)], milestones=[5]),
        "ChainedScheduler": lambda: L.ChainedScheduler([L.ConstantLR(opt, 0.5, total_iters=6),
                                                        L.ExponentialLR(opt, 0.95)]),
        "ReduceLROnPlateau": lambda: L.ReduceLROnPlateau(opt, patience=1, factor=0.5, min_lr=1e-4),
    }


ALL = sorted(schedulers(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)))


def test_every_scheduler_class_is_covered() -> None:
    torch_classes = {
        n for n in L.__all__ if isinstance(getattr(L, n), type) and n not in ("LRScheduler", "_LRScheduler")}
    assert torch_classes <= set(ALL), sorted(torch_classes - set(ALL))


def _setup(name: str, seed_lr: float | None):
    torch.manual_seed(0)
    model = CASE.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = schedulers(opt)[name]()
    grower = Grower(model, sites=CASE.sites, example_input=CASE.x[:4], optimizer=opt, scheduler=sched,
                    kernels=BuiltinKernels(["bottleneck_mlp"]),
                    kasmina=KasminaConfig(incubation=1000, seed_lr=seed_lr))
    return model, opt, sched, grower


def _germinate(grower: Grower, slot_id: str) -> None:
    kid = grower.kernels.candidates(grower.model.site_signature(slot_id))[0].kernel_id
    rejected = grower.apply([D.Decision(kind=D.DECISION_KIND_GERMINATE, slot_id=slot_id, kernel_id=kid,
                                        blueprint_id="bp")])
    assert rejected == {}


def _run(name: str, seed_lr: float | None):
    model, opt, sched, grower = _setup(name, seed_lr)
    x, y = CASE.x[32:48], CASE.y[32:48]
    trace = []
    plateau = isinstance(sched, L.ReduceLROnPlateau)
    for step in range(STEPS):
        if step == 4:
            _germinate(grower, "1")
        if step == 11:
            _germinate(grower, "3")
        if step == 17:
            assert grower.apply([D.Decision(kind=D.DECISION_KIND_PRUNE, slot_id="1")]) == {}
        opt.zero_grad()
        CASE.loss_fn(model(x), y).backward()
        opt.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched.step(1.0) if plateau else sched.step()
        grower.step()
        groups = opt.param_groups
        trace.append([(g.get("kasmina_slot"), float(g["lr"]), g.get("momentum"),
                       g.get("initial_lr")) for g in groups])
        last = sched.get_last_lr()
        assert len(last) == len(groups)
    return trace, grower


@pytest.mark.parametrize("name", ALL)
def test_seed_groups_follow_the_schedule_across_germinate_and_prune(name: str) -> None:
    trace, _ = _run(name, None)
    assert [len(t) for t in (trace[3], trace[4], trace[11], trace[17])] == [1, 2, 3, 2]
    assert trace[-1][1][0] == "3"  # the pruned seed's group is gone, the other one stays
    lrs = [lr for t in trace for _, lr, _, _ in t]
    assert len({round(v, 12) for v in lrs}) > 1, "the schedule never moved"
    for step, groups in enumerate(trace):
        host_lr, host_mom = groups[0][1], groups[0][2]
        for slot, lr, mom, _ in groups[1:]:
            assert lr == pytest.approx(host_lr, rel=1e-12, abs=1e-15), (step, slot)
            assert mom == pytest.approx(host_mom), (step, slot)


@pytest.mark.parametrize("name", ["LambdaLR", "StepLR", "OneCycleLR", "CyclicLR", "CosineAnnealingLR",
                                  "ReduceLROnPlateau", "SequentialLR"])
def test_a_seed_lr_scales_the_seed_schedule(name: str) -> None:
    trace, _ = _run(name, 0.05)
    host_base = trace[0][0][3] or 0.1
    ratio = 0.05 / host_base
    for step, groups in enumerate(trace):
        for slot, lr, _, _ in groups[1:]:
            if name == "CosineAnnealingLR":
                # eta_min makes cosine affine in the base: the seed follows its own curve.
                t = step + 1
                want = 1e-3 + (0.1 * ratio - 1e-3) * (1 + math.cos(math.pi * t / 25)) / 2
            else:
                want = groups[0][1] * ratio
            assert lr == pytest.approx(want, rel=1e-9), (step, slot)


@pytest.mark.parametrize("name", ["LambdaLR", "OneCycleLR"])
def test_without_the_grower_the_known_failures_happen(name: str) -> None:
    """The failures of issue 9, reproduced with Kasmina alone (so the tests above can fail)."""
    torch.manual_seed(0)
    model = CASE.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = schedulers(opt)[name]()
    mm = wrap(model, sites=["1"], example_input=CASE.x[:4])
    mm.attach_optimizer(opt)
    kernels = BuiltinKernels(["bottleneck_mlp"])
    kid = kernels.candidates(mm.site_signature("1"))[0].kernel_id
    mm.germinate("1", kernels.load(kid), kernel_id=kid, blueprint_id="bp")
    opt.step()
    with pytest.raises((ValueError, KeyError)):
        sched.step()


def test_resumed_scheduler_state_matches(tmp_path) -> None:
    """Grower first, then optimizer and scheduler: LambdaLR/OneCycle load with seed groups."""
    for name in ("LambdaLR", "OneCycleLR", "SequentialLR"):
        model, opt, sched, grower = _setup(name, None)
        _germinate(grower, "1")
        for _ in range(3):
            opt.step()
            sched.step()
        saved = {"m": model.state_dict(), "o": opt.state_dict(), "s": sched.state_dict(),
                 "g": grower.state_dict()}
        model2, opt2, sched2, grower2 = _setup(name, None)
        grower2.load_state_dict(saved["g"])
        model2.load_state_dict(saved["m"])
        opt2.load_state_dict(saved["o"])
        sched2.load_state_dict(saved["s"])
        for _ in range(3):
            for o, s in ((opt, sched), (opt2, sched2)):
                o.step()
                s.step()
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt2.param_groups]
        assert len(opt2.param_groups) == 2


def test_held_out_is_not_needed_without_a_controller() -> None:
    model = CASE.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    Grower(model, sites=["1"], example_input=held_out(CASE)[0], optimizer=opt)
