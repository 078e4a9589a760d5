"""Blueprint IR: site signatures, validation with shape inference, canonical bytes and ids."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from esper.blueprints.attrs import typed_attr
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


def _layout_value(layout: str | int, field: str) -> int:
    if isinstance(layout, str):
        if layout.upper() not in _LAYOUT_NAMES:
            raise BlueprintError(f"layout {layout!r} unknown; allowed: {sorted(_LAYOUT_NAMES)}",
                                 field=field)
        return _LAYOUT_NAMES[layout.upper()]
    return layout


def site_signature(layout: str | int, channels: int, spatial: tuple[int, ...] | list[int] = (),
                   *, dtype: int = seed_pb2.D_TYPE_FLOAT32,
                   input: tuple[Any, ...] | seed_pb2.ActivationSpec | None = None,
                   ) -> seed_pb2.SiteSignature:
    """Build and check a SiteSignature.

    Args:
        layout: "NC", "NCL", "NCHW", "NLD" or an `ActivationLayout` value.
        channels: channels (model width for NLD).
        spatial: (L,), (H, W) or (L,) for NLD; 0 marks an extent that varies; may be empty.
        input: for a parallel slot, the tensor the seed reads: `(layout, channels)` or
            `(layout, channels, spatial)` (same dtype as the output) or an `ActivationSpec`.
            None (the default) makes an output slot's signature. The first three arguments
            always describe the activation the seed's output is added to.
    """
    site = seed_pb2.SiteSignature(layout=_layout_value(layout, "site.layout"),
                                  channels=channels, spatial=list(spatial), dtype=dtype)
    if input is not None:
        site.kind = seed_pb2.SLOT_KIND_PARALLEL
        if isinstance(input, seed_pb2.ActivationSpec):
            site.input.CopyFrom(input)
        else:
            if not isinstance(input, (tuple, list)) or len(input) not in (2, 3):
                raise BlueprintError(f"input={input!r} must be (layout, channels[, spatial]) "
                                     "or an ActivationSpec", field="site.input")
            in_spatial = list(input[2]) if len(input) == 3 else []
            site.input.CopyFrom(seed_pb2.ActivationSpec(
                layout=_layout_value(input[0], "site.input.layout"), channels=input[1],
                spatial=in_spatial, dtype=dtype))
    check_site(site)
    return site


def is_parallel(site: seed_pb2.SiteSignature) -> bool:
    """Whether `site` is a parallel slot's (the seed reads the module's input)."""
    return site.kind == seed_pb2.SLOT_KIND_PARALLEL


def _check_activation(spec: seed_pb2.SiteSignature | seed_pb2.ActivationSpec, where: str) -> None:
    if spec.layout not in _LAYOUT_RANK:
        raise BlueprintError(f"{where} layout {spec.layout} unknown; allowed: "
                             f"{[layout_name(v) for v in _LAYOUT_RANK]}", field=f"{where}.layout")
    if not 1 <= spec.channels <= 65536:
        raise BlueprintError(f"{where} channels={spec.channels} must be in [1, 65536]",
                             field=f"{where}.channels")
    n = len(spec.spatial)
    if n not in (0, _LAYOUT_SPATIAL[spec.layout]):
        raise BlueprintError(
            f"{where} spatial={list(spec.spatial)} has {n} extents; layout "
            f"{layout_name(spec.layout)} takes 0 or {_LAYOUT_SPATIAL[spec.layout]}",
            field=f"{where}.spatial")
    if any(s > 65536 for s in spec.spatial):
        raise BlueprintError(f"{where} spatial={list(spec.spatial)} exceeds 65536",
                             field=f"{where}.spatial")


def check_site(site: seed_pb2.SiteSignature) -> None:
    """Raise BlueprintError unless `site` is a well-formed signature of either slot kind."""
    _check_activation(site, "site")
    if site.kind == seed_pb2.SLOT_KIND_UNSPECIFIED:
        if site.HasField("input"):
            raise BlueprintError("site.input is set on an output slot's signature; only a "
                                 "parallel slot (kind SLOT_KIND_PARALLEL) has an input spec",
                                 field="site.input")
        return
    if site.kind != seed_pb2.SLOT_KIND_PARALLEL:
        raise BlueprintError(f"site kind {site.kind} unknown; allowed: "
                             f"{list(seed_pb2.SlotKind.keys())}", field="site.kind")
    if not site.HasField("input"):
        raise BlueprintError("a parallel slot's signature needs site.input (the tensor the "
                             "seed reads)", field="site.input")
    _check_activation(site.input, "site.input")
    if site.input.dtype != site.dtype:
        raise BlueprintError(
            f"site.input dtype {seed_pb2.DType.Name(site.input.dtype)} differs from the "
            f"output's {seed_pb2.DType.Name(site.dtype)}; a seed reads and writes one dtype",
            field="site.input.dtype")


def _shape(spec: seed_pb2.SiteSignature | seed_pb2.ActivationSpec) -> Shape:
    spatial: list[int | None] = [s or None for s in spec.spatial]
    spatial += [None] * (_LAYOUT_SPATIAL[spec.layout] - len(spatial))
    if spec.layout == NLD:
        return (spatial[0], spec.channels)
    return (spec.channels, *spatial)


def site_shape(site: seed_pb2.SiteSignature) -> Shape:
    """Per-sample shape of the tensor the seed reads (None for extents that vary).

    The site's activation for an output slot, the wrapped module's input for a parallel one.
    """
    return _shape(site.input if is_parallel(site) else site)


def site_output_shape(site: seed_pb2.SiteSignature) -> Shape:
    """Per-sample shape the seed must return: the activation its output is added to."""
    return _shape(site)


def _activation_key(spec: seed_pb2.SiteSignature | seed_pb2.ActivationSpec) -> str:
    spatial = "x".join(str(s) for s in spec.spatial) or "-"
    dtype = seed_pb2.DType.Name(spec.dtype).removeprefix("D_TYPE_")
    return f"{layout_name(spec.layout)}:{spec.channels}:{spatial}:{dtype}"


PARALLEL_KEY_SEPARATOR = "->"


def site_key(site: seed_pb2.SiteSignature) -> str:
    """Stable text form of a site, e.g. "NCHW:16:8x8:FLOAT32".

    A parallel slot's key is "<input key>-><output key>", e.g.
    "NC:40:-:FLOAT32->NC:16:-:FLOAT32"; output slots keep the form they always had.
    """
    out = _activation_key(site)
    if is_parallel(site):
        return f"{_activation_key(site.input)}{PARALLEL_KEY_SEPARATOR}{out}"
    return out


def parse_site_key(key: str) -> seed_pb2.SiteSignature:
    """Inverse of `site_key` for either slot kind.

    Raises:
        BlueprintError: `key` is not of the form LAYOUT:CHANNELS:SPATIAL:DTYPE, optionally
            preceded by "<input key>->".
    """
    def parse(part: str) -> tuple[str, int, list[int], int]:
        try:
            layout, channels, spatial, dtype = part.split(":")
            extents = [] if spatial == "-" else [int(s) for s in spatial.split("x")]
            return layout, int(channels), extents, seed_pb2.DType.Value("D_TYPE_" + dtype)
        except ValueError as e:
            raise BlueprintError(
                f"site key {key!r} is not of the form LAYOUT:CHANNELS:SPATIAL:DTYPE, or "
                f"<input>{PARALLEL_KEY_SEPARATOR}<output> for a parallel slot ({e})",
                field="site_key") from e

    parts = key.split(PARALLEL_KEY_SEPARATOR)
    if len(parts) > 2:
        raise BlueprintError(f"site key {key!r} has more than one {PARALLEL_KEY_SEPARATOR!r}",
                             field="site_key")
    layout, channels, spatial, dtype = parse(parts[-1])
    if len(parts) == 1:
        return site_signature(layout, channels, spatial, dtype=dtype)
    in_layout, in_channels, in_spatial, in_dtype = parse(parts[0])
    return site_signature(layout, channels, spatial, dtype=dtype, input=seed_pb2.ActivationSpec(
        layout=_layout_value(in_layout, "site.input.layout"), channels=in_channels,
        spatial=in_spatial, dtype=in_dtype))


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
    """Per-sample shape the seed reads (`site_shape`)."""
    output_shape: Shape | None = None
    """Per-sample shape the seed returns (`site_output_shape`); None = `input_shape`."""

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
    the graph is acyclic and every node feeds the output, shapes infer from the seed's
    input (`site_shape`) to the shape it must return (`site_output_shape`: the same for
    an output slot; a parallel slot's module output, which may differ in channels), the
    parameter bound, and that the output is exactly zero at initialisation (so inserting
    the seed is function-preserving).

    Raises:
        BlueprintError: naming the node and what is allowed.
    """
    check_site(site)
    if is_parallel(site) and site.input.layout != site.layout:
        raise BlueprintError(
            f"parallel site {site_key(site)} changes layout {layout_name(site.input.layout)} "
            f"→ {layout_name(site.layout)}; a blueprint maps within one layout",
            field="site.input.layout")
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
    needed = ancestors(ir, ir.output)
    unused = [n.name for n in ir.nodes if n.name not in needed]
    if unused:
        raise BlueprintError(f"nodes {unused} do not feed the output {ir.output!r}; remove them",
                             field="ir.nodes")

    input_shape = site_shape(site)
    output_shape = site_output_shape(site)
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
    if shapes[ir.output] != output_shape:
        raise BlueprintError(f"output {ir.output!r} has per-sample shape {shapes[ir.output]}; "
                             f"a seed must return the site's shape {output_shape}",
                             field="ir.output")
    plan = IRPlan(tuple(planned), ir.output, ctx, input_shape, output_shape)
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


