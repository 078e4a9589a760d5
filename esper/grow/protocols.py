"""The two things a grower is given by value: a `Controller` and a `KernelSource`.

In process: `esper.grow.controllers` (Tamiyo's policies run here) and
`esper.grow.kernels.BuiltinKernels` (the built-in blueprint catalog built here).
Remote: `esper.tamiyo.client.TamiyoController` (TamiyoService.Decide over gRPC) and
`esper.urza.source.UrzaKernels` (Urza's kernels, verified by Kasmina's loader). The user's
training loop is the same for both; only the constructor argument changes.

Raising an `EsperError` from either means "degraded this boundary": the grower records
a `DegradationEvent` (component = the object's `component` attribute, else "controller" /
"kernels") and training goes on without that decision or kernel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import nn

from esper.tamiyo.policy import KernelCandidate
from generated.esper.common.v1 import decision_pb2, health_pb2, seed_pb2

SiteSignature = seed_pb2.SiteSignature
HealthSnapshot = health_pb2.HealthSnapshot
Decision = decision_pb2.Decision

__all__ = [
    "Controller",
    "Decision",
    "HealthSnapshot",
    "KernelCandidate",
    "KernelSource",
    "SiteSignature",
    "Stateful",
]


class KernelSource(Protocol):
    """Where seed modules come from."""

    def candidates(self, site: SiteSignature) -> list[KernelCandidate]:
        """The kernels that fit `site` (best first, if the source knows an order).

        Raises:
            EsperError: the source cannot answer now (the boundary goes on without them).
        """
        ...

    def load(self, kernel_id: str, site: SiteSignature | None = None) -> nn.Module:
        """A fresh seed module for `kernel_id`.

        `site` is the slot's signature at germination, and None when a checkpoint is
        loaded (the id alone must then suffice).

        Raises:
            NotFoundError: no such kernel (the germination is rejected).
            EsperError: anything else (rejected, and a degradation is recorded).
        """
        ...


class Controller(Protocol):
    """Decides growth at an epoch boundary."""

    def decide(self, snapshot: HealthSnapshot,
               candidates: Mapping[str, Sequence[KernelCandidate]]) -> Sequence[Decision]:
        """Decisions for this boundary.

        Args:
            snapshot: what the model looks like now (slots, graph, history, budget).
            candidates: per open DORMANT slot, the kernels the grower's source offers
                that fit the parameters left.

        Raises:
            EsperError: no decision this boundary (unavailable, deadline, ...).
        """
        ...


@runtime_checkable
class Stateful(Protocol):
    """A controller (or kernel source) whose memory belongs in the grower's checkpoint.

    `state_dict()` returns plain JSON-able data (dicts, lists, str, numbers, bools).
    """

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...
