"""The heuristic's cold start (probes), its choice across slot kinds, and the slot history
it reads from the snapshot, on hand-built snapshots."""

from __future__ import annotations

import pytest

from esper.grow import BuiltinKernels
from esper.tamiyo.heuristic import HeuristicConfig, HeuristicPolicy
from generated.esper.common.v1 import decision_pb2 as D
from generated.esper.common.v1 import health_pb2, seed_pb2
from tests.unit.tamiyo.snapshots import IMPROVING, S, slot
from tests.unit.tamiyo.snapshots import snapshot as _snapshot

G, F, W = D.DECISION_KIND_GERMINATE, D.DECISION_KIND_FOSSILIZE, D.DECISION_KIND_WAIT

NCL4 = seed_pb2.SiteSignature(layout=seed_pb2.ACTIVATION_LAYOUT_NCL, channels=4, spatial=[20],
                              dtype=seed_pb2.D_TYPE_FLOAT32)
"""The MNIST-1D CNN's activation sites (4 channels × 20)."""


def full_catalog_at(site: seed_pb2.SiteSignature) -> list:
    return BuiltinKernels().candidates(site)


def named(cands: list, name: str):
    return next(c for c in cands if c.blueprint_name == name)


def ncl_slot(slot_id: str, *, depth: int = 0, grad: float = 1.0) -> health_pb2.SlotHealth:
    s = slot(slot_id, depth=depth, host_grad_norm=grad)
    s.site.CopyFrom(NCL4)
    return s


_PROBES: dict[int, list[health_pb2.KernelProbe]] = {}
"""Probes by slot object (`HealthSnapshot.probes` names the slot; `snapshot` adds them)."""


def probe(s: health_pb2.SlotHealth, kernel_id: str, gain: float, stderr: float = 0.0) -> None:
    _PROBES.setdefault(id(s), []).append(health_pb2.KernelProbe(
        kernel_id=kernel_id, slot_id=s.slot_id, gain=gain, gain_stderr=stderr, steps=20, flops=1e6))


_RECORDS: list[health_pb2.SlotRecord] = []


def clear_probes(s: health_pb2.SlotHealth) -> None:
    _PROBES.pop(id(s), None)


def snapshot(slots: list[health_pb2.SlotHealth], **kw) -> health_pb2.HealthSnapshot:
    snap = _snapshot(slots, **kw)
    for s in slots:
        snap.probes.extend(_PROBES.get(id(s), []))
    return snap


@pytest.fixture(autouse=True)
def _fresh_probes():
    _PROBES.clear()
    yield
    _PROBES.clear()


def test_cold_start_with_the_full_catalog_follows_the_probe_not_the_cost() -> None:
    cands = full_catalog_at(NCL4)
    names = {c.blueprint_name for c in cands}
    assert {"norm_scale", "conv3_residual_1d", "bottleneck_mlp", "squeeze_excite"} <= names
    cheapest = min(cands, key=lambda c: c.parameters)
    assert cheapest.blueprint_name == "norm_scale" and all(c.outcomes == 0 for c in cands)
    pol = HeuristicPolicy()

    # No outcome history and no probe: only the parameter rent tells kernels apart.
    s = ncl_slot("act1")
    (d,) = pol.decide(snapshot([s], host_parameters=300), {"act1": cands})
    assert d.kind == G and d.kernel_id == cheapest.kernel_id

    # A probe shows the conv residual helps most: it wins despite 50x the parameters.
    conv = named(cands, "conv3_residual_1d")
    for c in cands:
        probe(s, c.kernel_id, 0.08 if c is conv else 0.01)
    (d,) = pol.decide(snapshot([s], host_parameters=300), {"act1": cands})
    assert d.kind == G and d.kernel_id == conv.kernel_id
    assert "probe gain +0.08" in d.reason and f"{len(cands)} probed kernel(s)" in d.reason

    # The probe is the evidence, not "anything but the cheapest": where the cheap kernel
    # measures best, it is chosen.
    clear_probes(s)
    for c in cands:
        probe(s, c.kernel_id, 0.05 if c is cheapest else 0.0)
    (d,) = pol.decide(snapshot([s], host_parameters=300), {"act1": cands})
    assert d.kernel_id == cheapest.kernel_id


def test_kernels_a_probe_cannot_tell_apart_go_to_the_larger_one() -> None:
    cands = full_catalog_at(NCL4)
    norm, conv, bottle = (named(cands, n) for n in ("norm_scale", "conv3_residual_1d",
                                                     "bottleneck_mlp"))
    s = ncl_slot("act1")
    # norm_scale measures best by less than the noise; conv (the largest) is within it,
    # bottleneck_mlp clearly below.
    probe(s, norm.kernel_id, 0.050, 0.004)
    probe(s, conv.kernel_id, 0.049, 0.004)
    probe(s, bottle.kernel_id, 0.020, 0.004)
    snap = snapshot([s], host_parameters=300)
    offered = {"act1": [norm, conv, bottle]}
    (d,) = HeuristicPolicy().decide(snap, offered)
    assert d.kernel_id == conv.kernel_id
    assert "the best score was norm_scale" in d.reason and "2 tied, the largest chosen" in d.reason
    (d,) = HeuristicPolicy(HeuristicConfig(probe_tie_stderr=0.0)).decide(snap, offered)
    assert d.kernel_id == norm.kernel_id
    # A clear measurement is not overridden by size.
    clear_probes(s)
    probe(s, norm.kernel_id, 0.050, 0.001)
    probe(s, conv.kernel_id, 0.030, 0.001)
    (d,) = HeuristicPolicy().decide(snapshot([s], host_parameters=300), {"act1": [norm, conv]})
    assert d.kernel_id == norm.kernel_id


