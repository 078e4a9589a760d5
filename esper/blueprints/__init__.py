"""Blueprints: the allowlisted op registry, IR validation, the built-in catalog and the
IR → nn.Module builder. A pure library (no gRPC, no bus, no service imports)."""

from esper.blueprints.builder import BlueprintModule, build_module
from esper.blueprints.catalog import builtin_blueprints, make_blueprint, node
from esper.blueprints.fit import fits
from esper.blueprints.ir import (
    OUTPUT_SLOT_TAG,
    PARALLEL_SLOT_TAG,
    IRPlan,
    blueprint_id,
    canonical_bytes,
    is_parallel,
    parse_site_key,
    plan_ir,
    site_key,
    site_output_shape,
    site_shape,
    site_signature,
    slot_kinds,
    supports,
    validate_ir,
)
from esper.blueprints.ops import OPS

__all__ = [
    "OPS",
    "OUTPUT_SLOT_TAG",
    "PARALLEL_SLOT_TAG",
    "BlueprintModule",
    "IRPlan",
    "blueprint_id",
    "build_module",
    "builtin_blueprints",
    "canonical_bytes",
    "fits",
    "is_parallel",
    "make_blueprint",
    "node",
    "parse_site_key",
    "plan_ir",
    "site_key",
    "site_output_shape",
    "site_shape",
    "site_signature",
    "slot_kinds",
    "supports",
    "validate_ir",
]
