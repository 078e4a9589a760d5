"""Taking the grown model away: fold, export/load (safetensors + manifest), pickling, remove_hooks."""

from __future__ import annotations

import io
import json
import pickle

import pytest
import torch
from torch import nn

from esper.errors import FailedPreconditionError
from esper.grow import (
    ExportError,
    FoldRule,
    SeedResidual,
    export,
    fold,
    load_exported,
    register_fold_rule,
)
from esper.grow.export import _RULES, MANIFEST, WEIGHTS, fold_rule
from tests.unit.grow.growkit import cases, evaluate, held_out, loader, make_grower, train_epoch

CASES = cases()


def grown(name: str, epochs: int = 5):
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    grower = make_grower(case, model, opt)
    data = loader(case)
    for _ in range(epochs):
        train_epoch(model, grower, data, opt, case.loss_fn)
        grower.end_epoch(val_loss=evaluate(model, case))
    assert grower.fossilized(), grower.live()
    return case, model, grower


@pytest.mark.parametrize("name", ["tabular_mlp", "batchnorm_cnn", "transformer", "residual_mlp"])
def test_export_round_trip_equals_the_wrapped_model(name: str, tmp_path) -> None:
    case, _, grower = grown(name)
    x, _ = held_out(case)
    grower.model.eval()
    with torch.no_grad():
        want = grower.model(x)
    plain = fold(grower.model)
    plain.eval()
    assert not any(m._forward_hooks for m in plain.modules())
    assert any(isinstance(m, SeedResidual) for m in plain.modules())
    with torch.no_grad():
        assert (plain(x) - want).abs().max() <= 1e-6
    path = export(grower.model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, WEIGHTS]
    manifest = json.loads(path.read_text())
    (site,) = manifest["sites"]
    assert site["site"] in grower.fossilized() and site["kernel_id"] == grower.fossilized()[site["site"]]
    assert site["ir"]["nodes"] and manifest["weights_sha256"]
    fresh = case.build()  # a freshly constructed host with other weights
    again = load_exported(fresh, tmp_path).eval()
    with torch.no_grad():
        assert (again(x) - want).abs().max() <= 1e-6
    # torch.export and torch.save work on the plain module.
    program = torch.export.export(again, (x,))
    with torch.no_grad():
        assert (program.module()(x) - want).abs().max() <= 1e-6
    buf = io.BytesIO()
    torch.save(again, buf)
    assert buf.tell() > 0


def test_a_tampered_manifest_or_weights_file_is_refused(tmp_path) -> None:
    case, _, grower = grown("tabular_mlp")
    export(grower.model, tmp_path)
    good_manifest = (tmp_path / MANIFEST).read_text()
    good_weights = (tmp_path / WEIGHTS).read_bytes()

    def restore() -> None:
        (tmp_path / MANIFEST).write_text(good_manifest)
        (tmp_path / WEIGHTS).write_bytes(good_weights)

    def edit(fn) -> None:
        doc = json.loads(good_manifest)
        fn(doc)
        (tmp_path / MANIFEST).write_text(json.dumps(doc))

    def hidden_width(doc) -> None:  # a wider seed: a different model from the same weights
        for node in doc["sites"][0]["ir"]["nodes"]:
            node.setdefault("attrs", {})["features"] = {"intValue": "7"}

    tampers = {
        "has SHA-256": lambda: (tmp_path / WEIGHTS).write_bytes(
            good_weights[:-1] + bytes([good_weights[-1] ^ 1])),
        "the manifest says 0000": lambda: edit(lambda d: d.update(weights_sha256="0" * 64)),
        "written for another manifest": lambda: edit(hidden_width),
        "sites were changed": lambda: edit(lambda d: d["sites"][0].update(site="0")),
        "tensors differ from the manifest": lambda: edit(lambda d: d["tensors"][0].update(shape=[1])),
        "manifest keys": lambda: edit(lambda d: d.update(code="import os")),
        "exports name it": lambda: edit(lambda d: d.update(weights="../../etc/passwd")),
        "is not JSON": lambda: (tmp_path / MANIFEST).write_text("{"),
    }
    for expected, tamper in tampers.items():
        restore()
        tamper()
        with pytest.raises(ExportError, match=expected):
            load_exported(case.build(), tmp_path)
    restore()
    load_exported(case.build(), tmp_path)  # the untouched export still loads
    (tmp_path / WEIGHTS).unlink()
    with pytest.raises(ExportError, match="does not exist"):
        load_exported(case.build(), tmp_path)


