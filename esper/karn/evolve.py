"""Karn's core: new blueprints by mutation and recombination of existing IR, parents chosen
from the Pareto front of field-report score against cost, every child checked before it
may leave this module.

Pure Python + torch over `esper.blueprints`: no gRPC. The service feeds it what Urza knows
(`Scored` blueprints) and sends the children that pass `preflight` to Tezzeret.

Operators rewrite the IR structurally; they look at the site's shapes (from `plan_ir`) so
that what they produce is meant to validate, but nothing trusts that: `preflight` runs the
IR validator and the same numerical checks Tezzeret makes before signing (function
preservation at initialisation, finite forward and backward), and a child that fails is
returned with `rejection` set, never sent on.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from esper.blueprints import blueprint_id, build_module, plan_ir
from esper.blueprints.attrs import attr_of, set_attr
from esper.blueprints.catalog import node as make_node
from esper.blueprints.check import failures, validate_kernel
from esper.blueprints.ir import INPUT, IRPlan, ancestors, check_site, layout_name, site_key
from esper.config import from_dict
from esper.errors import EsperError, InvalidArgumentError
from generated.esper.common.v1 import blueprint_pb2, seed_pb2

ORIGIN = "karn"
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
"""Activations a swap chooses among: each has f(0) = 0, so zero-initialised paths stay zero."""
NORMS = ("layernorm", "rmsnorm")
PROJECTIONS = frozenset({"linear", "conv1d", "conv2d", "lowrank"})
"""Ops whose output channels do not depend on their input's: a width change stops here."""
CHANNEL_PASSING = frozenset({*ACTIVATIONS, "sigmoid", "identity", "layernorm", "rmsnorm",
                             "depthwise_conv1d", "depthwise_conv2d", "scale", "mean_pool"})
"""Ops whose output has their input's channels (a width change flows through them)."""
_NAME_OK = re.compile(r"^[a-z][a-z0-9_\-]{0,63}$")


@dataclass(frozen=True)
class Scored:
    """A blueprint with what the field reports say of it at one site."""

    blueprint: blueprint_pb2.Blueprint
    score: float
    """Mean contribution (or accuracy delta) over its outcomes; higher is better."""
    cost: float
    """Parameters at the site; lower is better."""
    outcomes: int
    """Field reports behind `score` (0: unmeasured, `score` means nothing yet)."""

    @property
    def blueprint_id(self) -> str:
        return self.blueprint.blueprint_id


@dataclass(frozen=True)
class Candidate:
    """One child blueprint and what the pre-flight checks found."""

    blueprint: blueprint_pb2.Blueprint
    operator: str
    """"mutate:<op>" or "crossover"."""
    rejection: str = ""
    """Why pre-flight rejected it ("" when it passed)."""
    parameters: int = 0

    @property
    def ok(self) -> bool:
        return not self.rejection


def dominates(a: Scored, b: Scored) -> bool:
    """a is at least as good on both axes and strictly better on one."""
    return (a.score >= b.score and a.cost <= b.cost) and (a.score > b.score or a.cost < b.cost)


def pareto_front(points: Sequence[Scored]) -> list[Scored]:
    """The non-dominated points (score high, cost low), best score first."""
    front = [p for p in points if not any(dominates(q, p) for q in points if q is not p)]
    return sorted(front, key=lambda p: (-p.score, p.cost, p.blueprint_id))


# --------------------------------------------------------------------------- IR helpers


def _copy_ir(ir: blueprint_pb2.BlueprintIR) -> blueprint_pb2.BlueprintIR:
    out = blueprint_pb2.BlueprintIR()
    out.CopyFrom(ir)
    return out


def _consumers(ir: blueprint_pb2.BlueprintIR, name: str) -> list[blueprint_pb2.IRNode]:
    return [n for n in ir.nodes if name in n.inputs]


def _rewire(ir: blueprint_pb2.BlueprintIR, old: str, new: str, *, skip: str) -> None:
    """Point every consumer of `old` (but `skip`) and the output at `new`."""
    for n in ir.nodes:
        if n.name == skip:
            continue
        for i, src in enumerate(n.inputs):
            if src == old:
                n.inputs[i] = new
    if ir.output == old:
        ir.output = new


