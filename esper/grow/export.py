"""Take the grown model away: a plain `nn.Module` with fossilized seeds folded in.

    plain = esper.grow.fold(mm)                 # no hooks, no slots; torch.export / torch.save work
    esper.grow.export(mm, "out/")               # out/model.safetensors + out/manifest.json
    again = esper.grow.load_exported(MyNet(), "out/")   # a freshly constructed host

Folding replaces each fossilized site's module in a *copy* of the host by what a
`FoldRule` of the slot's kind builds. Each kind has one catch-all rule and may have
specialised rules, tried first, that apply only to some seeds at some sites:

* output slots (`y = h + s(h)`): "residual", a `SeedResidual` running the site module and
  then its seed;
* parallel slots (`y = m(x) + s(x)`), tried in this order:
  - "width-merge": a width seed (`linear → act → linear`, the `width` family) over a span
    `Linear → act → Linear` with the same activation becomes the wider plain layers: the
    seed's first linear adds rows (and bias entries) to the first Linear, its second
    linear adds columns to the second (its bias is added to the second's bias). The
    exported model is a plain MLP with wider layers, not a branch;
  - "lora-merge": a LoRA seed (one `lowrank` node, the `lora` family) at a single
    `nn.Linear` merges into its weight, `W + B·A` (PEFT's `merge_and_unload`);
  - "branch" (catch-all): a `SeedParallel` running the module and the seed side by side on
    the module's input. A span of children (`"blocks.0:2"`) folds into one `nn.Sequential`
    at its first child's place (the other children become `nn.Identity`: the span ran as
    a chain).

Merges work through earlier merges at the same layers: two width seeds over the spans
`fc1:fc2` and `fc2:head` of one MLP widen both hidden layers (the second seed read the
first hidden layer's original units, so its rows get zero weights for the units the
first seed added; appended units always come last). A fold that would read an activation
an earlier fold changed (a branch starting inside a widened layer, a residual after a
widened activation, a span over children an earlier branch made `nn.Identity`) is an
`ExportError` naming both slots, never a silently wrong model.

`register_fold_rule` adds rules (`FoldRule(name, fold, rebuild, applies=...)`).

The manifest (JSON) says, per fossilized site: the slot kind and the fold rule used, the
kernel and blueprint ids, the site signature and the blueprint IR the seed is rebuilt from
(never code: the IR's ops come from the allowlist), and for merges the shapes of the
layers the merge rebuilt (`"folded"`: module name → type, in/out features, bias), since
they differ from the freshly constructed host's; and every tensor of the weights file
(name, shape, dtype) with the file's SHA-256. The weights file's own metadata holds the
SHA-256 of the manifest's contents, so editing either file is detected. Loading never
unpickles: the module is rebuilt from the host you construct plus the IR, each site by
the same rule in the same order as at export, and its weights are read with safetensors
after every name, shape and dtype was checked.

Other ways to take a model away, and what they keep:
* `mm.host.state_dict()` — the host's own weights only (seeds live in the slots);
* `mm.state_dict()` — host + slots, with one `_extra_state` dict per slot (not a pure
  tensor map: store those as JSON, as Tolaria's checkpoints do);
* `torch.save(mm)` — the whole wrapped model, pickled (load it only from files you wrote);
* `mm.remove_hooks()` — refuses while a seed is fossilized (it would drop it); fold instead.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from google.protobuf import json_format
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from esper.blueprints import BlueprintModule, build_module, plan_ir
from esper.blueprints.attrs import set_attr
from esper.blueprints.ir import canonical_ir
from esper.blueprints.ops import NC, NLD
from esper.errors import ArtifactError, FailedPreconditionError
from esper.fsutil import atomic_write
from esper.kasmina import MorphogeneticModel, SeedStage, SlotKind
from esper.kasmina.stages import LIVE_STAGES
from generated.esper.common.v1 import blueprint_pb2, seed_pb2

FORMAT = "esper.grow.export/1"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
MAX_MANIFEST_BYTES = 16 << 20
_MANIFEST_SHA_KEY = "esper.export.manifest_sha256"

Live = Literal["refuse", "drop"]


class ExportError(ArtifactError):
    """An export is malformed or was tampered with; nothing of it is loaded."""

    reason = "EXPORT_INVALID"


Folded = nn.Module | Sequence[nn.Module]
"""What a rule's `fold`/`rebuild` returns: one module that replaces the site (a span's
first child; the other children become `nn.Identity`), or one module per child of the
span, in order, each put at its child's place (the merges)."""