def test_loading_never_unpickles(tmp_path, monkeypatch) -> None:
    case, _, grower = grown("tabular_mlp")
    export(grower.model, tmp_path)

    def refuse(*a, **k):
        raise AssertionError("pickle/torch.load used on an export")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    load_exported(case.build(), tmp_path)


def test_seeds_in_flight_are_refused_or_dropped_on_request(tmp_path) -> None:
    case = CASES["tabular_mlp"]
    torch.manual_seed(0)
    model = case.build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    grower = make_grower(case, model, opt)
    train_epoch(model, grower, loader(case), opt, case.loss_fn)
    grower.end_epoch(val_loss=1.0)
    assert list(grower.live().values()) == ["TRAINING"]
    with pytest.raises(FailedPreconditionError, match="not fossilized") as e:
        export(grower.model, tmp_path)
    assert e.value.reason == "SEEDS_IN_FLIGHT"
    plain = fold(grower.model, live="drop")
    x, _ = held_out(case)
    grower.model.eval()
    with torch.no_grad():  # a TRAINING seed leaves the forward as the host's
        assert torch.equal(plain.eval()(x), grower.model(x))


def test_wrapped_model_pickles_and_remove_hooks_keeps_fossils() -> None:
    case, model, grower = grown("tabular_mlp")
    x, _ = held_out(case)
    mm = grower.model
    mm.eval()
    buf = io.BytesIO()
    torch.save(mm, buf)  # used to fail: PicklingError on esper.common.v1.seed_pb2
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(again(x), mm(x))
    assert again.slots[next(iter(grower.fossilized()))].current_stage.name == "FOSSILIZED"
    with pytest.raises(FailedPreconditionError, match="fossilized") as e:
        mm.remove_hooks()
    assert e.value.reason == "FOSSILIZED_SEEDS"
    with torch.no_grad():
        assert torch.equal(mm(x), again(x))  # refused: nothing was dropped
    mm.remove_hooks(drop_fossilized=True)
    with torch.no_grad():
        assert not torch.equal(model(x), again(x))


def test_fold_rules_are_per_slot_kind() -> None:
    with pytest.raises(ValueError, match="exists"):
        register_fold_rule("output", FoldRule("x", fold=SeedResidual, rebuild=SeedResidual))
    assert fold_rule("parallel").name == "branch"  # the catch-all
    assert [r.name for r in _RULES["parallel"]] == ["width-merge", "lora-merge", "branch"]
    assert fold_rule("parallel", "lora-merge").applies is not None
    with pytest.raises(ExportError, match="no fold rule 'nope'"):
        fold_rule("parallel", "nope")
    with pytest.raises(ExportError, match="no fold rule for slot kind 'mystery'"):
        fold_rule("mystery")

    class Scaled(nn.Module):
        def __init__(self, module, seed):
            super().__init__()
            self.module, self.seed = module, seed

        def forward(self, x):
            return self.module(x) * 2

    register_fold_rule("test-kind", FoldRule("scaled", fold=Scaled, rebuild=Scaled))
    try:
        assert fold_rule("test-kind").name == "scaled"
    finally:
        _RULES.pop("test-kind")


@pytest.mark.parametrize(("parallel", "blueprint", "rule"),
                         [(["2"], "lora_r4", "lora-merge"), (["0:1"], "width4_relu", "branch")],
                         ids=["parallel-linear-lora", "parallel-span-width"])
