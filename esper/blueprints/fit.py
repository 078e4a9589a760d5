"""Which offered blueprints fit which seed slots: the check against silent no-growth.

A grower or benchmark whose catalog fits none of the model's slots would train a static
model and report it as grown; `fits` turns that into a `ConfigError` at start.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from esper.blueprints.ir import is_parallel, layout_name, site_key, slot_kinds, supports
from esper.errors import ConfigError
from generated.esper.common.v1 import blueprint_pb2, seed_pb2

_KIND_NAMES = {seed_pb2.SLOT_KIND_UNSPECIFIED: "output", seed_pb2.SLOT_KIND_PARALLEL: "parallel"}


def _describe_blueprint(bp: blueprint_pb2.Blueprint) -> str:
    layouts = "/".join(layout_name(x) for x in bp.layouts)
    kinds = "+".join(_KIND_NAMES[k] for k in sorted(slot_kinds(bp)))
    return f"{bp.name or bp.blueprint_id} ({layouts}; {kinds} slots)"


def _describe_site(slot_id: str, site: seed_pb2.SiteSignature) -> str:
    kind = "parallel" if is_parallel(site) else "output"
    return f"{slot_id} ({kind} {site_key(site)})"


def fits(blueprints: Iterable[blueprint_pb2.Blueprint],
         sites: Mapping[str, seed_pb2.SiteSignature], *, require: bool = True
         ) -> dict[str, list[blueprint_pb2.Blueprint]]:
    """slot id → the offered blueprints that fit its site (`supports`), in offer order.

    Args:
        blueprints: the catalog a run offers.
        sites: slot id → site signature (e.g. `{s: mm.site_signature(s) for s in mm.slots}`).
        require: raise when no blueprint fits any slot (the default), instead of returning
            a mapping of empty lists.

    Raises:
        ConfigError: no slots, no blueprints, or (with `require`) no blueprint fits any
            slot; the message lists every slot with its kind and signature and every
            blueprint with its layouts and slot kinds.
    """
    bps = list(blueprints)
    if not sites:
        raise ConfigError("no seed slots to grow at: wrap the model with sites= or parallel=")
    out = {slot_id: [bp for bp in bps if supports(bp, site)] for slot_id, site in sites.items()}
    if require and not any(out.values()):
        slots = ", ".join(_describe_site(s, site) for s, site in sites.items())
        offered = ", ".join(_describe_blueprint(bp) for bp in bps) or "(none)"
        raise ConfigError(
            f"no offered blueprint fits any seed slot, so nothing could grow. Slots: {slots}. "
            f"Blueprints: {offered}. Offer blueprints for these layouts and slot kinds (output "
            "slots: sites=; parallel slots: parallel=, e.g. the width/lora families for "
            "Linear layers), or choose other sites.")
    return out
