"""Which kernels a run needs in Urza before it starts: the signatures of its seed sites.

A run can only germinate a kernel that Tezzeret compiled for the exact signature of a
slot's site. `site_signatures` computes those signatures the way the worker will see
them (Kasmina records them from one example batch), so the platform can have Tezzeret
compile the catalog for them before the first Decide.
"""

from __future__ import annotations

import torch

from esper.kasmina import wrap
from esper.tolaria.config import RunConfig
from esper.tolaria.tasks import get_task, resolve_sites
from generated.esper.common.v1 import seed_pb2


def site_signatures(config: RunConfig) -> dict[str, seed_pb2.SiteSignature]:
    """slot id → SiteSignature for every seed site of the run's host (in depth order)."""
    task = get_task(config.task)
    spec = task.host(config.host)
    data = task.load(config.seed)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        host = spec.build(config.width)
    sites = resolve_sites(host, config.sites or spec.default_sites)
    mm = wrap(host, sites=sites, example_input=data.x_train[:8])
    return {slot_id: mm.site_signature(slot_id) for slot_id in mm.slots}