def _fresh_name(ir: blueprint_pb2.BlueprintIR, base: str) -> str:
    taken = {n.name for n in ir.nodes}
    for i in range(len(taken) + 1):
        name = f"{base}{i}"[:64]
        if name not in taken:
            return name
    raise AssertionError("unreachable: more candidate names than nodes")


def _insert_after(ir: blueprint_pb2.BlueprintIR, after: str, new: blueprint_pb2.IRNode) -> None:
    """Place `new` right after `after` in declaration order (order of nodes is cosmetic:
    the planner sorts topologically, but a readable IR keeps producers first)."""
    nodes = list(ir.nodes)
    idx = next((i for i, n in enumerate(nodes) if n.name == after), -1) + 1
    nodes.insert(idx, new)
    del ir.nodes[:]
    ir.nodes.extend(nodes)


def _channels(plan: IRPlan, name: str) -> int:
    shape = plan.input_shape if name == INPUT else next(n.out_shape for n in plan.nodes
                                                          if n.name == name)
    c = shape[plan.context.channel_axis]
    assert c is not None, "validated plans have known channel extents"
    return c


def _width_change_contained(ir: blueprint_pb2.BlueprintIR, name: str) -> bool:
    """Whether changing `name`'s output channels is absorbed by projections before it
    reaches the output or meets another tensor (add/mul) whose width would not change."""
    frontier = [name]
    changed: set[str] = set()
    while frontier:
        cur = frontier.pop()
        if cur in changed:
            continue
        changed.add(cur)
        if ir.output == cur:
            return False
        for c in _consumers(ir, cur):
            if c.op in PROJECTIONS:
                continue
            if c.op in CHANNEL_PASSING:
                frontier.append(c.name)
                continue
            # add/mul: every other operand would have to change with it.
            return False
    return True


# --------------------------------------------------------------------------- operators

Operator = Callable[[blueprint_pb2.BlueprintIR, IRPlan, random.Random],
                    blueprint_pb2.BlueprintIR | None]
"""(parent IR, its plan at the site, rng) → child IR, or None where the operator does not
apply to this parent."""


def _rescale_width(factor: float) -> Operator:
    def op(ir: blueprint_pb2.BlueprintIR, plan: IRPlan, rng: random.Random
           ) -> blueprint_pb2.BlueprintIR | None:
        site_c = plan.context.site_channels
        options = []
        for n in ir.nodes:
            if n.op not in ("linear", "conv1d", "conv2d") or not _width_change_contained(ir, n.name):
                continue
            if n.op != "linear" and (attr_of(n, "groups") or 1) != 1:
                continue
            width = _channels(plan, n.name)
            new = max(1, round(width * factor))
            if new == width or new > 16 * site_c:
                continue
            options.append((n.name, new))
        if not options:
            return None
        name, new = rng.choice(options)
        child = _copy_ir(ir)
        target = next(n for n in child.nodes if n.name == name)
        # A ratio keeps the child portable across sites of other widths.
        set_attr(target, "features", 0)
        set_attr(target, "ratio", min(16.0, new / site_c))
        set_attr(target, "min_features", 1)
        return child
    return op


def swap_activation(ir: blueprint_pb2.BlueprintIR, plan: IRPlan, rng: random.Random
                    ) -> blueprint_pb2.BlueprintIR | None:
    acts = [n.name for n in ir.nodes if n.op in ACTIVATIONS]
    if not acts:
        return None
    child = _copy_ir(ir)
    target = next(n for n in child.nodes if n.name == rng.choice(acts))
    target.op = rng.choice([a for a in ACTIVATIONS if a != target.op])
    return child


