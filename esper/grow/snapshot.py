"""What a controller sees at a boundary: the health snapshot, the model graph, the kernels on offer.

Plain functions over a `MorphogeneticModel`; the grower calls them in this order:
`measure_contribution` (held-out batch) → `build_snapshot` → `offered_kernels`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from esper.errors import EsperError
from esper.kasmina import MorphogeneticModel
from esper.tamiyo.policy import KernelCandidate
from generated.esper.common.v1 import health_pb2, seed_pb2

UNBOUNDED_PARAMETERS = 2**63 - 1
"""`HealthSnapshot.parameters_left` when the budget sets no parameter bound."""


def count(params: Any) -> int:
    return sum(p.numel() for p in params)


def _call(model: nn.Module, x: Any) -> Any:
    if isinstance(x, tuple):
        return model(*x)
    if isinstance(x, dict):
        return model(**x)
    return model(x)


def execution_order(host: nn.Module, example_input: Any, sites: Mapping[str, nn.Module]
                    ) -> list[tuple[str, str]]:
    """The host's leaf modules in the order a forward pass runs them, and each slot.

    `sites` maps each slot id to the module whose output the slot changes (a span's last
    child). Returns `[("leaf", name) | ("slot", slot_id), ...]`: a slot comes right after
    that module finished (for a module with children, after its last leaf). Runs `example_input` once
    in eval mode without autograd; modules keep their train/eval modes.
    """
    order: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    handles = []

    def note(kind: str, name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _a: Any, _o: Any) -> None:
            if (kind, name) not in seen:
                seen.add((kind, name))
                order.append((kind, name))
        return hook

    modules = dict(host.named_modules())
    try:
        for name, mod in modules.items():
            if name and not any(True for _ in mod.children()):
                handles.append(mod.register_forward_hook(note("leaf", name)))
        # Registered after the leaf hooks: on a leaf site the leaf is noted first.
        for slot_id, module in sites.items():
            handles.append(module.register_forward_hook(note("slot", slot_id)))
        modes = [(m, m.training) for m in modules.values()]
        host.eval()
        try:
            with torch.no_grad():
                _call(host, example_input)
        finally:
            for m, mode in modes:
                m.training = mode
    finally:
        for h in handles:
            h.remove()
    return order


def model_graph(mm: MorphogeneticModel, order: Sequence[tuple[str, str]]) -> health_pb2.ModelGraph:
    """Leaf modules in execution order with a slot node after each site, chained."""
    graph = health_pb2.ModelGraph()
    modules = dict(mm.host.named_modules())
    slots = mm.slots
    for kind, name in order:
        if kind == "leaf":
            mod = modules[name]
            graph.nodes.add(name=name, kind=type(mod).__name__.lower(),
                            parameters=count(mod.parameters()))
        else:
            seed = slots[name].seed
            graph.nodes.add(name=f"{name}/slot", kind="slot", slot_id=name,
                            parameters=count(seed.parameters()) if seed is not None else 0)
    for i in range(len(graph.nodes) - 1):
        graph.edges.add(src=i, dst=i + 1)
    return graph


@dataclass(kw_only=True, frozen=True)
class Budget:
    """What the growth budget leaves at a boundary."""

    seeds_left: int
    parameters_left: int


def build_snapshot(
    mm: MorphogeneticModel,
    *,
    run_id: str,
    epoch: int,
    total_epochs: int,
    train_loss: Sequence[float],
    val_loss: Sequence[float],
    val_accuracy: Sequence[float],
    host_parameters: int,
    budget: Budget,
    contributions: dict[str, float],
    graph: health_pb2.ModelGraph,
    task: str,
) -> health_pb2.HealthSnapshot:
    """The `HealthSnapshot` of `mm` now; a seed whose numbers are not finite is marked so."""
    snap = health_pb2.HealthSnapshot(
        run_id=run_id,
        epoch=epoch,
        total_epochs=total_epochs,
        global_step=mm.global_step,
        train_loss_history=list(train_loss),
        val_loss_history=list(val_loss),
        val_accuracy_history=list(val_accuracy),
        host_parameters=host_parameters,
        total_parameters=count(mm.parameters()),
        seeds_left=budget.seeds_left,
        parameters_left=budget.parameters_left,
        task=task,
    )
    for h in mm.health():
        slot = snap.slots.add()
        slot.CopyFrom(h.to_proto())
        if h.slot_id in contributions:
            slot.contribution = contributions[h.slot_id]
            slot.contribution_measured = True
        if not math.isfinite(slot.contribution):
            # The contract's doubles stay finite; the policy reads `finite` and prunes.
            slot.finite = False
            slot.contribution = 0.0
    snap.graph.CopyFrom(graph)
    snap.taken_at.GetCurrentTime()
    return snap


HISTORY_LIMIT = 16
"""Records per slot a snapshot carries (the heuristic's streaks are shorter)."""

RECORDS_LIMIT = 512
"""Records a snapshot carries in all (`HealthSnapshot.slot_records`' bound)."""


def slot_records(snapshot: health_pb2.HealthSnapshot) -> dict[str, list[Any]]:
    """slot id → `[stage, contribution measured, contribution, kernel id]` of this boundary."""
    return {s.slot_id: [int(s.stage), bool(s.contribution_measured), float(s.contribution),
                        s.kernel_id] for s in snapshot.slots}


def attach_history(snapshot: health_pb2.HealthSnapshot, boundaries: Sequence[Mapping[str, Any]]) -> None:
    """Fill `snapshot.slot_records` for each seed-holding slot from earlier boundaries'
    records and this one.

    `boundaries` are `{"epoch": e, "slots": slot_records(...)}` in epoch order (the
    grower's `GrowthHistory.slot_records`). A slot's history is the run of boundaries,
    newest backwards, at which it held the kernel it holds now (a new seed starts a new
    history), at most `HISTORY_LIMIT` records ending with this boundary (fewer when so
    many slots hold seeds that `RECORDS_LIMIT` would be passed). Sets
    `snapshot.slot_history`.
    """
    snapshot.slot_history = True
    current = slot_records(snapshot)
    earlier = [b for b in boundaries if b["epoch"] < snapshot.epoch]
    seeded = [s for s in snapshot.slots if s.kernel_id]
    limit = min(HISTORY_LIMIT, RECORDS_LIMIT // max(1, len(seeded)))
    for slot in seeded:
        if limit < 1:
            break
        kept: list[tuple[int, list[Any]]] = [(snapshot.epoch, current[slot.slot_id])]
        for b in reversed(earlier):
            rec = b["slots"].get(slot.slot_id)
            if rec is None or rec[3] != slot.kernel_id or len(kept) >= limit:
                break
            kept.append((int(b["epoch"]), rec))
        for epoch, (stage, measured, contribution, _) in reversed(kept):
            snapshot.slot_records.add(slot_id=slot.slot_id, epoch=epoch, stage=stage,
                                      contribution_measured=measured,
                             contribution=contribution if math.isfinite(contribution) else 0.0)


def open_slots(snapshot: health_pb2.HealthSnapshot) -> list[health_pb2.SlotHealth]:
    """DORMANT, not embargoed slots, when the budget still allows a germination."""
    if snapshot.seeds_left == 0 or snapshot.parameters_left == 0:
        return []
    return [s for s in snapshot.slots
            if s.stage == seed_pb2.SEED_STAGE_DORMANT and s.embargo_epochs_left == 0]


def offered_kernels(
    snapshot: health_pb2.HealthSnapshot, candidates: Callable[[seed_pb2.SiteSignature], list[KernelCandidate]]
) -> tuple[dict[str, list[KernelCandidate]], list[EsperError]]:
    """Per open slot, the source's kernels that fit the parameters left; and the source's errors.

    A site the source could not answer for is left out (no germination there this
    boundary); each distinct site is asked once.
    """
    by_site: dict[bytes, list[KernelCandidate] | None] = {}
    errors: list[EsperError] = []
    out: dict[str, list[KernelCandidate]] = {}
    bound = snapshot.parameters_left
    for slot in open_slots(snapshot):
        key = slot.site.SerializeToString(deterministic=True)
        if key not in by_site:
            try:
                by_site[key] = list(candidates(slot.site))
            except EsperError as e:
                by_site[key] = None
                errors.append(e)
        kernels = by_site[key]
        if kernels is not None:
            out[slot.slot_id] = [c for c in kernels if c.parameters <= bound]
    return out, errors
