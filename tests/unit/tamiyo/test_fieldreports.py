"""Field reports: events → run reports, the reward on hand-made outcomes, the behaviour policy."""

from __future__ import annotations

import math
import random

import pytest

from esper.errors import ConfigError
from esper.tamiyo.fieldreports import (
    EXPLORE,
    BoundaryRecord,
    ExploringPolicy,
    RewardConfig,
    RunReport,
    SeedOutcome,
    boundary_rewards,
    random_legal_decision,
    reports_from_events,
)
from esper.tamiyo.heuristic import HeuristicPolicy
from esper.tamiyo.policy import check_decisions
from generated.esper.common.v1 import decision_pb2 as D
from generated.esper.oona.v1 import events_pb2 as E
from tests.unit.tamiyo.snapshots import S, candidate, slot, snapshot

K = candidate("k", 500)


def env(run: str, seq: int, epoch: int, **payload) -> E.EventEnvelope:
    e = E.EventEnvelope(event_id=f"{run}/{seq}", run_id=run, sequence=seq, epoch=epoch, source="tolaria")
    (name, msg), = payload.items()
    getattr(e, name).CopyFrom(msg)
    return e


def germinate(slot_id: str) -> D.Decision:
    return D.Decision(kind=D.DECISION_KIND_GERMINATE, slot_id=slot_id, kernel_id=K.kernel_id, blueprint_id=K.blueprint_id)


def run_events(run: str = "r1") -> list[E.EventEnvelope]:
    """Epoch 3: germinate s0 and s1; s0 measured +0.02 at epoch 4, fossilized at 5;
    s1 fails a gate and is pruned by a governor rollback at 5; epoch 6 ends the run."""
    seq = iter(range(1, 100))
    ev = []
    snap3 = snapshot([slot("s0"), slot("s1", depth=1)], epoch=3)
    snap3.run_id = run
    ev.append(env(run, next(seq), 3, health=snap3))
    ev.append(env(run, next(seq), 3, decision=E.DecisionEvent(decisions=[germinate("s0"), germinate("s1")], rejected={})))
    for s in ("s0", "s1"):
        ev.append(env(run, next(seq), 3, lifecycle=E.LifecycleEvent(slot_id=s, from_stage=S.SEED_STAGE_DORMANT,
                                                                    to_stage=S.SEED_STAGE_GERMINATED, kernel_id=K.kernel_id)))
    live0 = slot("s0", S.SEED_STAGE_BLENDING, contribution=0.02, measured=True)
    live0.seed_parameters = 500
    live1 = slot("s1", S.SEED_STAGE_TRAINING, depth=1)
    live1.seed_parameters = 500
    snap4 = snapshot([live0, live1], epoch=4)
    snap4.run_id = run
    ev.append(env(run, next(seq), 4, health=snap4))
    ev.append(env(run, next(seq), 4, gate=E.GateEvent(slot_id="s1", gate="blending", passed=False, reason="nope")))
    ev.append(env(run, next(seq), 5, degradation=E.DegradationEvent(component="governor", kind="rollback", detail="x")))
    ev.append(env(run, next(seq), 5, lifecycle=E.LifecycleEvent(slot_id="s1", to_stage=S.SEED_STAGE_PRUNED,
                                                                reason="governor rollback: loss exploded")))
    ev.append(env(run, next(seq), 5, lifecycle=E.LifecycleEvent(slot_id="s0", to_stage=S.SEED_STAGE_FOSSILIZED)))
    ev.append(env(run, next(seq), 6, epoch_metrics=E.EpochMetrics(epoch=6, total_epochs=10, val_accuracy=0.8)))
    return ev


def test_events_become_a_run_report_with_each_seeds_fate() -> None:
    events = run_events()
    random.Random(0).shuffle(events)
    (report,) = reports_from_events(events + events[:3], lambda site: [K], baselines={"r1": 0.7})
    assert [b.snapshot.epoch for b in report.boundaries] == [3, 4]
    assert [d.slot_id for d in report.boundaries[0].decisions] == ["s0", "s1"]
    assert report.boundaries[0].candidates == {"s0": [K], "s1": [K]}
    assert report.boundaries[1].decisions == [] and report.boundaries[1].candidates == {}
    s0, s1 = report.seeds
    assert (s0.slot_id, s0.fate, s0.contribution, s0.parameters, s0.germinated_epoch, s0.ended_epoch) == (
        "s0", "fossilized", 0.02, 500, 3, 5)
    assert (s1.slot_id, s1.fate, s1.rejected_by_gate) == ("s1", "rolled_back", True)
    assert report.rollbacks == 1 and report.final_val_accuracy == pytest.approx(0.8)
    assert report.baseline_val_accuracy == 0.7 and report.total_epochs == snap_total_epochs()


def test_a_run_that_was_never_controlled_gives_no_report() -> None:
    ev = [env("r2", 1, 1, epoch_metrics=E.EpochMetrics(epoch=1, val_accuracy=0.5))]
    assert reports_from_events(ev, lambda site: []) == []


