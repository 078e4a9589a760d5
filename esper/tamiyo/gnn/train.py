"""Imitation of the heuristic: the first stage of training the learned policy.

Each ensemble member is fitted on its own bootstrap resample of (snapshot, candidates,
heuristic decision) examples, from its own initialisation, with a cross-entropy loss on
the masked per-slot action distribution plus, where the teacher germinated, a
cross-entropy over the offered kernels. Different resamples and initialisations are what
make the members disagree away from the data (the uncertainty the safety gate reads).

Examples come from field snapshots (Tolaria's telemetry) or, to bootstrap before any run
exists, from `sample_snapshot`: random but plausible boundaries (1–6 slots in random
stages, gradient and activation statistics, contribution, loss curves that improve or
plateau, budgets). The value head is fitted only where examples carry a return (the
advantage-weighted stage); imitation leaves it untrained.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch_geometric.utils import softmax as pyg_softmax

from esper.tamiyo.gnn.features import build_graph
from esper.tamiyo.gnn.model import ACTIONS, Ensemble, kernel_features
from esper.tamiyo.gnn.policy import GnnPolicy
from esper.tamiyo.heuristic import HeuristicConfig, HeuristicPolicy
from esper.tamiyo.policy import Candidates, KernelCandidate, affordable
from generated.esper.common.v1 import decision_pb2, health_pb2, seed_pb2

_ACTION_OF = {
    decision_pb2.DECISION_KIND_GERMINATE: "germinate",
    decision_pb2.DECISION_KIND_PRUNE: "prune",
    decision_pb2.DECISION_KIND_FOSSILIZE: "fossilize",
}


@dataclass(kw_only=True)
class Example:
    snapshot: health_pb2.HealthSnapshot
    candidates: dict[str, list[KernelCandidate]]
    actions: list[int]
    """Teacher's action index per slot (snapshot.slots order)."""
    kernel: tuple[int, int] | None = None
    """(slot index, index into that slot's affordable candidates) of the teacher's germination."""
    rejected: list[tuple[int, int]] = field(default_factory=list)
    """(slot index, action index) taken here that a gate later rejected or the governor rolled
    back (field reports' `rejected_by_gate` / `rolled_back`): the safety regulariser's targets."""
    value_target: float | None = None
    """Observed return from this boundary (advantage-weighted stage); None: no value loss."""
    group: str = ""
    """Run the example came from: the advantage stage's value baseline for a run is fitted
    without that run's own returns (cross-fitting)."""
    weight: float = 1.0
    """Weight of this example's action and kernel log-likelihood (the advantage weight
    exp(A/β) in the advantage-weighted stage; 1 for plain imitation)."""


def _kernel(name: str, parameters: int, outcomes: int, fossilized: int, contribution: float) -> KernelCandidate:
    h = hashlib.sha256(name.encode()).hexdigest()
    return KernelCandidate(
        kernel_id=f"sha256:{h}",
        blueprint_id=f"bp-{h[:16]}",
        blueprint_name=name,
        family=name,
        parameters=parameters,
        outcomes=outcomes,
        fossilized=fossilized,
        pruned=outcomes - fossilized,
        mean_contribution=contribution,
    )


