"""The in-process kernel source: seed modules built from the built-in blueprint catalog.

Local kernel ids are self-describing, `local:<blueprint id>:<site key>` (for example
`local:bp-1a2b…:NCL:4:40:FLOAT32`), so a checkpoint's seeds are rebuilt from the id alone.
Weights depend only on (blueprint, site, `init_seed`), so every process builds the same
seed for the same id.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from esper.blueprints import (
    blueprint_id,
    build_module,
    builtin_blueprints,
    site_key,
    site_shape,
    supports,
)
from esper.blueprints import parse_site_key as _parse_site_key
from esper.errors import BlueprintError, ConfigError, NotFoundError
from esper.tamiyo.policy import KernelCandidate
from generated.esper.common.v1 import blueprint_pb2, seed_pb2

PREFIX = "local:"
"""Kernel ids of in-process kernels start with this."""


def parse_site_key(key: str) -> seed_pb2.SiteSignature:
    """Inverse of `esper.blueprints.site_key`, for output and parallel slots.

    Raises:
        NotFoundError: not a site key (so a bad local kernel id is "no such kernel").
    """
    try:
        return _parse_site_key(key)
    except BlueprintError as e:
        raise NotFoundError(str(e)) from e


class BuiltinKernels:
    """`KernelSource` over the built-in blueprint catalog, built in this process.

    Args:
        blueprints: catalog names to offer (None: every built-in blueprint).
        init_seed: seed of the seeds' initial weights (`build_module(..., seed=)`).

    Raises:
        ConfigError: a name that is not in the catalog (the message lists the catalog).
    """

    component = "kernels"

    def __init__(self, blueprints: Sequence[str] | None = None, *, init_seed: int = 0) -> None:
        catalog = builtin_blueprints()
        by_name = {bp.name: bp for bp in catalog}
        if isinstance(blueprints, str):
            raise ConfigError(f"blueprints={blueprints!r} must be a list of names, not one string")
        if blueprints is not None:
            unknown = [n for n in blueprints if n not in by_name]
            if unknown:
                raise ConfigError(
                    f"unknown blueprint(s) {unknown}; built-in: {', '.join(sorted(by_name))}"
                )
            catalog = [by_name[n] for n in blueprints]
        self.blueprints: dict[str, blueprint_pb2.Blueprint] = {
            bp.blueprint_id or blueprint_id(bp): bp for bp in catalog
        }
        self.init_seed = init_seed
        self._candidates: dict[str, list[KernelCandidate]] = {}

    @staticmethod
    def kernel_id(bp_id: str, site: seed_pb2.SiteSignature) -> str:
        return f"{PREFIX}{bp_id}:{site_key(site)}"

    def blueprint(self, kernel_id: str) -> blueprint_pb2.Blueprint:
        """The blueprint a local kernel id names.

        Raises:
            NotFoundError: not a local id, or a blueprint this source does not offer.
        """
        if not kernel_id.startswith(PREFIX):
            raise NotFoundError(
                f"kernel {kernel_id!r} is not a local kernel id ({PREFIX}<bp>:<site>)")
        bp_id = kernel_id[len(PREFIX):].partition(":")[0]
        bp = self.blueprints.get(bp_id)
        if bp is None:
            raise NotFoundError(
                f"blueprint {bp_id!r} of kernel {kernel_id!r} is not offered; "
                f"offered: {', '.join(sorted(self.blueprints))}"
            )
        return bp

    def load(self, kernel_id: str, site: seed_pb2.SiteSignature | None = None) -> nn.Module:
        """A freshly initialised seed module for a local kernel id.

        Raises:
            NotFoundError: not a local id, a blueprint this source does not offer, or a
                kernel built for another site than `site`.
            BlueprintError: the blueprint does not fit the site.
        """
        bp = self.blueprint(kernel_id)
        key = kernel_id[len(PREFIX):].partition(":")[2]
        encoded = parse_site_key(key)
        if site is not None and site_key(site) != key:
            raise NotFoundError(
                f"kernel {kernel_id!r} was built for site {key}, not {site_key(site)}")
        return build_module(bp, encoded, seed=self.init_seed)

    def candidates(self, site: seed_pb2.SiteSignature) -> list[KernelCandidate]:
        """Every offered blueprint that fits `site`, with its parameters and forward FLOPs."""
        key = site_key(site)
        if key not in self._candidates:
            found = []
            for bp_id, bp in self.blueprints.items():
                if not supports(bp, site):
                    continue
                module = build_module(bp, site, seed=self.init_seed)
                shape = tuple(1 if s is None else s for s in site_shape(site))
                with torch.no_grad(), FlopCounterMode(display=False) as counter:
                    module(torch.zeros((1, *shape)))
                found.append(KernelCandidate(
                    kernel_id=self.kernel_id(bp_id, site),
                    blueprint_id=bp_id,
                    blueprint_name=bp.name,
                    family=bp.family,
                    parameters=sum(p.numel() for p in module.parameters()),
                    forward_flops_per_sample=int(counter.get_total_flops()),
                ))
            self._candidates[key] = found
        return list(self._candidates[key])
