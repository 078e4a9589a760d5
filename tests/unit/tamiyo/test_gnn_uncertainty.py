"""The GNN's uncertainty is the ensemble's mutual information, not its predictive entropy.

The two coincide when the members disagree confidently, which is the case the fallback
test uses. They part where the members agree on a flat distribution: the prediction is
maximally uncertain (entropy log n) but the members know exactly as much as each other
(mutual information 0). Only epistemic disagreement should send a decision to the
heuristic.
"""

from __future__ import annotations

import math

import pytest
import torch

from esper.tamiyo.gnn import ACTIONS, Ensemble, GnnPolicy, NetConfig
from generated.esper.common.v1 import decision_pb2 as D
from tests.unit.tamiyo.snapshots import S, candidate, slot, snapshot


def _ensemble(members: int = 3) -> Ensemble:
    return Ensemble(NetConfig(hidden=16, heads=2, members=members), vocab=[candidate("a", 1).blueprint_id], seed=0)


def _flat_agreeing(ens: Ensemble) -> Ensemble:
    """Every member puts the same logit on every action: a uniform distribution over the
    legal ones, identical across members."""
    with torch.no_grad():
        for m in ens.members:
            m.action.weight.zero_()
            m.action.bias.zero_()
    return ens


def _snapshot():
    # s0 is BLENDING (legal: wait, prune), so its distribution is 50/50 over two actions.
    return snapshot([slot("s0", S.SEED_STAGE_BLENDING, contribution=0.01, measured=True)])


def test_members_agreeing_on_a_flat_distribution_have_zero_uncertainty() -> None:
    policy = GnnPolicy(_flat_agreeing(_ensemble()), uncertainty_threshold=0.2)
    choices, member_probs = policy.evaluate(_snapshot(), {})
    (c,) = choices
    assert set(c.legal) == {"wait", "prune"}
    # The prediction is as flat as it can be: predictive entropy is log 2 (normalised: 1).
    mean = member_probs.mean(0)[0]
    legal = [ACTIONS.index(a) for a in c.legal]
    assert mean[legal].tolist() == pytest.approx([0.5, 0.5])
    entropy = -sum(float(p) * math.log(float(p)) for p in mean[legal])
    assert entropy == pytest.approx(math.log(2))
    # ...and yet the members agree, so the mutual information is 0.
    assert c.uncertainty == pytest.approx(0.0, abs=1e-6)


def test_flat_but_agreeing_members_are_not_sent_to_the_fallback() -> None:
    policy = GnnPolicy(_flat_agreeing(_ensemble()), uncertainty_threshold=0.2)
    decisions = policy.decide(_snapshot(), {})
    s0 = [d for d in decisions if d.slot_id == "s0"]
    assert s0 and not any(d.fallback for d in s0), [d.reason for d in s0]
    assert s0[0].uncertainty == pytest.approx(0.0, abs=1e-6)
    assert s0[0].kind in (D.DECISION_KIND_WAIT, D.DECISION_KIND_PRUNE)


def test_confident_disagreement_has_the_mutual_information_of_the_split() -> None:
    # Two members, each certain, of different actions: MI = H(mean) - mean H = log 2 - 0,
    # normalised by log 2 (two legal actions) = 1.
    ens = _ensemble(members=2)
    with torch.no_grad():
        for m, a in zip(ens.members, ("wait", "prune"), strict=True):
            m.action.weight.zero_()
            m.action.bias.zero_()
            m.action.bias[ACTIONS.index(a)] = 40.0
    (c,), _ = GnnPolicy(ens, uncertainty_threshold=0.2).evaluate(_snapshot(), {})
    assert c.uncertainty == pytest.approx(1.0, abs=1e-6)