def insert_norm(ir: blueprint_pb2.BlueprintIR, plan: IRPlan, rng: random.Random
                ) -> blueprint_pb2.BlueprintIR | None:
    # After a hidden node (never after the output: a norm there would rescale the seed's
    # contribution away from the zero-initialised projection that bounds it).
    spots = [n.name for n in ir.nodes if n.name != ir.output and n.op != "mean_pool"
             and n.op not in NORMS]
    if not spots:
        return None
    after = rng.choice(spots)
    child = _copy_ir(ir)
    name = _fresh_name(child, "norm")
    _rewire(child, after, name, skip=name)
    _insert_after(child, after, make_node(name, rng.choice(NORMS), [after]))
    return child


def remove_norm(ir: blueprint_pb2.BlueprintIR, plan: IRPlan, rng: random.Random
                ) -> blueprint_pb2.BlueprintIR | None:
    norms = [n for n in ir.nodes if n.op in (*NORMS, "groupnorm") and n.name != ir.output]
    if not norms or len(ir.nodes) < 2:
        return None
    target = rng.choice(norms)
    child = _copy_ir(ir)
    _rewire(child, target.name, target.inputs[0], skip=target.name)
    keep = [n for n in child.nodes if n.name != target.name]
    del child.nodes[:]
    child.nodes.extend(keep)
    return child


