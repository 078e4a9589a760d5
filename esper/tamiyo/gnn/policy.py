"""The learned policy: a GATv2 deep ensemble, masked to legal actions, gated by its own uncertainty.

Per slot, every member gives a distribution over ACTIONS with the actions that are not
legal now masked out (stage rules, embargo, seeds left, a kernel that fits the parameters
left). The ensemble's mean distribution picks the action; its **uncertainty** is the
mutual information between the prediction and the member (BALD: entropy of the mean minus
the mean of the members' entropies), divided by log(#legal actions) so it lies in [0, 1].
For a germination the kernel choice's mutual information counts too (the larger of the two).

**Safety gate**: where a slot's uncertainty is above `uncertainty_threshold`, the learned
choice is not used; the heuristic's decision for that slot (or WAIT) is emitted instead,
with `fallback=True` and the uncertainty in the reason. At most one germination per
boundary (the most probable one); every decision carries confidence and uncertainty.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from esper.config import from_dict
from esper.tamiyo.gnn.features import build_graph
from esper.tamiyo.gnn.io import load_policy, trusted_keys_for
from esper.tamiyo.gnn.model import ACTIONS, Ensemble, kernel_features
from esper.tamiyo.heuristic import HeuristicConfig, HeuristicPolicy
from esper.tamiyo.policy import (
    GERMINATE,
    Candidates,
    KernelCandidate,
    Policy,
    affordable,
    legal_actions,
    wait,
)
from generated.esper.common.v1 import decision_pb2, health_pb2

_KIND = {
    "wait": decision_pb2.DECISION_KIND_WAIT,
    "germinate": decision_pb2.DECISION_KIND_GERMINATE,
    "prune": decision_pb2.DECISION_KIND_PRUNE,
    "fossilize": decision_pb2.DECISION_KIND_FOSSILIZE,
}


@dataclass(kw_only=True, frozen=True)
class GnnConfig:
    """`settings["tamiyo"]["gnn"]`."""

    policy_file: str = ""
    """Path of the policy's JSON config (its safetensors weights sit next to it)."""
    uncertainty_threshold: float = 0.2
    """Normalised ensemble mutual information above which the heuristic decides instead."""
    trusted_keys_dir: str = ""
    """Directory of the Ed25519 public keys (*.pub/*.pem) whose policy signatures are accepted;
    empty: ESPER_TRUSTED_KEYS_DIR, else `<data_dir>/trusted_keys` (where Tezzeret publishes its
    key). Re-read at every (re)load."""

    def __post_init__(self) -> None:
        if not self.policy_file:
            raise ValueError("policy_file='' : the gnn policy needs a policy file (esper tamiyo train writes one)")
        if not (isinstance(self.uncertainty_threshold, int | float) and 0.0 <= self.uncertainty_threshold <= 1.0):
            raise ValueError(f"uncertainty_threshold={self.uncertainty_threshold!r} must be in [0, 1]")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> GnnConfig:
        return from_dict(cls, data, what="tamiyo.gnn key(s)", path="tamiyo.gnn")


@dataclass(kw_only=True)
class SlotChoice:
    slot_id: str
    action: str
    probs: dict[str, float]
    uncertainty: float
    legal: tuple[str, ...]
    kernel: KernelCandidate | None = None


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


def _mutual_information(member_probs: torch.Tensor, n_options: torch.Tensor) -> torch.Tensor:
    """Normalised BALD mutual information; member_probs [M, S, A], n_options [S]."""
    mi = _entropy(member_probs.mean(0)) - _entropy(member_probs).mean(0)
    norm = torch.log(n_options.clamp_min(2).to(member_probs.dtype))
    return torch.where(n_options > 1, (mi / norm).clamp(0.0, 1.0), torch.zeros_like(mi))