def test_parallel_slots_grow_fold_and_export(parallel, blueprint, rule, tmp_path) -> None:
    from esper.grow import SeedParallel

    grower = grown_parallel(parallel, {s: blueprint for s in parallel})
    x, _ = held_out(CASES["tabular_mlp"])
    grower.model.eval()
    with torch.no_grad():
        want = grower.model(x)
    plain = fold(grower.model).eval()
    # A LoRA seed at a plain Linear merges into it; a width seed over Linear→ReLU (no
    # second Linear to take its columns) stays a branch.
    assert any(isinstance(m, SeedParallel) for m in plain.modules()) == (rule == "branch")
    with torch.no_grad():
        assert (plain(x) - want).abs().max() <= 1e-6
    manifest = json.loads(export(grower.model, tmp_path).read_text())
    assert [s["fold"] for s in manifest["sites"]] == [rule]
    again = load_exported(CASES["tabular_mlp"].build(), tmp_path).eval()
    with torch.no_grad():
        assert (again(x) - want).abs().max() <= 1e-6
    torch.export.export(again, (x,))


class Scripted:
    """Germinates the named blueprint at each slot (one per boundary, in the plan's order)
    and fossilizes whatever reaches HOLDING."""

    def __init__(self, plan: dict[str, str]) -> None:
        self.plan = plan

    def decide(self, snapshot, candidates):
        from generated.esper.common.v1 import decision_pb2 as D
        from generated.esper.common.v1 import seed_pb2

        out = [D.Decision(kind=D.DECISION_KIND_FOSSILIZE, slot_id=s.slot_id, reason="scripted")
               for s in snapshot.slots if s.stage == seed_pb2.SEED_STAGE_HOLDING]
        for slot_id, name in self.plan.items():
            dormant = any(s.slot_id == slot_id and s.stage == seed_pb2.SEED_STAGE_DORMANT
                          for s in snapshot.slots)
            k = next((c for c in candidates.get(slot_id, ()) if c.blueprint_name == name), None)
            if dormant and k is not None:
                out.append(D.Decision(kind=D.DECISION_KIND_GERMINATE, slot_id=slot_id,
                                      kernel_id=k.kernel_id, blueprint_id=k.blueprint_id,
                                      reason="scripted"))
                break
        return out or [D.Decision(kind=D.DECISION_KIND_WAIT, reason="nothing scripted")]


def grown_parallel(parallel: list[str], plan: dict[str, str], epochs: int = 7, build=None):
    from esper.grow import BuiltinKernels, Grower, GrowthConfig
    from tests.unit.grow.growkit import FAST

    case = CASES["tabular_mlp"]
    torch.manual_seed(0)
    model = (build or case.build)()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    grower = Grower(model, parallel=parallel, example_input=case.x[:4], optimizer=opt,
                    loss_fn=case.loss_fn, held_out=held_out(case), kasmina=FAST,
                    controller=Scripted(plan), config=GrowthConfig(max_seeds=len(plan)),
                    kernels=BuiltinKernels(sorted(set(plan.values()))))
    data = loader(case)
    for _ in range(epochs):
        train_epoch(model, grower, data, opt, case.loss_fn)
        grower.end_epoch(val_loss=evaluate(model, case))
    assert sorted(grower.fossilized()) == sorted(plan), grower.live()
    return grower


