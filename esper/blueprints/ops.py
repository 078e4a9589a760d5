"""The op allowlist: every op a blueprint may use, with its attributes, shape rule,
parameter specs and module constructor.

Nothing outside this registry can ever run inside a seed: the IR names ops, this module
decides what they mean. Ops see per-sample shapes (no batch dimension); `None` stands for
a spatial or sequence extent that varies between calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from esper.blueprints.attrs import from_attr
from esper.errors import BlueprintError
from generated.esper.common.v1 import seed_pb2

Shape = tuple[int | None, ...]
"""Per-sample shape; `None` marks an extent that varies between calls."""

NC = seed_pb2.ACTIVATION_LAYOUT_NC
NCL = seed_pb2.ACTIVATION_LAYOUT_NCL
NCHW = seed_pb2.ACTIVATION_LAYOUT_NCHW
NLD = seed_pb2.ACTIVATION_LAYOUT_NLD
ALL_LAYOUTS = frozenset({NC, NCL, NCHW, NLD})

MAX_FEATURES = 65536
"""Largest channel count an op may produce."""
MAX_KERNEL_SIZE = 15

_REQUIRED = object()


@dataclass(frozen=True)
class OpContext:
    """What an op may know about the site it is compiled for."""

    layout: int
    """`ActivationLayout` enum value of the site."""
    site_channels: int
    """Channels (or model width for NLD) of the site activation."""

    @property
    def channel_axis(self) -> int:
        """Index of the channel axis in a per-sample shape."""
        return 1 if self.layout == NLD else 0

    @property
    def spatial_axes(self) -> tuple[int, ...]:
        """Per-sample axes that pooling averages over (length, height/width, sequence)."""
        return {NC: (), NCL: (1,), NCHW: (1, 2), NLD: (0,)}[self.layout]


@dataclass(frozen=True)
class AttrSpec:
    """One attribute an op accepts."""

    kind: type
    """int, float, str or bool."""
    doc: str
    default: Any = _REQUIRED
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


@dataclass(frozen=True)
class OpDef:
    """An allowlisted op."""

    name: str
    doc: str
    min_inputs: int
    max_inputs: int
    infer: Callable[[OpContext, list[Shape], dict[str, Any]], Shape]
    """Output shape from input shapes; raises BlueprintError when they do not fit."""
    build: Callable[[OpContext, list[Shape], dict[str, Any]], nn.Module]
    """Constructs the module (called under a meta device; weights come later)."""
    zero_out: Callable[[dict[str, Any], list[bool]], bool]
    """Whether the output is exactly zero at initialisation, given which inputs are."""
    params: Callable[[OpContext, list[Shape], dict[str, Any]], dict[str, tuple[int, ...]]] = (
        lambda ctx, shapes, attrs: {}
    )
    """Name → shape of every parameter the module has (computed without building it)."""
    attrs: Mapping[str, AttrSpec] = field(default_factory=dict)
    layouts: frozenset[int] = ALL_LAYOUTS


def _fail(node: str, msg: str) -> BlueprintError:
    return BlueprintError(f"node {node!r}: {msg}", field="ir.nodes")


# ----------------------------------------------------------------------------- modules
# Every parametric module initialises from an explicit generator so that the same
# (blueprint, site, seed) gives bit-identical weights in any process.


def _uniform_(t: torch.Tensor, bound: float, gen: torch.Generator) -> None:
    with torch.no_grad():
        t.uniform_(-bound, bound, generator=gen)


class ChannelLinear(nn.Module):
    """A linear map over the channel axis (a 1x1 convolution for channel-first layouts)."""

    def __init__(self, in_f: int, out_f: int, *, bias: bool, zero_init: bool, channel_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_f, in_f))
        self.bias = nn.Parameter(torch.empty(out_f)) if bias else None
        self.zero_init = zero_init
        self.channel_dim = channel_dim

    def reset_parameters(self, gen: torch.Generator) -> None:
        if self.zero_init:
            with torch.no_grad():
                self.weight.zero_()
                if self.bias is not None:
                    self.bias.zero_()
            return
        bound = 1.0 / math.sqrt(self.weight.shape[1])
        _uniform_(self.weight, bound, gen)
        if self.bias is not None:
            _uniform_(self.bias, bound, gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_dim == -1 or self.channel_dim == x.dim() - 1:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x.movedim(self.channel_dim, -1), self.weight, self.bias).movedim(
            -1, self.channel_dim
        )


class LowRank(nn.Module):
    """x ↦ up(down(x)) over the channel axis; `up` starts at zero (LoRA's B = 0)."""

    def __init__(self, in_f: int, out_f: int, rank: int, *, bias: bool, zero_init: bool,
                 channel_dim: int):
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, in_f))
        self.up = nn.Parameter(torch.empty(out_f, rank))
        self.bias = nn.Parameter(torch.empty(out_f)) if bias else None
        self.zero_init = zero_init
        self.channel_dim = channel_dim

    def reset_parameters(self, gen: torch.Generator) -> None:
        _uniform_(self.down, 1.0 / math.sqrt(self.down.shape[1]), gen)
        with torch.no_grad():
            if self.zero_init:
                self.up.zero_()
            else:
                self.up.uniform_(-1.0 / math.sqrt(self.up.shape[1]),
                                 1.0 / math.sqrt(self.up.shape[1]), generator=gen)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = self.channel_dim == -1 or self.channel_dim == x.dim() - 1
        h = x if last else x.movedim(self.channel_dim, -1)
        h = F.linear(F.linear(h, self.down), self.up, self.bias)
        return h if last else h.movedim(-1, self.channel_dim)


