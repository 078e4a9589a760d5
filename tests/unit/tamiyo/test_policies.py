"""Rules every policy obeys (legal actions, budget, embargo) and the two baseline policies."""

from __future__ import annotations

import itertools

import pytest

from esper.errors import ConfigError
from esper.tamiyo.baselines import FixedConfig, FixedPolicy, RandomConfig, RandomPolicy
from esper.tamiyo.config import TamiyoConfig
from esper.tamiyo.heuristic import HeuristicConfig, HeuristicPolicy
from esper.tamiyo.policy import (
    FOSSILIZE,
    GERMINATE,
    PRUNE,
    check_decisions,
    legal_actions,
    stage_name,
)
from esper.tamiyo.registry import make_policy
from generated.esper.common.v1 import decision_pb2 as D
from generated.esper.common.v1 import seed_pb2
from tests.unit.tamiyo.snapshots import IMPROVING, PLATEAU, S, candidate, slot, snapshot

ALL_STAGES = [v for v in seed_pb2.SeedStage.values() if v != S.SEED_STAGE_UNSPECIFIED]
ACTION = {D.DECISION_KIND_GERMINATE: GERMINATE, D.DECISION_KIND_PRUNE: PRUNE, D.DECISION_KIND_FOSSILIZE: FOSSILIZE}


def test_legal_actions_table() -> None:
    table = {stage_name(s): sorted(legal_actions(s)) for s in ALL_STAGES}
    assert table == {
        "DORMANT": ["germinate"],
        "GERMINATED": ["prune"],
        "TRAINING": ["prune"],
        "BLENDING": ["prune"],
        "HOLDING": ["fossilize", "prune"],
        "FOSSILIZED": [],
        "PRUNED": [],
        "EMBARGOED": [],
        "RESETTING": [],
    }


def _policies() -> list:
    return [
        HeuristicPolicy(HeuristicConfig(one_seed_in_flight=False, fossilize_epochs=1, holding_patience_epochs=1)),
        FixedPolicy(FixedConfig(germinate_epochs=(6,), fossilize_after_epochs=0)),
        *[
            RandomPolicy(RandomConfig(seed=i, germinate_prob=1.0, prune_prob=0.5, fossilize_prob=0.5, one_seed_in_flight=False))
            for i in range(8)
        ],
    ]


@pytest.mark.parametrize("stage", ALL_STAGES, ids=stage_name)
@pytest.mark.parametrize(
    ("contribution", "measured", "finite"),
    [(0.5, True, True), (-0.5, True, True), (0.0, False, True), (0.0, False, False)],
)
def test_no_policy_emits_an_illegal_action(stage: int, contribution: float, measured: bool, finite: bool) -> None:
    """Every slot in `stage`; whatever the signals, each emitted action is legal for that stage."""
    slots = [
        slot(f"s{i}", stage, depth=i, contribution=contribution, measured=measured, finite=finite, epochs_in_stage=9)
        for i in range(4)
    ]
    cands = {s.slot_id: [candidate("a", 10), candidate("b", 20)] for s in slots}
    emitted = 0
    for pol, val_loss in itertools.product(_policies(), (PLATEAU, IMPROVING)):
        ds = pol.decide(snapshot(slots, val_loss=val_loss), cands)
        assert ds, f"{pol.name} returned no decision"
        _, withheld = check_decisions(snapshot(slots, val_loss=val_loss), ds, cands)
        assert withheld == [], [w.why for w in withheld]
        for d in ds:
            assert d.reason, f"{pol.name} gave no reason for {d}"
            if d.kind == D.DECISION_KIND_WAIT:
                continue
            emitted += 1
            assert ACTION[d.kind] in legal_actions(stage), (pol.name, stage_name(stage), d)
    # The parametrization must exercise actions where any are legal, or it proves nothing.
    assert (emitted > 0) == bool(legal_actions(stage))


def test_check_decisions_withholds_what_the_rules_refuse() -> None:
    k = candidate("k", 100)
    slots = [
        slot("d0"),
        slot("d1", depth=1, embargo=1),
        slot("f", S.SEED_STAGE_FOSSILIZED, depth=2),
        slot("t", S.SEED_STAGE_TRAINING, depth=3),
    ]
    snap = snapshot(slots, parameters_left=150)
    cands = {"d0": [k, candidate("huge", 151)], "d1": [k]}

    def g(slot_id: str, kernel) -> D.Decision:
        return D.Decision(kind=D.DECISION_KIND_GERMINATE, slot_id=slot_id, kernel_id=kernel.kernel_id, blueprint_id=kernel.blueprint_id)

    proposed = [
        D.Decision(kind=D.DECISION_KIND_FOSSILIZE, slot_id="f"),
        D.Decision(kind=D.DECISION_KIND_FOSSILIZE, slot_id="t"),
        D.Decision(kind=D.DECISION_KIND_PRUNE, slot_id="nope"),
        g("d1", k),
        g("d0", candidate("huge", 151)),
        g("d0", candidate("never_offered", 5)),
        g("d0", k),
        g("d0", k),
        D.Decision(kind=D.DECISION_KIND_PRUNE, slot_id="t"),
    ]
    allowed, withheld = check_decisions(snap, proposed, cands)
    assert [(d.kind, d.slot_id) for d in allowed] == [(D.DECISION_KIND_GERMINATE, "d0"), (D.DECISION_KIND_PRUNE, "t")]
    whys = [w.why for w in withheld]
    assert len(whys) == 7
    assert "stage FOSSILIZED" in whys[0] and "stage TRAINING" in whys[1] and "not in the snapshot" in whys[2]
    assert "embargoed" in whys[3] and "more than the 150 left" in whys[4] and "not offered" in whys[5]
    assert "second action" in whys[6] or "at most one germination" in whys[6]
    no_seeds = snapshot(slots, seeds_left=0)
    assert "no seeds left" in check_decisions(no_seeds, [g("d0", k)], cands)[1][0].why


