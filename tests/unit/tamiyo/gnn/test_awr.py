"""Advantage-weighted training, the batched inference path and the cached graph topology."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from esper.errors import ConfigError
from esper.tamiyo.fieldreports import BoundaryRecord, RunReport, SeedOutcome
from esper.tamiyo.gnn import ACTIONS, Ensemble, GnnPolicy, NetConfig
from esper.tamiyo.gnn.awr import AwrConfig, awr_weights, behaviour_examples, train_awr
from esper.tamiyo.gnn.features import build_graph
from esper.tamiyo.gnn.train import Example, sample_snapshot
from generated.esper.common.v1 import decision_pb2 as D
from tests.unit.tamiyo.snapshots import S, candidate, slot, snapshot

K1, K2 = candidate("k1", 300), candidate("k2", 600)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_awr_weights_on_a_hand_made_batch() -> None:
    returns = torch.tensor([1.0, 0.0, -1.0, 5.0, 0.3])
    values = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.3])
    w = awr_weights(returns, values, beta=0.5, max_weight=20.0)
    assert w.tolist() == pytest.approx([math.exp(2), 1.0, math.exp(-2), 20.0, 1.0])
    with pytest.raises(ConfigError, match="beta=0"):
        awr_weights(returns, values, beta=0, max_weight=20.0)
    with pytest.raises(ValueError, match="max_weight=0.5"):
        AwrConfig(max_weight=0.5)


def test_behaviour_examples_label_applied_actions_and_mark_unsafe_ones() -> None:
    snap = snapshot([slot("a"), slot("b", S.SEED_STAGE_HOLDING, depth=1, contribution=0.1, measured=True),
                     slot("c", S.SEED_STAGE_TRAINING, depth=2)], epoch=4, host_parameters=5000)
    decisions = [
        D.Decision(kind=D.DECISION_KIND_GERMINATE, slot_id="a", kernel_id=K2.kernel_id, blueprint_id=K2.blueprint_id),
        D.Decision(kind=D.DECISION_KIND_FOSSILIZE, slot_id="b"),
        D.Decision(kind=D.DECISION_KIND_PRUNE, slot_id="c"),
    ]
    report = RunReport(
        run_id="r", task="t", total_epochs=10, host_parameters=5000, final_val_accuracy=0.9, baseline_val_accuracy=0.9,
        boundaries=[BoundaryRecord(snapshot=snap, candidates={"a": [K1, K2]}, decisions=decisions,
                                   rejected={2: "prune refused"})],
        seeds=[SeedOutcome(slot_id="a", kernel_id=K2.kernel_id, germinated_epoch=4, ended_epoch=6, fate="rolled_back",
                           contribution=0.0, parameters=600)],
    )
    (ex,) = behaviour_examples([report])
    assert [ACTIONS[a] for a in ex.actions] == ["germinate", "fossilize", "wait"]
    assert ex.kernel == (0, 1)
    assert sorted(ex.rejected) == [(0, ACTIONS.index("germinate")), (2, ACTIONS.index("prune"))]
    # germinate: tanh(0) − 0.5·600/5000·(2/10) − gate penalty 0.5; fossilize: tanh(0.1/0.05)
    assert ex.value_target == pytest.approx(-0.5 * 0.12 * 0.2 - 0.5 + math.tanh(2.0))


def _bandit(n: int, seed: int) -> list[Example]:
    """Boundaries with one open dormant slot; the behaviour germinated or waited at random,
    and germinating paid +1 while waiting paid −1."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        snap, cands = sample_snapshot(rng)
        del snap.slots[1:]
        snap.slots[0].stage, snap.slots[0].embargo_epochs_left = S.SEED_STAGE_DORMANT, 0
        snap.seeds_left, snap.parameters_left = 2, snap.host_parameters
        cands = {snap.slots[0].slot_id: [K1]}
        g = rng.random() < 0.5
        out.append(Example(snapshot=snap, candidates=cands, actions=[ACTIONS.index("germinate") if g else 0],
                           kernel=(0, 0) if g else None, value_target=1.0 if g else -1.0))
    return out


