"""IR → nn.Module: an interpreter over allowlisted op modules (no code from the IR runs)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from esper.blueprints.ir import INPUT, IRPlan, plan_ir
from esper.blueprints.ops import OPS
from generated.esper.common.v1 import blueprint_pb2, seed_pb2


class BlueprintModule(nn.Module):
    """Runs a planned blueprint graph; parameters are named `nodes.<node>.<param>`."""

    def __init__(self, plan: IRPlan):
        super().__init__()
        self.nodes = nn.ModuleDict()
        for n in plan.nodes:
            self.nodes[n.name] = OPS[n.op].build(plan.context, list(n.in_shapes), n.attrs)
        self._steps: tuple[tuple[str, tuple[str, ...]], ...] = tuple(
            (n.name, n.inputs) for n in plan.nodes)
        self._output = plan.output
        self.plan = plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = {INPUT: x}
        for name, inputs in self._steps:
            env[name] = self.nodes[name](*(env[i] for i in inputs))
        return env[self._output]


def _seed_for(seed: int, node: str) -> int:
    # Per-node streams: a node's initial weights do not depend on which nodes come before it.
    digest = hashlib.sha256(f"{seed}:{node}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def construct(plan: IRPlan) -> BlueprintModule:
    """The module's structure with uninitialised CPU parameters (`torch.empty`).

    Not under a meta-device context: that mode's per-op dispatch costs more than the small
    allocations it would save, and attaching from cache must stay well under a millisecond.
    """
    return BlueprintModule(plan)


def build_module(bp: blueprint_pb2.Blueprint | blueprint_pb2.BlueprintIR,
                 site: seed_pb2.SiteSignature, *, seed: int = 0) -> BlueprintModule:
    """Validate and build a freshly initialised seed module for `site`.

    Weights depend only on (IR, site, seed). The output side is zero-initialised, so
    the module's output is exactly zero at initialisation.

    Raises:
        BlueprintError: the IR fails validation for this site.
    """
    ir = bp.ir if isinstance(bp, blueprint_pb2.Blueprint) else bp
    plan = plan_ir(ir, site)
    module = construct(plan)
    gen = torch.Generator()
    for n in plan.nodes:
        node_mod = module.nodes[n.name]
        if hasattr(node_mod, "reset_parameters"):
            gen.manual_seed(_seed_for(seed, n.name))
            node_mod.reset_parameters(gen)
    return module