@dataclass(frozen=True)
class FoldRule:
    """How a seed of one slot kind becomes part of a plain model.

    `fold(site_module, seed)` returns what replaces the site in the folded copy (both
    arguments are copies the rule may modify or absorb; a span arrives as an
    `nn.Sequential` of its children). `rebuild(site_module, seed)` returns the same
    structure from a freshly constructed site module and a seed rebuilt from its IR, so
    that the exported weights load into it. `applies(site_module, seed)`: None for the
    kind's catch-all rule; else the rule is used only where it returns True (it is tried
    before the catch-all, in registration order).
    """

    name: str
    fold: Callable[[nn.Module, nn.Module], Folded]
    rebuild: Callable[[nn.Module, nn.Module], Folded]
    applies: Callable[[nn.Module, nn.Module], bool] | None = None


_RULES: dict[str, list[FoldRule]] = {}


def register_fold_rule(kind: str, rule: FoldRule, *, replace: bool = False) -> None:
    """Declare how seeds of slot kind `kind` are folded (and rebuilt on load).

    A catch-all rule (`applies=None`) is the kind's fallback; a specialised rule is tried
    before it, after the specialised rules registered earlier.

    Raises:
        ValueError: the kind already has a rule of this name, or (for a catch-all) a
            catch-all, and `replace` is False.
    """
    rules = _RULES.setdefault(kind, [])
    clash = [r for r in rules if r.name == rule.name or (rule.applies is None and r.applies is None)]
    if clash and not replace:
        raise ValueError(f"a fold rule for slot kind {kind!r} exists ({clash[0].name}); "
                         "pass replace=True to replace it")
    rules[:] = [r for r in rules if r not in clash]
    if rule.applies is None:
        rules.append(rule)
    else:
        at = next((i for i, r in enumerate(rules) if r.applies is None), len(rules))
        rules.insert(at, rule)


def fold_rule(kind: str, name: str | None = None) -> FoldRule:
    """The rule of slot kind `kind` named `name` (None: the kind's catch-all).

    Raises:
        ExportError: no such rule is registered.
    """
    rules = _RULES.get(kind, [])
    for r in rules:
        if (r.name == name) if name is not None else r.applies is None:
            return r
    if not rules:
        raise ExportError(f"no fold rule for slot kind {kind!r}; registered: {sorted(_RULES)} "
                          "(esper.grow.export.register_fold_rule adds one)")
    raise ExportError(f"slot kind {kind!r} has no fold rule {name!r}; its rules: "
                      f"{[r.name for r in rules]}")


def choose_rule(kind: str, site: nn.Module, seed: nn.Module) -> FoldRule:
    """The first of the kind's rules that applies to this seed at this site.

    Raises:
        ExportError: the kind has no rule that applies.
    """
    rules = _RULES.get(kind, [])
    for r in rules:
        if r.applies is None or r.applies(site, seed):
            return r
    raise ExportError(f"no fold rule of slot kind {kind!r} applies to the seed "
                      f"{type(seed).__name__} at {type(site).__name__} (rules: "
                      f"{[r.name for r in rules] or 'none'}; register a catch-all with "
                      "esper.grow.export.register_fold_rule)")