class Conv(nn.Module):
    """Stride-1 'same' convolution (1-d or 2-d), optionally grouped."""

    def __init__(self, dims: int, in_c: int, out_c: int, k: int, *, groups: int, bias: bool,
                 zero_init: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_c, in_c // groups, *([k] * dims)))
        self.bias = nn.Parameter(torch.empty(out_c)) if bias else None
        self.dims, self.groups, self.padding, self.zero_init = dims, groups, k // 2, zero_init

    def reset_parameters(self, gen: torch.Generator) -> None:
        if self.zero_init:
            with torch.no_grad():
                self.weight.zero_()
                if self.bias is not None:
                    self.bias.zero_()
            return
        fan_in = self.weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in)
        _uniform_(self.weight, bound, gen)
        if self.bias is not None:
            _uniform_(self.bias, bound, gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = F.conv1d if self.dims == 1 else F.conv2d
        return conv(x, self.weight, self.bias, padding=self.padding, groups=self.groups)


class ChannelNorm(nn.Module):
    """LayerNorm / RMSNorm over the channel axis, or GroupNorm over channel groups."""

    def __init__(self, kind: str, channels: int, *, groups: int, eps: float, affine: bool,
                 channel_dim: int):
        super().__init__()
        self.kind, self.groups, self.eps, self.channel_dim = kind, groups, eps, channel_dim
        self.weight = nn.Parameter(torch.empty(channels)) if affine else None
        self.bias = nn.Parameter(torch.empty(channels)) if affine and kind != "rmsnorm" else None

    def reset_parameters(self, gen: torch.Generator) -> None:
        with torch.no_grad():
            if self.weight is not None:
                self.weight.fill_(1.0)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "groupnorm":
            if self.channel_dim == 1 or x.dim() == 2:
                return F.group_norm(x, self.groups, self.weight, self.bias, self.eps)
            return F.group_norm(x.movedim(-1, 1), self.groups, self.weight, self.bias,
                                self.eps).movedim(1, -1)
        last = self.channel_dim == -1 or self.channel_dim == x.dim() - 1
        h = x if last else x.movedim(self.channel_dim, -1)
        if self.kind == "layernorm":
            h = F.layer_norm(h, (h.shape[-1],), self.weight, self.bias, self.eps)
        else:
            h = F.rms_norm(h, (h.shape[-1],), self.weight, self.eps)
        return h if last else h.movedim(-1, self.channel_dim)


class Scale(nn.Module):
    """Learned per-channel scale (and optional shift); ReZero when it starts at 0."""

    def __init__(self, channels: int, *, init: float, bias: bool, channel_dim: int, ndim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.init = init
        # Shape that broadcasts a (C,) vector along the channel axis of a batched tensor.
        view = [1] * (ndim + 1)
        view[channel_dim] = channels
        self.view = tuple(view)

    def reset_parameters(self, gen: torch.Generator) -> None:
        with torch.no_grad():
            self.weight.fill_(self.init)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * self.weight.view(self.view)
        return y if self.bias is None else y + self.bias.view(self.view)


class Unary(nn.Module):
    def __init__(self, fn: str):
        super().__init__()
        self.fn = fn
        self._f: Callable[[torch.Tensor], torch.Tensor] = _UNARY[fn]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._f(x)

    def extra_repr(self) -> str:
        return self.fn


class Add(nn.Module):
    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class Mul(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b


class Attention(nn.Module):
    """Multi-head self-attention over the sequence axis of (N, L, C) tokens.

    `qkv` projects C_in to heads × head_dim queries, keys and values; `out` projects the
    concatenated heads to C_out and starts at zero (zero_init), so the output is exactly
    zero at initialisation while the heads' projections already hold random weights.
    """

    def __init__(self, in_f: int, out_f: int, heads: int, head_dim: int, *, causal: bool,
                 bias: bool, zero_init: bool):
        super().__init__()
        inner = heads * head_dim
        self.qkv_weight = nn.Parameter(torch.empty(3 * inner, in_f))
        self.qkv_bias = nn.Parameter(torch.empty(3 * inner)) if bias else None
        self.out_weight = nn.Parameter(torch.empty(out_f, inner))
        self.out_bias = nn.Parameter(torch.empty(out_f)) if bias else None
        self.heads, self.head_dim, self.causal, self.zero_init = heads, head_dim, causal, zero_init

    def reset_parameters(self, gen: torch.Generator) -> None:
        _uniform_(self.qkv_weight, 1.0 / math.sqrt(self.qkv_weight.shape[1]), gen)
        with torch.no_grad():
            if self.qkv_bias is not None:
                self.qkv_bias.zero_()
            if self.out_bias is not None:
                self.out_bias.zero_()
            if self.zero_init:
                self.out_weight.zero_()
                return
        _uniform_(self.out_weight, 1.0 / math.sqrt(self.out_weight.shape[1]), gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length = x.shape[0], x.shape[1]
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.view(n, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # Written out rather than F.scaled_dot_product_attention: torch's FLOP counter
        # does not count SDPA's CPU kernel, and kernel profiles and growth benchmarks
        # compare FLOPs. Seeds are small, so the fused kernel's memory saving is not needed.
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        if self.causal:
            future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        o = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, length, -1)
        return F.linear(o, self.out_weight, self.out_bias)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, causal={self.causal}"


class MeanPool(nn.Module):
    """Mean over the spatial/sequence axes, kept as size-1 axes so it broadcasts back."""

    def __init__(self, dims: tuple[int, ...]):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=self.dims, keepdim=True)


_UNARY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}
_ZERO_FIXED_UNARY = {"identity", "relu", "gelu", "silu", "tanh"}
"""Unary ops with f(0) = 0: a zero input stays zero."""


# ----------------------------------------------------------------------------- shape rules


def _channels(node: str, ctx: OpContext, shape: Shape) -> int:
    c = shape[ctx.channel_axis]
    if c is None:
        raise _fail(node, "channel extent must be known")
    return c


def _out_features(ctx: OpContext, attrs: dict[str, Any]) -> int:
    if attrs["features"] > 0:
        return attrs["features"]
    if attrs["ratio"] > 0:
        return max(attrs["min_features"], round(ctx.site_channels * attrs["ratio"]))
    return ctx.site_channels


def _with_channels(ctx: OpContext, shape: Shape, c: int) -> Shape:
    s = list(shape)
    s[ctx.channel_axis] = c
    return tuple(s)


def _broadcast(node: str, shapes: list[Shape]) -> Shape:
    rank = len(shapes[0])
    if any(len(s) != rank for s in shapes):
        raise _fail(node, f"inputs have different ranks: {shapes}")
    out: list[int | None] = []
    for dims in zip(*shapes, strict=True):
        known = {d for d in dims if d is not None and d != 1}
        if len(known) > 1:
            raise _fail(node, f"input shapes {shapes} do not broadcast")
        if known:
            out.append(known.pop())
        elif None in dims:
            out.append(None)
        else:
            out.append(1)
    return tuple(out)


_FEATURE_ATTRS = {
    "features": AttrSpec(int, "output channels; 0 = use `ratio`, or the site's channels",
                         default=0, min=0, max=MAX_FEATURES),
    "ratio": AttrSpec(float, "output channels as a fraction of the site's (when features=0)",
                      default=0.0, min=0.0, max=16.0),
    "min_features": AttrSpec(int, "lower bound on channels derived from `ratio`",
                             default=1, min=1, max=MAX_FEATURES),
    "bias": AttrSpec(bool, "learn an additive bias", default=True),
    "zero_init": AttrSpec(bool, "start with all weights at zero (function-preserving output side)",
                          default=False),
}


def _linear_params(ctx: OpContext, shapes: list[Shape], a: dict[str, Any]):
    cin, cout = shapes[0][ctx.channel_axis], _out_features(ctx, a)
    p: dict[str, tuple[int, ...]] = {"weight": (cout, cin)}
    if a["bias"]:
        p["bias"] = (cout,)
    return p


def _linear_infer(ctx: OpContext, shapes: list[Shape], a: dict[str, Any], node: str = "") -> Shape:
    _channels(node, ctx, shapes[0])
    return _with_channels(ctx, shapes[0], _out_features(ctx, a))


def _channel_dim(ctx: OpContext) -> int:
    return -1 if ctx.layout == NLD else 1


def _lowrank_params(ctx: OpContext, shapes: list[Shape], a: dict[str, Any]):
    cin, cout = shapes[0][ctx.channel_axis], _out_features(ctx, a)
    p: dict[str, tuple[int, ...]] = {"down": (a["rank"], cin), "up": (cout, a["rank"])}
    if a["bias"]:
        p["bias"] = (cout,)
    return p


def _conv_attrs(depthwise: bool) -> dict[str, AttrSpec]:
    attrs = {
        "kernel_size": AttrSpec(int, "odd kernel size; 'same' padding, stride 1", default=3,
                                min=1, max=MAX_KERNEL_SIZE),
        "bias": _FEATURE_ATTRS["bias"],
        "zero_init": _FEATURE_ATTRS["zero_init"],
    }
    if depthwise:
        attrs["multiplier"] = AttrSpec(int, "output channels per input channel", default=1,
                                       min=1, max=16)
    else:
        attrs.update({k: _FEATURE_ATTRS[k] for k in ("features", "ratio", "min_features")})
        attrs["groups"] = AttrSpec(int, "channel groups; must divide in and out channels",
                                   default=1, min=1, max=MAX_FEATURES)
    return attrs


def _conv_out(ctx: OpContext, shapes: list[Shape], a: dict[str, Any]) -> tuple[int, int, int]:
    cin = shapes[0][0]
    assert cin is not None
    if "multiplier" in a:
        return cin, cin * a["multiplier"], cin
    return cin, _out_features(ctx, a), a["groups"]


def _conv_infer(dims: int):
    def infer(ctx: OpContext, shapes: list[Shape], a: dict[str, Any], node: str = "") -> Shape:
        if len(shapes[0]) != dims + 1:
            raise _fail(node, f"expects a {dims + 1}-d per-sample input, got {shapes[0]}")
        _channels(node, ctx, shapes[0])
        if a["kernel_size"] % 2 == 0:
            raise _fail(node, f"kernel_size={a['kernel_size']} must be odd ('same' padding)")
        cin, cout, groups = _conv_out(ctx, shapes, a)
        if cout > MAX_FEATURES:
            raise _fail(node, f"{cout} output channels exceed the bound {MAX_FEATURES}")
        if cin % groups or cout % groups:
            raise _fail(node, f"groups={groups} must divide in ({cin}) and out ({cout}) channels")
        return (cout, *shapes[0][1:])
    return infer


def _conv_params(dims: int):
    def params(ctx: OpContext, shapes: list[Shape], a: dict[str, Any]):
        cin, cout, groups = _conv_out(ctx, shapes, a)
        p: dict[str, tuple[int, ...]] = {
            "weight": (cout, cin // groups, *([a["kernel_size"]] * dims))}
        if a["bias"]:
            p["bias"] = (cout,)
        return p
    return params


def _conv_build(dims: int):
    def build(ctx: OpContext, shapes: list[Shape], a: dict[str, Any]) -> nn.Module:
        cin, cout, groups = _conv_out(ctx, shapes, a)
        return Conv(dims, cin, cout, a["kernel_size"], groups=groups, bias=a["bias"],
                    zero_init=a["zero_init"])
    return build


_NORM_ATTRS = {
    "eps": AttrSpec(float, "numerical floor of the variance", default=1e-5, min=1e-12, max=1.0),
    "affine": AttrSpec(bool, "learn a per-channel weight (and bias)", default=True),
}


def _norm_def(kind: str, doc: str) -> OpDef:
    attrs = dict(_NORM_ATTRS)
    if kind == "groupnorm":
        attrs["groups"] = AttrSpec(int, "number of channel groups; must divide the channels",
                                   default=1, min=1, max=MAX_FEATURES)

    def infer(ctx: OpContext, shapes: list[Shape], a: dict[str, Any], node: str = "") -> Shape:
        c = _channels(node, ctx, shapes[0])
        if kind == "groupnorm" and c % a["groups"]:
            raise _fail(node, f"groups={a['groups']} must divide the {c} channels")
        return shapes[0]

    def params(ctx: OpContext, shapes: list[Shape], a: dict[str, Any]):
        c = shapes[0][ctx.channel_axis]
        if not a["affine"]:
            return {}
        return {"weight": (c,)} if kind == "rmsnorm" else {"weight": (c,), "bias": (c,)}

    def build(ctx: OpContext, shapes: list[Shape], a: dict[str, Any]) -> nn.Module:
        return ChannelNorm(kind, shapes[0][ctx.channel_axis], groups=a.get("groups", 1),
                           eps=a["eps"], affine=a["affine"], channel_dim=_channel_dim(ctx))

    # A normalised zero is zero and the shift starts at zero, so zeros pass through.
    return OpDef(kind, doc, 1, 1, infer, build, lambda a, z: z[0], params, attrs)


def _unary_def(fn: str, doc: str) -> OpDef:
    return OpDef(fn, doc, 1, 1, lambda ctx, s, a, node="": s[0],
                 lambda ctx, s, a: Unary(fn),
                 lambda a, z: z[0] and fn in _ZERO_FIXED_UNARY)


def _scale_params(ctx: OpContext, shapes: list[Shape], a: dict[str, Any]):
    c = shapes[0][ctx.channel_axis]
    return {"weight": (c,), "bias": (c,)} if a["bias"] else {"weight": (c,)}


def _mean_pool_infer(ctx: OpContext, shapes: list[Shape], a: dict[str, Any], node: str = ""):
    s = list(shapes[0])
    for ax in ctx.spatial_axes:
        s[ax] = 1
    return tuple(s)


MAX_ATTENTION_HEADS = 64
MAX_ATTENTION_WIDTH = 4096
"""Bound on heads × head_dim of one attention op (its q, k and v widths)."""


def _head_dim(shapes: list[Shape], a: dict[str, Any]) -> int:
    if a["head_dim"] > 0:
        return a["head_dim"]
    cin = shapes[0][1]
    assert cin is not None
    return max(1, cin // a["heads"])


def _attention_infer(ctx: OpContext, shapes: list[Shape], a: dict[str, Any], node: str = ""
                     ) -> Shape:
    if len(shapes[0]) != 2:
        raise _fail(node, f"expects a per-sample (L, C) token sequence, got {shapes[0]}")
    _channels(node, ctx, shapes[0])
    inner = a["heads"] * _head_dim(shapes, a)
    if inner > MAX_ATTENTION_WIDTH:
        raise _fail(node, f"heads x head_dim = {a['heads']} x {_head_dim(shapes, a)} = {inner} "
                          f"exceeds the bound {MAX_ATTENTION_WIDTH}")
    return _with_channels(ctx, shapes[0], _out_features(ctx, a))


def _attention_params(ctx: OpContext, shapes: list[Shape], a: dict[str, Any]):
    cin, cout = shapes[0][1], _out_features(ctx, a)
    inner = a["heads"] * _head_dim(shapes, a)
    p: dict[str, tuple[int, ...]] = {"qkv_weight": (3 * inner, cin)}
    if a["bias"]:
        p["qkv_bias"] = (3 * inner,)
    p["out_weight"] = (cout, inner)
    if a["bias"]:
        p["out_bias"] = (cout,)
    return p


_ATTENTION_ATTRS = {
    "heads": AttrSpec(int, "number of attention heads", default=2, min=1,
                      max=MAX_ATTENTION_HEADS),
    "head_dim": AttrSpec(int, "width of each head; 0 = input channels / heads (at least 1)",
                         default=0, min=0, max=MAX_ATTENTION_WIDTH),
    "causal": AttrSpec(bool, "each position attends only to itself and earlier ones (use it "
                             "in causal models: a non-causal seed would read future tokens)",
                       default=False),
    **{k: _FEATURE_ATTRS[k] for k in ("features", "ratio", "min_features", "bias")},
    "zero_init": AttrSpec(bool, "start the output projection (and its bias) at zero",
                          default=True),
}


def _registry() -> dict[str, OpDef]:
    ops: list[OpDef] = [
        OpDef("linear", "affine map over the channel axis (1x1 conv for channel-first layouts)",
              1, 1, _linear_infer,
              lambda ctx, s, a: ChannelLinear(s[0][ctx.channel_axis], _out_features(ctx, a),
                                              bias=a["bias"], zero_init=a["zero_init"],
                                              channel_dim=_channel_dim(ctx)),
              lambda a, z: a["zero_init"] or (z[0] and not a["bias"]),
              _linear_params, dict(_FEATURE_ATTRS)),
        OpDef("lowrank", "rank-r factorised channel map up(down(x)); up starts at zero by default",
              1, 1, _linear_infer,
              lambda ctx, s, a: LowRank(s[0][ctx.channel_axis], _out_features(ctx, a), a["rank"],
                                        bias=a["bias"], zero_init=a["zero_init"],
                                        channel_dim=_channel_dim(ctx)),
              # Bias starts at zero, so a zero `up` (or zero input) gives a zero output.
              lambda a, z: a["zero_init"] or z[0],
              _lowrank_params,
              {**_FEATURE_ATTRS,
               "rank": AttrSpec(int, "inner rank", min=1, max=4096),
               "zero_init": AttrSpec(bool, "start `up` at zero", default=True)}),
        OpDef("conv1d", "stride-1 'same' 1-d convolution", 1, 1, _conv_infer(1), _conv_build(1),
              lambda a, z: a["zero_init"] or (z[0] and not a["bias"]), _conv_params(1),
              _conv_attrs(False), frozenset({NCL})),
        OpDef("conv2d", "stride-1 'same' 2-d convolution", 1, 1, _conv_infer(2), _conv_build(2),
              lambda a, z: a["zero_init"] or (z[0] and not a["bias"]), _conv_params(2),
              _conv_attrs(False), frozenset({NCHW})),
        OpDef("depthwise_conv1d", "per-channel 1-d convolution", 1, 1, _conv_infer(1),
              _conv_build(1), lambda a, z: a["zero_init"] or (z[0] and not a["bias"]),
              _conv_params(1), _conv_attrs(True), frozenset({NCL})),
        OpDef("depthwise_conv2d", "per-channel 2-d convolution", 1, 1, _conv_infer(2),
              _conv_build(2), lambda a, z: a["zero_init"] or (z[0] and not a["bias"]),
              _conv_params(2), _conv_attrs(True), frozenset({NCHW})),
        _norm_def("layernorm", "normalise over the channel axis at each position"),
        _norm_def("rmsnorm", "root-mean-square normalise over the channel axis"),
        _norm_def("groupnorm", "normalise over channel groups (and spatial extent)"),
        _unary_def("identity", "y = x"),
        _unary_def("relu", "max(x, 0)"),
        _unary_def("gelu", "Gaussian error linear unit"),
        _unary_def("silu", "x * sigmoid(x)"),
        _unary_def("sigmoid", "logistic function"),
        _unary_def("tanh", "hyperbolic tangent"),
        OpDef("add", "element-wise sum of 2 to 8 inputs (broadcasting)", 2, 8,
              lambda ctx, s, a, node="": _broadcast(node, s), lambda ctx, s, a: Add(),
              lambda a, z: all(z)),
        OpDef("mul", "element-wise product of two inputs (broadcasting, e.g. channel gates)",
              2, 2, lambda ctx, s, a, node="": _broadcast(node, s), lambda ctx, s, a: Mul(),
              lambda a, z: any(z)),
        OpDef("scale", "learned per-channel scale (and shift); init 0 = ReZero", 1, 1,
              lambda ctx, s, a, node="": (_channels(node, ctx, s[0]), s[0])[1],
              lambda ctx, s, a: Scale(s[0][ctx.channel_axis], init=a["init"], bias=a["bias"],
                                      channel_dim=_channel_dim(ctx), ndim=len(s[0])),
              lambda a, z: a["init"] == 0.0 or z[0], _scale_params,
              {"init": AttrSpec(float, "initial scale", default=0.0, min=-1e3, max=1e3),
               "bias": AttrSpec(bool, "learn a per-channel shift (starts at 0)", default=False)}),
        OpDef("attention", "multi-head self-attention over the token axis (NLD); the output "
              "projection starts at zero by default", 1, 1, _attention_infer,
              lambda ctx, s, a: Attention(s[0][1], _out_features(ctx, a), a["heads"],
                                          _head_dim(s, a), causal=a["causal"], bias=a["bias"],
                                          zero_init=a["zero_init"]),
              # Zero input without biases gives zero queries, keys and values, so zero out.
              lambda a, z: a["zero_init"] or (z[0] and not a["bias"]),
              _attention_params, dict(_ATTENTION_ATTRS), frozenset({NLD})),
        OpDef("mean_pool", "mean over the spatial/sequence axes, kept as size-1 axes", 1, 1,
              _mean_pool_infer, lambda ctx, s, a: MeanPool(tuple(ax + 1 for ax in
                                                                 ctx.spatial_axes)),
              lambda a, z: z[0], attrs={}, layouts=frozenset({NCL, NCHW, NLD})),
    ]
    return {op.name: op for op in ops}


OPS: Mapping[str, OpDef] = _registry()
"""The allowlist: op name → definition."""


def coerce_attrs(node: str, op: OpDef, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Check a node's attributes against the op's schema and fill defaults.

    `raw` maps names to `AttrValue` messages (or plain Python values).
    """
    out: dict[str, Any] = {}
    for key in raw:
        if key not in op.attrs:
            raise _fail(node, f"op {op.name!r} has no attribute {key!r}; "
                              f"allowed: {sorted(op.attrs) or 'none'}")
    for key, spec in op.attrs.items():
        if key not in raw:
            if spec.required:
                raise _fail(node, f"op {op.name!r} requires attribute {key!r} ({spec.doc})")
            out[key] = spec.default
            continue
        value = from_attr(raw[key])
        if spec.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not spec.kind:
            raise _fail(node, f"attribute {key!r}={value!r} must be {spec.kind.__name__}")
        if spec.kind is float and not math.isfinite(value):
            raise _fail(node, f"attribute {key!r}={value!r} must be finite")
        if spec.min is not None and value < spec.min or spec.max is not None and value > spec.max:
            raise _fail(node, f"attribute {key!r}={value!r} out of range "
                              f"[{spec.min}, {spec.max}]")
        if spec.choices is not None and value not in spec.choices:
            raise _fail(node, f"attribute {key!r}={value!r} not one of {spec.choices}")
        out[key] = value
    return out