def _hand_report(baseline: float | None) -> RunReport:
    dormant = snapshot([slot("a"), slot("b", depth=1)], epoch=2, host_parameters=1000)
    holding = slot("a", S.SEED_STAGE_HOLDING, contribution=0.05, measured=True)
    hurting = slot("b", S.SEED_STAGE_BLENDING, depth=1, contribution=-0.025, measured=True)
    hurting.seed_parameters = 200
    later = snapshot([holding, hurting], epoch=6, host_parameters=1000)
    return RunReport(
        run_id="r", task="t", total_epochs=10, host_parameters=1000, final_val_accuracy=0.82,
        baseline_val_accuracy=baseline,
        boundaries=[
            BoundaryRecord(snapshot=dormant, candidates={}, decisions=[germinate("a"), germinate("b")]),
            BoundaryRecord(snapshot=later, candidates={}, rejected={2: "kernel unavailable"},
                           decisions=[D.Decision(kind=D.DECISION_KIND_FOSSILIZE, slot_id="a"),
                                      D.Decision(kind=D.DECISION_KIND_PRUNE, slot_id="b"),
                                      D.Decision(kind=D.DECISION_KIND_WAIT)]),
        ],
        seeds=[
            SeedOutcome(slot_id="a", kernel_id="k", germinated_epoch=2, ended_epoch=10, fate="fossilized",
                        contribution=0.05, parameters=100),
            SeedOutcome(slot_id="b", kernel_id="k", germinated_epoch=2, ended_epoch=6, fate="pruned",
                        contribution=-0.025, parameters=200, rejected_by_gate=True),
        ],
    )


def test_rewards_on_hand_made_outcomes() -> None:
    cfg = RewardConfig(contribution_scale=0.05, accuracy_weight=10.0, parameter_rent=0.5, gate_penalty=0.5)
    (r0, first), (r1, second) = boundary_rewards(_hand_report(baseline=0.80), cfg)
    # germinate a: tanh(0.05/0.05) − 0.5·100/1000·(8/10); germinate b: tanh(−0.5) − 0.5·200/1000·(4/10) − 0.5
    ga = math.tanh(1.0) - 0.5 * 0.1 * 0.8
    gb = math.tanh(-0.5) - 0.5 * 0.2 * 0.4 - 0.5
    assert [(r.slot_id, r.action) for r in first] == [("a", "germinate"), ("b", "germinate")]
    assert first[0].reward == pytest.approx(ga) and first[1].reward == pytest.approx(gb)
    assert first[1].unsafe and not first[0].unsafe
    run_term = 10.0 * (0.82 - 0.80)
    assert r0 == pytest.approx(run_term + ga + gb)
    # fossilize a at +0.05: tanh(1); prune b at −0.025: +tanh(0.5) + rent saved 0.5·0.2·(4/10)
    fa, pb = math.tanh(1.0), math.tanh(0.5) + 0.5 * 0.2 * 0.4
    assert [(r.action, round(r.reward, 9)) for r in second] == [("fossilize", round(fa, 9)), ("prune", round(pb, 9))]
    assert r1 == pytest.approx(run_term + fa + pb)


def test_without_a_baseline_the_accuracy_term_is_zero_and_rejected_decisions_earn_nothing() -> None:
    report = _hand_report(baseline=None)
    report.boundaries[1].rejected = {0: "gate", 1: "gate"}
    (r0, first), (r1, second) = boundary_rewards(report)
    assert r0 == pytest.approx(sum(r.reward for r in first))
    assert second == [] and r1 == 0.0


def test_reward_config_rejects_bad_values_and_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="parameter_rent=-1"):
        RewardConfig.from_dict({"parameter_rent": -1})
    with pytest.raises(ConfigError, match="unknown tamiyo.reward key"):
        RewardConfig.from_dict({"lambda": 1})


def test_exploration_replaces_decisions_with_legal_ones_and_says_so() -> None:
    snap = snapshot([slot("a"), slot("b", S.SEED_STAGE_HOLDING, depth=1, contribution=0.1, measured=True),
                     slot("c", S.SEED_STAGE_FOSSILIZED, depth=2)])
    cands = {"a": [K]}
    always = ExploringPolicy(HeuristicPolicy(), epsilon=1.0, seed=3)
    never = ExploringPolicy(HeuristicPolicy(), epsilon=0.0, seed=3)
    kinds = set()
    for epoch in range(60):
        snap.epoch = epoch
        (d,) = always.decide(snap, cands)
        allowed, withheld = check_decisions(snap, [d], cands)
        assert allowed == [d]
        assert withheld == [] and d.policy == EXPLORE and d.slot_id != "c"
        kinds.add(D.DecisionKind.Name(d.kind))
        assert all(x.policy == "heuristic" for x in never.decide(snap, cands))
    assert kinds == {"DECISION_KIND_WAIT", "DECISION_KIND_GERMINATE", "DECISION_KIND_PRUNE", "DECISION_KIND_FOSSILIZE"}
    with pytest.raises(ConfigError, match="epsilon=1.5"):
        ExploringPolicy(HeuristicPolicy(), epsilon=1.5)


def test_random_legal_decision_never_germinates_without_seeds_or_at_an_embargoed_slot() -> None:
    snap = snapshot([slot("a", embargo=2), slot("b", depth=1)], seeds_left=0)
    rng = random.Random(0)
    assert {random_legal_decision(snap, {"a": [K], "b": [K]}, rng).kind for _ in range(30)} == {D.DECISION_KIND_WAIT}


def snap_total_epochs() -> int:
    return snapshot([]).total_epochs


def test_a_seed_outcome_says_which_kind_of_slot_it_grew_in() -> None:
    events = run_events()
    for e in events:
        if e.WhichOneof("payload") == "health":
            for s in e.health.slots:
                if s.slot_id == "s1":
                    s.site.kind = S.SLOT_KIND_PARALLEL
                    s.site.input.CopyFrom(S.ActivationSpec(layout=S.ACTIVATION_LAYOUT_NC, channels=40))
    (report,) = reports_from_events(events, lambda site: [K])
    assert {o.slot_id: o.slot_kind for o in report.seeds} == {"s0": "output", "s1": "parallel"}
    # The boundary records keep the kind too (the snapshot's site), for the learner.
    assert report.boundaries[0].snapshot.slots[1].site.kind == S.SLOT_KIND_PARALLEL