def test_width_seeds_export_as_a_plain_mlp_with_wider_layers(tmp_path) -> None:
    # Host: Linear(8,16) ReLU Linear(16,16) ReLU Linear(16,3). "0:2" widens the first hidden
    # layer, "2:4" the second (its seed read the first layer's original 16 units only).
    grower = grown_parallel(["0:2", "2:4"], {"0:2": "width4_relu", "2:4": "width8_relu"})
    x, _ = held_out(CASES["tabular_mlp"])
    grower.model.eval()
    with torch.no_grad():
        want = grower.model(x)
    plain = fold(grower.model).eval()
    assert [type(m) for m in plain] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert [(m.in_features, m.out_features) for m in plain if isinstance(m, nn.Linear)] == [
        (8, 20), (20, 24), (24, 3)]
    # The seeds' output biases merge into the layers' biases (-16, -3); the second layer
    # gains zeros where the 8 new units would read the 4 the first seed added (+32).
    assert sum(p.numel() for p in plain.parameters()) == grower.parameters() - 16 - 3 + 32
    with torch.no_grad():
        assert (plain(x) - want).abs().max() <= 1e-5
    # The first layer's new rows are the seed's hidden units, exactly.
    seed = grower.model.slots["0:2"].seed
    assert torch.equal(plain[0].weight[16:], seed.nodes["hidden"].weight)
    # The second seed never read the 4 units the first one added.
    assert torch.count_nonzero(plain[2].weight[16:, 16:]) == 0

    manifest = json.loads(export(grower.model, tmp_path).read_text())
    assert [s["fold"] for s in manifest["sites"]] == ["width-merge", "width-merge"]
    assert manifest["sites"][1]["folded"]["2"] == {
        "type": "Linear", "in_features": 20, "out_features": 24, "bias": True}
    again = load_exported(CASES["tabular_mlp"].build(), tmp_path).eval()
    assert [type(m) for m in again] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    with torch.no_grad():
        assert (again(x) - want).abs().max() <= 1e-5
    program = torch.export.export(again, (x,))
    with torch.no_grad():
        assert (program.module()(x) - want).abs().max() <= 1e-5


def test_lora_seed_merges_into_a_plain_linear(tmp_path) -> None:
    grower = grown_parallel(["2"], {"2": "lora_r8"})
    x, _ = held_out(CASES["tabular_mlp"])
    host_w = grower.model.host[2].weight.detach().clone()
    lora = grower.model.slots["2"].seed.nodes["adapter"]
    grower.model.eval()
    with torch.no_grad():
        want = grower.model(x)
    plain = fold(grower.model).eval()
    assert type(plain[2]) is nn.Linear and (plain[2].in_features, plain[2].out_features) == (16, 16)
    with torch.no_grad():
        assert torch.allclose(plain[2].weight, host_w + lora.up @ lora.down, atol=1e-7)
        assert (plain(x) - want).abs().max() <= 1e-5
    assert sum(p.numel() for p in plain.parameters()) == sum(
        p.numel() for p in CASES["tabular_mlp"].build().parameters())
    export(grower.model, tmp_path)
    again = load_exported(CASES["tabular_mlp"].build(), tmp_path).eval()
    assert type(again[2]) is nn.Linear
    with torch.no_grad():
        assert (again(x) - want).abs().max() <= 1e-5


def test_a_width_seed_whose_activation_differs_stays_a_branch() -> None:
    from esper.grow import SeedParallel

    # GELU units beside a ReLU layer are not "more of the same neurons".
    grower = grown_parallel(["0:2"], {"0:2": "width8_gelu"})
    plain = fold(grower.model)
    assert isinstance(plain[0], SeedParallel) and all(type(m) is nn.Identity for m in plain[1:3])


def test_a_fold_that_reads_a_widened_layer_is_refused(tmp_path) -> None:
    # A LoRA over the span "2:4" is a branch that reads the first hidden layer; the width
    # merge of "0:2" widened it, so folding both would feed the branch 20 units, not 16.
    grower = grown_parallel(["0:2", "2:4"], {"0:2": "width4_relu", "2:4": "lora_r4"})
    with pytest.raises(ExportError, match=r"slot '2:4' reads the input of '2', which the fold of slot '0:2'"):
        fold(grower.model)
    with pytest.raises(ExportError, match="cannot be folded"):
        export(grower.model, tmp_path)
