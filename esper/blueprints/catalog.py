"""Built-in blueprint families, each function-preserving at initialisation."""

from __future__ import annotations

from typing import Any

from esper.blueprints.attrs import to_attr
from esper.blueprints.ir import OUTPUT_SLOT_TAG, PARALLEL_SLOT_TAG, blueprint_id
from esper.blueprints.ops import NC, NCHW, NCL, NLD
from generated.esper.common.v1 import blueprint_pb2


def node(name: str, op: str, inputs: list[str], **attrs: Any) -> blueprint_pb2.IRNode:
    """An IR node; attribute values are Python bool/int/float/str."""
    return blueprint_pb2.IRNode(name=name, op=op, inputs=inputs,
                                attrs={k: to_attr(v) for k, v in attrs.items()})


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
    """The built-in catalog: the output-slot families, then the parallel-slot ones."""
    return _output_slot_blueprints() + _parallel_slot_blueprints()


def _output_slot_blueprints() -> list[blueprint_pb2.Blueprint]:
    """Six families over NC, NCL, NCHW and NLD output slots (`y = h + alpha * s(h)`).

    Their ids and IRs are fixed: kernels compiled from them must keep their ids.
    """
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


def _width(k: int, act: str) -> blueprint_pb2.Blueprint:
    return make_blueprint(
        f"width{k}_{act}", "width",
        f"{k} new hidden units across a Linear→{act}→Linear pair: input→{k}, {act}, "
        f"{k}→output zero-initialised (exactly {k} more neurons in the wrapped pair when "
        f"its activation is {act})",
        [NC, NLD],
        [node("hidden", "linear", ["input"], features=k),
         node("act", act, ["hidden"]),
         node("out", "linear", ["act"], zero_init=True)],
        "out", tags=["width", PARALLEL_SLOT_TAG])


def _lora(rank: int) -> blueprint_pb2.Blueprint:
    return make_blueprint(
        f"lora_r{rank}", "lora",
        f"LoRA: B·A·x beside the wrapped Linear (rank {rank}, no bias); B starts at zero, "
        "so the adapter merges into the layer's weight as W + B·A",
        [NC, NLD],
        [node("adapter", "lowrank", ["input"], rank=rank, bias=False)],
        "adapter", tags=["adapter", "lowrank", PARALLEL_SLOT_TAG])


def _parallel_slot_blueprints() -> list[blueprint_pb2.Blueprint]:
    """Families for parallel slots (`y = m(x) + alpha * s(x)`): the seed maps the wrapped
    module's input to its output, whose channels may differ."""
    return [
        _width(4, "relu"),
        _width(8, "relu"),
        _width(8, "gelu"),
        _lora(4),
        _lora(8),
        make_blueprint(
            "conv_branch_1d", "conv_branch",
            "parallel 1-d conv branch: width-3 conv to half the output channels (at least 4), "
            "ReLU, width-3 conv to the output channels starting at zero",
            [NCL],
            [node("conv1", "conv1d", ["input"], kernel_size=3, ratio=0.5, min_features=4),
             node("act", "relu", ["conv1"]),
             node("conv2", "conv1d", ["act"], kernel_size=3, zero_init=True)],
            "conv2", tags=["conv", PARALLEL_SLOT_TAG]),
        make_blueprint(
            "conv_branch_2d", "conv_branch",
            "parallel 3x3 conv branch: conv to half the output channels (at least 4), ReLU, "
            "conv to the output channels starting at zero",
            [NCHW],
            [node("conv1", "conv2d", ["input"], kernel_size=3, ratio=0.5, min_features=4),
             node("act", "relu", ["conv1"]),
             node("conv2", "conv2d", ["act"], kernel_size=3, zero_init=True)],
            "conv2", tags=["conv", PARALLEL_SLOT_TAG]),
        make_blueprint(
            "parallel_mlp_x2", "parallel_mlp",
            "parallel transformer MLP branch: tokens → 2x output width, GELU, → output width "
            "starting at zero",
            [NLD],
            [node("up", "linear", ["input"], ratio=2.0, min_features=4),
             node("act", "gelu", ["up"]),
             node("down", "linear", ["act"], zero_init=True)],
            "down", tags=["mlp", "transformer", PARALLEL_SLOT_TAG]),
        make_blueprint(
            "attn_heads2", "attention_heads",
            "two extra self-attention heads (head width = input width / 2) whose output "
            "projection starts at zero; not causal: for encoders and pooled token models",
            [NLD],
            [node("attn", "attention", ["input"], heads=2)],
            "attn", tags=["attention", "transformer", PARALLEL_SLOT_TAG, OUTPUT_SLOT_TAG]),
        make_blueprint(
            "attn_heads2_causal", "attention_heads",
            "two extra causal self-attention heads (each position sees itself and earlier "
            "ones) whose output projection starts at zero: for decoders",
            [NLD],
            [node("attn", "attention", ["input"], heads=2, causal=True)],
            "attn", tags=["attention", "transformer", "causal", PARALLEL_SLOT_TAG,
                          OUTPUT_SLOT_TAG]),
    ]
