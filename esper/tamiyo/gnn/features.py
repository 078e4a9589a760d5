"""The model as a graph for the learned policy: nodes, edges and features from one HealthSnapshot.

Nodes are `HealthSnapshot.graph.nodes` (host layers and seed slots, data-flow edges as
given by Tolaria from `torch.fx` or the module structure). A slot in `snapshot.slots` with
no graph node is appended and chained to the previous slot by depth, so a snapshot without
a graph still gives a (chain) graph. Edges are made bidirectional: a slot's decision
depends on what is upstream (its input) and downstream (what consumes it).

Node features (`NODE_FEATURES`, every one bounded so no input can dominate by scale):
kind one-hot, log-parameters, and for slot nodes the SlotHealth numbers: stage one-hot,
alpha, log gradient norms, activation statistics, counterfactual contribution (and whether
it was measured), log steps/epochs in stage, log seed parameters, embargo, finiteness, depth,
and the slot's kind (`site.kind`: 1 for a parallel slot, whose seed reads the wrapped
module's input) with its channel ratio (log2 of output over input channels, squashed: a
parallel slot over `Linear(40 → 16)` is not the same place as an activation of 16).
Global features (`GLOBAL_FEATURES`): training progress, latest losses and accuracy and
their trends over the last 3 and 8 epochs, train/val gap, the plateau statistic the
heuristic uses, and the growth budget left.

Non-finite inputs become 0 with the slot's `finite` feature 0, so a diverging seed is
visible to the network without poisoning it with NaN.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from esper.tamiyo.policy import IN_FLIGHT_STAGES
from generated.esper.common.v1 import health_pb2, seed_pb2

FEATURE_VERSION = 2
"""Bumped whenever the meaning or order of a feature changes (policy files record it; a
file of another version is refused at load with "retrain it"). 2: slot kind features."""

KINDS: tuple[str, ...] = ("linear", "conv", "norm", "activation", "other", "slot")
STAGES: tuple[int, ...] = tuple(v for v in seed_pb2.SeedStage.values() if v != seed_pb2.SEED_STAGE_UNSPECIFIED)

NODE_FEATURES: tuple[str, ...] = (
    *(f"kind_{k}" for k in KINDS),
    "log_parameters",
    *(f"stage_{seed_pb2.SeedStage.Name(s).removeprefix('SEED_STAGE_').lower()}" for s in STAGES),
    "alpha",
    "log_host_grad_norm",
    "log_seed_grad_norm",
    "activation_mean",
    "log_activation_std",
    "contribution",
    "contribution_measured",
    "log_steps_in_stage",
    "log_epochs_in_stage",
    "log_seed_parameters",
    "embargoed",
    "embargo_epochs_left",
    "finite",
    "depth",
    "slot_parallel",
    "slot_channel_ratio",
)

GLOBAL_FEATURES: tuple[str, ...] = (
    "progress",
    "log_val_loss",
    "log_train_loss",
    "val_accuracy",
    "val_loss_trend_3",
    "val_loss_trend_8",
    "val_accuracy_trend_3",
    "val_accuracy_trend_8",
    "generalization_gap",
    "plateau_improvement_3",
    "log_seeds_left",
    "parameters_left_fraction",
    "slots_in_flight_fraction",
    "history_length",
)


@dataclass(kw_only=True)
class GraphInput:
    """Tensors for one snapshot."""

    x: torch.Tensor
    """[nodes, len(NODE_FEATURES)] float32."""
    edge_index: torch.Tensor
    """[2, edges] int64, both directions, plus one self-loop per node."""
    u: torch.Tensor
    """[len(GLOBAL_FEATURES)] float32."""
    slot_nodes: torch.Tensor
    """[slots] int64: node index of each slot, in `slot_ids` order."""
    slot_ids: list[str]
    """Slot ids in `snapshot.slots` order."""


def _kind(kind: str) -> str:
    k = kind.lower()
    if k == "slot":
        return "slot"
    if "conv" in k:
        return "conv"
    if "norm" in k:
        return "norm"
    if k in ("linear", "dense", "embedding"):
        return "linear"
    if k in ("relu", "gelu", "silu", "tanh", "sigmoid", "activation"):
        return "activation"
    return "other"


def _f(v: float) -> float:
    return v if math.isfinite(v) else 0.0


def _log(v: float) -> float:
    v = _f(v)
    return math.copysign(math.log1p(abs(v)), v)


def _squash(v: float, scale: float) -> float:
    return math.tanh(_f(v) / scale)


def _trend(h: Sequence[float], n: int, *, log: bool) -> float:
    """Change over the last `n` epochs, relative (for losses) or absolute (for accuracies), squashed."""
    vals = [v for v in h if math.isfinite(v)]
    if len(vals) < 2:
        return 0.0
    a, b = vals[-min(n + 1, len(vals))], vals[-1]
    if log:
        return math.tanh((b - a) / max(abs(a), 1e-12) * 5)
    return math.tanh((b - a) * 10)


def _plateau(h: Sequence[float], window: int) -> float:
    vals = [v for v in h if math.isfinite(v)]
    if len(vals) < window + 1:
        return 1.0
    before, recent = min(vals[:-window]), min(vals[-window:])
    return math.tanh((before - recent) / max(abs(before), 1e-12) * 10)


def slot_features(s: health_pb2.SlotHealth, max_depth: int) -> list[float]:
    stage = [1.0 if s.stage == st else 0.0 for st in STAGES]
    finite = s.finite and all(
        math.isfinite(v)
        for v in (s.alpha, s.host_grad_norm, s.seed_grad_norm, s.activation_mean, s.activation_std, s.contribution)
    )
    return [
        *stage,
        _f(s.alpha),
        _log(s.host_grad_norm),
        _log(s.seed_grad_norm),
        _squash(s.activation_mean, 3.0),
        _log(s.activation_std),
        _squash(s.contribution, 0.05),
        1.0 if s.contribution_measured else 0.0,
        math.log1p(s.steps_in_stage) / 10,
        math.log1p(s.epochs_in_stage) / 3,
        math.log1p(s.seed_parameters) / 12,
        1.0 if s.embargo_epochs_left > 0 else 0.0,
        math.log1p(s.embargo_epochs_left) / 3,
        1.0 if finite else 0.0,
        s.depth / max(max_depth, 1),
        *_kind_features(s.site),
    ]


def _kind_features(site: seed_pb2.SiteSignature) -> tuple[float, float]:
    if site.kind != seed_pb2.SLOT_KIND_PARALLEL:
        return 0.0, 0.0
    ratio = max(site.channels, 1) / max(site.input.channels, 1)
    return 1.0, math.tanh(math.log2(ratio) / 3)


def global_features(snap: health_pb2.HealthSnapshot) -> list[float]:
    val, train, acc = list(snap.val_loss_history), list(snap.train_loss_history), list(snap.val_accuracy_history)

    def last(h: list[float]) -> float:
        return _f(h[-1]) if h else 0.0

    in_flight = sum(1 for s in snap.slots if s.stage in IN_FLIGHT_STAGES)
    return [
        snap.epoch / max(snap.total_epochs, snap.epoch, 1),
        _log(last(val)),
        _log(last(train)),
        last(acc),
        _trend(val, 3, log=True),
        _trend(val, 8, log=True),
        _trend(acc, 3, log=False),
        _trend(acc, 8, log=False),
        _squash(last(val) - last(train), 0.5),
        _plateau(val, 3),
        math.log1p(snap.seeds_left) / 3,
        min(snap.parameters_left / max(snap.host_parameters, 1), 4.0) / 4,
        in_flight / max(len(snap.slots), 1),
        math.log1p(len(val)) / 5,
    ]


@dataclass(kw_only=True, frozen=True)
class _Topology:
    """What a snapshot's graph gives before any health number: host rows, edges, slot rows."""

    base_x: torch.Tensor
    """[nodes, len(NODE_FEATURES)]: kind one-hot and log-parameters; slot health columns 0."""
    edge_index: torch.Tensor
    slot_nodes: torch.Tensor
    """Node index of each slot in `snapshot.slots` order."""


