"""In-process stand-ins for the control plane: kernels built from the built-in blueprint
catalog and Tamiyo policies run in the training process.

The growth benchmark and the unit tests use these; a run under the service gets its
kernels from Urza (through Kasmina's `KernelLoader`) and its decisions from
`TamiyoService.Decide`. Both sides satisfy the same `KernelProvider` and `Controller`
protocols (`esper.tolaria.trainer`), so the trainer cannot tell them apart.

Local kernel ids are self-describing, `local:<blueprint id>:<site key>` (for example
`local:bp-1a2b…:NCL:4:40:FLOAT32`), so a checkpoint's seeds can be rebuilt from the id
alone, as Kasmina's `kernel_resolver` requires.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

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
from esper.blueprints import site_signature as make_site_signature
from esper.errors import ConfigError, NotFoundError
from esper.tamiyo.policy import KernelCandidate, Policy, check_decisions
from esper.tasks.hosts import STATIC_SEED
from generated.esper.common.v1 import blueprint_pb2, decision_pb2, health_pb2, seed_pb2

_log = logging.getLogger(__name__)

PREFIX = "local:"


def parse_site_key(key: str) -> seed_pb2.SiteSignature:
    """Inverse of `esper.blueprints.site_key` ("NCL:4:40:FLOAT32" → SiteSignature)."""
    try:
        layout, channels, spatial, dtype = key.split(":")
        extents = [] if spatial == "-" else [int(s) for s in spatial.split("x")]
        return make_site_signature(layout, int(channels), extents,
                                   dtype=seed_pb2.DType.Value("D_TYPE_" + dtype))
    except ValueError as e:
        raise NotFoundError(
            f"site key {key!r} is not of the form LAYOUT:CHANNELS:SPATIAL:DTYPE ({e})"
        ) from e


class BuiltinKernels:
    """`KernelProvider` over the built-in blueprint catalog, built in this process.

    Args:
        blueprints: catalog names to offer (None: every built-in blueprint).
        init_seed: seed of the seeds' initial weights (`build_module(..., seed=)`).
    """

    def __init__(self, blueprints: Sequence[str] | None = None, *, init_seed: int = 0) -> None:
        catalog = builtin_blueprints()
        by_name = {bp.name: bp for bp in catalog}
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

    def load(self, kernel_id: str, site: seed_pb2.SiteSignature | None = None) -> nn.Module:
        """A freshly initialised seed module for a local kernel id.

        Raises:
            NotFoundError: not a local id, or a blueprint this provider does not offer.
            BlueprintError: the blueprint does not fit the site.
        """
        if not kernel_id.startswith(PREFIX):
            raise NotFoundError(f"kernel {kernel_id!r} is not a local kernel id ({PREFIX}<bp>:<site>)")
        bp_id, _, key = kernel_id[len(PREFIX):].partition(":")
        bp = self.blueprints.get(bp_id)
        if bp is None:
            raise NotFoundError(
                f"blueprint {bp_id!r} of kernel {kernel_id!r} is not offered; "
                f"offered: {', '.join(sorted(self.blueprints))}"
            )
        encoded = parse_site_key(key)
        if site is not None and site_key(site) != key:
            raise NotFoundError(
                f"kernel {kernel_id!r} was built for site {key}, not {site_key(site)}"
            )
        return build_module(bp, encoded, seed=self.init_seed)

    def candidates(self, site: seed_pb2.SiteSignature) -> list[KernelCandidate]:
        """Every offered blueprint that fits `site`, as Tamiyo's kernel candidates."""
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
                found.append(
                    KernelCandidate(
                        kernel_id=self.kernel_id(bp_id, site),
                        blueprint_id=bp_id,
                        blueprint_name=bp.name,
                        family=bp.family,
                        parameters=sum(p.numel() for p in module.parameters()),
                        forward_flops_per_sample=int(counter.get_total_flops()),
                    )
                )
            self._candidates[key] = found
        return list(self._candidates[key])


class PolicyController:
    """`Controller` running a Tamiyo policy in this process, under Tamiyo's rules.

    Candidates come from a `BuiltinKernels` provider for every DORMANT slot; whatever the
    rules withhold (`esper.tamiyo.policy.check_decisions`) is logged and kept in
    `withheld`, as the Tamiyo service does.
    """

    def __init__(self, policy: Policy, kernels: BuiltinKernels) -> None:
        self.policy = policy
        self.kernels = kernels
        self.withheld: list[str] = []

    def decide(self, snapshot: health_pb2.HealthSnapshot) -> list[decision_pb2.Decision]:
        candidates = {
            s.slot_id: self.kernels.candidates(s.site)
            for s in snapshot.slots
            if s.stage == seed_pb2.SEED_STAGE_DORMANT
        }
        decisions = self.policy.decide(snapshot, candidates)
        allowed, withheld = check_decisions(snapshot, decisions, candidates)
        for w in withheld:
            _log.info("policy %s: withheld %s: %s", self.policy.name,
                      decision_pb2.DecisionKind.Name(w.decision.kind), w.why)
            self.withheld.append(w.why)
        return allowed


def attach_static_seeds(host: nn.Module, kernels: BuiltinKernels,
                        seeds: Iterable[tuple[str, str]]) -> None:
    """Fix seed modules into `host`: `y = h + seed(h)` at each (site, kernel id), from step 0.

    This is how the static-final baseline gets the grown topology without growing: the
    same modules the controller fossilized, present (and trained) from the first step.
    Each seed becomes a child `static_seed` of its site module, so its parameters are host
    parameters and its weights are in the host's state dict; a forward hook on the site
    adds its output. (The host's own module list is left alone: an `nn.Sequential` runs
    every child it has.)

    Raises:
        ConfigError: a site that is not a module of the host (the message lists them).
    """
    modules = dict(host.named_modules())
    for site, kernel_id in seeds:
        if site not in modules:
            raise ConfigError(
                f"static seed site {site!r} is not a module of the host; "
                f"available: {', '.join(n for n in modules if n)}"
            )
        site_module = modules[site]
        site_module.add_module(STATIC_SEED, kernels.load(kernel_id))
        site_module.register_forward_hook(_add_static_seed)


def _add_static_seed(module: nn.Module, _args: object, out: torch.Tensor) -> torch.Tensor:
    return out + getattr(module, STATIC_SEED)(out)
