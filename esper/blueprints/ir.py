"""Blueprint IR: site signatures, validation with shape inference, canonical bytes and ids."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from esper.blueprints.ops import NC, NCHW, NCL, NLD, OPS, OpContext, Shape, coerce_attrs
from esper.errors import BlueprintError
from generated.esper.common.v1 import blueprint_pb2, seed_pb2

IR_VERSION = 1
MAX_NODES = 256
"""Matches the `max_items` rule on `BlueprintIR.nodes` in the proto."""
MAX_PARAMS = 1 << 24
"""Parameters one seed may have (16.8 M); a larger blueprint is refused before it is built."""
INPUT = "input"
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
# Node modules live in an nn.ModuleDict; a name equal to one of its attributes cannot be a key.
_RESERVED = frozenset(n for n in dir(nn.ModuleDict) if _NAME.match(n)) | {INPUT}

_LAYOUT_NAMES = {"NC": NC, "NCL": NCL, "NCHW": NCHW, "NLD": NLD}
_LAYOUT_RANK = {NC: 1, NCL: 2, NCHW: 3, NLD: 2}
_LAYOUT_SPATIAL = {NC: 0, NCL: 1, NCHW: 2, NLD: 1}


def layout_name(layout: int) -> str:
    return seed_pb2.ActivationLayout.Name(layout).removeprefix("ACTIVATION_LAYOUT_")


def site_signature(layout: str | int, channels: int, spatial: tuple[int, ...] | list[int] = (),
                   *, dtype: int = seed_pb2.D_TYPE_FLOAT32) -> seed_pb2.SiteSignature:
    """Build and check a SiteSignature.

    Args:
        layout: "NC", "NCL", "NCHW", "NLD" or an `ActivationLayout` value.
        channels: channels (model width for NLD).
        spatial: (L,), (H, W) or (L,) for NLD; 0 marks an extent that varies; may be empty.
    """
    if isinstance(layout, str):
        if layout.upper() not in _LAYOUT_NAMES:
            raise BlueprintError(f"layout {layout!r} unknown; allowed: {sorted(_LAYOUT_NAMES)}",
                                 field="site.layout")
        layout = _LAYOUT_NAMES[layout.upper()]
    site = seed_pb2.SiteSignature(layout=layout, channels=channels, spatial=list(spatial),
                                  dtype=dtype)
    check_site(site)
    return site


def check_site(site: seed_pb2.SiteSignature) -> None:
    if site.layout not in _LAYOUT_RANK:
        raise BlueprintError(f"site layout {site.layout} unknown; allowed: "
                             f"{[layout_name(v) for v in _LAYOUT_RANK]}", field="site.layout")
    if not 1 <= site.channels <= 65536:
        raise BlueprintError(f"site channels={site.channels} must be in [1, 65536]",
                             field="site.channels")
    n = len(site.spatial)
    if n not in (0, _LAYOUT_SPATIAL[site.layout]):
        raise BlueprintError(
            f"site spatial={list(site.spatial)} has {n} extents; layout "
            f"{layout_name(site.layout)} takes 0 or {_LAYOUT_SPATIAL[site.layout]}",
            field="site.spatial")
    if any(s > 65536 for s in site.spatial):
        raise BlueprintError(f"site spatial={list(site.spatial)} exceeds 65536",
                             field="site.spatial")


def site_shape(site: seed_pb2.SiteSignature) -> Shape:
    """Per-sample shape of the site's activation (None for extents that vary)."""
    spatial: list[int | None] = [s or None for s in site.spatial]
    spatial += [None] * (_LAYOUT_SPATIAL[site.layout] - len(spatial))
    if site.layout == NLD:
        return (spatial[0], site.channels)
    return (site.channels, *spatial)


def site_key(site: seed_pb2.SiteSignature) -> str:
    """Stable text form of a site, e.g. "NCHW:16:8x8:FLOAT32"."""
    spatial = "x".join(str(s) for s in site.spatial) or "-"
    dtype = seed_pb2.DType.Name(site.dtype).removeprefix("D_TYPE_")
    return f"{layout_name(site.layout)}:{site.channels}:{spatial}:{dtype}"