_CACHE_SIZE = 128
_cache: OrderedDict[bytes, _Topology] = OrderedDict()
_cache_lock = threading.Lock()


def _topology_key(snap: health_pb2.HealthSnapshot) -> bytes:
    slots = "\0".join(f"{s.slot_id}\1{s.depth}" for s in snap.slots)
    return snap.graph.SerializeToString(deterministic=True) + b"\0\0" + slots.encode()


def _topology(snap: health_pb2.HealthSnapshot) -> _Topology:
    """The topology part of the graph, cached: it changes only when a seed is germinated or
    pruned (a slot node's parameter count) or the host changes, not from epoch to epoch."""
    key = _topology_key(snap)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    n_kind = len(KINDS)
    width = len(NODE_FEATURES)
    slot_ids = {s.slot_id for s in snap.slots}
    rows: list[list[float]] = []
    node_of_slot: dict[str, int] = {}
    for i, n in enumerate(snap.graph.nodes):
        row = [0.0] * width
        kind = _kind(n.kind)
        row[KINDS.index(kind)] = 1.0
        row[n_kind] = math.log1p(n.parameters) / 12
        if kind == "slot" and n.slot_id in slot_ids and n.slot_id not in node_of_slot:
            node_of_slot[n.slot_id] = i
        rows.append(row)
    edges = [(e.src, e.dst) for e in snap.graph.edges if e.src < len(rows) and e.dst < len(rows)]
    previous: int | None = None
    for s in sorted(snap.slots, key=lambda s: (s.depth, s.slot_id)):
        if s.slot_id not in node_of_slot:
            row = [0.0] * width
            row[KINDS.index("slot")] = 1.0
            node_of_slot[s.slot_id] = len(rows)
            rows.append(row)
            if previous is not None:
                edges.append((previous, node_of_slot[s.slot_id]))
        previous = node_of_slot[s.slot_id]
    if not rows:
        rows.append([0.0] * width)
    # Self-loops added once here rather than by every attention layer of every member.
    both = edges + [(d, s) for s, d in edges] + [(i, i) for i in range(len(rows))]
    topo = _Topology(
        base_x=torch.tensor(rows, dtype=torch.float32),
        edge_index=torch.tensor(both, dtype=torch.long).t().contiguous(),
        slot_nodes=torch.tensor([node_of_slot[s.slot_id] for s in snap.slots], dtype=torch.long),
    )
    with _cache_lock:
        _cache[key] = topo
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return topo


def build_graph(snap: health_pb2.HealthSnapshot) -> GraphInput:
    """Graph tensors for one snapshot (see the module docstring for what each feature is).

    The topology (host rows, edges) comes from a cache keyed by the graph and the slots'
    ids and depths; only the slot rows' health numbers and the globals are computed per
    call. `edge_index` may be shared between calls: never modify it in place.
    """
    topo = _topology(snap)
    max_depth = max((s.depth for s in snap.slots), default=0)
    x = topo.base_x.clone()
    if len(snap.slots):
        health = torch.tensor([slot_features(s, max_depth) for s in snap.slots], dtype=torch.float32)
        x[topo.slot_nodes, len(KINDS) + 1 :] = health
    return GraphInput(
        x=x,
        edge_index=topo.edge_index,
        u=torch.tensor(global_features(snap), dtype=torch.float32),
        slot_nodes=topo.slot_nodes,
        slot_ids=[s.slot_id for s in snap.slots],
    )