def sample_snapshot(rng: random.Random, *, run_id: str = "synthetic") -> tuple[health_pb2.HealthSnapshot, dict[str, list[KernelCandidate]]]:
    """One plausible epoch boundary and the kernels on offer at its dormant slots."""
    n_slots = rng.randint(1, 6)
    host = rng.choice([2_000, 8_000, 30_000])
    epoch = rng.randint(0, 40)
    base = rng.uniform(0.3, 2.0)
    plateau_at = rng.randint(2, 30)
    val = []
    for e in range(epoch + 1):
        decay = min(e, plateau_at)
        val.append(base * (0.5 + 0.5 * 0.85**decay) * (1 + rng.gauss(0, 0.003)))
    stages = [
        seed_pb2.SEED_STAGE_DORMANT,
        seed_pb2.SEED_STAGE_DORMANT,
        seed_pb2.SEED_STAGE_TRAINING,
        seed_pb2.SEED_STAGE_BLENDING,
        seed_pb2.SEED_STAGE_HOLDING,
        seed_pb2.SEED_STAGE_FOSSILIZED,
        seed_pb2.SEED_STAGE_EMBARGOED,
    ]
    snap = health_pb2.HealthSnapshot(
        run_id=run_id,
        epoch=epoch,
        total_epochs=40,
        val_loss_history=val,
        train_loss_history=[v * rng.uniform(0.8, 1.0) for v in val],
        val_accuracy_history=[max(0.0, min(1.0, 1.1 - v / (base * 1.1))) for v in val],
        host_parameters=host,
        total_parameters=host,
        seeds_left=rng.choice([0, 1, 2, 3]),
        parameters_left=rng.choice([0, host // 20, host // 4, host]),
        task="synthetic",
    )
    site = seed_pb2.SiteSignature(layout=seed_pb2.ACTIVATION_LAYOUT_NC, channels=32)
    for i in range(n_slots):
        stage = rng.choice(stages)
        live = stage in (seed_pb2.SEED_STAGE_TRAINING, seed_pb2.SEED_STAGE_BLENDING, seed_pb2.SEED_STAGE_HOLDING)
        measured = stage in (seed_pb2.SEED_STAGE_BLENDING, seed_pb2.SEED_STAGE_HOLDING)
        snap.slots.add(
            slot_id=f"body.{i}",
            stage=stage,
            alpha=1.0 if stage == seed_pb2.SEED_STAGE_HOLDING else (rng.random() if measured else 0.0),
            site=site,
            host_grad_norm=rng.lognormvariate(-1, 0.8),
            seed_grad_norm=rng.lognormvariate(-2, 0.8) if live else 0.0,
            activation_mean=rng.gauss(0, 0.3),
            activation_std=rng.lognormvariate(0, 0.3),
            contribution=rng.gauss(0.005, 0.02) if measured else 0.0,
            contribution_measured=measured,
            epochs_in_stage=rng.randint(0, 8) if stage != seed_pb2.SEED_STAGE_DORMANT else 0,
            embargo_epochs_left=rng.randint(1, 3) if stage == seed_pb2.SEED_STAGE_EMBARGOED else (rng.random() < 0.1) * 2,
            finite=rng.random() > 0.03,
            depth=i,
            seed_parameters=host // 20 if live else 0,
            kernel_id=f"sha256:{i:064x}" if live else "",
        )
    pool = [
        _kernel("bottleneck", host // 25, 20, 15, 0.03),
        _kernel("lowrank", host // 50, 12, 6, 0.01),
        _kernel("wide", host // 3, 8, 6, 0.05),
        _kernel("fresh", host // 30, 0, 0, 0.0),
    ]
    candidates = {
        s.slot_id: rng.sample(pool, rng.randint(1, len(pool))) for s in snap.slots if s.stage == seed_pb2.SEED_STAGE_DORMANT
    }
    return snap, candidates


def teacher_example(
    snap: health_pb2.HealthSnapshot, candidates: Candidates, teacher_config: HeuristicConfig
) -> Example:
    """The heuristic's decision for one snapshot as training labels.

    A fresh teacher per example: its fossilization history is then the snapshot alone, so
    the teacher runs with `fossilize_epochs=1` semantics by construction of the config given.
    """
    teacher = HeuristicPolicy(teacher_config)
    decisions = teacher.decide(snap, candidates)
    index = {s.slot_id: i for i, s in enumerate(snap.slots)}
    actions = [0] * len(snap.slots)
    kernel = None
    for d in decisions:
        a = _ACTION_OF.get(d.kind)
        if a is None or d.slot_id not in index:
            continue
        i = index[d.slot_id]
        actions[i] = ACTIONS.index(a)
        if a == "germinate":
            ks = affordable(snap, candidates.get(d.slot_id, ()))
            kernel = (i, [k.kernel_id for k in ks].index(d.kernel_id))
    return Example(snapshot=snap, candidates={k: list(v) for k, v in candidates.items()}, actions=actions, kernel=kernel)


def synthetic_examples(n: int, *, seed: int, teacher_config: HeuristicConfig | None = None) -> list[Example]:
    rng = random.Random(seed)
    cfg = teacher_config or HeuristicConfig(fossilize_epochs=1, warmup_epochs=3)
    return [teacher_example(*sample_snapshot(rng, run_id=f"synthetic-{seed}-{i}"), cfg) for i in range(n)]


def _collate(examples: Sequence[Example], policy: GnnPolicy) -> dict:
    xs, eis, us, batch, slot_nodes, slot_graph, masks, actions = [], [], [], [], [], [], [], []
    offset = 0
    for gi, ex in enumerate(examples):
        g = build_graph(ex.snapshot)
        xs.append(g.x)
        eis.append(g.edge_index + offset)
        us.append(g.u)
        batch.append(torch.full((g.x.shape[0],), gi, dtype=torch.long))
        slot_nodes.append(g.slot_nodes + offset)
        slot_graph.append(torch.full((len(g.slot_ids),), gi, dtype=torch.long))
        masks.append(policy.legal_mask(ex.snapshot, ex.candidates))
        actions.extend(ex.actions)
        offset += g.x.shape[0]
    return {
        "x": torch.cat(xs),
        "edge_index": torch.cat(eis, dim=1),
        "u": torch.stack(us),
        "batch": torch.cat(batch),
        "slot_nodes": torch.cat(slot_nodes),
        "slot_graph": torch.cat(slot_graph),
        "mask": torch.cat(masks),
        "actions": torch.tensor(actions, dtype=torch.long),
        "slot_weight": torch.tensor(
            [ex.weight for ex in examples for _ in ex.snapshot.slots], dtype=torch.float32
        ),
    }


def _kernel_targets(examples: Sequence[Example], ensemble: Ensemble) -> dict[str, torch.Tensor] | None:
    """All offered kernels of every teacher germination, flattened for one batched loss.

    rows: slot row (in the collated batch) each candidate belongs to; group: which
    germination it belongs to; target: flat index of the teacher's kernel per group.
    """
    rows, bps, kfs, groups, targets, weights = [], [], [], [], [], []
    row = offset = 0
    for ex in examples:
        if ex.kernel is not None:
            i, target = ex.kernel
            weights.append(ex.weight)
            ks = affordable(ex.snapshot, ex.candidates.get(ex.snapshot.slots[i].slot_id, ()))
            rows += [row + i] * len(ks)
            bps.append(ensemble.blueprint_index([k.blueprint_id for k in ks]))
            kfs += [kernel_features(k, ex.snapshot.host_parameters) for k in ks]
            groups += [len(targets)] * len(ks)
            targets.append(offset + target)
            offset += len(ks)
        row += len(ex.snapshot.slots)
    if not targets:
        return None
    return {
        "rows": torch.tensor(rows, dtype=torch.long),
        "bp": torch.cat(bps),
        "kf": torch.tensor(kfs, dtype=torch.float32),
        "group": torch.tensor(groups, dtype=torch.long),
        "target": torch.tensor(targets, dtype=torch.long),
        "weight": torch.tensor(weights, dtype=torch.float32),
    }


def _safety_targets(examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    rows, acts = [], []
    row = 0
    for ex in examples:
        for i, a in ex.rejected:
            rows.append(row + i)
            acts.append(a)
        row += len(ex.snapshot.slots)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(acts, dtype=torch.long)


def _value_targets(examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    idx = [g for g, ex in enumerate(examples) if ex.value_target is not None]
    return torch.tensor(idx, dtype=torch.long), torch.tensor(
        [examples[g].value_target for g in idx], dtype=torch.float32
    )


def train_imitation(
    ensemble: Ensemble,
    examples: Sequence[Example],
    *,
    steps: int = 200,
    lr: float = 3e-3,
    seed: int = 0,
    safety_weight: float = 1.0,
    value_weight: float = 0.5,
) -> list[float]:
    """Fit every member on its own bootstrap resample; returns each member's final loss.

    Loss = cross-entropy to the teacher's masked action per slot
    + cross-entropy to the teacher's kernel where it germinated
    (both multiplied by each example's `weight` when any weight differs from 1: the
    advantage-weighted stage)
    + `safety_weight` × mean −log(1 − p(action)) over actions a gate rejected or the
      governor rolled back (drives their probability towards 0 even where imitated)
    + `value_weight` × mean squared error of the value head where a return is known.
    """
    policy = GnnPolicy(ensemble, uncertainty_threshold=1.0)
    finals = []
    for k, member in enumerate(ensemble.members):
        rng = random.Random(seed * 7919 + k)
        sample = [examples[rng.randrange(len(examples))] for _ in examples]
        data = _collate(sample, policy)
        kernels = _kernel_targets(sample, ensemble)
        unsafe_rows, unsafe_actions = _safety_targets(sample)
        value_idx, value_y = _value_targets(sample)
        weighted = bool((data["slot_weight"] != 1).any())
        opt = torch.optim.Adam(member.parameters(), lr=lr)
        member.train()
        loss = torch.tensor(0.0)
        for _ in range(steps):
            emb, logits, value = member(
                data["x"], data["edge_index"], data["u"], data["batch"], data["slot_nodes"], data["slot_graph"]
            )
            logits = logits.masked_fill(~data["mask"], -1e9)
            if weighted:
                ce = F.cross_entropy(logits, data["actions"], reduction="none")
                loss = (ce * data["slot_weight"]).mean()
            else:
                loss = F.cross_entropy(logits, data["actions"])
            if len(unsafe_rows) and safety_weight > 0:
                p = torch.softmax(logits, dim=-1)[unsafe_rows, unsafe_actions]
                loss = loss - safety_weight * torch.log((1 - p).clamp_min(1e-6)).mean()
            if len(value_idx) and value_weight > 0:
                loss = loss + value_weight * F.mse_loss(value[value_idx], value_y)
            if kernels is not None:
                scores = member.kernel_scores(emb[kernels["rows"]], kernels["bp"], kernels["kf"])
                log_p = torch.log(pyg_softmax(scores, kernels["group"]).clamp_min(1e-12))
                if weighted:
                    loss = loss - (log_p[kernels["target"]] * kernels["weight"]).mean()
                else:
                    loss = loss - log_p[kernels["target"]].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        member.eval()
        finals.append(float(loss.detach()))
    ensemble.eval()
    return finals


def imitation_accuracy(ensemble: Ensemble, examples: Sequence[Example]) -> float:
    """Fraction of slots where the ensemble's masked argmax equals the teacher's action."""
    policy = GnnPolicy(ensemble, uncertainty_threshold=1.0)
    hits = total = 0
    for ex in examples:
        choices, _ = policy.evaluate(ex.snapshot, ex.candidates)
        for c, a in zip(choices, ex.actions, strict=True):
            hits += c.action == ACTIONS[a]
            total += 1
    return hits / max(total, 1)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m esper.tamiyo.gnn.train --out policies/gnn.json`: imitation of the heuristic on
    synthetic boundaries; prints held-out agreement with the teacher; writes a versioned policy file."""
    import argparse
    import time
    from pathlib import Path

    from esper.tamiyo.gnn.io import save_policy
    from esper.tamiyo.gnn.model import NetConfig

    ap = argparse.ArgumentParser(description="Train Tamiyo's GNN policy by imitating the heuristic")
    ap.add_argument("--out", required=True, help="policy JSON path (weights written next to it)")
    ap.add_argument("--examples", type=int, default=600)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--version", default="", help="policy version (default: UTC timestamp)")
    ap.add_argument("--signing-key", default="", help="Ed25519 private key file to sign with (default: "
                    "ESPER_SIGNING_KEY(_FILE), else DATA_DIR/tezzeret/signing_key.pem)")
    ap.add_argument("--data-dir", type=Path, default=Path(".esper"), help="the platform's data directory")
    args = ap.parse_args(argv)
    from esper.tamiyo.gnn.io import signing_key_for

    key, _ = signing_key_for(args.signing_key or None, data_dir=args.data_dir)
    torch.set_num_threads(1)
    train = synthetic_examples(args.examples, seed=args.seed * 2 + 1)
    held = synthetic_examples(max(args.examples // 3, 50), seed=args.seed * 2 + 2)
    vocab = sorted({k.blueprint_id for e in train for ks in e.candidates.values() for k in ks})
    ens = Ensemble(NetConfig(hidden=args.hidden, members=args.members), vocab, seed=args.seed)
    t0 = time.monotonic()
    losses = train_imitation(ens, train, steps=args.steps, seed=args.seed)
    agreement = imitation_accuracy(ens, held)
    version = args.version or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = save_policy(
        ens,
        Path(args.out),
        version=version,
        signing_key=key,
        training={
            "method": "imitation of the heuristic (synthetic boundaries)",
            "examples": len(train),
            "steps": args.steps,
            "seed": args.seed,
            "final_losses": losses,
            "heldout_agreement": agreement,
            "seconds": round(time.monotonic() - t0, 1),
        },
    )
    print(f"wrote {path} version {version} (signed by key {key.key_id}): held-out agreement with the "
          f"heuristic {agreement:.1%}")


if __name__ == "__main__":
    main()