class _Folded(nn.Module):
    """A site module with its seed folded in; reads of other attributes reach the module."""

    def __init__(self, module: nn.Module, seed: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.seed = seed

    def __getattr__(self, name: str) -> Any:
        # The host may read attributes of the module it thinks is there (TransformerEncoder
        # reads `layers[0].self_attn`); they are the wrapped module's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("module")
            if inner is None:
                raise
            return getattr(inner, name)


class SeedResidual(_Folded):
    """An output slot's site followed by its fossilized seed: `y = h + seed(h)`, `h = module(x)`."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = self.module(*args, **kwargs)
        return h + self.seed(h)


class SeedParallel(_Folded):
    """A parallel slot's module beside its fossilized seed: `y = module(x) + seed(x)`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x) + self.seed(x)


# ---- merges: width and LoRA seeds become the plain layers they extend ------------------

_ACTIVATIONS: dict[str, Callable[[nn.Module], bool]] = {
    "relu": lambda m: type(m) is nn.ReLU,
    "gelu": lambda m: type(m) is nn.GELU and m.approximate == "none",
    "silu": lambda m: type(m) is nn.SiLU,
    "tanh": lambda m: type(m) is nn.Tanh,
    "identity": lambda m: type(m) is nn.Identity,
}
"""Blueprint unary op → the host activation module computing exactly the same function."""


def _plan(seed: nn.Module) -> Any:
    """The seed's validated plan when it is a blueprint module over the channel (last) axis."""
    if not isinstance(seed, BlueprintModule) or seed.plan.context.layout not in (NC, NLD):
        return None
    return seed.plan


def _width_nodes(seed: nn.Module) -> tuple[str, str, str] | None:
    """(first linear, activation, second linear) node names of a width seed, else None."""
    plan = _plan(seed)
    if plan is None or len(plan.nodes) != 3:
        return None
    a, act, b = plan.nodes
    chain = a.inputs == ("input",) and act.inputs == (a.name,) and b.inputs == (act.name,)
    if not (chain and plan.output == b.name and a.op == "linear" and b.op == "linear"
            and act.op in _ACTIVATIONS):
        return None
    return a.name, act.name, b.name


def _is_linear(m: nn.Module) -> bool:
    # Exactly nn.Linear: a subclass may compute something else in its forward.
    return type(m) is nn.Linear


def _width_applies(site: nn.Module, seed: nn.Module) -> bool:
    nodes = _width_nodes(seed)
    if nodes is None or not isinstance(site, nn.Sequential) or len(site) != 3:
        return False
    first, act, second = site
    seed_act = seed.plan.nodes[1].op
    hidden = seed.nodes[nodes[0]].weight
    out = seed.nodes[nodes[2]].weight
    return (_is_linear(first) and _is_linear(second) and _ACTIVATIONS[seed_act](act)
            and first.out_features == second.in_features
            and hidden.shape[1] <= first.in_features and out.shape[0] <= second.out_features)


def _bias(*parts: tuple[torch.Tensor | None, int]) -> torch.Tensor | None:
    """Biases side by side (zeros where a part has none), or None when no part has one."""
    if all(b is None for b, _ in parts):
        return None
    ref = next(b for b, _ in parts if b is not None)
    return torch.cat([b if b is not None else ref.new_zeros(n) for b, n in parts])


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


@torch.no_grad()
def merge_width(site: nn.Module, seed: nn.Module) -> list[nn.Module]:
    """`[Linear, act, Linear]` + a width seed → the same layers with the seed's k units added.

    First layer: the seed's hidden rows appended (zero weights for inputs the seed did not
    read: units an earlier merge appended to this layer's input). Second layer: the seed's
    output columns appended (zero rows for outputs the seed did not write: units an earlier
    merge appended), its bias added to the layer's.
    """
    first, act, second = site
    a, _, b = _width_nodes(seed)
    wa, ba = seed.nodes[a].weight, seed.nodes[a].bias
    wb, bb = seed.nodes[b].weight, seed.nodes[b].bias
    k = wa.shape[0]
    wa = torch.nn.functional.pad(wa, (0, first.in_features - wa.shape[1]))
    wb = torch.nn.functional.pad(wb, (0, 0, 0, second.out_features - wb.shape[0]))
    if bb is not None:
        bb = torch.nn.functional.pad(bb, (0, second.out_features - bb.shape[0]))
    wide_first = _linear(torch.cat([first.weight, wa.to(first.weight)]),
                         _bias((first.bias, first.out_features), (ba, k)))
    if second.bias is None and bb is None:
        bias2 = None
    else:
        bias2 = (second.bias if second.bias is not None else torch.zeros_like(bb)) + (
            bb.to(second.weight) if bb is not None else 0)
    wide_second = _linear(torch.cat([second.weight, wb.to(second.weight)], dim=1), bias2)
    return [wide_first, act, wide_second]


def _lora_applies(site: nn.Module, seed: nn.Module) -> bool:
    plan = _plan(seed)
    if plan is None or len(plan.nodes) != 1 or not _is_linear(site):
        return False
    (n,) = plan.nodes
    if n.op != "lowrank" or n.inputs != ("input",) or plan.output != n.name:
        return False
    m = seed.nodes[n.name]
    return m.down.shape[1] <= site.in_features and m.up.shape[0] <= site.out_features


@torch.no_grad()
def merge_lora(site: nn.Module, seed: nn.Module) -> nn.Linear:
    """A Linear + a LoRA seed → one Linear with `W + B·A` (and the seed's bias, if any)."""
    (n,) = seed.plan.nodes
    m = seed.nodes[n.name]
    delta = (m.up @ m.down).to(site.weight)
    weight = site.weight.clone()
    weight[: delta.shape[0], : delta.shape[1]] += delta
    bias = site.bias.clone() if site.bias is not None else None
    if m.bias is not None:
        bias = weight.new_zeros(site.out_features) if bias is None else bias
        bias[: m.bias.shape[0]] += m.bias.to(bias)
    return _linear(weight, bias)


register_fold_rule("output", FoldRule("residual", fold=SeedResidual, rebuild=SeedResidual))
register_fold_rule("parallel", FoldRule("branch", fold=SeedParallel, rebuild=SeedParallel))
register_fold_rule("parallel", FoldRule("width-merge", fold=merge_width, rebuild=merge_width,
                                        applies=_width_applies))
register_fold_rule("parallel", FoldRule("lora-merge", fold=merge_lora, rebuild=merge_lora,
                                        applies=_lora_applies))


def slot_kind(slot: Any) -> str:
    """The slot's kind as a rule key: "output" or "parallel"."""
    return "parallel" if getattr(slot, "kind", SlotKind.OUTPUT) is SlotKind.PARALLEL else "output"


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


def _span(root: nn.Module, slot_id: str) -> tuple[nn.Module, list[str]]:
    """The container and child names a slot covers: one child, or a span `<c>.<first>:<last>`.

    Raises:
        ExportError: the slot id names no module (or span of children) of `root`.
    """
    try:
        if ":" not in slot_id:
            parent, child = _parent(root, slot_id)
            if child not in dict(parent.named_children()):
                raise AttributeError(slot_id)
            return parent, [child]
        head, _, last = slot_id.partition(":")
        container, _, first = head.rpartition(".")
        parent = root.get_submodule(container) if container else root
        names = [n for n, _ in parent.named_children()]
        i, j = names.index(first), names.index(last)
    except (AttributeError, ValueError) as e:
        raise ExportError(f"site {slot_id!r} is not a module or span of {type(root).__name__}") from e
    return parent, names[i:j + 1]


class _Folding:
    """Replaces sites of one model copy in data-flow order, and refuses a fold that would
    read an activation an earlier fold changed (what the seed read in the wrapped model
    is no longer there). `widened` activations only gained units at the end, which merges
    handle (their first layer gets zero weights for the units it never read)."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.inputs: dict[str, str] = {}
        """Module name → slot whose fold changed what this module reads."""
        self.outputs: dict[str, str] = {}
        """Module name → slot whose fold changed what this module returns."""
        self.widened: set[str] = set()

    def site(self, slot_id: str) -> tuple[nn.Module, nn.Module, list[str]]:
        """(parent, the site module or the span as nn.Sequential, child names)."""
        parent, children = _span(self.root, slot_id)
        modules = [getattr(parent, c) for c in children]
        return parent, modules[0] if len(modules) == 1 else nn.Sequential(*modules), children

    def _check(self, slot_id: str, names: list[str], *, reads_output: bool, merge: bool) -> None:
        first = names[0]
        if reads_output:
            earlier = self.outputs.get(first)
            what = f"the output of {first!r}"
        else:
            earlier = self.inputs.get(first)
            if merge and first in self.widened:
                earlier = None
            what = f"the input of {first!r}"
        inner = [n for n in names[1:] if n in self.inputs] if merge else []
        if earlier is None and inner:
            earlier, what = self.inputs[inner[0]], f"the input of {inner[0]!r}"
        if earlier is not None:
            raise ExportError(
                f"slot {slot_id!r} reads {what}, which the fold of slot {earlier!r} changed; "
                "these two seeds cannot be folded into one plain model (export the wrapped "
                "model's state_dict instead, or fossilize only one of them)")

    def apply(self, slot_id: str, kind: str, rule: FoldRule, seed: nn.Module, *,
              rebuild: bool) -> None:
        parent, site, children = self.site(slot_id)
        names = _module_names(slot_id, children)
        merged = (rule.rebuild if rebuild else rule.fold)(site, seed)
        if isinstance(merged, nn.Module):
            self._check(slot_id, names, reads_output=kind == "output", merge=False)
            setattr(parent, children[0], merged)
            for c in children[1:]:
                setattr(parent, c, nn.Identity())
            for n in names[1:]:
                self.inputs[n] = slot_id
            for n in names[:-1]:
                self.outputs[n] = slot_id
            return
        merged = list(merged)
        if len(merged) != len(children):
            raise ExportError(f"fold rule {rule.name!r} returned {len(merged)} modules for the "
                              f"{len(children)} children of {slot_id!r}")
        self._check(slot_id, names, reads_output=False, merge=True)
        old = [getattr(parent, c) for c in children]
        for c, m in zip(children, merged, strict=True):
            setattr(parent, c, m)
        # A merge keeps the span's function; the layers inside it gained units at the end.
        for i, n in enumerate(names):
            if i > 0:
                self.inputs[n] = slot_id
                self.widened.add(n)
            if i < len(names) - 1 and (merged[i] is not old[i] or i > 0):
                self.outputs[n] = slot_id


def _module_names(slot_id: str, children: list[str]) -> list[str]:
    """Full module names of a site's children (`"blocks.0:2"` → blocks.0, blocks.1, ...)."""
    head = slot_id.partition(":")[0] if ":" in slot_id else slot_id
    prefix = head.rpartition(".")[0]
    return [f"{prefix}.{c}" if prefix else c for c in children]


def _linear_shapes(root: nn.Module, slot_id: str) -> dict[str, tuple[int, int, bool]]:
    """Module name → (in, out, bias) of every nn.Linear among a site's children."""
    parent, children = _span(root, slot_id)
    return {name: (m.in_features, m.out_features, m.bias is not None)
            for c, name in zip(children, _module_names(slot_id, children), strict=True)
            if isinstance(m := getattr(parent, c), nn.Linear)}


def _shape_record(shape: tuple[int, int, bool]) -> dict[str, Any]:
    return {"type": "Linear", "in_features": shape[0], "out_features": shape[1], "bias": shape[2]}


def _check_live(mm: MorphogeneticModel, live: Live) -> None:
    if live not in ("refuse", "drop"):
        raise ValueError(f"live={live!r}; allowed: 'refuse', 'drop'")
    pending = {sid: s.current_stage.name for sid, s in mm.slots.items()
               if s.current_stage in LIVE_STAGES and s.current_stage is not SeedStage.FOSSILIZED}
    if pending and live == "refuse":
        raise FailedPreconditionError(
            f"slot(s) {pending} hold seeds that are not fossilized; fossilize or prune them, "
            "or pass live='drop' to export without them (the exported model then differs from "
            "the wrapped one wherever such a seed is blended in)", reason="SEEDS_IN_FLIGHT")


@dataclass(frozen=True)
class _FoldedSite:
    slot: Any
    rule: FoldRule
    folded: dict[str, Any]


def _fold(mm: MorphogeneticModel, live: Live) -> tuple[nn.Module, list[_FoldedSite]]:
    _check_live(mm, live)
    slots = list(mm.slots.values())
    for s in slots:
        s.remove_hook()
    try:
        plain = copy.deepcopy(mm.host)
    finally:
        for s in slots:
            s.update_hook()
    for p in plain.parameters():
        p.grad = None
    folding = _Folding(plain)
    done = []
    for slot in slots:  # data-flow order of the slots' outputs
        if slot.current_stage is not SeedStage.FOSSILIZED:
            continue
        seed = copy.deepcopy(slot.seed)
        for p in seed.parameters():
            p.grad = None
        kind = slot_kind(slot)
        rule = choose_rule(kind, folding.site(slot.slot_id)[1], seed)
        before = _linear_shapes(plain, slot.slot_id)
        folding.apply(slot.slot_id, kind, rule, seed, rebuild=False)
        after = _linear_shapes(plain, slot.slot_id)
        folded = {n: _shape_record(v) for n, v in after.items() if before.get(n) != v}
        done.append(_FoldedSite(slot=slot, rule=rule, folded=folded))
    return plain, done


def fold(mm: MorphogeneticModel, *, live: Live = "refuse") -> nn.Module:
    """A copy of `mm.host` with every fossilized seed folded in: no hooks, no slots, output
    and parallel slots alike (width and LoRA seeds merged into plain Linear layers where
    the maths allows, see the module docstring).

    Args:
        mm: the wrapped model (unchanged by this call).
        live: what to do with seeds that are not fossilized: "refuse" (raise) or "drop"
            (leave them out).

    Raises:
        FailedPreconditionError: `live="refuse"` and a seed is still in flight.
        ExportError: a slot kind without a fold rule, or two seeds whose folds conflict.
    """
    return _fold(mm, live)[0]


def ir_of(seed: nn.Module, site: seed_pb2.SiteSignature, where: str) -> blueprint_pb2.BlueprintIR:
    """The blueprint IR a seed module was built from (read back from its validated plan).

    Raises:
        ExportError: the seed is not a blueprint module, or its plan does not round-trip.
    """
    if not isinstance(seed, BlueprintModule):
        raise ExportError(
            f"the seed at {where!r} is a {type(seed).__name__}, not a blueprint module; only "
            "seeds built from a blueprint IR can be exported (they are rebuilt from the IR, "
            "never from code)")
    plan = seed.plan
    ir = blueprint_pb2.BlueprintIR(ir_version=1, output=plan.output)
    for n in plan.nodes:
        node = ir.nodes.add(name=n.name, op=n.op, inputs=list(n.inputs))
        for key, value in n.attrs.items():
            if value is None:
                continue  # an unset optional attribute: the op's default again on rebuild
            set_attr(node, key, value if isinstance(value, bool | int | float | str) else str(value))
    if plan_ir(ir, site).tensor_specs() != plan.tensor_specs():
        raise ExportError(f"the seed at {where!r}: its plan does not round-trip through the IR")
    return ir


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# safetensors' header names for torch dtypes.
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


def _core_sha(core: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(core)).hexdigest()


def _header(weights: Path) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """The metadata and the tensor list (name, shape, dtype) of a safetensors file's header."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = []
            for k in sorted(f.keys()):
                sl = f.get_slice(k)
                tensors.append({"name": k, "shape": list(sl.get_shape()), "dtype": sl.get_dtype()})
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ExportError(f"{weights} is not a readable safetensors file: {e}") from e
    return meta, tensors


def export(mm: MorphogeneticModel, directory: str | Path, *, live: Live = "refuse") -> Path:
    """Write the folded model to `directory`: `model.safetensors` and `manifest.json`.

    Returns the manifest's path. Raises what `fold` raises, and `ExportError` for a seed
    that is not a blueprint module or host state that is not tensors.
    """
    plain, folded = _fold(mm, live)
    sites = []
    for f in folded:
        slot = f.slot
        site = slot.site_signature()
        ir = ir_of(slot.seed, site, slot.slot_id)
        entry = {
            "site": slot.slot_id,
            "kind": slot_kind(slot),
            "fold": f.rule.name,
            "kernel_id": slot.kernel_id,
            "blueprint_id": slot.blueprint_id,
            "site_signature": json_format.MessageToDict(site),
            "ir": json_format.MessageToDict(ir),
            "ir_sha256": hashlib.sha256(_canonical(canonical_ir(ir))).hexdigest(),
        }
        if f.folded:
            entry["folded"] = f.folded
        sites.append(entry)
    state = plain.state_dict()
    odd = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise ExportError(f"model state {odd} is not tensors (a module's get_extra_state); "
                          "safetensors holds tensors only")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS
    tmp = out / (WEIGHTS + ".tmp")
    core = {"format": FORMAT, "sites": sites, "host": type(mm.host).__qualname__, "weights": WEIGHTS}
    # Tensors shared between modules (tied weights) are stored once (save_model); the
    # manifest lists what the file's header really holds.
    save_model(plain, str(tmp), metadata={"format": FORMAT, _MANIFEST_SHA_KEY: _core_sha(core)})
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, weights)
    manifest = {**core, "tensors": _header(weights)[1], "weights_sha256": _sha256(weights),
                "weights_size": weights.stat().st_size}
    path = out / MANIFEST
    atomic_write(path, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return path


_MANIFEST_KEYS = {"format", "sites", "host", "weights", "tensors", "weights_sha256", "weights_size"}
_SITE_KEYS = {"site", "kind", "fold", "kernel_id", "blueprint_id", "site_signature", "ir", "ir_sha256"}
_OPTIONAL_SITE_KEYS = {"folded"}
"""Written only for merges, so exports without them read as they always did."""


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ExportError(f"{path} does not exist; an export directory holds {MANIFEST} and {WEIGHTS}")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise ExportError(f"{path} is {size} bytes; a manifest is at most {MAX_MANIFEST_BYTES}")
    try:
        doc = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path} is not JSON: {e}") from e
    if not isinstance(doc, dict) or set(doc) != _MANIFEST_KEYS:
        keys = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise ExportError(f"{path}: manifest keys {keys}; expected {sorted(_MANIFEST_KEYS)}")
    if doc["format"] != FORMAT:
        raise ExportError(f"{path}: format {doc['format']!r}; this version reads {FORMAT!r}")
    if doc["weights"] != WEIGHTS:
        raise ExportError(f"{path}: weights file {doc['weights']!r}; exports name it {WEIGHTS!r}")
    if not isinstance(doc["sites"], list) or not all(
            isinstance(s, dict) and _SITE_KEYS <= set(s) <= _SITE_KEYS | _OPTIONAL_SITE_KEYS
            for s in doc["sites"]):
        raise ExportError(f"{path}: every site entry must have the keys {sorted(_SITE_KEYS)} "
                          f"and may have {sorted(_OPTIONAL_SITE_KEYS)}")
    if not isinstance(doc["tensors"], list) or not all(
            isinstance(t, dict) and set(t) == {"name", "shape", "dtype"} for t in doc["tensors"]):
        raise ExportError(f"{path}: every tensor entry must have exactly name, shape and dtype")
    return doc


def _check_weights(doc: dict[str, Any], weights: Path) -> None:
    if not weights.is_file():
        raise ExportError(f"{weights} does not exist")
    size = weights.stat().st_size
    if size != doc["weights_size"]:
        raise ExportError(f"{weights} is {size} bytes; the manifest says {doc['weights_size']}")
    digest = _sha256(weights)
    if digest != doc["weights_sha256"]:
        raise ExportError(f"{weights} has SHA-256 {digest}; the manifest says "
                          f"{doc['weights_sha256']} (the file or the manifest was changed)")
    core = {k: doc[k] for k in ("format", "sites", "host", "weights")}
    meta, header = _header(weights)
    if meta.get(_MANIFEST_SHA_KEY) != _core_sha(core):
        raise ExportError(f"{weights} was written for another manifest (the manifest's sites "
                          "were changed after export)")
    if header != doc["tensors"]:
        raise ExportError(f"{weights}: its tensors differ from the manifest's list")


def load_exported(host: nn.Module, directory: str | Path) -> nn.Module:
    """Rebuild an exported model onto `host`, a freshly constructed model of the same class.

    `host` is modified in place (its fossilized sites are replaced by their folded
    modules) and returned with the exported weights loaded.

    Raises:
        ExportError: a missing, malformed or tampered manifest or weights file, an IR that
            fails validation, or tensors that do not fit the rebuilt module.
    """
    directory = Path(directory)
    doc = _read_manifest(directory / MANIFEST)
    weights = directory / WEIGHTS
    _check_weights(doc, weights)
    folding = _Folding(host)
    for entry in doc["sites"]:
        where = entry["site"]
        if not isinstance(where, str) or not where:
            raise ExportError(f"site {where!r} of the manifest is not a slot id")
        _span(host, where)
        rule = fold_rule(entry["kind"], entry["fold"])
        try:
            ir = json_format.ParseDict(entry["ir"], blueprint_pb2.BlueprintIR())
            site = json_format.ParseDict(entry["site_signature"], seed_pb2.SiteSignature())
        except json_format.ParseError as e:
            raise ExportError(f"site {where!r}: {e}") from e
        if hashlib.sha256(_canonical(canonical_ir(ir))).hexdigest() != entry["ir_sha256"]:
            raise ExportError(f"site {where!r}: its IR does not match its recorded SHA-256")
        try:
            seed = build_module(ir, site)
        except ArtifactError as e:
            raise ExportError(f"site {where!r}: {e}") from e
        except ValueError as e:  # BlueprintError: the IR fails validation for the site
            raise ExportError(f"site {where!r}: the IR is not valid for its site: {e}") from e
        if rule.applies is not None and not rule.applies(folding.site(where)[1], seed):
            raise ExportError(f"site {where!r} was folded by {rule.name!r}, which does not apply "
                              f"to this host's modules there (another model class or version?)")
        before = _linear_shapes(host, where)
        folding.apply(where, entry["kind"], rule, seed, rebuild=True)
        after = _linear_shapes(host, where)
        rebuilt = {n: _shape_record(v) for n, v in after.items() if before.get(n) != v}
        if rebuilt != entry.get("folded", {}):
            raise ExportError(f"site {where!r}: folding rebuilt layers {rebuilt}, the manifest "
                              f"records {entry.get('folded', {})}")
    state = host.state_dict()
    for t in doc["tensors"]:
        have = state.get(t["name"])
        if have is None:
            raise ExportError(f"tensor {t['name']!r} of the export is not in the rebuilt "
                              f"{type(host).__name__} (another model class or version?)")
        dtype = _ST_DTYPES.get(have.dtype, str(have.dtype))
        if list(have.shape) != t["shape"] or dtype != t["dtype"]:
            raise ExportError(f"tensor {t['name']!r}: the rebuilt model has {list(have.shape)} "
                              f"{dtype}, the export {t['shape']} {t['dtype']}")
    try:
        load_model(host, str(weights), strict=True)
    except RuntimeError as e:
        raise ExportError(f"the weights do not fit the rebuilt {type(host).__name__}: {e}") from e
    return host