def test_outcome_records_outweigh_a_probe_as_they_accumulate() -> None:
    from dataclasses import replace

    cands = full_catalog_at(NCL4)
    conv, bottle = named(cands, "conv3_residual_1d"), named(cands, "bottleneck_mlp")
    s = ncl_slot("act1")
    probe(s, conv.kernel_id, 0.06)
    probe(s, bottle.kernel_id, 0.03)
    proven = replace(bottle, outcomes=40, fossilized=36, mean_contribution=0.09)
    (d,) = HeuristicPolicy().decide(snapshot([s], host_parameters=300), {"act1": [conv, proven]})
    assert d.kernel_id == bottle.kernel_id


def test_probes_choose_the_slot_too_across_slot_kinds() -> None:
    out_slot = slot("act1", depth=0, host_grad_norm=9.0)
    par = slot("fc1:fc2", depth=1, host_grad_norm=0.1)
    par.site.kind = seed_pb2.SLOT_KIND_PARALLEL
    par.site.input.CopyFrom(seed_pb2.ActivationSpec(layout=seed_pb2.ACTIVATION_LAYOUT_NC,
                                                    channels=40, dtype=seed_pb2.D_TYPE_FLOAT32))
    from tests.unit.tamiyo.snapshots import candidate

    norm, width = candidate("norm_scale", 32), candidate("width8_relu", 472)
    cands = {"act1": [norm], "fc1:fc2": [width]}
    pol = HeuristicPolicy()
    # Without probes: parallel slots rank first by default, by gradient when asked.
    (d,) = pol.decide(snapshot([out_slot, par]), cands)
    assert d.slot_id == "fc1:fc2" and "parallel slots" in d.reason
    (d,) = HeuristicPolicy(HeuristicConfig(slot_kinds="gradient")).decide(snapshot([out_slot, par]), cands)
    assert d.slot_id == "act1"
    (d,) = HeuristicPolicy(HeuristicConfig(slot_kinds="output_first")).decide(snapshot([out_slot, par]), cands)
    assert d.slot_id == "act1"
    # With probes the measured gains decide, whatever the kinds and gradients say.
    probe(out_slot, norm.kernel_id, 0.04)
    probe(par, width.kernel_id, 0.01)
    (d,) = pol.decide(snapshot([out_slot, par]), cands)
    assert (d.slot_id, d.kernel_id) == ("act1", norm.kernel_id) and "output slot" in d.reason


def test_probe_min_gain_withholds_a_germination_nothing_measured_worth() -> None:
    cands = full_catalog_at(NCL4)
    s = ncl_slot("act1")
    for c in cands:
        probe(s, c.kernel_id, -0.01)
    (d,) = HeuristicPolicy(HeuristicConfig(probe_min_gain=0.0)).decide(snapshot([s]), {"act1": cands})
    assert d.kind == W and "probe_min_gain=0" in d.reason
    (d,) = HeuristicPolicy().decide(snapshot([s]), {"act1": cands})
    assert d.kind == G  # no gate by default: probes only choose


def holding_with_history(epoch: int, contributions: list[float]) -> health_pb2.HealthSnapshot:
    s = slot("s0", S.SEED_STAGE_HOLDING, contribution=contributions[-1], measured=True,
             epochs_in_stage=len(contributions))
    first = epoch - len(contributions) + 1
    for i, c in enumerate(contributions):
        _RECORDS.append(health_pb2.SlotRecord(slot_id="s0", epoch=first + i, stage=S.SEED_STAGE_HOLDING,
                                              contribution_measured=True, contribution=c))
    snap = snapshot([s], epoch=epoch, val_loss=IMPROVING)
    snap.slot_records.extend(_RECORDS)
    _RECORDS.clear()
    snap.slot_history = True
    return snap


def test_a_fresh_policy_reads_the_streak_from_the_snapshot() -> None:
    cfg = HeuristicConfig(fossilize_epochs=3, fossilize_threshold=0.01, holding_patience_epochs=10)
    # Every boundary answered by a new policy object (another replica): same answer.
    assert HeuristicPolicy(cfg).decide(holding_with_history(12, [0.05, 0.04]), {})[0].kind == W
    ds = HeuristicPolicy(cfg).decide(holding_with_history(13, [0.05, 0.04, 0.03]), {})
    assert [(d.kind, d.slot_id) for d in ds] == [(F, "s0")] and "3 consecutive" in ds[0].reason
    # A dip inside the window, or a gap in the epochs, breaks the streak.
    assert HeuristicPolicy(cfg).decide(holding_with_history(13, [0.05, 0.001, 0.03]), {})[0].kind == W
    gap = holding_with_history(13, [0.05, 0.04, 0.03])
    gap.slot_records[0].epoch = 9
    assert HeuristicPolicy(cfg).decide(gap, {})[0].kind == W
    # The policy kept nothing: a snapshot without the flag starts from its own (empty) memory.
    pol = HeuristicPolicy(cfg)
    pol.decide(holding_with_history(13, [0.05, 0.04, 0.03]), {})
    assert pol.history.runs() == 0
    no_flag = holding_with_history(13, [0.05, 0.04, 0.03])
    no_flag.slot_history = False
    assert pol.decide(no_flag, {})[0].kind == W


@pytest.mark.parametrize("bad", [{"slot_kinds": "both"}, {"probe_weight": -1},
                                 {"probe_min_gain": float("nan")}])
def test_new_settings_are_validated(bad) -> None:
    from esper.errors import ConfigError

    with pytest.raises(ConfigError, match=next(iter(bad))):
        HeuristicConfig.from_dict(bad)
