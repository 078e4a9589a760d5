"""Built-in blueprint families, each function-preserving at initialisation."""

from __future__ import annotations

from typing import Any

from esper.blueprints.ir import blueprint_id
from esper.blueprints.ops import NC, NCHW, NCL, NLD
from generated.esper.common.v1 import blueprint_pb2


def _attr(v: Any) -> blueprint_pb2.AttrValue:
    if isinstance(v, bool):
        return blueprint_pb2.AttrValue(bool_value=v)
    if isinstance(v, int):
        return blueprint_pb2.AttrValue(int_value=v)
    if isinstance(v, float):
        return blueprint_pb2.AttrValue(float_value=v)
    return blueprint_pb2.AttrValue(string_value=v)


def node(name: str, op: str, inputs: list[str], **attrs: Any) -> blueprint_pb2.IRNode:
    """An IR node; attribute values are Python bool/int/float/str."""
    return blueprint_pb2.IRNode(name=name, op=op, inputs=inputs,
                                attrs={k: _attr(v) for k, v in attrs.items()})


def make_blueprint(name: str, family: str, description: str, layouts: list[int],
                   nodes: list[blueprint_pb2.IRNode], output: str, *, tags: list[str] = (),
                   origin: str = "builtin",
                   parent_ids: list[str] = ()) -> blueprint_pb2.Blueprint:
    bp = blueprint_pb2.Blueprint(
        name=name, family=family, description=description,
        ir=blueprint_pb2.BlueprintIR(ir_version=1, nodes=nodes, output=output),
        layouts=layouts, tags=list(tags), origin=origin, parent_ids=list(parent_ids))
    bp.blueprint_id = blueprint_id(bp)
    return bp


def builtin_blueprints() -> list[blueprint_pb2.Blueprint]:
    """The built-in catalog: six families over NC, NCL, NCHW and NLD sites."""
    channelwise = [NC, NCL, NCHW, NLD]
    return [
        make_blueprint(
            "bottleneck_mlp", "bottleneck_mlp",
            "channel MLP C→C/2→C with GELU; the up-projection starts at zero",
            channelwise,
            [node("down", "linear", ["input"], ratio=0.5, min_features=4),
             node("act", "gelu", ["down"]),
             node("up", "linear", ["act"], zero_init=True)],
            "up", tags=["mlp", "bottleneck"]),
        make_blueprint(
            "lowrank_adapter", "lowrank_adapter",
            "rank-8 adapter (LoRA-style: B starts at zero)",
            channelwise,
            [node("adapter", "lowrank", ["input"], rank=8)],
            "adapter", tags=["adapter", "lowrank"]),
        make_blueprint(
            "conv3x3_residual", "conv_residual",
            "two 3x3 convolutions with ReLU; the second starts at zero",
            [NCHW],
            [node("conv1", "conv2d", ["input"], kernel_size=3),
             node("act", "relu", ["conv1"]),
             node("conv2", "conv2d", ["act"], kernel_size=3, zero_init=True)],
            "conv2", tags=["conv"]),
        make_blueprint(
            "conv3_residual_1d", "conv_residual",
            "two width-3 1-d convolutions with ReLU; the second starts at zero",
            [NCL],
            [node("conv1", "conv1d", ["input"], kernel_size=3),
             node("act", "relu", ["conv1"]),
             node("conv2", "conv1d", ["act"], kernel_size=3, zero_init=True)],
            "conv2", tags=["conv"]),
        make_blueprint(
            "dwsep_conv2d", "depthwise_separable",
            "depthwise 3x3 then pointwise 1x1 with SiLU; the pointwise starts at zero",
            [NCHW],
            [node("dw", "depthwise_conv2d", ["input"], kernel_size=3),
             node("act", "silu", ["dw"]),
             node("pw", "linear", ["act"], zero_init=True)],
            "pw", tags=["conv", "depthwise"]),
        make_blueprint(
            "dwsep_conv1d", "depthwise_separable",
            "depthwise width-5 then pointwise with SiLU; the pointwise starts at zero",
            [NCL],
            [node("dw", "depthwise_conv1d", ["input"], kernel_size=5),
             node("act", "silu", ["dw"]),
             node("pw", "linear", ["act"], zero_init=True)],
            "pw", tags=["conv", "depthwise"]),
        make_blueprint(
            "squeeze_excite", "squeeze_excitation",
            "channel gates from pooled context (C→C/4→C, sigmoid) times the input, "
            "behind a ReZero scale",
            [NCL, NCHW, NLD],
            [node("pool", "mean_pool", ["input"]),
             node("squeeze", "linear", ["pool"], ratio=0.25, min_features=4),
             node("act", "relu", ["squeeze"]),
             node("excite", "linear", ["act"]),
             node("gate", "sigmoid", ["excite"]),
             node("gated", "mul", ["input", "gate"]),
             node("out", "scale", ["gated"], init=0.0)],
            "out", tags=["attention", "gating"]),
        make_blueprint(
            "norm_scale", "norm_scale",
            "LayerNorm over channels behind a per-channel ReZero scale and shift",
            channelwise,
            [node("norm", "layernorm", ["input"]),
             node("out", "scale", ["norm"], init=0.0, bias=True)],
            "out", tags=["norm"]),
    ]
