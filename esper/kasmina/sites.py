"""Where seed slots go: site requests, their resolution against the host's module names,
the probe run over `example_input`, and the site signatures it records.

Two kinds of slot (`SlotKind`):

* output (`sites=`): the seed reads the site module's output `h`; `y = h + alpha * s(h)`.
* parallel (`parallel=`, or `Site(..., kind="parallel")`): the slot wraps a module `m`, or
  a contiguous span of a container's children, and the seed reads its input `x`;
  `y = m(x) + alpha * s(x)`. Input and output may differ in channels (a Linear 40 → 16).

A span is written `"<container>.<first>:<last>"` (`"<first>:<last>"` for the root's
children): the children from `first` to `last` inclusive, which must run one after the
other, each feeding the next, as in `nn.Sequential`. The container part is an fnmatch
pattern, so `"blocks.*.mlp.0:2"` asks for one span per matching block. Module names never
contain ":", so a pattern with one is always a span.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch
from torch import nn

from esper.errors import ConfigError
from esper.kasmina.config import KasminaConfig
from generated.esper.common.v1 import seed_pb2


class SlotKind(IntEnum):
    """How a slot attaches to its site; values equal `esper.common.v1.SlotKind`."""

    OUTPUT = seed_pb2.SLOT_KIND_UNSPECIFIED
    """The seed reads the site module's output: `y = h + alpha * s(h)`."""
    PARALLEL = seed_pb2.SLOT_KIND_PARALLEL
    """The seed reads the wrapped module's input: `y = m(x) + alpha * s(x)`."""


_KINDS = {"output": SlotKind.OUTPUT, "parallel": SlotKind.PARALLEL}


@dataclass(frozen=True)
class Site:
    """A request for seed slots of one kind at every module `match` selects.

    `wrap(sites=[...])` takes these next to plain patterns and types (which mean
    `Site(x)`, an output slot); `wrap(parallel=[...])` takes patterns and types meaning
    `Site(x, kind="parallel")`.
    """

    match: str | type[nn.Module]
    """An fnmatch pattern over module names, or an nn.Module type (every module of that
    type); for parallel slots a pattern may name a span, "<container>.<first>:<last>"."""
    kind: str = "output"
    """"output" (the seed reads the module's output) or "parallel" (its input)."""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ConfigError(f"Site.kind={self.kind!r} is not one of: {', '.join(_KINDS)}")
        if isinstance(self.match, str):
            if ":" in self.match and self.kind != "parallel":
                raise ConfigError(
                    f"site {self.match!r} names a span of children; spans are parallel slots "
                    f"only: Site({self.match!r}, kind='parallel') or parallel=[{self.match!r}]"
                )
        elif not (isinstance(self.match, type) and issubclass(self.match, nn.Module)):
            raise ConfigError(
                f"Site.match={self.match!r} is neither a module-name pattern nor an nn.Module type"
            )

    @property
    def slot_kind(self) -> SlotKind:
        return _KINDS[self.kind]


SiteSpec = str | type[nn.Module] | Site


@dataclass(frozen=True)
class SlotPlan:
    """One resolved slot: its id, kind and the host modules it spans (first to last)."""

    slot_id: str
    kind: SlotKind
    modules: tuple[str, ...]
    """Module names: one for an output slot or a single wrapped module, else the span."""

    @property
    def target(self) -> str:
        """The module whose output the slot changes (its forward hook's module)."""
        return self.modules[-1]


def _what(match: str | type[nn.Module]) -> str:
    return match if isinstance(match, str) else match.__name__


def match_modules(named: Sequence[tuple[str, nn.Module]], match: str | type[nn.Module]
                  ) -> list[str]:
    """Names in `named` (model.named_modules() order) an fnmatch pattern or a module type
    selects: the one site-matching rule (Kasmina's slots, the jobs' site lists)."""
    if isinstance(match, str):
        return [n for n, _ in named if fnmatch.fnmatchcase(n, match)]
    return [n for n, m in named if isinstance(m, match)]


