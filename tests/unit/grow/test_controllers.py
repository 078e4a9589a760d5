"""In-process controllers: Tamiyo's policies under Tamiyo's rules, their memory in checkpoints."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from esper.errors import ConfigError
from esper.grow import (
    BuiltinKernels,
    PolicyController,
    fixed_controller,
    gnn_controller,
    heuristic_controller,
    random_controller,
)
from esper.tamiyo.heuristic import HeuristicConfig
from esper.tamiyo.policy import Policy, wait
from generated.esper.common.v1 import decision_pb2 as D
from tests.unit.grow.growkit import cases, evaluate, loader, make_grower, train_epoch
from tests.unit.tamiyo.snapshots import S, candidate, slot, snapshot

CASE = cases()["tabular_mlp"]


def test_factories_take_a_config_a_mapping_or_keywords_and_reject_unknown_keys() -> None:
    assert heuristic_controller(HeuristicConfig(warmup_epochs=7)).policy.config.warmup_epochs == 7
    assert heuristic_controller({"warmup_epochs": 6}).policy.config.warmup_epochs == 6
    assert heuristic_controller(warmup_epochs=5).policy.config.warmup_epochs == 5
    assert random_controller(seed=3).policy.config.seed == 3
    assert fixed_controller(germinate_epochs=[2]).policy.config.germinate_epochs == (2,)
    with pytest.raises(ConfigError, match="warmup"):
        heuristic_controller(warmup=1)
    with pytest.raises(ConfigError, match="either"):
        heuristic_controller(HeuristicConfig(), warmup_epochs=1)
    with pytest.raises(ConfigError, match="Policy"):
        PolicyController(object())  # type: ignore[arg-type]


class _Greedy(Policy):
    """Proposes two germinations and a fossilize of a dormant slot: the rules keep one."""

    name = "greedy"

    def decide(self, snapshot, candidates):
        out = []
        for s in snapshot.slots:
            kernels = candidates.get(s.slot_id, [])
            if kernels:
                out.append(D.Decision(kind=D.DECISION_KIND_GERMINATE, slot_id=s.slot_id,
                                      kernel_id=kernels[0].kernel_id, blueprint_id=kernels[0].blueprint_id))
        out.append(D.Decision(kind=D.DECISION_KIND_FOSSILIZE, slot_id=snapshot.slots[0].slot_id))
        out.append(wait("nothing else", policy=self.name))
        return out


def test_withheld_decisions_are_said_in_words_as_the_service_does() -> None:
    snap = snapshot([slot("a", depth=0), slot("b", depth=1)], seeds_left=2)
    k = candidate("k", 10)
    ctrl = PolicyController(_Greedy())
    out = ctrl.decide(snap, {"a": [k], "b": [k]})
    kinds = [D.DecisionKind.Name(d.kind) for d in out]
    assert kinds == ["DECISION_KIND_GERMINATE", "DECISION_KIND_WAIT"]
    assert len(ctrl.withheld) == 2
    assert "at most one germination per boundary" in ctrl.withheld[0]
    assert "fossilize is not legal" in ctrl.withheld[1]
    assert all(d.policy == "greedy" for d in out)


def test_heuristic_memory_is_in_the_controller_state() -> None:
    ctrl = heuristic_controller(fossilize_epochs=2)
    holding = slot("s", S.SEED_STAGE_HOLDING, depth=0, contribution=0.05, measured=True)
    holding.kernel_id = "k1"
    ctrl.decide(snapshot([holding], epoch=4), {})
    state = ctrl.state_dict()
    fresh = heuristic_controller(fossilize_epochs=2)
    fresh.load_state_dict(state)
    # The second qualifying epoch fossilizes only if the first one was remembered.
    a = ctrl.decide(snapshot([holding], epoch=5), {})
    b = fresh.decide(snapshot([holding], epoch=5), {})
    never = heuristic_controller(fossilize_epochs=2).decide(snapshot([holding], epoch=5), {})
    assert [d.kind for d in a] == [d.kind for d in b] == [D.DECISION_KIND_FOSSILIZE]
    assert [d.kind for d in never] != [D.DECISION_KIND_FOSSILIZE]
    with pytest.raises(ConfigError, match="policy 'heuristic'"):
        random_controller().load_state_dict(state)


@pytest.mark.parametrize("make", [
    lambda: heuristic_controller(warmup_epochs=1, plateau_window=1, plateau_threshold=1.0),
    lambda: random_controller(germinate_prob=1.0),
    lambda: fixed_controller(germinate_epochs=(1,)),
], ids=["heuristic", "random", "fixed"])
def test_each_in_process_controller_grows_the_model(make) -> None:
    torch.manual_seed(0)
    model = CASE.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    grower = make_grower(CASE, model, opt, controller=make())
    data = loader(CASE)
    for _ in range(3):
        tl = train_epoch(model, grower, data, opt, CASE.loss_fn)
        grower.end_epoch(train_loss=tl, val_loss=evaluate(model, CASE))
    assert grower.seeds_germinated >= 1


def test_gnn_controller_loads_a_policy_file_and_decides(tmp_path) -> None:
    from esper.blueprints.artifact import SigningKey, TrustedKeys
    from esper.tamiyo.gnn import Ensemble, NetConfig, UntrustedPolicyKeyError, save_policy

    kernels = BuiltinKernels(["bottleneck_mlp"])
    vocab = sorted(kernels.blueprints)
    key = SigningKey.generate()
    path = save_policy(Ensemble(NetConfig(hidden=8, heads=2, members=2), vocab=vocab), tmp_path / "gnn.json",
                       version="test-1", signing_key=key)
    with pytest.raises(UntrustedPolicyKeyError):  # signed, but not by a key this caller trusts
        gnn_controller(path, trusted_keys=TrustedKeys([SigningKey.generate()]))
    torch.manual_seed(0)
    model = CASE.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ctrl = gnn_controller(path, trusted_keys=TrustedKeys([key]), uncertainty_threshold=0.0,
                          heuristic={"warmup_epochs": 1})
    assert ctrl.policy.name == "gnn" and ctrl.policy.version == "test-1"
    grower = make_grower(CASE, model, opt, controller=ctrl)
    train_epoch(model, grower, loader(CASE), opt, CASE.loss_fn)
    report = grower.end_epoch(val_loss=evaluate(model, CASE))
    assert report.decisions and all(d.policy for d in report.decisions)
    assert set(ctrl.state_dict()["histories"]) == {"fallback"}


def test_torch_geometric_is_imported_only_when_a_gnn_controller_is_built() -> None:
    probe = ("import sys, esper.grow; esper.grow.heuristic_controller(); "
             "print('torch_geometric' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         timeout=120)
    assert out.stdout.strip() == "False"
