"""The learned policy: features reach the network, masks hold, the gate falls back, files are safe."""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from esper.blueprints.artifact import SigningKey, TrustedKeys
from esper.tamiyo.gnn import (
    ACTIONS,
    Ensemble,
    GnnPolicy,
    NetConfig,
    PolicyFileError,
    load_policy,
    save_policy,
)
from esper.tamiyo.gnn.features import GLOBAL_FEATURES, NODE_FEATURES, build_graph
from esper.tamiyo.gnn.train import (
    imitation_accuracy,
    sample_snapshot,
    synthetic_examples,
    train_imitation,
)
from esper.tamiyo.policy import check_decisions, legal_actions, stage_name
from generated.esper.common.v1 import decision_pb2 as D
from generated.esper.common.v1 import seed_pb2
from tests.unit.tamiyo.snapshots import IMPROVING, S, candidate, slot, snapshot

ALL_STAGES = [v for v in seed_pb2.SeedStage.values() if v != S.SEED_STAGE_UNSPECIFIED]
KEY = SigningKey.from_bytes(b"71" * 32)
TRUSTED = TrustedKeys([KEY])


def trust_dir(data_dir: Path) -> Path:
    """`<data_dir>/trusted_keys` holding KEY's public half (where the service looks by default)."""
    d = data_dir / "trusted_keys"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"tezzeret-{KEY.key_id}.pub").write_bytes(KEY.public_pem())
    return d


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny graphs on a shared 2-core machine: intra-op threads only add contention.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ensemble(members: int = 3, seed: int = 0) -> Ensemble:
    return Ensemble(NetConfig(hidden=16, heads=2, members=members), vocab=[candidate("a", 1).blueprint_id], seed=seed)


def two_slot_snapshot(**kw):
    slots = [slot("s0", depth=0, host_grad_norm=0.5), slot("s1", S.SEED_STAGE_HOLDING, depth=1, contribution=0.02, measured=True)]
    return snapshot(slots, graph_nodes=16, **kw)


def test_graph_nodes_edges_and_slot_positions_follow_the_snapshot() -> None:
    snap = two_slot_snapshot()
    g = build_graph(snap)
    assert g.x.shape == (16, len(NODE_FEATURES)) and g.u.shape == (len(GLOBAL_FEATURES),)
    names = [n.slot_id for n in snap.graph.nodes]
    assert [names[i] for i in g.slot_nodes.tolist()] == ["s0", "s1"]
    pairs = set(map(tuple, g.edge_index.t().tolist()))
    assert (0, 1) in pairs and (1, 0) in pairs and (5, 5) in pairs
    assert g.edge_index.shape[1] == 2 * 15 + 16
    # Without a graph, the slots alone form a chain by depth.
    bare = build_graph(snapshot([slot("b", depth=1), slot("a", depth=0)]))
    assert bare.x.shape[0] == 2 and bare.slot_nodes.tolist() == [1, 0]  # nodes in depth order
    assert {(1, 0), (0, 1)} <= set(map(tuple, bare.edge_index.t().tolist()))


@pytest.mark.parametrize(
    ("field", "value", "feature"),
    [
        ("host_grad_norm", 7.0, "log_host_grad_norm"),
        ("contribution", -0.04, "contribution"),
        ("activation_std", 4.0, "log_activation_std"),
        ("epochs_in_stage", 5, "log_epochs_in_stage"),
    ],
)
def test_changing_one_health_input_changes_the_policy_input_and_output(field: str, value: float, feature: str) -> None:
    policy = GnnPolicy(ensemble(), uncertainty_threshold=1.0)
    cands = {"s0": [candidate("a", 100), candidate("b", 200)]}
    base = two_slot_snapshot()
    changed = two_slot_snapshot()
    setattr(changed.slots[1], field, value)
    g0, g1 = build_graph(base), build_graph(changed)
    diff = (g0.x != g1.x).nonzero().tolist()
    s1_node = int(g0.slot_nodes[1])
    assert diff == [[s1_node, NODE_FEATURES.index(feature)]]
    _, p0 = policy.evaluate(base, cands)
    _, p1 = policy.evaluate(changed, cands)
    assert not torch.allclose(p0, p1)


