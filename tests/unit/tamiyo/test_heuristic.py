"""Heuristic policy on hand-built snapshots: every rule, with the numbers that trip it."""

from __future__ import annotations

import pytest

from esper.errors import ConfigError
from esper.tamiyo.heuristic import HeuristicConfig, HeuristicPolicy
from esper.tamiyo.heuristic.policy import kernel_score, relative_improvement
from generated.esper.common.v1 import decision_pb2 as D
from tests.unit.tamiyo.snapshots import IMPROVING, S, candidate, slot, snapshot

G, P, F, W = D.DECISION_KIND_GERMINATE, D.DECISION_KIND_PRUNE, D.DECISION_KIND_FOSSILIZE, D.DECISION_KIND_WAIT


def kinds(ds: list[D.Decision]) -> list[tuple[int, str]]:
    return [(d.kind, d.slot_id) for d in ds]


def three_dormant() -> list:
    return [
        slot("s0", depth=0, host_grad_norm=0.5),
        slot("s1", depth=1, host_grad_norm=2.5),
        slot("s2", depth=2, host_grad_norm=1.0),
    ]


def test_plateau_germinates_at_the_highest_gradient_slot_with_the_best_kernel_within_budget() -> None:
    big_star = candidate("big_star", 9_000, outcomes=20, fossilized=19, mean_contribution=0.5)
    good = candidate("good", 800, outcomes=10, fossilized=8, mean_contribution=0.05)
    meh = candidate("meh", 400, outcomes=10, fossilized=2, mean_contribution=-0.01)
    cands = {s: [big_star, meh, good] for s in ("s0", "s1", "s2")}
    snap = snapshot(three_dormant(), parameters_left=1_000)
    ds = HeuristicPolicy().decide(snap, cands)
    assert kinds(ds) == [(G, "s1")]
    assert ds[0].kernel_id == good.kernel_id and ds[0].blueprint_id == good.blueprint_id
    assert "plateau" in ds[0].reason and "s1" in ds[0].reason and ds[0].policy == "heuristic"


def test_no_plateau_or_warmup_means_wait_with_the_number_in_words() -> None:
    cands = {"s1": [candidate("good", 100)]}
    ds = HeuristicPolicy().decide(snapshot(three_dormant(), val_loss=IMPROVING), cands)
    assert kinds(ds) == [(W, "")]
    assert "no plateau" in ds[0].reason and "%" in ds[0].reason
    ds = HeuristicPolicy(HeuristicConfig(warmup_epochs=10)).decide(snapshot(three_dormant(), epoch=6), cands)
    assert kinds(ds) == [(W, "")] and "warm-up" in ds[0].reason


def test_relative_improvement_is_measured_against_the_best_loss_before_the_window() -> None:
    assert relative_improvement([1.0, 0.5, 0.6, 0.55, 0.52], 3) == pytest.approx(-0.04)
    assert relative_improvement([1.0, 0.8], 3) is None
    assert relative_improvement([1.0, 1.0, 0.9], 1) == pytest.approx(0.1)


@pytest.mark.parametrize(("tie_break", "expected"), [("deepest", "s2"), ("earliest", "s0")])
def test_gradient_ties_go_to_the_configured_end(tie_break: str, expected: str) -> None:
    slots = [slot(f"s{i}", depth=i, host_grad_norm=1.0) for i in range(3)]
    cands = {s.slot_id: [candidate("k", 100)] for s in slots}
    ds = HeuristicPolicy(HeuristicConfig(tie_break=tie_break)).decide(snapshot(slots), cands)
    assert kinds(ds) == [(G, expected)]


def test_outcome_records_outrank_an_unknown_kernel_and_cost_breaks_near_ties() -> None:
    cfg = HeuristicConfig()
    proven = candidate("proven", 500, outcomes=30, fossilized=25, mean_contribution=0.04)
    unknown = candidate("unknown", 500)
    assert kernel_score(proven, host_parameters=5000, config=cfg) > kernel_score(unknown, host_parameters=5000, config=cfg)
    small, large = candidate("small", 100), candidate("large", 4000)
    assert kernel_score(small, host_parameters=5000, config=cfg) > kernel_score(large, host_parameters=5000, config=cfg)
    ds = HeuristicPolicy(cfg).decide(snapshot([slot("s0")]), {"s0": [unknown, proven]})
    assert ds[0].kernel_id == proven.kernel_id


def test_budget_exhausted_never_germinates() -> None:
    cands = {s: [candidate("k", 500)] for s in ("s0", "s1", "s2")}
    ds = HeuristicPolicy().decide(snapshot(three_dormant(), seeds_left=0), cands)
    assert kinds(ds) == [(W, "")] and "no seeds are left" in ds[0].reason
    ds = HeuristicPolicy().decide(snapshot(three_dormant(), parameters_left=499), cands)
    assert kinds(ds) == [(W, "")] and "499 parameters left" in ds[0].reason


def test_embargoed_slot_is_skipped_for_the_next_best() -> None:
    slots = [slot("s0", depth=0, host_grad_norm=0.5), slot("s1", depth=1, host_grad_norm=3.0, embargo=2)]
    cands = {"s0": [candidate("k", 100)], "s1": [candidate("k", 100)]}
    assert kinds(HeuristicPolicy().decide(snapshot(slots), cands)) == [(G, "s0")]
    slots[0].embargo_epochs_left = 1
    ds = HeuristicPolicy().decide(snapshot(slots), cands)
    assert kinds(ds) == [(W, "")] and "embargoed" in ds[0].reason


