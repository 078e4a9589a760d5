"""Karn's core: operators give valid IR, crossover respects shapes, the Pareto front,
pre-flight rejections, lineage and reproducibility."""

from __future__ import annotations

import random
import re

import pytest
import torch

from esper.blueprints import (
    build_module,
    builtin_blueprints,
    node,
    plan_ir,
    site_signature,
    validate_ir,
)
from esper.errors import ConfigError, InvalidArgumentError
from esper.karn.evolve import (
    MUTATIONS,
    EvolveConfig,
    Evolver,
    Scored,
    crossover,
    make_child,
    pareto_front,
    preflight,
)
from generated.esper.common.v1 import blueprint_pb2

SITES = {
    1: site_signature("NC", 16),
    2: site_signature("NCL", 8, (40,)),
    3: site_signature("NCHW", 8, (6, 6)),
    4: site_signature("NLD", 16, (10,)),
}
CATALOG = {bp.name: bp for bp in builtin_blueprints()}
PAIRS = [(bp.name, layout) for bp in builtin_blueprints() for layout in bp.layouts]
NAME = re.compile(r"^[a-z][a-z0-9_\-]{0,63}$")


def _ops(ir: blueprint_pb2.BlueprintIR) -> list[str]:
    return [n.op for n in ir.nodes]


@pytest.mark.parametrize("op_name", sorted(MUTATIONS))
@pytest.mark.parametrize(("bp_name", "layout"), PAIRS)
def test_mutation_gives_valid_function_preserving_ir(op_name, bp_name, layout):
    bp, site = CATALOG[bp_name], SITES[layout]
    plan = plan_ir(bp.ir, site)
    for s in range(2):
        ir = MUTATIONS[op_name](bp.ir, plan, random.Random(s))
        if ir is None:
            continue
        assert ir != bp.ir
        validate_ir(ir, site)
        child = make_child(ir, [bp], f"mutate:{op_name}", site)
        assert preflight(child, site) == ("", plan_ir(ir, site).parameter_count)
        x = torch.randn(3, *[d or 5 for d in plan.input_shape])
        assert torch.equal(build_module(child, site, seed=s)(x), torch.zeros_like(x))


@pytest.mark.parametrize("op_name", sorted(MUTATIONS))
def test_every_operator_applies_to_some_builtin(op_name):
    applied = [
        (name, layout) for name, layout in PAIRS
        if MUTATIONS[op_name](CATALOG[name].ir, plan_ir(CATALOG[name].ir, SITES[layout]),
                              random.Random(0)) is not None
    ]
    assert applied, f"{op_name} applies to no built-in blueprint"


def test_widen_and_narrow_rescale_the_hidden_width():
    bp, site = CATALOG["bottleneck_mlp"], SITES[1]
    plan = plan_ir(bp.ir, site)
    hidden = {n.name: n.out_shape[0] for n in plan.nodes}["down"]
    wide = plan_ir(MUTATIONS["widen"](bp.ir, plan, random.Random(0)), site)
    narrow = plan_ir(MUTATIONS["narrow"](bp.ir, plan, random.Random(0)), site)
    assert {n.name: n.out_shape[0] for n in wide.nodes}["down"] == 2 * hidden
    assert {n.name: n.out_shape[0] for n in narrow.nodes}["down"] == hidden // 2
    assert narrow.parameter_count < plan.parameter_count < wide.parameter_count


def test_width_change_is_refused_where_it_would_reach_the_output():
    # lowrank_adapter has no hidden linear/conv; norm_scale's nodes all feed the output width.
    for name in ("lowrank_adapter", "norm_scale"):
        bp = CATALOG[name]
        assert MUTATIONS["widen"](bp.ir, plan_ir(bp.ir, SITES[1]), random.Random(0)) is None


def test_swap_activation_changes_one_activation_to_another():
    bp = CATALOG["bottleneck_mlp"]
    ir = MUTATIONS["swap_activation"](bp.ir, plan_ir(bp.ir, SITES[1]), random.Random(3))
    before, after = _ops(bp.ir), _ops(ir)
    diff = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert len(diff) == 1 and diff[0][0] == "gelu" and diff[0][1] in {"relu", "silu", "tanh"}


def test_insert_and_remove_norm():
    bp = CATALOG["conv3_residual_1d"]
    plan = plan_ir(bp.ir, SITES[2])
    ir = MUTATIONS["insert_norm"](bp.ir, plan, random.Random(0))
    norms = [n for n in ir.nodes if n.op in ("layernorm", "rmsnorm")]
    assert len(norms) == 1 and len(ir.nodes) == 4
    back = MUTATIONS["remove_norm"](ir, plan_ir(ir, SITES[2]), random.Random(0))
    assert _ops(back) == _ops(bp.ir)
    assert [list(n.inputs) for n in back.nodes] == [list(n.inputs) for n in bp.ir.nodes]