def test_awr_moves_probability_towards_the_actions_with_higher_returns() -> None:
    behaviour = _bandit(80, seed=1)

    def p_germinate(ens: Ensemble) -> float:
        policy = GnnPolicy(ens, uncertainty_threshold=1.0)
        return statistics.mean(policy.evaluate(e.snapshot, e.candidates)[0][0].probs["germinate"] for e in behaviour)

    net = NetConfig(hidden=16, heads=2, members=2)
    plain = Ensemble(net, vocab=[K1.blueprint_id], seed=3)
    train_awr(plain, behaviour, [Example(**{**e.__dict__, "value_target": None}) for e in behaviour],
              config=AwrConfig(beta=1e6, steps=60, lr=5e-3), imitation_steps=60)
    weighted = Ensemble(net, vocab=[K1.blueprint_id], seed=3)
    result = train_awr(weighted, behaviour, behaviour, config=AwrConfig(beta=0.5, steps=60, lr=5e-3),
                       imitation_steps=60)
    # β → ∞ makes every weight 1 (plain behaviour cloning of a 50/50 behaviour).
    assert p_germinate(weighted) > p_germinate(plain) + 0.2, (p_germinate(plain), p_germinate(weighted))
    # Cross-fitted baseline: the state does not tell which action was drawn, so out-of-fold
    # V(s) stays near the mean return and the advantages keep their sign.
    high = [w for w, e in zip(result.weights, behaviour, strict=True) if e.value_target > 0]
    low = [w for w, e in zip(result.weights, behaviour, strict=True) if e.value_target < 0]
    assert statistics.mean(high) > 3 * statistics.mean(low), (statistics.mean(high), statistics.mean(low))


def test_batched_inference_equals_the_torch_geometric_module_path() -> None:
    rng = random.Random(4)
    ens = Ensemble(NetConfig(hidden=16, heads=4, layers=3, members=3), vocab=[K1.blueprint_id], seed=2)
    for _ in range(10):
        snap, _ = sample_snapshot(rng)
        g = build_graph(snap)
        n, s = g.x.shape[0], len(g.slot_ids)
        ref_emb, ref_logits, _ = ens.forward_all(g.x, g.edge_index, g.u.unsqueeze(0), torch.zeros(n, dtype=torch.long),
                                                 g.slot_nodes, torch.zeros(s, dtype=torch.long))
        emb, logits = ens.infer(g.x, g.edge_index[0], g.edge_index[1], g.u, g.slot_nodes)
        torch.testing.assert_close(emb, ref_emb, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
        bp = ens.blueprint_index([K1.blueprint_id, "unknown"])
        kf = torch.rand(2, 5)
        ref = torch.stack([m.kernel_scores(e[:1].expand(2, -1), bp, kf) for m, e in zip(ens.members, emb, strict=True)])
        torch.testing.assert_close(ens.infer_kernel_scores(emb[:, :1].expand(-1, 2, -1), bp, kf), ref,
                                   atol=1e-5, rtol=1e-4)


def test_graph_topology_is_cached_across_epochs_and_rebuilt_when_a_seed_changes_it() -> None:
    slots = [slot("a"), slot("b", S.SEED_STAGE_TRAINING, depth=1)]
    first = snapshot(slots, graph_nodes=12, epoch=4)
    later = snapshot(slots, graph_nodes=12, epoch=5)
    later.slots[1].alpha = 0.5
    g1, g2 = build_graph(first), build_graph(later)
    assert g1.edge_index is g2.edge_index
    b = int(g2.slot_nodes[1])
    assert not torch.equal(g1.x[b], g2.x[b]) and torch.equal(g1.x[:b], g2.x[:b])
    grown = snapshot(slots, graph_nodes=12, epoch=5)
    node = next(n for n in grown.graph.nodes if n.slot_id == "b")
    node.parameters = 4000
    g3 = build_graph(grown)
    assert g3.edge_index is not g1.edge_index
    assert g3.x[int(g3.slot_nodes[1]), 6] == pytest.approx(math.log1p(4000) / 12)