def _requests(sites: Sequence[SiteSpec], parallel: Sequence[SiteSpec], available: str
              ) -> list[Site]:
    for name, specs in (("sites", sites), ("parallel", parallel)):
        if isinstance(specs, (str, type, Site)):
            raise ConfigError(
                f"{name}={specs!r} must be a list of module-name patterns, module types and/or "
                f"Site(...) entries; available modules: {available}"
            )
    if not sites and not parallel:
        raise ConfigError(
            f"sites={list(sites)!r} and parallel={list(parallel)!r}: ask for at least one slot "
            f"(module-name patterns and/or module types); available modules: {available}"
        )
    out: list[Site] = []
    for spec, default in [(s, "output") for s in sites] + [(s, "parallel") for s in parallel]:
        if isinstance(spec, Site):
            if default == "parallel" and spec.kind != "parallel":
                raise ConfigError(
                    f"parallel= holds {spec!r}; its entries are parallel slots (pass "
                    "output slots in sites=)"
                )
            out.append(spec)
        elif isinstance(spec, str) or (isinstance(spec, type) and issubclass(spec, nn.Module)):
            out.append(Site(spec, kind=default))
        else:
            raise ConfigError(
                f"site {spec!r} is neither a module-name pattern nor an nn.Module type; "
                f"available modules: {available}"
            )
    return out


def _span_plans(model: nn.Module, named: list[tuple[str, nn.Module]], pattern: str
                ) -> list[SlotPlan]:
    left, last = pattern.split(":", 1)
    container_pat, _, first = left.rpartition(".")
    if not first or not last or ":" in last or "." in last:
        raise ConfigError(
            f"span {pattern!r} must read '<container>.<first>:<last>' (or '<first>:<last>' for "
            "the model's own children), naming two children of one container"
        )
    containers = [("", model)] if not container_pat else [
        (n, m) for n, m in named if fnmatch.fnmatchcase(n, container_pat)]
    plans, seen_children = [], []
    for cname, container in containers:
        children = [n for n, _ in container.named_children()]
        seen_children.append(f"{cname or '(model)'}: {', '.join(children) or '(none)'}")
        if first not in children or last not in children:
            continue
        i, j = children.index(first), children.index(last)
        if j < i:
            raise ConfigError(
                f"span {pattern!r}: child {last!r} comes before {first!r} in "
                f"{cname or 'the model'} (children: {', '.join(children)}); write it first:last"
            )
        prefix = f"{cname}." if cname else ""
        modules = tuple(prefix + c for c in children[i : j + 1])
        slot_id = modules[0] if i == j else f"{prefix}{first}:{last}"
        plans.append(SlotPlan(slot_id, SlotKind.PARALLEL, modules))
    if not plans:
        raise ConfigError(
            f"span {pattern!r} matches no container with children {first!r} and {last!r}; "
            f"containers matched and their children: {'; '.join(seen_children) or '(none)'}"
        )
    return plans