def change_rank(ir: blueprint_pb2.BlueprintIR, plan: IRPlan, rng: random.Random
                ) -> blueprint_pb2.BlueprintIR | None:
    options = []
    for n in ir.nodes:
        if n.op != "lowrank":
            continue
        rank = int(attr_of(n, "rank"))
        for new in (rank * 2, rank // 2):
            if 1 <= new <= min(4096, 4 * plan.context.site_channels) and new != rank:
                options.append((n.name, new))
    if not options:
        return None
    name, new = rng.choice(options)
    child = _copy_ir(ir)
    set_attr(next(n for n in child.nodes if n.name == name), "rank", new)
    return child


def add_residual(ir: blueprint_pb2.BlueprintIR, plan: IRPlan, rng: random.Random
                 ) -> blueprint_pb2.BlueprintIR | None:
    """A skip connection `add(x, y)` from an earlier tensor y of x's shape to a hidden x."""
    shapes = {INPUT: plan.input_shape, **{n.name: n.out_shape for n in plan.nodes}}
    order = [INPUT, *(n.name for n in plan.nodes)]
    pairs = []
    for j, x in enumerate(order[1:], start=1):
        if x == ir.output:
            continue
        node_x = next(n for n in plan.nodes if n.name == x)
        for y in order[:j]:
            # Skip y's that are x's direct input: add(x, input_of_x) around a single op is
            # a residual too, but around an activation it just doubles the signal path.
            if shapes[y] == shapes[x] and (y not in node_x.inputs or node_x.op in PROJECTIONS):
                pairs.append((x, y))
    if not pairs:
        return None
    x, y = rng.choice(pairs)
    child = _copy_ir(ir)
    name = _fresh_name(child, "res")
    _rewire(child, x, name, skip=name)
    _insert_after(child, x, make_node(name, "add", [x, y]))
    return child


def change_kernel_size(ir: blueprint_pb2.BlueprintIR, plan: IRPlan, rng: random.Random
                       ) -> blueprint_pb2.BlueprintIR | None:
    options = []
    for n in ir.nodes:
        if n.op not in ("conv1d", "conv2d", "depthwise_conv1d", "depthwise_conv2d"):
            continue
        k = int(attr_of(n, "kernel_size") or 3)
        options += [(n.name, k2) for k2 in (k - 2, k + 2) if 1 <= k2 <= 15]
    if not options:
        return None
    name, k = rng.choice(options)
    child = _copy_ir(ir)
    set_attr(next(n for n in child.nodes if n.name == name), "kernel_size", k)
    return child


MUTATIONS: Mapping[str, Operator] = {
    "widen": _rescale_width(2.0),
    "narrow": _rescale_width(0.5),
    "swap_activation": swap_activation,
    "insert_norm": insert_norm,
    "remove_norm": remove_norm,
    "change_rank": change_rank,
    "add_residual": add_residual,
    "change_kernel_size": change_kernel_size,
}
"""Every mutation operator by name (the proposal's operator is "mutate:<name>")."""


def crossover(a: blueprint_pb2.BlueprintIR, plan_a: IRPlan, b: blueprint_pb2.BlueprintIR,
              plan_b: IRPlan, rng: random.Random) -> blueprint_pb2.BlueprintIR | None:
    """A's subgraph up to a cut node, then B's graph from a cut node of the same shape on.

    Cut points: a hidden node of A and a node of B (or B's input) whose
    per-sample shapes agree at the site. B's nodes are renamed with a `b_` prefix; those B
    nodes the suffix still needs besides the cut (e.g. a gate reading B's input) come along.
    """
    shapes_a = {INPUT: plan_a.input_shape, **{n.name: n.out_shape for n in plan_a.nodes}}
    shapes_b = {INPUT: plan_b.input_shape, **{n.name: n.out_shape for n in plan_b.nodes}}
    # A contributes at least one node (cut_a is never A's input) and B at least its output.
    cuts = [(ca, cb) for ca in shapes_a if ca not in (INPUT, a.output)
            for cb in shapes_b if cb != b.output and shapes_a[ca] == shapes_b[cb]]
    if not cuts:
        return None
    cut_a, cut_b = rng.choice(cuts)
    by_b = {n.name: n for n in b.nodes}
    # B's suffix: the nodes that depend on cut_b and feed B's output.
    downstream = {cut_b}
    for n in plan_b.nodes:
        if any(i in downstream for i in n.inputs):
            downstream.add(n.name)
    feeds_out = ancestors(b, b.output)
    suffix = [n.name for n in plan_b.nodes
              if n.name in downstream and n.name in feeds_out and n.name != cut_b]
    need = set(suffix)
    for name in suffix:
        for src in by_b[name].inputs:
            if src not in (INPUT, cut_b):
                need |= ancestors(b, src)
    prefix = ancestors(a, cut_a)
    ren = _renaming(sorted(prefix), list(by_b))
    ren[INPUT] = INPUT
    ren[cut_b] = cut_a
    child = blueprint_pb2.BlueprintIR(ir_version=1)
    child.nodes.extend(n for n in a.nodes if n.name in prefix)
    for n in b.nodes:
        if n.name in need and n.name != cut_b:
            m = blueprint_pb2.IRNode()
            m.CopyFrom(n)
            m.name = ren[n.name]
            del m.inputs[:]
            m.inputs.extend(ren[s] for s in n.inputs)
            child.nodes.append(m)
    child.output = ren[b.output]
    return child


def _renaming(taken: Sequence[str], names: Sequence[str]) -> dict[str, str]:
    """Prefix B's node names so none collides with A's (which may carry earlier prefixes)."""
    used = set(taken)
    for k in range(len(used) + 2):
        prefix = "b_" if k == 0 else f"b{k}_"
        ren = {n: f"{prefix}{n}"[:64] for n in names}
        if not used & set(ren.values()) and len(set(ren.values())) == len(names):
            return ren
    raise AssertionError("unreachable: a free prefix exists among len(taken) + 2")


# --------------------------------------------------------------------------- pre-flight


def preflight(bp: blueprint_pb2.Blueprint, site: seed_pb2.SiteSignature, *, seed: int = 0
              ) -> tuple[str, int]:
    """The checks a child must pass before it is offered to Tezzeret and Urza.

    Returns (rejection, parameters): rejection "" when every check passed.
    Checks: name/family/tag rules of the proto, the site's layout is declared, the IR
    validates for the site (allowlist, shapes, acyclic, provably zero output), and, built
    with seeded random weights, Tezzeret's own checks before signing
    (`esper.blueprints.check`: the output shape the site adds it to — a parallel site's
    output, not its input —, the output at init within INIT_TOLERANCE of zero, finite
    forward and finite gradients of a blend `h + s` against a random target).
    """
    if not _NAME_OK.match(bp.name):
        return f"name {bp.name!r} does not match {_NAME_OK.pattern}", 0
    if not 1 <= len(bp.family) <= 64:
        return f"family {bp.family!r} must have 1..64 characters", 0
    if len(bp.tags) > 32 or any(not 1 <= len(t) <= 64 for t in bp.tags):
        return f"tags {list(bp.tags)}: at most 32, each 1..64 characters", 0
    if len(bp.parent_ids) > 8:
        return f"{len(bp.parent_ids)} parent ids; at most 8", 0
    if site.layout not in bp.layouts:
        return (f"layouts {[layout_name(x) for x in bp.layouts]} do not include the site's "
                f"{layout_name(site.layout)}"), 0
    try:
        plan = plan_ir(bp.ir, site)
        module = build_module(bp, site, seed=seed)
    except EsperError as e:
        return f"IR invalid at {site_key(site)}: {e}", 0
    return "; ".join(failures(validate_kernel(module, site, seed=seed))), plan.parameter_count


# --------------------------------------------------------------------------- the evolver


@dataclass(kw_only=True, frozen=True)
class EvolveConfig:
    """How Karn chooses parents and operators."""

    crossover_rate: float = 0.25
    """Chance that a proposal is a crossover of two parents (when two are available)."""
    explore_rate: float = 0.2
    """Chance that a parent is drawn from every candidate rather than the Pareto front
    (unmeasured blueprints, including Karn's own new ones, only get outcomes this way)."""
    objective: str = "contribution"
    """Score read from KernelStats: "contribution" (mean counterfactual contribution) or
    "accuracy_delta"."""
    max_attempts_per_proposal: int = 12
    """Operator applications tried per requested proposal before giving up (operators
    that do not apply to a parent, and children identical to known blueprints, use these)."""
    max_parameter_ratio: float = 4.0
    """A child may have at most this many parameters per site channel squared (guards the
    library against widening runaways; 4.0 ≈ four C×C projections)."""

    def __post_init__(self) -> None:
        for name in ("crossover_rate", "explore_rate"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 0.0 <= v <= 1.0):
                raise ValueError(f"karn {name}={v!r}: must be a number in [0, 1]")
        if self.objective not in ("contribution", "accuracy_delta"):
            raise ValueError(f"karn objective={self.objective!r}: allowed 'contribution', "
                             "'accuracy_delta'")
        if not (isinstance(self.max_attempts_per_proposal, int)
                and 1 <= self.max_attempts_per_proposal <= 1000):
            raise ValueError(f"karn max_attempts_per_proposal={self.max_attempts_per_proposal!r}:"
                             " must be an int in [1, 1000]")
        if not (isinstance(self.max_parameter_ratio, int | float)
                and 0 < self.max_parameter_ratio <= 1024):
            raise ValueError(f"karn max_parameter_ratio={self.max_parameter_ratio!r}: must be "
                             "in (0, 1024]")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> EvolveConfig:
        return from_dict(cls, data, what="karn settings")


def child_name(family: str, bp_id: str) -> str:
    """A name unique per content id, valid for the proto pattern."""
    base = re.sub(r"[^a-z0-9_]", "_", family.lower()).strip("_")[:40] or "bp"
    if not base[0].isalpha():
        base = "k" + base
    return f"karn-{base}-{bp_id.removeprefix('bp-')[:12]}"


def make_child(ir: blueprint_pb2.BlueprintIR, parents: Sequence[blueprint_pb2.Blueprint],
               operator: str, site: seed_pb2.SiteSignature) -> blueprint_pb2.Blueprint:
    """Wrap a child IR as a Blueprint with lineage (parent ids, origin "karn")."""
    first = parents[0]
    tags = list(dict.fromkeys([*(t for t in first.tags if t != ORIGIN and not t.startswith("op-")),
                               ORIGIN, "op-" + operator.replace(":", "-")[:60]]))[:32]
    bp = blueprint_pb2.Blueprint(
        family=first.family, ir=ir, layouts=[site.layout], tags=tags, origin=ORIGIN,
        parent_ids=[p.blueprint_id for p in parents],
        description=(f"{operator} of {' x '.join(p.name for p in parents)} "
                     f"for {site_key(site)}")[:1024])
    bp.blueprint_id = blueprint_id(bp)
    bp.name = child_name(bp.family, bp.blueprint_id)
    return bp


@dataclass
class Evolver:
    """Proposes children of a pool of scored blueprints at one site."""

    config: EvolveConfig = field(default_factory=EvolveConfig)
    mutations: Mapping[str, Operator] = field(default_factory=lambda: dict(MUTATIONS))

    def score_of(self, mean_contribution: float, mean_accuracy_delta: float) -> float:
        """The configured objective of a blueprint's KernelStats."""
        return mean_contribution if self.config.objective == "contribution" else mean_accuracy_delta

    def propose(self, pool: Sequence[Scored], site: seed_pb2.SiteSignature, count: int,
                seed: int, *, known_ids: set[str] | None = None) -> list[Candidate]:
        """Up to `count` children that pass pre-flight, plus every child that failed it.

        Args:
            pool: blueprints that support `site`, with their field-report scores.
            known_ids: blueprint ids already in the library (children equal to one are
                not proposals; they are skipped).

        Raises:
            InvalidArgumentError: an empty pool, or a count outside 1..64.
        """
        check_site(site)
        if not 1 <= count <= 64:
            raise InvalidArgumentError(f"count={count}: must be in [1, 64]", field="count")
        usable = [p for p in pool if site.layout in p.blueprint.layouts]
        if not usable:
            raise InvalidArgumentError(
                f"no blueprint in the pool supports site {site_key(site)}; a proposal needs "
                "a parent (compile the catalog for this site first)", field="site")
        rng = random.Random(seed)
        plans = {p.blueprint_id: plan_ir(p.blueprint.ir, site) for p in usable}
        measured = [p for p in usable if p.outcomes > 0]
        front = pareto_front(measured) if measured else []
        seen = set(known_ids or ()) | {p.blueprint_id for p in usable}
        max_params = int(self.config.max_parameter_ratio * site.channels * site.channels) + \
            max(p.cost for p in usable)
        out: list[Candidate] = []
        passed = 0
        for _ in range(count * self.config.max_attempts_per_proposal):
            if passed >= count:
                break
            made = self._one(usable, front, plans, site, rng)
            if made is None:
                continue
            ir, parents, operator = made
            child = make_child(ir, parents, operator, site)
            if child.blueprint_id in seen:
                continue
            seen.add(child.blueprint_id)
            rejection, params = preflight(child, site, seed=rng.randrange(1 << 31))
            if not rejection and params > max_params:
                rejection = (f"{params} parameters at {site_key(site)} exceed Karn's bound "
                             f"{max_params} (max_parameter_ratio={self.config.max_parameter_ratio})")
            out.append(Candidate(child, operator, rejection, params))
            passed += not rejection
        return out

    def _pick(self, usable: Sequence[Scored], front: Sequence[Scored], rng: random.Random
              ) -> Scored:
        if front and rng.random() >= self.config.explore_rate:
            return rng.choice(list(front))
        return rng.choice(list(usable))

    def _one(self, usable: Sequence[Scored], front: Sequence[Scored],
             plans: Mapping[str, IRPlan], site: seed_pb2.SiteSignature, rng: random.Random
             ) -> tuple[blueprint_pb2.BlueprintIR, list[blueprint_pb2.Blueprint], str] | None:
        a = self._pick(usable, front, rng)
        if len(usable) > 1 and rng.random() < self.config.crossover_rate:
            others = [p for p in usable if p.blueprint_id != a.blueprint_id]
            b = self._pick([p for p in others], [p for p in front if p in others], rng)
            ir = crossover(a.blueprint.ir, plans[a.blueprint_id], b.blueprint.ir,
                           plans[b.blueprint_id], rng)
            return None if ir is None else (ir, [a.blueprint, b.blueprint], "crossover")
        name = rng.choice(sorted(self.mutations))
        ir = self.mutations[name](a.blueprint.ir, plans[a.blueprint_id], rng)
        return None if ir is None else (ir, [a.blueprint], f"mutate:{name}")


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from stable parts (used when a request asks for seed 0)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