def test_random_policy_is_reproducible_per_seed_and_obeys_the_budget() -> None:
    slots = [slot(f"s{i}", depth=i) for i in range(6)]
    cands = {s.slot_id: [candidate("a", 10), candidate("b", 20), candidate("big", 10_000)] for s in slots}

    def run(seed: int, **kw) -> list[list[tuple[int, str, str]]]:
        pol = RandomPolicy(RandomConfig(seed=seed, germinate_prob=0.5, **kw))
        return [
            [(d.kind, d.slot_id, d.kernel_id) for d in pol.decide(snapshot(slots, epoch=e, parameters_left=100), cands)]
            for e in range(40)
        ]

    assert run(3) == run(3)
    assert run(3) != run(4)
    germs = [d for epoch in run(3) for d in epoch if d[0] == D.DECISION_KIND_GERMINATE]
    assert 8 <= len(germs) <= 32  # ~half of 40 boundaries
    assert all(d[2] != candidate("big", 1).kernel_id for d in germs)
    assert all(sum(d[0] == D.DECISION_KIND_GERMINATE for d in epoch) <= 1 for epoch in run(3))
    none = RandomPolicy(RandomConfig(seed=3, germinate_prob=1.0))
    assert none.decide(snapshot(slots, seeds_left=0), cands)[0].kind == D.DECISION_KIND_WAIT


def test_fixed_policy_germinates_on_schedule_and_fossilizes_after_n_holding_epochs() -> None:
    pol = FixedPolicy(FixedConfig(germinate_epochs=(4, 8), fossilize_after_epochs=2))
    slots = [slot("s0", depth=0), slot("s1", depth=1)]
    cands = {"s0": [candidate("first", 50), candidate("second", 10)], "s1": [candidate("first", 50)]}
    assert pol.decide(snapshot(slots, epoch=3), cands)[0].kind == D.DECISION_KIND_WAIT
    ds = pol.decide(snapshot(slots, epoch=4), cands)
    assert [(d.kind, d.slot_id, d.blueprint_id) for d in ds] == [
        (D.DECISION_KIND_GERMINATE, "s0", candidate("first", 50).blueprint_id)
    ]
    holding = [slot("s0", S.SEED_STAGE_HOLDING, epochs_in_stage=1), slot("s1", depth=1)]
    assert pol.decide(snapshot(holding, epoch=6), cands)[0].kind == D.DECISION_KIND_WAIT
    holding[0].epochs_in_stage = 2
    ds = pol.decide(snapshot(holding, epoch=8), cands)
    assert [(d.kind, d.slot_id) for d in ds] == [(D.DECISION_KIND_FOSSILIZE, "s0"), (D.DECISION_KIND_GERMINATE, "s1")]


@pytest.mark.parametrize(
    ("cls", "bad", "match"),
    [
        (RandomConfig, {"germinate_prob": 1.5}, "germinate_prob=1.5"),
        (RandomConfig, {"sed": 1}, "unknown"),
        (FixedConfig, {"germinate_epochs": [3, 3]}, "repeated"),
        (FixedConfig, {"slot_order": "middle"}, "slot_order='middle'"),
        (TamiyoConfig, {"policy": "oracle"}, "policy='oracle'"),
        (TamiyoConfig, {"max_candidates": 0}, "max_candidates=0"),
        (TamiyoConfig, {"urza": {}}, "unknown tamiyo key"),
    ],
)
def test_configs_reject_bad_input_naming_the_value(cls, bad: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        cls.from_dict(bad)


def test_registry_builds_each_policy_from_its_section() -> None:
    pol = make_policy(TamiyoConfig.from_dict({"policy": "fixed", "fixed": {"germinate_epochs": [2]}}))
    assert pol.name == "fixed" and pol.settings()["germinate_epochs"] == "(2,)"
    with pytest.raises(ConfigError, match="warmup"):
        make_policy(TamiyoConfig.from_dict({"heuristic": {"warmup": 1}}))
