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
    assert fold_rule("parallel").name == "branch"
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


@pytest.mark.parametrize(("parallel", "blueprint"), [(["2"], "lora_r4"), (["0:1"], "width4_relu")],
                         ids=["parallel-linear-lora", "parallel-span-width"])
def test_parallel_slots_grow_fold_and_export(parallel, blueprint, tmp_path) -> None:
    from esper.grow import BuiltinKernels, Grower, SeedParallel, fixed_controller
    from tests.unit.grow.growkit import FAST

    case = CASES["tabular_mlp"]
    torch.manual_seed(0)
    model = case.build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    grower = Grower(model, parallel=parallel, example_input=case.x[:4], optimizer=opt,
                    loss_fn=case.loss_fn, held_out=held_out(case), kasmina=FAST,
                    controller=fixed_controller(germinate_epochs=(1,), fossilize_after_epochs=1),
                    kernels=BuiltinKernels([blueprint]))
    data = loader(case)
    for _ in range(5):
        train_epoch(model, grower, data, opt, case.loss_fn)
        grower.end_epoch(val_loss=evaluate(model, case))
    assert list(grower.fossilized()) == parallel
    x, _ = held_out(case)
    grower.model.eval()
    with torch.no_grad():
        want = grower.model(x)
    plain = fold(grower.model).eval()
    assert any(isinstance(m, SeedParallel) for m in plain.modules())
    with torch.no_grad():
        assert (plain(x) - want).abs().max() <= 1e-6
    export(grower.model, tmp_path)
    again = load_exported(case.build(), tmp_path).eval()
    with torch.no_grad():
        assert (again(x) - want).abs().max() <= 1e-6
    torch.export.export(again, (x,))
