"""Advantage-weighted regression (AWR) on field reports: the second stage of training.

Stage 1 (imitation, `train.train_imitation`) fits every member to the heuristic's choice on
the field snapshots (and synthetic ones) and fits the value head to the observed returns.
Stage 2 re-fits the action and kernel heads to the actions the behaviour policy actually
took, each boundary's log-likelihood weighted by

    w = min(exp((R − V(s)) / β), w_max)

where R is the boundary's return (`esper.tamiyo.fieldreports.boundary_rewards`) and V(s)
the ensemble's mean value at that snapshot: actions that turned out better than the value
head expected are imitated more, worse ones less (Peng et al. 2019, "Advantage-Weighted
Regression"). The safety regulariser keeps pushing down the actions a gate rejected, the
trainer could not apply, or the governor rolled back. docs/LEARNED_CONTROL.md has the
method, the reward and the numbers measured with it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from esper.errors import ConfigError
from esper.tamiyo.fieldreports import RewardConfig, RunReport, boundary_rewards
from esper.tamiyo.gnn.model import ACTIONS, Ensemble
from esper.tamiyo.gnn.policy import GnnPolicy
from esper.tamiyo.gnn.train import Example, _collate, teacher_example, train_imitation
from esper.tamiyo.heuristic import HeuristicConfig
from esper.tamiyo.policy import affordable
from generated.esper.common.v1 import decision_pb2

_ACTION_INDEX = {
    decision_pb2.DECISION_KIND_GERMINATE: ACTIONS.index("germinate"),
    decision_pb2.DECISION_KIND_PRUNE: ACTIONS.index("prune"),
    decision_pb2.DECISION_KIND_FOSSILIZE: ACTIONS.index("fossilize"),
}


@dataclass(kw_only=True, frozen=True)
class AwrConfig:
    """Settings of the advantage-weighted stage."""

    beta: float = 0.5
    """Temperature β of exp(A/β), in reward units: smaller trusts the advantages more."""
    max_weight: float = 20.0
    """w_max: no single boundary may dominate the fit."""
    steps: int = 150
    """Optimizer steps of the weighted stage (per member)."""
    lr: float = 2e-3
    """Learning rate of the weighted stage."""
    value_folds: int = 2
    """Cross-fitting folds (by run) of the value baseline: each run's advantages are measured
    against value heads fitted without that run, which could otherwise memorise its returns
    (every boundary is a distinct state) and drive every advantage to 0. 1: no cross-fitting."""

    def __post_init__(self) -> None:
        for name in ("beta", "max_weight", "lr"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"awr {name}={v!r} must be a finite number > 0")
        if self.max_weight < 1:
            raise ValueError(f"awr max_weight={self.max_weight!r} must be >= 1 (weights of average actions are ~1)")
        for name in ("steps", "value_folds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"awr {name}={v!r} must be an integer >= 1")


def awr_weights(returns: torch.Tensor, values: torch.Tensor, *, beta: float, max_weight: float) -> torch.Tensor:
    """min(exp((returns − values) / beta), max_weight), elementwise."""
    if beta <= 0:
        raise ConfigError(f"beta={beta!r} must be > 0")
    return torch.exp((returns - values) / beta).clamp(max=max_weight)


def behaviour_examples(reports: Sequence[RunReport], reward: RewardConfig | None = None) -> list[Example]:
    """One example per boundary: the actions applied there (rejected ones become WAIT and a
    safety target), the behaviour's kernel choice, unsafe germinations as safety targets,
    and the boundary's return as the value target."""
    out = []
    for report in reports:
        for b, (ret, slot_rewards) in zip(report.boundaries, boundary_rewards(report, reward), strict=True):
            snap = b.snapshot
            index = {s.slot_id: i for i, s in enumerate(snap.slots)}
            actions = [0] * len(snap.slots)
            kernel = None
            rejected: list[tuple[int, int]] = []
            for j, d in enumerate(b.decisions):
                a = _ACTION_INDEX.get(d.kind)
                if a is None or d.slot_id not in index:
                    continue
                i = index[d.slot_id]
                if j in b.rejected:
                    rejected.append((i, a))
                    continue
                actions[i] = a
                if d.kind == decision_pb2.DECISION_KIND_GERMINATE:
                    ids = [k.kernel_id for k in affordable(snap, b.candidates.get(d.slot_id, ()))]
                    if d.kernel_id in ids:
                        kernel = (i, ids.index(d.kernel_id))
            rejected += [(index[r.slot_id], ACTIONS.index(r.action)) for r in slot_rewards
                         if r.unsafe and r.slot_id in index]
            out.append(Example(snapshot=snap, candidates=b.candidates, actions=actions, kernel=kernel,
                               rejected=rejected, value_target=ret, group=report.run_id))
    return out