@dataclass(frozen=True)
class PlannedNode:
    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: dict[str, Any]
    in_shapes: tuple[Shape, ...]
    out_shape: Shape
    params: dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class IRPlan:
    """A validated IR for one site: nodes in execution order with shapes and parameters."""

    nodes: tuple[PlannedNode, ...]
    output: str
    context: OpContext
    input_shape: Shape

    @property
    def parameter_count(self) -> int:
        total = 0
        for n in self.nodes:
            for shape in n.params.values():
                size = 1
                for d in shape:
                    size *= d
                total += size
        return total

    def tensor_specs(self) -> dict[str, tuple[int, ...]]:
        """State-dict name → shape of every parameter the built module will hold."""
        return {f"nodes.{n.name}.{p}": shape for n in self.nodes for p, shape in n.params.items()}


def plan_ir(ir: blueprint_pb2.BlueprintIR, site: seed_pb2.SiteSignature, *,
            max_params: int = MAX_PARAMS) -> IRPlan:
    """Validate `ir` for `site` and return its execution plan.

    Checks: version, node count, names (pattern, unique, not reserved), ops on the
    allowlist and allowed for the layout, attributes against their schema, inputs exist,
    the graph is acyclic and every node feeds the output, shapes infer and the output
    shape equals the input shape, the parameter bound, and that the output is exactly
    zero at initialisation (so inserting the seed is function-preserving).

    Raises:
        BlueprintError: naming the node and what is allowed.
    """
    check_site(site)
    if ir.ir_version != IR_VERSION:
        raise BlueprintError(f"ir_version={ir.ir_version} unsupported; only {IR_VERSION}",
                             field="ir.ir_version")
    if not 1 <= len(ir.nodes) <= MAX_NODES:
        raise BlueprintError(f"IR has {len(ir.nodes)} nodes; allowed 1..{MAX_NODES}",
                             field="ir.nodes")
    ctx = OpContext(layout=site.layout, site_channels=site.channels)
    by_name: dict[str, blueprint_pb2.IRNode] = {}
    for node in ir.nodes:
        if not _NAME.match(node.name):
            raise BlueprintError(f"node name {node.name!r} must match {_NAME.pattern}",
                                 field="ir.nodes.name")
        if node.name in _RESERVED:
            raise BlueprintError(f"node name {node.name!r} is reserved; choose another",
                                 field="ir.nodes.name")
        if node.name in by_name:
            raise BlueprintError(f"node name {node.name!r} is used twice", field="ir.nodes.name")
        if node.op not in OPS:
            raise BlueprintError(f"node {node.name!r}: op {node.op!r} is not on the allowlist; "
                                 f"allowed: {sorted(OPS)}", field="ir.nodes.op")
        op = OPS[node.op]
        if ctx.layout not in op.layouts:
            raise BlueprintError(
                f"node {node.name!r}: op {node.op!r} does not apply to layout "
                f"{layout_name(ctx.layout)}; it takes {sorted(layout_name(x) for x in op.layouts)}",
                field="ir.nodes.op")
        if not op.min_inputs <= len(node.inputs) <= op.max_inputs:
            raise BlueprintError(f"node {node.name!r}: op {node.op!r} takes "
                                 f"{op.min_inputs}..{op.max_inputs} inputs, got {len(node.inputs)}",
                                 field="ir.nodes.inputs")
        by_name[node.name] = node
    for node in ir.nodes:
        for src in node.inputs:
            if src != INPUT and src not in by_name:
                raise BlueprintError(f"node {node.name!r}: input {src!r} is neither 'input' nor "
                                     f"a node", field="ir.nodes.inputs")
    if ir.output not in by_name:
        raise BlueprintError(f"output {ir.output!r} is not a node; nodes: {sorted(by_name)}",
                             field="ir.output")

    order = _toposort(ir, by_name)
    needed = _ancestors(ir.output, by_name)
    unused = [n.name for n in ir.nodes if n.name not in needed]
    if unused:
        raise BlueprintError(f"nodes {unused} do not feed the output {ir.output!r}; remove them",
                             field="ir.nodes")

    input_shape = site_shape(site)
    shapes: dict[str, Shape] = {INPUT: input_shape}
    zero: dict[str, bool] = {INPUT: False}
    planned: list[PlannedNode] = []
    for name in order:
        node = by_name[name]
        op = OPS[node.op]
        attrs = coerce_attrs(name, op, dict(node.attrs))
        in_shapes = [shapes[s] for s in node.inputs]
        out = op.infer(ctx, in_shapes, attrs, name)
        params = op.params(ctx, in_shapes, attrs)
        shapes[name] = out
        zero[name] = op.zero_out(attrs, [zero[s] for s in node.inputs])
        planned.append(PlannedNode(name, node.op, tuple(node.inputs), attrs, tuple(in_shapes),
                                   out, params))
    if shapes[ir.output] != input_shape:
        raise BlueprintError(f"output {ir.output!r} has per-sample shape {shapes[ir.output]}; "
                             f"a seed must return the site's shape {input_shape}",
                             field="ir.output")
    plan = IRPlan(tuple(planned), ir.output, ctx, input_shape)
    if plan.parameter_count > max_params:
        raise BlueprintError(f"blueprint has {plan.parameter_count} parameters at this site; "
                             f"the bound is {max_params}", field="ir.nodes")
    if not zero[ir.output]:
        raise BlueprintError(
            f"output {ir.output!r} is not zero at initialisation, so inserting the seed would "
            "change the model; zero-initialise the output side (zero_init=true on the last "
            "linear/conv, or a scale with init 0)", field="ir.output")
    return plan