def test_change_rank_halves_or_doubles():
    bp = CATALOG["lowrank_adapter"]
    ranks = {MUTATIONS["change_rank"](bp.ir, plan_ir(bp.ir, SITES[1]), random.Random(s))
             .nodes[0].attrs["rank"].int_value for s in range(20)}
    assert ranks == {4, 16}


def test_add_residual_joins_equal_shapes():
    bp, site = CATALOG["conv3_residual_1d"], SITES[2]
    ir = MUTATIONS["add_residual"](bp.ir, plan_ir(bp.ir, site), random.Random(0))
    plan = plan_ir(ir, site)
    shapes = {"input": plan.input_shape, **{n.name: n.out_shape for n in plan.nodes}}
    adds = [n for n in ir.nodes if n.op == "add"]
    assert len(adds) == 1
    assert shapes[adds[0].inputs[0]] == shapes[adds[0].inputs[1]]
    assert ir.output == bp.ir.output


def test_change_kernel_size_stays_odd_and_in_range():
    bp = CATALOG["dwsep_conv1d"]
    sizes = {MUTATIONS["change_kernel_size"](bp.ir, plan_ir(bp.ir, SITES[2]), random.Random(s))
             .nodes[0].attrs["kernel_size"].int_value for s in range(20)}
    assert sizes == {3, 7}


@pytest.mark.parametrize("layout", sorted(SITES))
def test_crossover_respects_shapes(layout):
    site = SITES[layout]
    usable = [bp for bp in builtin_blueprints() if layout in bp.layouts]
    made = 0
    for a in usable:
        for b in usable:
            if a is b:
                continue
            pa, pb = plan_ir(a.ir, site), plan_ir(b.ir, site)
            for s in range(2):
                ir = crossover(a.ir, pa, b.ir, pb, random.Random(s))
                if ir is None:
                    continue
                made += 1
                child = plan_ir(ir, site)  # raises if shapes did not agree at the cut
                assert child.input_shape == pa.input_shape
                names = {n.name for n in ir.nodes}
                # A contributes its prefix under its own names; B its output, renamed.
                assert names & {n.name for n in a.ir.nodes}
                assert ir.output.startswith("b") and ir.output.endswith(b.ir.output)
                bp = make_child(ir, [a, b], "crossover", site)
                assert preflight(bp, site)[0] == ""
    assert made > 0


def test_crossover_is_none_without_a_shared_shape():
    a, b = CATALOG["bottleneck_mlp"], CATALOG["lowrank_adapter"]
    site = SITES[1]  # bottleneck's only hidden shapes are C/2; lowrank has none
    assert crossover(a.ir, plan_ir(a.ir, site), b.ir, plan_ir(b.ir, site),
                     random.Random(0)) is None


def _scored(name: str, score: float, cost: float, outcomes: int = 3) -> Scored:
    bp = blueprint_pb2.Blueprint()
    bp.CopyFrom(CATALOG["bottleneck_mlp"])
    bp.blueprint_id = f"bp-{name}"
    return Scored(bp, score, cost, outcomes)


def test_pareto_front_on_hand_made_stats():
    pts = [_scored("a", 0.9, 100), _scored("b", 0.5, 10), _scored("c", 0.5, 50),
           _scored("d", 0.95, 400), _scored("e", 0.1, 10), _scored("f", 0.2, 5),
           _scored("g", 0.9, 100)]
    front = pareto_front(pts)
    # c is dominated by b (same score, cheaper); e by b (cheaper is tied, b scores higher).
    assert [p.blueprint_id for p in front] == ["bp-d", "bp-a", "bp-g", "bp-b", "bp-f"]


def test_pareto_front_of_one_and_of_none():
    assert pareto_front([]) == []
    only = _scored("x", -1.0, 1e6)
    assert pareto_front([only]) == [only]


def test_preflight_rejects_shape_layout_and_non_preserving_children():
    site = SITES[1]
    bp = CATALOG["bottleneck_mlp"]
    bad_shape = make_child(blueprint_pb2.BlueprintIR(ir_version=1, nodes=[
        node("down", "linear", ["input"], ratio=0.5), node("up", "linear", ["down"],
                                                           features=3, zero_init=True)],
        output="up"), [bp], "mutate:test", site)
    why, _ = preflight(bad_shape, site)
    assert "IR invalid" in why and "shape" in why
    loud = make_child(blueprint_pb2.BlueprintIR(ir_version=1, nodes=[
        node("up", "linear", ["input"])], output="up"), [bp], "mutate:test", site)
    assert "zero at initialisation" in preflight(loud, site)[0]
    other = make_child(bp.ir, [bp], "mutate:test", SITES[2])
    assert "do not include the site's NC" in preflight(other, site)[0]


def test_make_child_records_lineage_and_a_valid_unique_name():
    a, b = CATALOG["conv3_residual_1d"], CATALOG["dwsep_conv1d"]
    site = SITES[2]
    ir = crossover(a.ir, plan_ir(a.ir, site), b.ir, plan_ir(b.ir, site), random.Random(0))
    child = make_child(ir, [a, b], "crossover", site)
    assert list(child.parent_ids) == [a.blueprint_id, b.blueprint_id]
    assert child.origin == "karn" and "karn" in child.tags and "op-crossover" in child.tags
    assert NAME.match(child.name) and child.blueprint_id.removeprefix("bp-")[:12] in child.name
    assert list(child.layouts) == [site.layout]