class GnnPolicy(Policy):
    name = "gnn"
    fallback_name = "heuristic"
    uses_probes = True  # its heuristic fallback chooses kernels by them

    def __init__(
        self,
        ensemble: Ensemble,
        *,
        uncertainty_threshold: float,
        fallback: HeuristicPolicy | None = None,
        version: str = "0",
    ) -> None:
        self.ensemble = ensemble.eval()
        self.uncertainty_threshold = uncertainty_threshold
        self.fallback = fallback or HeuristicPolicy()
        self._version = version

    @property
    def version(self) -> str:
        return self._version

    def settings(self) -> dict[str, str]:
        return {
            "uncertainty_threshold": str(self.uncertainty_threshold),
            "ensemble_members": str(len(self.ensemble.members)),
            "hidden": str(self.ensemble.cfg.hidden),
            "heads": str(self.ensemble.cfg.heads),
            "layers": str(self.ensemble.cfg.layers),
            "blueprint_vocab": str(len(self.ensemble.vocab)),
        }

    def legal_mask(self, snapshot: health_pb2.HealthSnapshot, candidates: Candidates) -> torch.Tensor:
        """[slots, len(ACTIONS)] bool: WAIT always; others by stage, embargo and budget."""
        rows = []
        for s in snapshot.slots:
            legal = set(legal_actions(s.stage))
            if GERMINATE in legal and (
                s.embargo_epochs_left > 0
                or snapshot.seeds_left <= 0
                or not affordable(snapshot, candidates.get(s.slot_id, ()))
            ):
                legal.discard(GERMINATE)
            rows.append([a == "wait" or a in legal for a in ACTIONS])
        return torch.tensor(rows, dtype=torch.bool).reshape(len(rows), len(ACTIONS))

    @torch.inference_mode()
    def evaluate(self, snapshot: health_pb2.HealthSnapshot, candidates: Candidates) -> tuple[list[SlotChoice], torch.Tensor]:
        """Per-slot masked choices and the members' action probabilities [M, S, A].

        One batched pass of the whole ensemble over the graph (`Ensemble.infer`), then one
        batched kernel-scoring pass over every germinating slot's candidates.
        """
        g = build_graph(snapshot)
        mask = self.legal_mask(snapshot, candidates)
        embs, logits = self.ensemble.infer(g.x, g.edge_index[0], g.edge_index[1], g.u, g.slot_nodes)
        member_probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
        mean = member_probs.mean(0)
        unc = _mutual_information(member_probs, mask.sum(-1)).tolist()
        best = mean.argmax(-1).tolist()
        mean_rows, mask_rows = mean.tolist(), mask.tolist()
        choices = []
        for i, slot_id in enumerate(g.slot_ids):
            p = dict(zip(ACTIONS, mean_rows[i], strict=True))
            legal = tuple(a for a, ok in zip(ACTIONS, mask_rows[i], strict=True) if ok)
            choices.append(SlotChoice(slot_id=slot_id, action=ACTIONS[best[i]], probs=p, uncertainty=unc[i], legal=legal))
        germinating = [i for i, c in enumerate(choices) if c.action == "germinate"]
        if germinating:
            self._pick_kernels(snapshot, candidates, [choices[i] for i in germinating], embs[:, germinating])
        return choices, member_probs

    def _pick_kernels(
        self, snapshot: health_pb2.HealthSnapshot, candidates: Candidates, choices: list[SlotChoice], embs: torch.Tensor
    ) -> None:
        """Sets `kernel` on each germinating choice and raises its uncertainty to the kernel
        choice's where that is higher; embs [M, len(choices), h]."""
        offered = [affordable(snapshot, candidates.get(c.slot_id, ())) for c in choices]
        rows = torch.tensor([j for j, ks in enumerate(offered) for _ in ks], dtype=torch.long)
        bp = self.ensemble.blueprint_index([k.blueprint_id for ks in offered for k in ks])
        kf = torch.tensor([kernel_features(k, snapshot.host_parameters) for ks in offered for k in ks],
                          dtype=torch.float32)
        scores = self.ensemble.infer_kernel_scores(embs[:, rows], bp, kf)
        start = 0
        for c, ks in zip(choices, offered, strict=True):
            member = torch.softmax(scores[:, start : start + len(ks)], dim=-1)
            start += len(ks)
            unc = float(_mutual_information(member.unsqueeze(1), torch.tensor([len(ks)]))[0])
            c.kernel = ks[int(member.mean(0).argmax())]
            c.uncertainty = max(c.uncertainty, unc)

    def decide(self, snapshot: health_pb2.HealthSnapshot, candidates: Candidates) -> list[decision_pb2.Decision]:
        # The heuristic runs every boundary so its per-run history stays complete for fallbacks.
        heuristic = {d.slot_id: d for d in self.fallback.decide(snapshot, candidates) if d.slot_id}
        choices, _ = self.evaluate(snapshot, candidates)
        germinating = [c for c in choices if c.action == "germinate" and c.uncertainty <= self.uncertainty_threshold]
        keep = max(germinating, key=lambda c: c.probs["germinate"], default=None)
        decisions: list[decision_pb2.Decision] = []
        fallback_germinated = False
        for c in choices:
            ex = ", ".join(f"{a}={c.probs[a]:.2f}" for a in c.legal)
            if c.uncertainty > self.uncertainty_threshold:
                h = heuristic.get(c.slot_id)
                if h is not None and h.kind == decision_pb2.DECISION_KIND_GERMINATE:
                    if keep is not None or fallback_germinated:
                        h = None
                    else:
                        fallback_germinated = True
                d = decision_pb2.Decision()
                if h is not None:
                    d.CopyFrom(h)
                else:
                    d.kind, d.slot_id = decision_pb2.DECISION_KIND_WAIT, c.slot_id
                    d.reason = f"wait at {c.slot_id}"
                d.reason = (
                    f"{d.reason} — fallback to {self.fallback_name}: ensemble uncertainty {c.uncertainty:.3f} > "
                    f"threshold {self.uncertainty_threshold:.3f} (gnn wanted {c.action}; {ex})"
                )
                d.fallback, d.policy = True, self.name
                d.uncertainty, d.confidence = c.uncertainty, c.probs[c.action]
                decisions.append(d)
                continue
            action = c.action
            if action == "germinate" and c is not keep:
                action = "wait"
            if action == "wait" and len(c.legal) <= 1:
                continue  # nothing could be done at this slot; the global WAIT covers it
            d = decision_pb2.Decision(
                kind=_KIND[action],
                slot_id=c.slot_id,
                policy=self.name,
                confidence=c.probs[action],
                uncertainty=c.uncertainty,
                reason=(
                    f"gnn: {action} {c.slot_id} (p={c.probs[action]:.2f}; {ex}; ensemble of "
                    f"{len(self.ensemble.members)}, uncertainty {c.uncertainty:.3f} <= {self.uncertainty_threshold:.3f})"
                ),
            )
            if c.action == "germinate" and action == "wait":
                d.reason += "; another slot germinates this boundary"
            if action == "germinate" and c.kernel is not None:
                d.kernel_id, d.blueprint_id = c.kernel.kernel_id, c.kernel.blueprint_id
                d.reason += f"; kernel {c.kernel.label}"
            decisions.append(d)
        if not any(d.kind != decision_pb2.DECISION_KIND_WAIT for d in decisions):
            decisions.append(wait("gnn: no slot has an action worth taking this boundary", policy=self.name))
        return decisions


def load_gnn_policy(config: Any, *, data_dir: Path | None = None) -> GnnPolicy:
    """The GNN policy `TamiyoConfig.gnn` names, with the heuristic from `TamiyoConfig.heuristic` as fallback.

    The file must be signed by a key in `gnn.trusted_keys_dir` (else ESPER_TRUSTED_KEYS_DIR,
    else `<data_dir>/trusted_keys`).
    """
    gcfg = GnnConfig.from_dict(config.gnn)
    trusted = trusted_keys_for(gcfg.trusted_keys_dir or None, data_dir=data_dir)
    ensemble, meta = load_policy(Path(gcfg.policy_file), trusted)
    return GnnPolicy(
        ensemble,
        uncertainty_threshold=gcfg.uncertainty_threshold,
        fallback=HeuristicPolicy(HeuristicConfig.from_dict(config.heuristic)),
        version=str(meta["version"]),
    )