def ancestors(ir: blueprint_pb2.BlueprintIR, name: str) -> set[str]:
    """`name` and every node it reads from, directly or not (the input excluded).

    Every input must name a node of `ir` or the input (as `plan_ir` checks first).
    """
    by_name = {n.name: n for n in ir.nodes}
    seen: set[str] = set()
    stack = [name]
    while stack:
        cur = stack.pop()
        if cur in seen or cur == INPUT:
            continue
        seen.add(cur)
        stack.extend(by_name[cur].inputs)
    return seen


def canonical_ir(ir: blueprint_pb2.BlueprintIR) -> dict[str, Any]:
    """A plain, order-stable description of the IR (attrs sorted, values typed)."""
    nodes = []
    for n in ir.nodes:
        attrs = {k: typed_attr(n.attrs[k]) for k in sorted(n.attrs)}
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


OUTPUT_SLOT_TAG = "slot-output"
PARALLEL_SLOT_TAG = "slot-parallel"
_SLOT_TAGS = {OUTPUT_SLOT_TAG: seed_pb2.SLOT_KIND_UNSPECIFIED,
              PARALLEL_SLOT_TAG: seed_pb2.SLOT_KIND_PARALLEL}


def slot_kinds(bp: blueprint_pb2.Blueprint) -> frozenset[int]:
    """The `SlotKind`s a blueprint is offered at, from its tags.

    A blueprint tagged "slot-parallel" and/or "slot-output" serves exactly those kinds; one
    with neither tag serves output slots only, as every blueprint did before parallel slots.
    Tags (not the IR) decide because an output slot's residual blueprint would also
    validate at a parallel site whose input and output shapes agree, and offering it there
    would change nothing a user asked for; Karn's children inherit their parents' tags.
    """
    kinds = frozenset(_SLOT_TAGS[t] for t in bp.tags if t in _SLOT_TAGS)
    return kinds or frozenset({seed_pb2.SLOT_KIND_UNSPECIFIED})


def supports(bp: blueprint_pb2.Blueprint, site: seed_pb2.SiteSignature) -> bool:
    """Whether `bp` serves the site's slot kind and layout and its IR validates there.

    For a parallel site the IR must map the site's input shape to its output shape (both
    in one layout), e.g. 40 → 16 channels across a Linear→act→Linear span.
    """
    if site.layout not in bp.layouts or site.kind not in slot_kinds(bp):
        return False
    try:
        plan_ir(bp.ir, site)
    except BlueprintError:
        return False
    return True