def validate_ir(ir: blueprint_pb2.BlueprintIR, site: seed_pb2.SiteSignature, *,
                max_params: int = MAX_PARAMS) -> None:
    """Raise BlueprintError unless `ir` is a valid, function-preserving seed for `site`."""
    plan_ir(ir, site, max_params=max_params)


def _toposort(ir: blueprint_pb2.BlueprintIR, by_name: dict[str, Any]) -> list[str]:
    indegree = {n.name: sum(1 for s in n.inputs if s != INPUT) for n in ir.nodes}
    users: dict[str, list[str]] = {n.name: [] for n in ir.nodes}
    for n in ir.nodes:
        for s in n.inputs:
            if s != INPUT:
                users[s].append(n.name)
    # Kahn's algorithm, keeping the declaration order among ready nodes for stable plans.
    ready = [n.name for n in ir.nodes if indegree[n.name] == 0]
    order: list[str] = []
    while ready:
        name = ready.pop(0)
        order.append(name)
        for u in users[name]:
            indegree[u] -= 1
            if indegree[u] == 0:
                ready.append(u)
    if len(order) != len(by_name):
        cyclic = sorted(n for n, d in indegree.items() if d > 0)
        raise BlueprintError(f"IR has a cycle through nodes {cyclic}; a blueprint must be acyclic",
                             field="ir.nodes.inputs")
    return order


def _ancestors(output: str, by_name: dict[str, blueprint_pb2.IRNode]) -> set[str]:
    seen: set[str] = set()
    stack = [output]
    while stack:
        name = stack.pop()
        if name in seen or name == INPUT:
            continue
        seen.add(name)
        stack.extend(by_name[name].inputs)
    return seen


def canonical_ir(ir: blueprint_pb2.BlueprintIR) -> dict[str, Any]:
    """A plain, order-stable description of the IR (attrs sorted, values typed)."""
    nodes = []
    for n in ir.nodes:
        attrs = {}
        for k in sorted(n.attrs):
            which = n.attrs[k].WhichOneof("value")
            attrs[k] = [which, getattr(n.attrs[k], which) if which else None]
        nodes.append({"name": n.name, "op": n.op, "inputs": list(n.inputs), "attrs": attrs})
    return {"ir_version": ir.ir_version, "nodes": nodes, "output": ir.output}


def canonical_bytes(bp: blueprint_pb2.Blueprint) -> bytes:
    """Bytes the blueprint id is computed over: the canonical IR and the family.

    JSON with sorted keys rather than protobuf bytes, whose encoding is not guaranteed
    stable across library versions.
    """
    doc = {"family": bp.family, "ir": canonical_ir(bp.ir)}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def blueprint_id(bp: blueprint_pb2.Blueprint) -> str:
    """Content address "bp-<16 hex>" of a blueprint (same in every process)."""
    return "bp-" + hashlib.sha256(canonical_bytes(bp)).hexdigest()[:16]


def supports(bp: blueprint_pb2.Blueprint, site: seed_pb2.SiteSignature) -> bool:
    """Whether `bp` declares the site's layout and its IR validates for the site."""
    if site.layout not in bp.layouts:
        return False
    try:
        plan_ir(bp.ir, site)
    except BlueprintError:
        return False
    return True
