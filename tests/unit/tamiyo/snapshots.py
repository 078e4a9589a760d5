"""Hand-built health snapshots and kernel records for Tamiyo's tests."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from esper.tamiyo.policy import KernelCandidate
from generated.esper.common.v1 import health_pb2, kernel_pb2, seed_pb2

S = seed_pb2

PLATEAU = [2.0, 1.2, 0.9, 0.80, 0.799, 0.7985, 0.7984]
"""Validation loss that flattened: the last 3 epochs improved the best by ~0.02%."""
IMPROVING = [2.0, 1.5, 1.2, 1.0, 0.85, 0.72, 0.60]


def site(channels: int = 16) -> seed_pb2.SiteSignature:
    return seed_pb2.SiteSignature(layout=seed_pb2.ACTIVATION_LAYOUT_NC, channels=channels, dtype=seed_pb2.D_TYPE_FLOAT32)


def slot(
    slot_id: str,
    stage: int = S.SEED_STAGE_DORMANT,
    *,
    depth: int = 0,
    host_grad_norm: float = 1.0,
    contribution: float = 0.0,
    measured: bool = False,
    epochs_in_stage: int = 0,
    embargo: int = 0,
    channels: int = 16,
    finite: bool = True,
    kernel_id: str = "",
) -> health_pb2.SlotHealth:
    live = stage not in (S.SEED_STAGE_DORMANT, S.SEED_STAGE_EMBARGOED, S.SEED_STAGE_RESETTING, S.SEED_STAGE_PRUNED)
    return health_pb2.SlotHealth(
        slot_id=slot_id,
        stage=stage,
        depth=depth,
        site=site(channels),
        host_grad_norm=host_grad_norm,
        contribution=contribution,
        contribution_measured=measured,
        epochs_in_stage=epochs_in_stage,
        embargo_epochs_left=embargo,
        finite=finite,
        kernel_id=kernel_id or (kernel_id_of(f"k-{slot_id}") if live else ""),
        alpha=1.0 if stage in (S.SEED_STAGE_HOLDING, S.SEED_STAGE_FOSSILIZED) else 0.0,
    )


def snapshot(
    slots: Sequence[health_pb2.SlotHealth],
    *,
    epoch: int = 6,
    val_loss: Sequence[float] = PLATEAU,
    seeds_left: int = 3,
    parameters_left: int = 10_000,
    host_parameters: int = 5_000,
    run_id: str = "run-1",
    graph_nodes: int = 0,
) -> health_pb2.HealthSnapshot:
    snap = health_pb2.HealthSnapshot(
        run_id=run_id,
        epoch=epoch,
        total_epochs=30,
        global_step=epoch * 100,
        slots=list(slots),
        train_loss_history=[v * 0.9 for v in val_loss],
        val_loss_history=list(val_loss),
        val_accuracy_history=[min(0.99, 1.0 - v / 3) for v in val_loss],
        host_parameters=host_parameters,
        total_parameters=host_parameters,
        seeds_left=seeds_left,
        parameters_left=parameters_left,
        task="synthetic",
    )
    if graph_nodes:
        add_chain_graph(snap, graph_nodes)
    return snap


def add_chain_graph(snap: health_pb2.HealthSnapshot, n: int) -> None:
    """A chain of `n` nodes; the snapshot's slots sit after evenly spaced host layers."""
    slot_ids = [s.slot_id for s in snap.slots]
    hosts = n - len(slot_ids)
    every = max(1, hosts // max(len(slot_ids), 1))
    nodes: list[health_pb2.GraphNode] = []
    pending = list(slot_ids)
    for i in range(hosts):
        nodes.append(health_pb2.GraphNode(name=f"layer{i}", kind="linear", parameters=256))
        if pending and (i + 1) % every == 0:
            sid = pending.pop(0)
            nodes.append(health_pb2.GraphNode(name=sid, kind="slot", slot_id=sid))
    for sid in pending:
        nodes.append(health_pb2.GraphNode(name=sid, kind="slot", slot_id=sid))
    snap.graph.nodes.extend(nodes)
    snap.graph.edges.extend(health_pb2.GraphEdge(src=i, dst=i + 1) for i in range(len(nodes) - 1))


def kernel_id_of(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def candidate(
    name: str,
    parameters: int,
    *,
    outcomes: int = 0,
    fossilized: int = 0,
    mean_contribution: float = 0.0,
) -> KernelCandidate:
    return KernelCandidate(
        kernel_id=kernel_id_of(name),
        blueprint_id="bp-" + hashlib.sha256(name.encode()).hexdigest()[:16],
        blueprint_name=name,
        family=name,
        parameters=parameters,
        outcomes=outcomes,
        fossilized=fossilized,
        pruned=outcomes - fossilized,
        mean_contribution=mean_contribution,
    )


def record(c: KernelCandidate, channels: int = 16) -> kernel_pb2.KernelRecord:
    """The Urza KernelRecord a candidate comes from."""
    return kernel_pb2.KernelRecord(
        kernel_id=c.kernel_id,
        manifest=kernel_pb2.KernelManifest(
            blueprint_id=c.blueprint_id,
            blueprint_name=c.blueprint_name,
            family=c.family,
            site=site(channels),
            profile=kernel_pb2.KernelProfile(parameters=c.parameters),
        ),
        stats=kernel_pb2.KernelStats(
            outcomes=c.outcomes, fossilized=c.fossilized, pruned=c.pruned, mean_contribution=c.mean_contribution
        ),
    )