def test_a_global_trend_reaches_the_network() -> None:
    policy = GnnPolicy(ensemble(), uncertainty_threshold=1.0)
    a, b = two_slot_snapshot(), two_slot_snapshot(val_loss=IMPROVING)
    ga, gb = build_graph(a), build_graph(b)
    assert ga.u[GLOBAL_FEATURES.index("val_loss_trend_3")] != gb.u[GLOBAL_FEATURES.index("val_loss_trend_3")]
    assert not torch.allclose(policy.evaluate(a, {})[1], policy.evaluate(b, {})[1])


def _biased(ens: Ensemble, action: str) -> Ensemble:
    """Every member strongly prefers `action` whatever the input."""
    with torch.no_grad():
        for m in ens.members:
            m.action.bias.zero_()
            m.action.bias[ACTIONS.index(action)] = 50.0
    return ens


@pytest.mark.parametrize("stage", ALL_STAGES, ids=stage_name)
@pytest.mark.parametrize("preferred", ACTIONS)
def test_masked_actions_are_never_emitted(stage: int, preferred: str) -> None:
    policy = GnnPolicy(_biased(ensemble(), preferred), uncertainty_threshold=1.0)
    slots = [slot(f"s{i}", stage, depth=i, embargo=1 if i == 2 else 0) for i in range(3)]
    snap = snapshot(slots, parameters_left=150)
    # s1 is offered only a kernel too large for the budget; s2 is embargoed.
    cands = {"s0": [candidate("a", 100)], "s1": [candidate("big", 151)], "s2": [candidate("a", 100)]}
    ds = policy.decide(snap, cands)
    _, withheld = check_decisions(snap, ds, cands)
    assert withheld == []
    acted = {(d.kind, d.slot_id) for d in ds if d.kind != D.DECISION_KIND_WAIT}
    for kind, slot_id in acted:
        assert {D.DECISION_KIND_GERMINATE: "germinate", D.DECISION_KIND_PRUNE: "prune", D.DECISION_KIND_FOSSILIZE: "fossilize"}[kind] in legal_actions(stage)
    if preferred == "germinate" and stage == S.SEED_STAGE_DORMANT:
        assert acted == {(D.DECISION_KIND_GERMINATE, "s0")}
    if preferred in ("prune", "fossilize") and preferred in legal_actions(stage):
        assert len(acted) == 3
    for d in ds:
        assert d.policy == "gnn" and d.reason and 0.0 <= d.uncertainty <= 1.0


def test_uncertain_choices_fall_back_to_the_heuristic_and_say_so() -> None:
    slots = [slot("s0", S.SEED_STAGE_BLENDING, contribution=-0.3, measured=True), slot("s1", depth=1)]
    snap = snapshot(slots)
    cands = {"s1": [candidate("a", 100)]}
    # Members that disagree: opposite biases on the two legal actions of s0.
    ens = ensemble(members=2)
    with torch.no_grad():
        for m, a in zip(ens.members, ("wait", "prune"), strict=True):
            m.action.bias.zero_()
            m.action.bias[ACTIONS.index(a)] = 30.0
    gated = GnnPolicy(ens, uncertainty_threshold=0.2).decide(snap, cands)
    s0 = [d for d in gated if d.slot_id == "s0"]
    assert len(s0) == 1 and s0[0].fallback and s0[0].kind == D.DECISION_KIND_PRUNE
    assert s0[0].uncertainty > 0.9 and "fallback to heuristic" in s0[0].reason
    # With the gate open the learned choice stands (the members' mean picks one, no fallback).
    free = GnnPolicy(ens, uncertainty_threshold=1.0).decide(snap, cands)
    assert not any(d.fallback for d in free)


