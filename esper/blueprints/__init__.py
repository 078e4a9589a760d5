"""Blueprints: the allowlisted op registry, IR validation, the built-in catalog and the
IR → nn.Module builder. A pure library (no gRPC, no bus, no service imports)."""

from esper.blueprints.builder import BlueprintModule, build_module
from esper.blueprints.catalog import builtin_blueprints, make_blueprint, node
from esper.blueprints.ir import (
    IRPlan,
    blueprint_id,
    canonical_bytes,
    plan_ir,
    site_key,
    site_shape,
    site_signature,
    supports,
    validate_ir,
)
from esper.blueprints.ops import OPS

__all__ = [
    "OPS",
    "BlueprintModule",
    "IRPlan",
    "blueprint_id",
    "build_module",
    "builtin_blueprints",
    "canonical_bytes",
    "make_blueprint",
    "node",
    "plan_ir",
    "site_key",
    "site_shape",
    "site_signature",
    "supports",
    "validate_ir",
]
