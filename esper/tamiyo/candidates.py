"""Caller-chosen kernel candidates on the wire: `DecideRequest.candidates` ⇄ `KernelCandidate`s.

A caller with its own kernel source (esper.grow) sends the kernels it can load per slot;
Tamiyo then chooses among them instead of querying Urza. Messages only: no gRPC here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from esper.errors import InvalidArgumentError
from esper.tamiyo.policy import KernelCandidate
from generated.esper.common.v1 import health_pb2
from generated.esper.tamiyo.v1 import tamiyo_service_pb2 as pb


def to_proto(candidates: Mapping[str, Sequence[KernelCandidate]]) -> pb.CallerCandidates:
    """The wire form of per-slot candidates (slots and kernels in the given order)."""
    msg = pb.CallerCandidates()
    for slot_id, kernels in candidates.items():
        slot = msg.slots.add(slot_id=slot_id)
        for c in kernels:
            slot.kernels.add(
                kernel_id=c.kernel_id, blueprint_id=c.blueprint_id,
                blueprint_name=c.blueprint_name, family=c.family, parameters=c.parameters,
                forward_flops_per_sample=c.forward_flops_per_sample, outcomes=c.outcomes,
                fossilized=c.fossilized, pruned=c.pruned, mean_contribution=c.mean_contribution,
            )
    return msg


def from_proto(msg: pb.CallerCandidates, snapshot: health_pb2.HealthSnapshot,
               field: str = "candidates") -> dict[str, list[KernelCandidate]]:
    """Per-slot candidates from the wire, checked against the snapshot.

    Raises:
        InvalidArgumentError: a slot the snapshot does not have, a slot listed twice, or a
            kernel listed twice for one slot (`field` names the offending entry).
    """
    known = {s.slot_id for s in snapshot.slots}
    out: dict[str, list[KernelCandidate]] = {}
    for i, slot in enumerate(msg.slots):
        where = f"{field}.slots[{i}]"
        if slot.slot_id not in known:
            raise InvalidArgumentError(
                f"{where}.slot_id={slot.slot_id!r} is not a slot of the snapshot; slots: "
                f"{sorted(known) or 'none'}", field=f"{where}.slot_id")
        if slot.slot_id in out:
            raise InvalidArgumentError(f"{where}.slot_id={slot.slot_id!r} is listed twice",
                                       field=f"{where}.slot_id")
        kernels: list[KernelCandidate] = []
        seen: set[str] = set()
        for j, k in enumerate(slot.kernels):
            if k.kernel_id in seen:
                raise InvalidArgumentError(
                    f"{where}.kernels[{j}].kernel_id={k.kernel_id!r} is listed twice for slot "
                    f"{slot.slot_id!r}", field=f"{where}.kernels[{j}].kernel_id")
            seen.add(k.kernel_id)
            kernels.append(KernelCandidate(
                kernel_id=k.kernel_id, blueprint_id=k.blueprint_id,
                blueprint_name=k.blueprint_name, family=k.family, parameters=int(k.parameters),
                forward_flops_per_sample=int(k.forward_flops_per_sample),
                outcomes=int(k.outcomes), fossilized=int(k.fossilized), pruned=int(k.pruned),
                mean_contribution=float(k.mean_contribution),
            ))
        out[slot.slot_id] = kernels
    return out