def teacher_examples(
    reports: Sequence[RunReport], teacher: HeuristicConfig, reward: RewardConfig | None = None
) -> list[Example]:
    """The field snapshots labelled with the heuristic's choice, each with its boundary's
    observed return as value target (stage 1 on real boundaries)."""
    out = []
    for r in reports:
        for b, (ret, _) in zip(r.boundaries, boundary_rewards(r, reward), strict=True):
            ex = teacher_example(b.snapshot, b.candidates, teacher)
            ex.value_target, ex.group = ret, r.run_id
            out.append(ex)
    return out


@torch.inference_mode()
def ensemble_values(ensemble: Ensemble, examples: Sequence[Example]) -> torch.Tensor:
    """The members' mean value head output per example, in one batched pass."""
    data = _collate(examples, GnnPolicy(ensemble, uncertainty_threshold=1.0))
    _, _, values = ensemble.forward_all(
        data["x"], data["edge_index"], data["u"], data["batch"], data["slot_nodes"], data["slot_graph"]
    )
    return values.mean(0)


@dataclass(kw_only=True)
class AwrResult:
    imitation_losses: list[float]
    awr_losses: list[float]
    mean_return: float
    value_mse_before: float
    """Mean squared error of the value head against the returns, before stage 1 (untrained)."""
    value_mse: float
    """... of the baseline the advantages are measured against (cross-fitted: out of fold)."""
    weights: list[float]
    """The advantage weight of every behaviour example."""


def train_awr(
    ensemble: Ensemble,
    behaviour: Sequence[Example],
    imitation: Sequence[Example],
    *,
    config: AwrConfig | None = None,
    imitation_steps: int = 200,
    seed: int = 0,
    safety_weight: float = 1.0,
) -> AwrResult:
    """Stage 1 (imitation of `imitation`, whose examples with a `value_target` also fit the
    value head), then stage 2 (weighted fit to `behaviour`'s actions); trains `ensemble` in place."""
    cfg = config or AwrConfig()
    if not behaviour:
        raise ConfigError("train_awr needs at least one behaviour example (collect field reports first)")
    returns = torch.tensor([ex.value_target for ex in behaviour], dtype=torch.float32)
    before = float(((ensemble_values(ensemble, behaviour) - returns) ** 2).mean())
    imitation_losses = train_imitation(ensemble, imitation, steps=imitation_steps, seed=seed,
                                       safety_weight=safety_weight)
    values = _baseline_values(ensemble, behaviour, imitation, cfg, imitation_steps, seed, safety_weight)
    after = float(((values - returns) ** 2).mean())
    weights = awr_weights(returns, values, beta=cfg.beta, max_weight=cfg.max_weight)
    weighted = [
        Example(snapshot=ex.snapshot, candidates=ex.candidates, actions=ex.actions, kernel=ex.kernel,
                rejected=ex.rejected, value_target=ex.value_target, weight=float(w))
        for ex, w in zip(behaviour, weights, strict=True)
    ]
    awr_losses = train_imitation(ensemble, weighted, steps=cfg.steps, lr=cfg.lr, seed=seed + 1,
                                 safety_weight=safety_weight)
    return AwrResult(imitation_losses=imitation_losses, awr_losses=awr_losses, mean_return=float(returns.mean()),
                     value_mse_before=before, value_mse=after, weights=[float(w) for w in weights])


def _folds(examples: Sequence[Example], k: int) -> list[int]:
    """Fold of each example: by run (`group`) where examples carry one, else by position."""
    groups = sorted({ex.group for ex in examples})
    if len(groups) >= k and all(ex.group for ex in examples):
        fold_of = {g: i % k for i, g in enumerate(groups)}
        return [fold_of[ex.group] for ex in examples]
    return [i % k for i in range(len(examples))]


def _baseline_values(
    ensemble: Ensemble,
    behaviour: Sequence[Example],
    imitation: Sequence[Example],
    cfg: AwrConfig,
    steps: int,
    seed: int,
    safety_weight: float,
) -> torch.Tensor:
    """V(s) per behaviour example: the trained ensemble's (value_folds 1), or out of fold from
    ensembles of the same architecture fitted on the other folds' runs."""
    if cfg.value_folds == 1:
        return ensemble_values(ensemble, behaviour)
    folds = _folds(behaviour, cfg.value_folds)
    grouped = all(ex.group for ex in behaviour)
    values = torch.zeros(len(behaviour))
    for k in range(cfg.value_folds):
        inside = [i for i, f in enumerate(folds) if f == k]
        if not inside:
            continue
        held = {behaviour[i].group for i in inside} if grouped else {id(behaviour[i]) for i in inside}
        # The held-out runs' boundaries stay as imitation examples; only their returns are hidden.
        train = [dataclasses.replace(ex, value_target=None) if (ex.group if grouped else id(ex)) in held else ex
                 for ex in imitation]
        aux = Ensemble(ensemble.cfg, ensemble.vocab, seed=seed + 101 + k)
        train_imitation(aux, train, steps=steps, seed=seed + 101 + k, safety_weight=safety_weight)
        values[inside] = ensemble_values(aux, [behaviour[i] for i in inside])
    return values