def resolve_sites(model: nn.Module, sites: Sequence[SiteSpec], parallel: Sequence[SiteSpec]
                  ) -> list[SlotPlan]:
    """The slots `sites` (output by default) and `parallel` ask for, in request order.

    Raises:
        ConfigError: a request matches nothing (the message lists the available modules),
            one module is asked for as both kinds, or two slots would change the output of
            the same module (their order would decide the result).
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    available = ", ".join(f"{n} ({type(m).__name__})" for n, m in named)
    chosen: dict[str, SlotPlan] = {}
    for req in _requests(sites, parallel, available):
        kind = req.slot_kind
        if isinstance(req.match, str) and ":" in req.match:
            plans = _span_plans(model, named, req.match)
        else:
            hits = match_modules(named, req.match)
            if not hits:
                raise ConfigError(
                    f"site {_what(req.match)!r} matches no module; available modules: {available}"
                )
            plans = [SlotPlan(h, kind, (h,)) for h in hits]
        for plan in plans:
            prior = chosen.get(plan.slot_id)
            if prior is None:
                chosen[plan.slot_id] = plan
            elif prior.kind is not plan.kind:
                raise ConfigError(
                    f"module {plan.slot_id!r} is asked for as both an output and a parallel "
                    "site; choose one kind for it"
                )
    by_target: dict[str, str] = {}
    for plan in chosen.values():
        other = by_target.setdefault(plan.target, plan.slot_id)
        if other != plan.slot_id:
            raise ConfigError(
                f"slots {other!r} and {plan.slot_id!r} would both change the output of module "
                f"{plan.target!r}; their order would decide the result, so one slot per module "
                "output (drop one, or end the span at another child)"
            )
    return list(chosen.values())


# ---- the probe run ---------------------------------------------------------------------

_NCL_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d, nn.InstanceNorm1d, nn.MaxPool1d,
    nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d,
)
_NLD_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.LayerNorm, nn.Embedding, nn.MultiheadAttention, nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer, nn.RMSNorm,
)
_LAYOUT = {
    "nc": seed_pb2.ACTIVATION_LAYOUT_NC,
    "ncl": seed_pb2.ACTIVATION_LAYOUT_NCL,
    "nchw": seed_pb2.ACTIVATION_LAYOUT_NCHW,
    "nld": seed_pb2.ACTIVATION_LAYOUT_NLD,
}
DTYPES = {
    torch.float32: seed_pb2.D_TYPE_FLOAT32,
    torch.float16: seed_pb2.D_TYPE_FLOAT16,
    torch.bfloat16: seed_pb2.D_TYPE_BFLOAT16,
    torch.float64: seed_pb2.D_TYPE_FLOAT64,
}


def call(model: nn.Module, x: Any) -> Any:
    """`model(x)`, `model(*x)` for a tuple, `model(**x)` for a dict."""
    if isinstance(x, tuple):
        return model(*x)
    if isinstance(x, dict):
        return model(**x)
    return model(x)


def _own_hint(mod: nn.Module) -> str:
    return "ncl" if isinstance(mod, _NCL_TYPES) else "nld" if isinstance(mod, _NLD_TYPES) else ""


@dataclass
class Traced:
    """What the probe run recorded for one slot."""

    order: int
    """Position of the slot's output in data-flow order."""
    output: torch.Tensor
    output_hint: str
    input: torch.Tensor | None = None
    """Parallel slots: the tensor the seed reads."""
    input_hint: str = ""


