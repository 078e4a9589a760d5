"""Which kernels a run needs in Urza: the signatures of its seed sites.

A run can only germinate a kernel that Tezzeret compiled for the exact signature of a
slot's site. `site_signatures` computes those signatures the way the worker will see
them (Kasmina records them from the job's example batch), so a caller can have Tezzeret
compile the catalog for them ahead of the run; the worker itself asks for whatever its
sites lack when it starts (`esper.urza.source.UrzaKernels.ensure`).
"""

from __future__ import annotations

import torch

from esper.jobs.registry import JobRegistry
from esper.jobs.sites import resolve_sites
from esper.kasmina import wrap
from esper.tolaria.config import RunConfig
from generated.esper.common.v1 import seed_pb2


def site_signatures(config: RunConfig, registry: JobRegistry | None = None
                    ) -> dict[str, seed_pb2.SiteSignature]:
    """slot id → SiteSignature for every seed site of the run's model (in depth order)."""
    from esper.tolaria.trainer import build_job

    with torch.random.fork_rng():
        job = build_job(config, registry)
    sites = resolve_sites(job.model, config.sites or job.sites)
    mm = wrap(job.model, sites=sites, example_input=job.example_input)
    return {slot_id: mm.site_signature(slot_id) for slot_id in mm.slots}