def _pool(site) -> list[Scored]:
    out = []
    for i, bp in enumerate(b for b in builtin_blueprints() if site.layout in b.layouts):
        out.append(Scored(bp, score=0.1 * i, cost=float(plan_ir(bp.ir, site).parameter_count),
                          outcomes=2))
    return out


def test_propose_is_reproducible_and_records_lineage():
    site = SITES[2]
    pool = _pool(site)
    ev = Evolver()
    first = ev.propose(pool, site, 6, seed=11)
    again = ev.propose(pool, site, 6, seed=11)
    other = ev.propose(pool, site, 6, seed=12)
    ids = [c.blueprint.blueprint_id for c in first]
    assert ids == [c.blueprint.blueprint_id for c in again]
    assert ids != [c.blueprint.blueprint_id for c in other]
    assert sum(c.ok for c in first) == 6
    pool_ids = {p.blueprint_id for p in pool}
    names = [c.blueprint.name for c in first]
    assert len(set(names)) == len(names) and len(set(ids)) == len(ids)
    for c in first:
        assert c.blueprint.origin == "karn"
        assert set(c.blueprint.parent_ids) <= pool_ids and c.blueprint.parent_ids
        assert c.blueprint.blueprint_id not in pool_ids
        assert c.operator == "crossover" or c.operator.removeprefix("mutate:") in MUTATIONS


def test_parents_come_from_the_front_when_not_exploring():
    site = SITES[2]
    pool = _pool(site)
    # Make one blueprint dominate all others: best score at the lowest cost.
    best = min(pool, key=lambda p: p.cost)
    pool = [Scored(p.blueprint, 10.0 if p is best else p.score, p.cost, p.outcomes) for p in pool]
    assert [p.blueprint_id for p in pareto_front(pool)] == [best.blueprint_id]
    ev = Evolver(config=EvolveConfig(explore_rate=0.0, crossover_rate=0.0))
    children = ev.propose(pool, site, 5, seed=3)
    assert children and all(list(c.blueprint.parent_ids) == [best.blueprint_id]
                            for c in children)


def test_a_breaking_operator_is_rejected_with_its_reason():
    def unzero(ir, plan, rng):
        child = blueprint_pb2.BlueprintIR()
        child.CopyFrom(ir)
        out = next(n for n in child.nodes if n.name == child.output)
        out.attrs["zero_init"].bool_value = False
        return child

    site = SITES[1]
    pool = [p for p in _pool(site) if p.blueprint.name == "bottleneck_mlp"]
    ev = Evolver(config=EvolveConfig(crossover_rate=0.0), mutations={"unzero": unzero})
    got = ev.propose(pool, site, 1, seed=0)
    assert len(got) == 1 and not got[0].ok
    assert got[0].operator == "mutate:unzero"
    assert "zero at initialisation" in got[0].rejection


def test_known_children_are_not_proposed_again():
    site = SITES[1]
    pool = [p for p in _pool(site) if p.blueprint.name == "lowrank_adapter"]
    ev = Evolver(config=EvolveConfig(crossover_rate=0.0), mutations={
        "change_rank": MUTATIONS["change_rank"]})
    first = ev.propose(pool, site, 2, seed=0)
    assert {c.blueprint.ir.nodes[0].attrs["rank"].int_value for c in first} == {4, 16}
    known = {c.blueprint.blueprint_id for c in first}
    assert ev.propose(pool, site, 2, seed=0, known_ids=known) == []


def test_propose_rejects_bad_arguments():
    site = SITES[1]
    with pytest.raises(InvalidArgumentError, match="count=0"):
        Evolver().propose(_pool(site), site, 0, seed=0)
    with pytest.raises(InvalidArgumentError, match="no blueprint in the pool supports"):
        conv2d = [p for p in _pool(SITES[3]) if p.blueprint.name == "conv3x3_residual"]
        Evolver().propose(conv2d, site_signature("NCL", 4, (9,)), 1, seed=0)


def test_config_validation():
    assert EvolveConfig.from_dict({"crossover_rate": 0.5}).crossover_rate == 0.5
    with pytest.raises(ConfigError, match="unknown karn settings \\['bogus'\\]"):
        EvolveConfig.from_dict({"bogus": 1})
    # Direct construction raises the plain ValueError; from_dict turns it into ConfigError.
    with pytest.raises(ValueError, match="explore_rate=1.5"):
        EvolveConfig(explore_rate=1.5)
    with pytest.raises(ConfigError, match="explore_rate=1.5"):
        EvolveConfig.from_dict({"explore_rate": 1.5})
    with pytest.raises(ValueError, match="objective='loss'"):
        EvolveConfig(objective="loss")