def trace_sites(model: nn.Module, plans: list[SlotPlan], example_input: Any
                ) -> dict[str, Traced]:
    """Run `example_input` once (eval mode, no autograd): order, tensors and layout hints.

    The layout hint for a 3-d activation comes from the most recent leaf module that
    fixes one (a Conv1d/BatchNorm1d/... means NCL, a Linear/LayerNorm/... means NLD), so an
    activation or dropout after a conv is classified by the conv before it; a parallel
    slot's input takes the hint of its first module, or of the leaf that ran before it.

    Raises:
        ConfigError: a slot's module did not run, returns something other than one tensor,
            (parallel) takes anything other than one floating-point tensor, or (span) its
            children do not run as a chain.
    """
    modules = dict(model.named_modules())
    order: list[str] = []
    outputs: dict[str, tuple[torch.Tensor, str]] = {}
    inputs: dict[str, tuple[torch.Tensor, str]] = {}
    # Spans: the first call's raw input and output of every child, to check the chain.
    seen_in: dict[str, Any] = {}
    seen_out: dict[str, Any] = {}
    last_hint = [""]
    handles = []

    def leaf_hook(mod: nn.Module, _args: Any, _out: Any) -> None:
        hint = _own_hint(mod)
        if hint:
            last_hint[0] = hint

    def output_hook(plan: SlotPlan) -> Callable[..., None]:
        def hook(mod: nn.Module, _args: Any, out: Any) -> None:
            if plan.slot_id in outputs:
                return
            if not isinstance(out, torch.Tensor):
                where = f"site {plan.slot_id!r}" if len(plan.modules) == 1 else (
                    f"span {plan.slot_id!r}: its last child {plan.target!r}")
                raise ConfigError(
                    f"{where} ({type(mod).__name__}) returns {type(out).__name__}; a seed "
                    "slot needs a module whose output is one tensor"
                )
            if plan.kind is SlotKind.PARALLEL and plan.slot_id not in inputs:
                raise ConfigError(
                    f"span {plan.slot_id!r}: child {plan.target!r} ran before "
                    f"{plan.modules[0]!r}; a span's children must run in order"
                )
            order.append(plan.slot_id)
            outputs[plan.slot_id] = (out.detach(), _own_hint(mod) or last_hint[0])

        return hook

    def input_hook(plan: SlotPlan) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if plan.slot_id in inputs:
                return
            first = plan.modules[0]
            ok = len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
            if not ok:
                got = [type(a).__name__ for a in args] + [f"{k}=" for k in kwargs]
                raise ConfigError(
                    f"parallel site {plan.slot_id!r}: module {first!r} ({type(mod).__name__}) "
                    f"is called with ({', '.join(got)}); a parallel slot's seed reads the "
                    "module's input, so it needs a module called with exactly one tensor"
                )
            x = args[0]
            if x.dtype not in DTYPES:
                raise ConfigError(
                    f"parallel site {plan.slot_id!r}: module {first!r} reads a {x.dtype} "
                    f"tensor; a seed reads one of {', '.join(map(str, DTYPES))} (an index "
                    "tensor, e.g. an Embedding's input, cannot feed a seed)"
                )
            inputs[plan.slot_id] = (x.detach(), _own_hint(mod) or last_hint[0])

        return hook

    def chain_pre(name: str) -> Callable[..., None]:
        def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if name not in seen_in:
                seen_in[name] = args[0] if len(args) == 1 and not kwargs else None
        return hook

    def chain_post(name: str) -> Callable[..., None]:
        def hook(_mod: nn.Module, _args: Any, out: Any) -> None:
            seen_out.setdefault(name, out)
        return hook

    try:
        for mod in modules.values():
            if not list(mod.children()) or isinstance(mod, _NCL_TYPES + _NLD_TYPES):
                handles.append(mod.register_forward_hook(leaf_hook))
        for plan in plans:
            if plan.kind is SlotKind.PARALLEL:
                handles.append(modules[plan.modules[0]].register_forward_pre_hook(
                    input_hook(plan), with_kwargs=True))
            if len(plan.modules) > 1:
                for name in plan.modules:
                    handles.append(modules[name].register_forward_pre_hook(
                        chain_pre(name), with_kwargs=True))
                    handles.append(modules[name].register_forward_hook(chain_post(name)))
            handles.append(modules[plan.target].register_forward_hook(output_hook(plan)))
        training = {n: m.training for n, m in modules.items()}
        model.eval()  # no BatchNorm statistics updates, no dropout, from the probe run
        try:
            with torch.no_grad():
                call(model, example_input)
        finally:
            for n, m in modules.items():
                m.training = training[n]
    finally:
        for h in handles:
            h.remove()
    missing = [p.slot_id for p in plans if p.slot_id not in outputs]
    if missing:
        raise ConfigError(
            f"site(s) {', '.join(map(repr, missing))} did not run on example_input; sites that "
            f"ran: {', '.join(order) or '(none)'}"
        )
    for plan in plans:
        for a, b in zip(plan.modules, plan.modules[1:]):
            if seen_in.get(b) is None or seen_in[b] is not seen_out.get(a):
                raise ConfigError(
                    f"span {plan.slot_id!r} is not a chain: child {b!r} does not take child "
                    f"{a!r}'s output as its one input; a span must be children that run one "
                    "after the other, each feeding the next (as in nn.Sequential)"
                )
    out: dict[str, Traced] = {}
    for plan in plans:
        y, y_hint = outputs[plan.slot_id]
        x, x_hint = inputs.get(plan.slot_id, (None, ""))
        out[plan.slot_id] = Traced(order.index(plan.slot_id), y, y_hint, x, x_hint)
    return out