def test_policy_file_round_trip_is_exact_and_uses_no_pickle(tmp_path: Path) -> None:
    ens = ensemble()
    path = save_policy(ens, tmp_path / "policy.json", version="test-1", signing_key=KEY, training={"examples": 0})
    weights = (tmp_path / "policy.safetensors").read_bytes()
    header_len = int.from_bytes(weights[:8], "little")
    assert weights[8:9] == b"{" and json.loads(weights[8 : 8 + header_len])["__metadata__"]["format"] == "esper.tamiyo.gnn"
    assert b"\x80\x04" not in weights[:2]  # not a pickle stream
    loaded, meta = load_policy(path, TRUSTED)
    assert meta["version"] == "test-1"
    snap, cands = two_slot_snapshot(), {"s0": [candidate("a", 100)]}
    a = GnnPolicy(ens, uncertainty_threshold=1.0).evaluate(snap, cands)[1]
    b = GnnPolicy(loaded, uncertainty_threshold=1.0).evaluate(snap, cands)[1]
    assert torch.equal(a, b)


def _signed(config: dict, key: SigningKey = KEY) -> str:
    """`config` re-signed by `key`: a signer's own mistakes, which the checks after the
    signature must still catch."""
    from esper.tamiyo.gnn.io import signed_bytes

    config = {k: v for k, v in config.items() if k != "signature"}
    config["signature"] = {"key_id": key.key_id, "ed25519": key.sign(signed_bytes(config)).hex()}
    return json.dumps(config)


def test_tampered_policy_files_are_rejected(tmp_path: Path) -> None:
    path = save_policy(ensemble(), tmp_path / "p.json", version="v", signing_key=KEY)
    wpath = tmp_path / "p.safetensors"
    good = wpath.read_bytes()
    flipped = bytearray(good)
    flipped[-3] ^= 0x01
    wpath.write_bytes(bytes(flipped))
    with pytest.raises(PolicyFileError, match="changed after training"):
        load_policy(path, TRUSTED)
    wpath.write_bytes(good)
    config = json.loads(path.read_text())
    # Any edit of the signed config is refused by the signature before anything else...
    config["net"]["hidden"] = 32
    path.write_text(json.dumps(config))
    with pytest.raises(PolicyFileError, match="changed after signing"):
        load_policy(path, TRUSTED)
    # ...and a signed config that describes another network is still caught by the shape check.
    path.write_text(_signed(config))
    with pytest.raises(PolicyFileError, match="configured network needs"):
        load_policy(path, TRUSTED)
    config["net"]["hidden"] = 16
    config["extra"] = 1
    path.write_text(_signed(config))
    with pytest.raises(PolicyFileError, match="expected exactly"):
        load_policy(path, TRUSTED)
    del config["extra"]
    config["weights_file"] = "../p.safetensors"
    path.write_text(_signed(config))
    with pytest.raises(PolicyFileError, match="bare file name"):
        load_policy(path, TRUSTED)


def test_imitation_learns_the_heuristic_and_uncertainty_rises_out_of_distribution() -> None:
    train = synthetic_examples(160, seed=1)
    held = synthetic_examples(80, seed=2)
    vocab = sorted({k.blueprint_id for e in train for ks in e.candidates.values() for k in ks})
    # The rise of uncertainty out of distribution is a property of most initialisations,
    # not all: with feature version 2, ensemble seeds 3, 4, 7 and 9 of 0-11 stay below 2x
    # (version 1: seed 5 of 0-5). Seed 0 is one of the typical ones.
    ens = Ensemble(NetConfig(hidden=16, heads=2, members=4), vocab=vocab, seed=0)
    before = imitation_accuracy(ens, held)
    train_imitation(ens, train, steps=80, lr=1e-2)
    after = imitation_accuracy(ens, held)
    assert after >= 0.85 and after > before
    policy = GnnPolicy(ens, uncertainty_threshold=0.2)
    rng = random.Random(11)

    def uncertainty(pairs) -> float:
        return statistics.mean(c.uncertainty for s, cs in pairs for c in policy.evaluate(s, cs)[0] if len(c.legal) > 1)

    in_dist = [sample_snapshot(rng) for _ in range(60)]
    far = []
    for snap, cands in (sample_snapshot(rng) for _ in range(60)):
        # Health far outside anything the sampler produces: exploding gradients and activations,
        # a loss a thousand times larger than the training runs ever saw.
        for s in snap.slots:
            s.host_grad_norm *= 1e4
            s.seed_grad_norm = s.seed_grad_norm * 1e4 + 1e3
            s.activation_mean, s.activation_std = 40.0, s.activation_std * 300
        snap.val_loss_history[:] = [v * 1e3 for v in snap.val_loss_history]
        far.append((snap, cands))
    u_in, u_far = uncertainty(in_dist), uncertainty(far)
    assert u_far > 2 * u_in, (u_in, u_far)


