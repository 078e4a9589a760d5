"""The one IR attribute conversion and the one kernel pre-check (Tezzeret and Karn)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esper.blueprints import build_module, builtin_blueprints, site_signature
from esper.blueprints.artifact import SigningKey
from esper.blueprints.attrs import attr_of, from_attr, set_attr, to_attr, typed_attr
from esper.blueprints.check import INIT_TOLERANCE, failures, probe_shape, validate_kernel
from esper.blueprints.ir import ancestors
from esper.karn.evolve import preflight
from esper.tezzeret.compiler import CompileError, compile_kernel
from generated.esper.common.v1 import blueprint_pb2, seed_pb2


@pytest.mark.parametrize(("value", "kind"), [(True, "bool_value"), (3, "int_value"),
                                             (0.5, "float_value"), ("relu", "string_value")])
def test_attr_values_round_trip(value, kind) -> None:
    a = to_attr(value)
    assert a.WhichOneof("value") == kind and from_attr(a) == value and type(from_attr(a)) is type(value)
    assert typed_attr(a) == [kind, value]
    n = blueprint_pb2.IRNode(name="n", op="linear")
    set_attr(n, "k", value)
    assert attr_of(n, "k") == value and attr_of(n, "absent") is None
    assert from_attr(value) == value  # plain values pass through


def test_unset_and_unsupported_attr_values() -> None:
    assert from_attr(blueprint_pb2.AttrValue()) is None
    assert typed_attr(blueprint_pb2.AttrValue()) == [None, None]
    with pytest.raises(TypeError, match="allowed: bool, int, float, str"):
        to_attr([1, 2])  # type: ignore[arg-type]


def test_ancestors_follow_inputs_back_to_the_input() -> None:
    ir = blueprint_pb2.BlueprintIR(ir_version=1, output="c", nodes=[
        blueprint_pb2.IRNode(name="a", op="linear", inputs=["input"]),
        blueprint_pb2.IRNode(name="b", op="relu", inputs=["a"]),
        blueprint_pb2.IRNode(name="unused", op="relu", inputs=["a"]),
        blueprint_pb2.IRNode(name="c", op="add", inputs=["b", "input"])])
    assert ancestors(ir, "c") == {"a", "b", "c"} and ancestors(ir, "a") == {"a"}


OUTPUT_SITE = site_signature("NCL", 8, (40,))
PARALLEL_SITE = seed_pb2.SiteSignature(
    layout=seed_pb2.ACTIVATION_LAYOUT_NC, channels=16, kind=seed_pb2.SLOT_KIND_PARALLEL,
    input=seed_pb2.ActivationSpec(layout=seed_pb2.ACTIVATION_LAYOUT_NC, channels=40))


def test_probe_shapes_use_the_site_and_the_layout_defaults() -> None:
    assert probe_shape(site_signature("NCL", 8)) == (8, 32)
    assert probe_shape(site_signature("NCHW", 4)) == (4, 8, 8)
    assert probe_shape(site_signature("NLD", 6)) == (16, 6)
    assert probe_shape(PARALLEL_SITE) == (40,) and probe_shape(PARALLEL_SITE, output=True) == (16,)


class Zero(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(c_in, c_out)
        nn.init.zeros_(self.lin.weight)
        nn.init.zeros_(self.lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_a_parallel_seed_is_checked_against_the_site_output_not_its_input() -> None:
    assert failures(validate_kernel(Zero(40, 16), PARALLEL_SITE)) == []
    wrong = failures(validate_kernel(Zero(40, 40), PARALLEL_SITE))
    assert wrong[0] == "output shape differs from the site's" and "!= site output" in wrong[1]
    loud = nn.Linear(40, 16)
    got = failures(validate_kernel(loud, PARALLEL_SITE))
    assert len(got) == 1 and got[0].startswith("output changes by") and f"(> {INIT_TOLERANCE})" in got[0]


def test_karn_preflight_and_tezzeret_compile_share_the_check() -> None:
    bp = next(b for b in builtin_blueprints() if b.name == "bottleneck_mlp")
    site = site_signature("NC", 16)
    assert preflight(bp, site) == ("", build_module(bp, site).plan.parameter_count)
    key = SigningKey.from_bytes(b"11" * 32)
    assert compile_kernel(bp, site, key, benchmark_iters=0).manifest.validation.shape_ok


def test_both_refuse_a_module_that_fails_the_check(monkeypatch) -> None:
    bp = next(b for b in builtin_blueprints() if b.name == "bottleneck_mlp")
    site = site_signature("NC", 16)
    from esper.karn import evolve
    from esper.tezzeret import compiler

    def loud_build(*args, **kwargs):
        return nn.Linear(16, 16)

    monkeypatch.setattr(evolve, "build_module", loud_build)
    monkeypatch.setattr(compiler, "build_module", loud_build)
    rejection, _ = preflight(bp, site)
    assert rejection.startswith("output changes by")
    with pytest.raises(CompileError, match="output changes by"):
        compile_kernel(bp, site, SigningKey.from_bytes(b"11" * 32), benchmark_iters=0)