# ---- signatures ------------------------------------------------------------------------


def _layouts_override(slot_id: str, kind: SlotKind, config: KasminaConfig
                      ) -> tuple[str | None, str | None]:
    value = config.layouts.get(slot_id)
    if value is None:
        return None, None
    if "->" in value:
        if kind is not SlotKind.PARALLEL:
            raise ConfigError(
                f"KasminaConfig.layouts[{slot_id!r}]={value!r}: 'input->output' layouts are for "
                "parallel slots; an output slot takes one layout"
            )
        a, b = value.split("->")
        return a, b
    return value, value


def _activation(slot_id: str, t: torch.Tensor, hint: str, layout: str | None, what: str
                ) -> tuple[int, int, list[int], int]:
    """(layout, channels, spatial, dtype) of one recorded activation."""
    where = f"site {slot_id!r}" if what == "output" else f"parallel site {slot_id!r}: its input"
    if layout is None:
        if t.dim() == 2:
            layout = "nc"
        elif t.dim() == 4:
            layout = "nchw"
        elif t.dim() == 3 and hint:
            layout = hint
        elif t.dim() == 3:
            how = ("'ncl' or 'nld' (input and output), or 'input->output' such as 'ncl->nc'"
                   if what == "input" else "'ncl' or 'nld'")
            raise ConfigError(
                f"{where}: cannot tell whether its 3-d {what} {tuple(t.shape)} is NCL "
                f"or NLD; set KasminaConfig.layouts[{slot_id!r}] to {how}"
            )
        else:
            raise ConfigError(
                f"{where}: {what} shape {tuple(t.shape)} has rank {t.dim()}; "
                "supported: 2 (NC), 3 (NCL/NLD), 4 (NCHW)"
            )
    expected_rank = {"nc": 2, "ncl": 3, "nld": 3, "nchw": 4}[layout]
    if t.dim() != expected_rank:
        raise ConfigError(
            f"{where}: layout {layout!r} needs rank {expected_rank}, {what} is {tuple(t.shape)}"
        )
    if t.dtype not in DTYPES:
        raise ConfigError(
            f"{where}: activation dtype {t.dtype} is not one of {', '.join(map(str, DTYPES))}"
        )
    shape = tuple(t.shape)
    if layout == "nld":
        channels, spatial = shape[2], [shape[1]]
    else:
        channels, spatial = shape[1], list(shape[2:])
    return _LAYOUT[layout], channels, spatial, DTYPES[t.dtype]


def signature(plan: SlotPlan, traced: Traced, config: KasminaConfig) -> seed_pb2.SiteSignature:
    """The slot's `SiteSignature`; an output slot's is exactly what it was before slot kinds
    existed (no kind, no input), so kernels compiled for it keep their ids."""
    in_layout, out_layout = _layouts_override(plan.slot_id, plan.kind, config)
    layout, channels, spatial, dtype = _activation(
        plan.slot_id, traced.output, traced.output_hint, out_layout, "output")
    sig = seed_pb2.SiteSignature(layout=layout, channels=channels, spatial=spatial, dtype=dtype)
    if plan.kind is SlotKind.PARALLEL:
        assert traced.input is not None
        il, ic, isp, idt = _activation(plan.slot_id, traced.input, traced.input_hint, in_layout,
                                       "input")
        if idt != dtype:
            raise ConfigError(
                f"parallel site {plan.slot_id!r} reads {traced.input.dtype} and returns "
                f"{traced.output.dtype}; a seed reads and writes one dtype"
            )
        sig.kind = seed_pb2.SLOT_KIND_PARALLEL
        sig.input.CopyFrom(seed_pb2.ActivationSpec(layout=il, channels=ic, spatial=isp,
                                                   dtype=idt))
    return sig