def test_no_germination_while_a_seed_is_in_flight_unless_configured() -> None:
    slots = [slot("s0", S.SEED_STAGE_BLENDING, depth=0), slot("s1", depth=1)]
    cands = {"s1": [candidate("k", 100)]}
    ds = HeuristicPolicy().decide(snapshot(slots), cands)
    assert kinds(ds) == [(W, "")] and "s0" in ds[0].reason
    ds = HeuristicPolicy(HeuristicConfig(one_seed_in_flight=False)).decide(snapshot(slots), cands)
    assert kinds(ds) == [(G, "s1")]


def test_negative_measured_contribution_prunes_and_unmeasured_does_not() -> None:
    slots = [
        slot("s0", S.SEED_STAGE_BLENDING, depth=0, contribution=-0.02, measured=True),
        slot("s1", S.SEED_STAGE_TRAINING, depth=1, contribution=-0.5, measured=False),
        slot("s2", S.SEED_STAGE_HOLDING, depth=2, contribution=-0.0005, measured=True),
    ]
    ds = HeuristicPolicy().decide(snapshot(slots, val_loss=IMPROVING), {})
    assert kinds(ds) == [(P, "s0")]
    assert "-0.02" in ds[0].reason


def test_non_finite_seed_is_pruned() -> None:
    slots = [slot("s0", S.SEED_STAGE_TRAINING, finite=False), slot("s1", S.SEED_STAGE_HOLDING, depth=1, contribution=float("nan"), measured=True)]
    ds = HeuristicPolicy().decide(snapshot(slots, val_loss=IMPROVING), {})
    assert kinds(ds) == [(P, "s0"), (P, "s1")]
    assert all("not finite" in d.reason for d in ds)


def test_stable_positive_contribution_in_holding_fossilizes_after_k_epochs_and_a_dip_resets() -> None:
    pol = HeuristicPolicy(HeuristicConfig(fossilize_epochs=3, fossilize_threshold=0.01, holding_patience_epochs=10))

    def at(epoch: int, c: float) -> list[D.Decision]:
        s = slot("s0", S.SEED_STAGE_HOLDING, contribution=c, measured=True, epochs_in_stage=epoch - 9)
        return pol.decide(snapshot([s], epoch=epoch, val_loss=IMPROVING), {})

    assert kinds(at(10, 0.05)) == [(W, "")]
    assert kinds(at(11, 0.002)) == [(W, "")]  # below threshold: streak broken
    assert kinds(at(12, 0.05)) == [(W, "")]
    assert kinds(at(13, 0.04)) == [(W, "")]
    # A retried boundary does not count twice.
    assert kinds(at(13, 0.04)) == [(W, "")]
    ds = at(14, 0.03)
    assert kinds(ds) == [(F, "s0")] and "3 consecutive" in ds[0].reason


def test_history_is_per_run_and_restarts_with_a_new_kernel() -> None:
    pol = HeuristicPolicy(HeuristicConfig(fossilize_epochs=2))
    for e in (10, 11):
        s = slot("s0", S.SEED_STAGE_HOLDING, contribution=0.05, measured=True, epochs_in_stage=e - 9)
        other = pol.decide(snapshot([s], epoch=e, val_loss=IMPROVING, run_id="run-B" if e == 10 else "run-A"), {})
    assert kinds(other) == [(W, "")]  # run-A has only one epoch of history
    s = slot("s0", S.SEED_STAGE_HOLDING, contribution=0.05, measured=True, kernel_id="sha256:" + "1" * 64)
    assert kinds(pol.decide(snapshot([s], epoch=12, val_loss=IMPROVING, run_id="run-A"), {})) == [(W, "")]


def test_holding_too_long_without_earning_fossilization_is_pruned() -> None:
    s = slot("s0", S.SEED_STAGE_HOLDING, contribution=0.0001, measured=True, epochs_in_stage=6)
    ds = HeuristicPolicy().decide(snapshot([s], val_loss=IMPROVING), {})
    assert kinds(ds) == [(P, "s0")] and "6 epochs in HOLDING" in ds[0].reason


def test_prune_frees_the_in_flight_rule_for_a_germination_elsewhere() -> None:
    slots = [slot("s0", S.SEED_STAGE_BLENDING, contribution=-0.3, measured=True), slot("s1", depth=1)]
    ds = HeuristicPolicy().decide(snapshot(slots), {"s1": [candidate("k", 10)]})
    assert kinds(ds) == [(P, "s0"), (G, "s1")]


def test_config_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ConfigError, match="plateau_windw"):
        HeuristicConfig.from_dict({"plateau_windw": 3})
    with pytest.raises(ConfigError, match="tie_break='middle'"):
        HeuristicConfig.from_dict({"tie_break": "middle"})
    with pytest.raises(ConfigError, match="prune_threshold=-1"):
        HeuristicConfig.from_dict({"prune_threshold": -1})
    with pytest.raises(ConfigError, match="holding_patience_epochs=1"):
        HeuristicConfig.from_dict({"holding_patience_epochs": 1, "fossilize_epochs": 2})
    assert HeuristicConfig.from_dict({"plateau_window": 5}).plateau_window == 5