def test_the_heuristic_path_never_imports_torch_geometric(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from esper.runtime.spec import PlatformContext;"
        "from esper.tamiyo.service import create_service;"
        f"create_service(PlatformContext(data_dir=Path({str(tmp_path)!r})));"
        "print('torch_geometric' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[3])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


async def test_service_serves_the_gnn_policy_from_its_file(tmp_path: Path) -> None:
    from generated.esper.tamiyo.v1 import tamiyo_service_pb2 as pb
    from tests.unit.tamiyo.snapshots import record
    from tests.unit.tamiyo.test_service import GOOD, CatalogUrza, Platform, plateau_snapshot

    trust_dir(tmp_path)
    path = save_policy(ensemble(), tmp_path / "gnn.json", version="2026-11-27.1", signing_key=KEY)
    settings = {"policy": "gnn", "gnn": {"policy_file": str(path), "uncertainty_threshold": 0.5}}
    async with Platform(tmp_path, CatalogUrza([record(GOOD)]), settings) as p:
        info = await p.stub.GetPolicyInfo(pb.GetPolicyInfoRequest(), timeout=5)
        assert (info.policy, info.policy_version, info.fallback_policy) == ("gnn", "2026-11-27.1", "heuristic")
        assert info.settings["uncertainty_threshold"] == "0.5" and info.settings["ensemble_members"] == "3"
        resp = await p.stub.Decide(pb.DecideRequest(snapshot=plateau_snapshot()), timeout=5)
        assert resp.policy == "gnn" and resp.decisions
        assert all(d.policy == "gnn" and d.reason for d in resp.decisions)
        for d in resp.decisions:
            if d.kind == D.DECISION_KIND_GERMINATE:
                assert d.kernel_id == GOOD.kernel_id
    (tmp_path / "gnn.safetensors").write_bytes(b"\0" * 64)
    from esper.errors import ArtifactError
    from esper.runtime.spec import PlatformContext
    from esper.tamiyo.service import create_service

    with pytest.raises(ArtifactError, match="changed after training"):
        create_service(PlatformContext(data_dir=tmp_path, settings={"tamiyo": settings}))


def test_safety_regulariser_pushes_down_actions_the_gates_rejected() -> None:
    examples = synthetic_examples(120, seed=5)
    germinations = [(e, i) for e in examples for i, a in enumerate(e.actions) if ACTIONS[a] == "germinate"]
    assert len(germinations) >= 5

    def germinate_probability(safety: bool) -> float:
        for e in examples:
            e.rejected = [(i, ACTIONS.index("germinate")) for x, i in germinations if x is e] if safety else []
        ens = Ensemble(NetConfig(hidden=16, heads=2, members=2), vocab=[], seed=4)
        train_imitation(ens, examples, steps=60, lr=1e-2, safety_weight=3.0)
        policy = GnnPolicy(ens, uncertainty_threshold=1.0)
        return statistics.mean(policy.evaluate(e.snapshot, e.candidates)[0][i].probs["germinate"] for e, i in germinations)

    plain, regularised = germinate_probability(False), germinate_probability(True)
    assert regularised < 0.5 * plain, (plain, regularised)


async def test_a_new_policy_file_is_hot_reloaded_and_a_tampered_one_never_serves(tmp_path: Path) -> None:
    import asyncio

    from generated.esper.tamiyo.v1 import tamiyo_service_pb2 as pb
    from tests.unit.tamiyo.test_service import CatalogUrza, Platform

    trust_dir(tmp_path)
    path = save_policy(ensemble(), tmp_path / "gnn.json", version="v1", signing_key=KEY)
    settings = {"policy": "gnn", "gnn": {"policy_file": str(path)}, "reload_check_s": 0.05}

    async def info_when(p: Platform, ok, timeout_s: float = 10.0) -> pb.GetPolicyInfoResponse:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            info = await p.stub.GetPolicyInfo(pb.GetPolicyInfoRequest(), timeout=5)
            if ok(info) or asyncio.get_running_loop().time() > deadline:
                return info
            await asyncio.sleep(0.05)

    async with Platform(tmp_path, CatalogUrza([]), settings) as p:
        first = await p.stub.GetPolicyInfo(pb.GetPolicyInfoRequest(), timeout=5)
        assert first.policy_version == "v1"
        save_policy(ensemble(members=2, seed=9), path, version="v2", signing_key=KEY)
        info = await info_when(p, lambda i: i.policy_version == "v2")
        assert info.policy_version == "v2" and info.settings["ensemble_members"] == "2"
        assert info.loaded_at.ToNanoseconds() >= first.loaded_at.ToNanoseconds()
        resp = await p.stub.Decide(pb.DecideRequest(snapshot=two_slot_snapshot()), timeout=5)
        assert resp.policy_version == "v2"
        # Weights changed after the fact: refused, v2 keeps serving, and GetPolicyInfo says why.
        w = tmp_path / "gnn.safetensors"
        data = w.read_bytes()
        w.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        info = await info_when(p, lambda i: "reload_error" in i.settings)
        assert info.policy_version == "v2" and "changed after training" in info.settings["reload_error"]
        resp = await p.stub.Decide(pb.DecideRequest(snapshot=two_slot_snapshot()), timeout=5)
        assert resp.policy_version == "v2"


def test_train_entry_point_writes_a_loadable_versioned_policy(tmp_path: Path, capsys) -> None:
    from esper.tamiyo.gnn import trusted_keys_for
    from esper.tamiyo.gnn.train import main

    main(["--out", str(tmp_path / "p" / "gnn.json"), "--examples", "60", "--steps", "10", "--members", "2",
          "--hidden", "16", "--version", "t-1", "--data-dir", str(tmp_path / "platform")])
    # Signed with the data dir's Tezzeret key, whose public key it published beside Tezzeret's.
    ens, meta = load_policy(tmp_path / "p" / "gnn.json", trusted_keys_for(data_dir=tmp_path / "platform"))
    assert meta["version"] == "t-1" and len(ens.members) == 2
    assert meta["training"]["examples"] == 60 and 0.0 <= meta["training"]["heldout_agreement"] <= 1.0
    assert "held-out agreement" in capsys.readouterr().out


def test_slot_nodes_carry_the_slot_kind_and_old_feature_versions_are_refused(tmp_path: Path) -> None:
    from esper.tamiyo.gnn.features import FEATURE_VERSION

    snap = two_slot_snapshot()
    g = build_graph(snap)
    col = NODE_FEATURES.index("slot_parallel"), NODE_FEATURES.index("slot_channel_ratio")
    assert g.x[g.slot_nodes][:, list(col)].abs().sum() == 0  # output slots
    snap.slots[0].site.kind = S.SLOT_KIND_PARALLEL
    snap.slots[0].site.input.CopyFrom(S.ActivationSpec(layout=S.ACTIVATION_LAYOUT_NC, channels=64,
                                                       dtype=S.D_TYPE_FLOAT32))
    g = build_graph(snap)
    row = g.x[g.slot_nodes[0]]
    assert row[col[0]] == 1.0 and row[col[1]] < 0  # 16 out of 64 in: narrowing
    assert g.x[g.slot_nodes[1]][list(col)].abs().sum() == 0
    # A policy file trained on the features before slot kinds is refused, saying why.
    path = save_policy(ensemble(), tmp_path / "p.json", version="v", signing_key=KEY)
    config = json.loads(path.read_text())
    config["feature_version"] = FEATURE_VERSION - 1
    config["node_features"] = [f for f in config["node_features"] if not f.startswith("slot_")]
    path.write_text(_signed(config))
    with pytest.raises(PolicyFileError, match=f"feature version {FEATURE_VERSION - 1}.*retrain it"):
        load_policy(path, TRUSTED)
