"""Blueprint registry, IR validation, builder and catalog."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from esper.blueprints import (
    OPS,
    blueprint_id,
    build_module,
    builtin_blueprints,
    make_blueprint,
    node,
    plan_ir,
    site_shape,
    site_signature,
    supports,
    validate_ir,
)
from esper.blueprints.ops import NC, NCHW
from esper.errors import BlueprintError

SITES = {
    "nc16": site_signature("NC", 16),
    "ncl8x20": site_signature("NCL", 8, (20,)),
    "ncl8_var": site_signature("NCL", 8),
    "nchw8x6x6": site_signature("NCHW", 8, (6, 6)),
    "nld16x5": site_signature("NLD", 16, (5,)),
}
PAIRS = [(bp, name) for bp in builtin_blueprints() for name, s in SITES.items() if supports(bp, s)]


def _input(site, batch=3):
    torch.manual_seed(1)
    return torch.randn(batch, *[d or 11 for d in site_shape(site)])


def test_catalog_has_six_families_over_every_layout():
    bps = builtin_blueprints()
    assert len({bp.family for bp in bps}) >= 6
    layouts = {lay for bp in bps for lay in bp.layouts}
    assert layouts == {1, 2, 3, 4}
    assert len({bp.blueprint_id for bp in bps}) == len(bps)
    for bp in bps:
        assert bp.blueprint_id == blueprint_id(bp)
        assert bp.blueprint_id.startswith("bp-") and len(bp.blueprint_id) == 19


@pytest.mark.parametrize("bp,site_name", PAIRS, ids=[f"{b.name}-{s}" for b, s in PAIRS])
def test_builtin_is_function_preserving_and_learns(bp, site_name):
    site = SITES[site_name]
    module = build_module(bp, site)
    x = _input(site)
    h = torch.randn_like(x)
    s = module(x)
    assert s.shape == x.shape
    assert torch.equal(h + s, h)  # exactly zero output at init
    loss = ((h + s) - torch.ones_like(h)).pow(2).mean()
    loss.backward()
    grads = [p.grad for p in module.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads), "no parameter would learn"
    specs = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert specs == module.plan.tensor_specs()
    assert sum(p.numel() for p in module.parameters()) == module.plan.parameter_count


def test_weights_are_deterministic_per_seed():
    bp = builtin_blueprints()[0]
    site = SITES["nc16"]
    a, b = build_module(bp, site), build_module(bp, site)
    c = build_module(bp, site, seed=1)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert not torch.equal(a.state_dict()["nodes.down.weight"], c.state_dict()["nodes.down.weight"])


def test_global_rng_untouched_by_build():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    build_module(builtin_blueprints()[0], SITES["nc16"])
    assert torch.equal(torch.rand(3), expected)


def test_blueprint_id_is_stable_across_processes():
    code = ("from esper.blueprints import builtin_blueprints, blueprint_id;"
            "print(' '.join(blueprint_id(b) for b in builtin_blueprints()))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": str(i), "PATH": ""},
                           cwd=".").stdout.strip() for i in (1, 2)}
    assert outs == {" ".join(b.blueprint_id for b in builtin_blueprints())}


def test_blueprint_id_depends_on_content():
    bp = builtin_blueprints()[0]
    other = type(bp)()
    other.CopyFrom(bp)
    other.description = "changed description only"
    assert blueprint_id(other) == blueprint_id(bp)
    other.ir.nodes[0].attrs["ratio"].float_value = 0.25
    assert blueprint_id(other) != blueprint_id(bp)


def _bp(nodes, output, layouts=(NC,)):
    return make_blueprint("t", "test", "", list(layouts), nodes, output)


NC16 = site_signature("NC", 16)
BAD = {
    "unknown op": ([node("a", "exec_python", ["input"])], "a", "not on the allowlist"),
    "cycle": ([node("a", "linear", ["b"]), node("b", "linear", ["a"], zero_init=True)], "b",
              "cycle"),
    "self loop": ([node("a", "add", ["a", "input"])], "a", "cycle"),
    "duplicate": ([node("a", "relu", ["input"]), node("a", "linear", ["input"], zero_init=True)],
                  "a", "used twice"),
    "missing input": ([node("a", "linear", ["nowhere"], zero_init=True)], "a", "neither"),
    "missing output": ([node("a", "linear", ["input"], zero_init=True)], "zzz", "not a node"),
    "shape mismatch": ([node("a", "linear", ["input"], features=3, zero_init=True)], "a",
                       "site's shape"),
    "not zero at init": ([node("a", "linear", ["input"])], "a", "not zero at initialisation"),
    "sigmoid breaks zero": ([node("a", "linear", ["input"], zero_init=True),
                             node("b", "sigmoid", ["a"])], "b", "not zero"),
    "unknown attr": ([node("a", "linear", ["input"], zero_init=True, code="rm -rf")], "a",
                     "no attribute 'code'"),
    "attr type": ([node("a", "linear", ["input"], zero_init=1)], "a", "must be bool"),
    "attr range": ([node("a", "lowrank", ["input"], rank=0)], "a", "out of range"),
    "missing attr": ([node("a", "lowrank", ["input"])], "a", "requires attribute 'rank'"),
    "wrong layout": ([node("a", "conv2d", ["input"], zero_init=True)], "a", "does not apply"),
    "unused node": ([node("x", "relu", ["input"]), node("a", "linear", ["input"],
                                                        zero_init=True)], "a", "do not feed"),
    "reserved name": ([node("forward", "linear", ["input"], zero_init=True)], "forward",
                      "reserved"),
    "arity": ([node("a", "add", ["input"])], "a", "takes 2..8 inputs"),
    "too big": ([node("a", "linear", ["input"], features=65536),
                 node("b", "linear", ["a"], features=65536),
                 node("c", "linear", ["b"], features=16, zero_init=True)], "c", "bound"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_invalid_ir_is_rejected_with_a_reason(case):
    nodes, output, needle = BAD[case]
    bp = _bp(nodes, output)
    with pytest.raises(BlueprintError, match=needle):
        validate_ir(bp.ir, NC16)
    assert not supports(bp, NC16)


def test_node_bound():
    nodes = [node("n0", "relu", ["input"])]
    nodes += [node(f"n{i}", "relu", [f"n{i - 1}"]) for i in range(1, 300)]
    with pytest.raises(BlueprintError, match="nodes; allowed 1..256"):
        validate_ir(_bp(nodes, "n299").ir, NC16)


def test_bad_site_rejected():
    with pytest.raises(BlueprintError, match="layout 'NCX' unknown"):
        site_signature("NCX", 4)
    with pytest.raises(BlueprintError, match="takes 0 or 2"):
        site_signature("NCHW", 4, (3,))


def test_supports_checks_layout_declaration():
    conv = next(b for b in builtin_blueprints() if b.name == "conv3x3_residual")
    assert supports(conv, site_signature("NCHW", 4, (5, 5)))
    assert not supports(conv, NC16)


def test_registry_covers_required_ops():
    required = {"linear", "conv1d", "conv2d", "depthwise_conv1d", "depthwise_conv2d", "layernorm",
                "groupnorm", "rmsnorm", "relu", "gelu", "silu", "sigmoid", "tanh", "add", "mul",
                "scale", "mean_pool", "identity", "lowrank"}
    assert required <= set(OPS)


def test_groupnorm_and_residual_add_graph():
    site = site_signature("NCHW", 8, (4, 4))
    bp = _bp([node("gn", "groupnorm", ["input"], groups=4),
              node("c", "conv2d", ["gn"], kernel_size=1, groups=2),
              node("t", "tanh", ["c"]),
              node("z", "linear", ["t"], zero_init=True),
              node("r", "add", ["z", "z"])], "r", layouts=(NCHW,))
    plan = plan_ir(bp.ir, site)
    assert [n.name for n in plan.nodes] == ["gn", "c", "t", "z", "r"]
    m = build_module(bp, site)
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(m(x), torch.zeros_like(x))
    with pytest.raises(BlueprintError, match="must divide"):
        validate_ir(_bp([node("gn", "groupnorm", ["input"], groups=3),
                         node("z", "scale", ["gn"])], "z").ir, site)
