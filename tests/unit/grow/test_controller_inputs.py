"""What the grower hands its controller: slot history from the run, cold-start probes, the
no-fit check, and the decision FLOPs it spends doing so."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from esper.errors import ConfigError
from esper.grow import BuiltinKernels, Grower, GrowthConfig, fixed_controller, heuristic_controller
from generated.esper.common.v1 import decision_pb2 as D
from generated.esper.common.v1 import seed_pb2
from tests.unit.grow.growkit import (
    FAST,
    cases,
    evaluate,
    held_out,
    loader,
    make_grower,
    train_epoch,
)

CASE = cases()["tabular_mlp"]
QUICK = {"warmup_epochs": 1, "plateau_window": 1, "plateau_threshold": 0.5,
         "fossilize_epochs": 2, "fossilize_threshold": 0.0, "holding_patience_epochs": 4}


def grower_with(controller, *, kernels=None, config=None, sites=("1", "3"), parallel=(), events=None):
    torch.manual_seed(0)
    model = CASE.build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = Grower(model, sites=list(sites), parallel=list(parallel), example_input=CASE.x[:4],
               optimizer=opt, loss_fn=CASE.loss_fn, held_out=held_out(CASE), kasmina=FAST,
               controller=controller, kernels=kernels or BuiltinKernels(["bottleneck_mlp"]),
               config=config or GrowthConfig(max_seeds=2),
               event_sink=None if events is None else events.append)
    return g, model, opt


def run(g, model, opt, epochs):
    data = loader(CASE)
    reports = []
    for _ in range(epochs):
        train_epoch(model, g, data, opt, CASE.loss_fn)
        reports.append(g.end_epoch(val_loss=evaluate(model, CASE)))
    return reports


# ---- no silent no-growth ----------------------------------------------------------------


def test_a_catalog_that_fits_no_slot_fails_at_construction_naming_slots_and_blueprints() -> None:
    with pytest.raises(ConfigError) as e:
        grower_with(heuristic_controller(), kernels=BuiltinKernels(["conv3x3_residual", "width4_relu"]))
    msg = str(e.value)
    assert "no offered blueprint fits any seed slot" in msg
    assert "1 (output NC:16:-:FLOAT32)" in msg and "3 (output NC:16:-:FLOAT32)" in msg
    assert "conv3x3_residual (NCHW; output slots)" in msg and "width4_relu (NC/NLD; parallel slots)" in msg
    # The same catalog at a parallel slot it serves is fine, and a static run needs no fit.
    grower_with(heuristic_controller(), kernels=BuiltinKernels(["width4_relu"]), sites=(),
                parallel=("0:2",))
    grower_with(None, kernels=BuiltinKernels(["conv3x3_residual"]))


def test_a_remote_source_whose_blueprints_attribute_is_an_empty_name_list_is_not_refused() -> None:
    # UrzaKernels.blueprints = () means "Tezzeret's whole catalog", not "nothing offered":
    # the construction-time check must not read it as an empty catalog (it did, and the
    # README's remote loop failed against a plain esper up).
    class NamesOnly(RemoteLike):
        blueprints: tuple[str, ...] = ()

    grower_with(heuristic_controller(), kernels=NamesOnly([]))


class RemoteLike:
    """A kernel source that cannot list its blueprints up front (like Urza)."""

    component = "urza"

    def __init__(self, answer):
        self.answer = answer

    def candidates(self, site):
        return list(self.answer)

    def load(self, kernel_id, site=None):
        raise AssertionError("nothing to load")


def test_a_remote_source_offering_nothing_that_fits_is_a_degradation_event() -> None:
    events: list = []
    g, model, opt = grower_with(fixed_controller(germinate_epochs=(1,)), kernels=RemoteLike([]),
                                events=events)
    reports = run(g, model, opt, 2)
    assert any("urza no_kernels_fit" in d and "1 (NC:16:-:FLOAT32)" in d for d in reports[0].degraded)
    assert reports[1].degraded == []  # said once, not every boundary
    kinds = [(e.degradation.component, e.degradation.kind) for e in events
             if e.WhichOneof("payload") == "degradation"]
    assert kinds == [("urza", "no_kernels_fit")]


# ---- decision FLOPs ---------------------------------------------------------------------


def forward_flops(model, x) -> float:
    with FlopCounterMode(display=False) as c, torch.no_grad():
        model(x)
    return float(c.get_total_flops())


def test_contribution_forwards_are_counted_as_decision_flops() -> None:
    events: list = []
    g, model, opt = grower_with(fixed_controller(germinate_epochs=(1,), fossilize_after_epochs=1),
                                events=events)
    reports = run(g, model, opt, 4)
    x, _ = held_out(CASE)
    blended_stages = {seed_pb2.SEED_STAGE_BLENDING, seed_pb2.SEED_STAGE_HOLDING,
                      seed_pb2.SEED_STAGE_FOSSILIZED}
    for r in reports:
        blended = [s.slot_id for s in r.snapshot.slots if s.stage in blended_stages]
        # One forward as is, one per blended seed with its alpha at 0 (none without one).
        expected = forward_flops(g.model, x) if blended else 0.0
        for slot_id in blended:
            slot = g.model.slots[slot_id]
            slot._force_zero = True
            expected += forward_flops(g.model, x)
            slot._force_zero = False
        assert r.decision_flops == pytest.approx(expected), r
    assert any(r.decision_flops > 0 for r in reports)
    assert g.history.decision_flops == [r.decision_flops for r in reports]
    metrics = [e.epoch_metrics for e in events if e.WhichOneof("payload") == "epoch_metrics"]
    assert metrics[-1].decision_flops == pytest.approx(sum(r.decision_flops for r in reports))


# ---- the run's history in every snapshot ------------------------------------------------


def test_every_snapshot_carries_each_seed_slots_history_and_a_resumed_grower_keeps_it() -> None:
    g, model, opt = grower_with(fixed_controller(germinate_epochs=(1,), fossilize_after_epochs=3))
    reports = run(g, model, opt, 5)
    snap = reports[-1].snapshot
    assert snap.slot_history
    (live,) = [s for s in snap.slots if s.kernel_id]
    history = [r for r in snap.slot_records if r.slot_id == live.slot_id]
    assert [r.epoch for r in history] == list(range(2, 6))  # from germination on
    assert history[-1].stage == live.stage and history[-1].contribution == live.contribution
    assert any(r.contribution_measured for r in history)
    assert {r.slot_id for r in snap.slot_records} == {live.slot_id}  # dormant slots: none

    # A fresh grower loaded from the state dict shows the same history.
    torch.manual_seed(0)
    model2 = CASE.build()
    model2.load_state_dict(model.state_dict())
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    g2 = make_grower(CASE, model2, opt2, controller=fixed_controller(germinate_epochs=(1,)))
    g2.load_state_dict(g.state_dict())
    again = list(g2.snapshot().slot_records)
    # snapshot() adds "now" (epoch 5 again, as recorded) to the recorded boundaries.
    assert again == history


# ---- cold-start probes ------------------------------------------------------------------


def test_probes_run_only_when_the_controller_would_germinate_and_leave_the_model_untouched() -> None:
    cat = BuiltinKernels(["norm_scale", "bottleneck_mlp", "lowrank_adapter"])
    g, model, opt = grower_with(heuristic_controller({**QUICK, "probe_tie_stderr": 0.0}), kernels=cat)
    data = loader(CASE)
    train_epoch(model, g, data, opt, CASE.loss_fn)
    r1 = g.end_epoch(val_loss=evaluate(model, CASE))  # warm-up: no germination, no probes
    assert r1.probe_ms == 0 and not r1.snapshot.probes
    train_epoch(model, g, data, opt, CASE.loss_fn)

    # What a probe must not change: host weights, BN-free but grads and RNG streams too.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    grads = [p.grad.clone() for p in model.parameters()]
    calls: list[int] = []
    inner = g.controller.decide
    g.controller.decide = lambda snap, c: calls.append(len(snap.probes)) or inner(snap, c)
    r2 = g.end_epoch(val_loss=evaluate(model, CASE))
    assert calls == [0, 6]  # asked once without probes, once with both open slots' 3 kernels
    (germ,) = [d for d in r2.applied if d.kind == D.DECISION_KIND_GERMINATE]
    probes = {s.slot_id: [p for p in r2.snapshot.probes if p.slot_id == s.slot_id] for s in r2.snapshot.slots}
    assert {len(p) for p in probes.values()} == {3}
    assert all(p.steps == g.config.probe_steps and p.flops > 0 for ps in probes.values() for p in ps)
    best = max((p.gain, sid, p.kernel_id) for sid, ps in probes.items() for p in ps
               if p.kernel_id in {c.kernel_id for c in cat.candidates(g.model.site_signature(sid))})
    assert (germ.slot_id, germ.kernel_id) == (best[1], best[2]) and "probe gain" in germ.reason
    assert r2.decision_flops >= sum(p.flops for ps in probes.values() for p in ps) > 0
    assert g.history.probes[-1]["epoch"] == 2
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, gr in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, gr)


def test_no_probes_for_controllers_that_do_not_read_them_or_when_switched_off() -> None:
    g, model, opt = grower_with(fixed_controller(germinate_epochs=(1,)))
    assert not any(r.snapshot.probes for r in run(g, model, opt, 2))
    g, model, opt = grower_with(heuristic_controller(QUICK),
                                config=GrowthConfig(max_seeds=2, probe_steps=0))
    reports = run(g, model, opt, 3)
    assert any(r.applied for r in reports) and all(r.probe_ms == 0 for r in reports)


def test_a_probe_picks_a_kernel_that_helps_over_the_cheapest() -> None:
    # Full catalog at the MLP's two ReLU outputs: without probes the heuristic's cold
    # start takes the cheapest kernel (norm_scale); the probe measures the others.
    def first_germination(config):
        g, model, opt = grower_with(heuristic_controller(QUICK), kernels=BuiltinKernels(),
                                    config=config)
        for r in run(g, model, opt, 3):
            for d in r.applied:
                if d.kind == D.DECISION_KIND_GERMINATE:
                    return g.kernels.blueprint(d.kernel_id).name, r
        raise AssertionError("no germination")

    name, _ = first_germination(GrowthConfig(max_seeds=1, probe_steps=0))
    assert name == "norm_scale"
    name, r = first_germination(GrowthConfig(max_seeds=1))
    assert name != "norm_scale"
    probes = {p.kernel_id: p for p in r.snapshot.probes}
    chosen = next(d for d in r.applied if d.kind == D.DECISION_KIND_GERMINATE)
    assert all(p.gain_stderr > 0 for p in probes.values())
    # The choice was measured: the chosen kernel's gain is within the noise of the best or
    # better than every norm_scale probe.
    norm = [p.gain for k, p in probes.items() if g_name(k) == "norm_scale"]
    best = max(p.gain for p in probes.values())
    mine = probes[chosen.kernel_id]
    assert mine.gain > max(norm) or best - mine.gain <= 3 * mine.gain_stderr


def g_name(kernel_id: str) -> str:
    return BuiltinKernels().blueprint(kernel_id).name


def test_parallel_and_output_slots_compete_in_one_decision() -> None:
    g, model, opt = grower_with(heuristic_controller({**QUICK, "probe_tie_stderr": 0.0}),
                                kernels=BuiltinKernels(["bottleneck_mlp", "width8_relu"]),
                                sites=("3",), parallel=("0:2",))
    for r in run(g, model, opt, 3):
        if r.snapshot is not None and r.snapshot.probes:
            kinds = {s.site.kind for s in r.snapshot.slots if any(p.slot_id == s.slot_id for p in r.snapshot.probes)}
            assert kinds == {seed_pb2.SLOT_KIND_UNSPECIFIED, seed_pb2.SLOT_KIND_PARALLEL}
            (germ,) = [d for d in r.applied if d.kind == D.DECISION_KIND_GERMINATE]
            gains = {(p.slot_id, p.kernel_id): p.gain for p in r.snapshot.probes}
            assert gains[(germ.slot_id, germ.kernel_id)] == max(gains.values())
            return
    raise AssertionError("no boundary probed")


def test_probe_settings_are_validated() -> None:
    for bad in ({"probe_steps": -1}, {"probe_lr": 0.0}, {"probe_fit_fraction": 1.0},
                {"probe_max_kernels": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GrowthConfig(**bad)
        with pytest.raises(ConfigError, match=next(iter(bad))):
            GrowthConfig.from_dict(bad)
