"""Baseline controllers for the growth benchmark: random legal actions and a fixed schedule.

Both obey the rules every policy obeys (legal actions, embargo, seeds and parameters left,
one germination per boundary) and both prune a seed whose numbers are not finite, so the
comparison with the heuristic is about *when* and *where* to grow, not about safety.
"""

from __future__ import annotations

import hashlib
import random

from esper.tamiyo._config import settings_in_words
from esper.tamiyo.baselines.config import FixedConfig, RandomConfig
from esper.tamiyo.policy import (
    FOSSILIZE,
    PRUNE,
    Candidates,
    Policy,
    affordable,
    legal_actions,
    seeds_in_flight,
    slot_finite,
    stage_name,
    wait,
)
from generated.esper.common.v1 import decision_pb2, health_pb2, seed_pb2


def _decision(kind: int, slot_id: str, reason: str, policy: str) -> decision_pb2.Decision:
    return decision_pb2.Decision(kind=kind, slot_id=slot_id, reason=reason, policy=policy, confidence=1.0)


def _non_finite_prunes(snapshot: health_pb2.HealthSnapshot, policy: str) -> list[decision_pb2.Decision]:
    return [
        _decision(
            decision_pb2.DECISION_KIND_PRUNE,
            s.slot_id,
            f"prune {s.slot_id}: its health numbers are not finite in {stage_name(s.stage)}",
            policy,
        )
        for s in snapshot.slots
        if PRUNE in legal_actions(s.stage) and not slot_finite(s)
    ]


class RandomPolicy(Policy):
    name = "random"

    def __init__(self, config: RandomConfig | None = None) -> None:
        self.config = config or RandomConfig()

    def settings(self) -> dict[str, str]:
        return settings_in_words(self.config)

    def _rng(self, snapshot: health_pb2.HealthSnapshot) -> random.Random:
        # A stable hash (not Python's salted hash()) so a retried boundary, or the same run
        # replayed in another process, draws the same actions.
        key = f"{self.config.seed}:{snapshot.run_id}:{snapshot.epoch}".encode()
        return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))

    def decide(self, snapshot: health_pb2.HealthSnapshot, candidates: Candidates) -> list[decision_pb2.Decision]:
        cfg = self.config
        rng = self._rng(snapshot)
        decisions = _non_finite_prunes(snapshot, self.name)
        removed = {d.slot_id for d in decisions}
        for s in sorted(snapshot.slots, key=lambda s: s.depth):
            if s.slot_id in removed:
                continue
            legal = legal_actions(s.stage)
            if FOSSILIZE in legal and rng.random() < cfg.fossilize_prob:
                decisions.append(
                    _decision(
                        decision_pb2.DECISION_KIND_FOSSILIZE,
                        s.slot_id,
                        f"fossilize {s.slot_id}: random draw below fossilize_prob={cfg.fossilize_prob}",
                        self.name,
                    )
                )
            elif PRUNE in legal and rng.random() < cfg.prune_prob:
                removed.add(s.slot_id)
                decisions.append(
                    _decision(
                        decision_pb2.DECISION_KIND_PRUNE,
                        s.slot_id,
                        f"prune {s.slot_id} in {stage_name(s.stage)}: random draw below prune_prob={cfg.prune_prob}",
                        self.name,
                    )
                )
        germ, why_not = self._germination(snapshot, candidates, removed, rng)
        if germ is not None:
            decisions.append(germ)
        if not decisions:
            decisions.append(wait(why_not, policy=self.name))
        return decisions

    def _germination(
        self,
        snapshot: health_pb2.HealthSnapshot,
        candidates: Candidates,
        removed: set[str],
        rng: random.Random,
    ) -> tuple[decision_pb2.Decision | None, str]:
        cfg = self.config
        if snapshot.epoch < cfg.warmup_epochs:
            return None, f"warm-up: epoch {snapshot.epoch} < warmup_epochs={cfg.warmup_epochs}"
        if snapshot.seeds_left <= 0:
            return None, "no seeds left in the growth budget"
        in_flight = [s for s in seeds_in_flight(snapshot) if s not in removed]
        if cfg.one_seed_in_flight and in_flight:
            return None, f"seed(s) {in_flight} are still training or blending"
        options = [
            (s, affordable(snapshot, candidates.get(s.slot_id, ())))
            for s in snapshot.slots
            if s.stage == seed_pb2.SEED_STAGE_DORMANT and s.embargo_epochs_left == 0
        ]
        options = [(s, ks) for s, ks in options if ks]
        if not options:
            return None, "no open dormant slot has a kernel within the parameters left"
        if rng.random() >= cfg.germinate_prob:
            return None, f"random draw above germinate_prob={cfg.germinate_prob}"
        slot, kernels = options[rng.randrange(len(options))]
        k = kernels[rng.randrange(len(kernels))]
        d = _decision(
            decision_pb2.DECISION_KIND_GERMINATE,
            slot.slot_id,
            f"germinate {slot.slot_id} with {k.label}: random slot and kernel "
            f"(germinate_prob={cfg.germinate_prob})",
            self.name,
        )
        d.blueprint_id, d.kernel_id = k.blueprint_id, k.kernel_id
        return d, ""


class FixedPolicy(Policy):
    name = "fixed"

    def __init__(self, config: FixedConfig | None = None) -> None:
        self.config = config or FixedConfig()

    def settings(self) -> dict[str, str]:
        return settings_in_words(self.config)

    def decide(self, snapshot: health_pb2.HealthSnapshot, candidates: Candidates) -> list[decision_pb2.Decision]:
        cfg = self.config
        decisions = _non_finite_prunes(snapshot, self.name)
        removed = {d.slot_id for d in decisions}
        for s in snapshot.slots:
            if (
                s.slot_id not in removed
                and s.stage == seed_pb2.SEED_STAGE_HOLDING
                and s.epochs_in_stage >= cfg.fossilize_after_epochs
            ):
                decisions.append(
                    _decision(
                        decision_pb2.DECISION_KIND_FOSSILIZE,
                        s.slot_id,
                        f"fossilize {s.slot_id}: {s.epochs_in_stage} epochs in HOLDING "
                        f">= fossilize_after_epochs={cfg.fossilize_after_epochs} (fixed schedule)",
                        self.name,
                    )
                )
        germ, why_not = self._germination(snapshot, candidates)
        if germ is not None:
            decisions.append(germ)
        if not decisions:
            decisions.append(wait(why_not, policy=self.name))
        return decisions

    def _germination(
        self, snapshot: health_pb2.HealthSnapshot, candidates: Candidates
    ) -> tuple[decision_pb2.Decision | None, str]:
        cfg = self.config
        if snapshot.epoch not in cfg.germinate_epochs:
            return None, f"epoch {snapshot.epoch} is not in germinate_epochs={list(cfg.germinate_epochs)}"
        if snapshot.seeds_left <= 0:
            return None, f"scheduled germination at epoch {snapshot.epoch}, but no seeds are left"
        sign = 1 if cfg.slot_order == "earliest" else -1
        open_slots = sorted(
            (s for s in snapshot.slots if s.stage == seed_pb2.SEED_STAGE_DORMANT and s.embargo_epochs_left == 0),
            key=lambda s: (sign * s.depth, s.slot_id),
        )
        for slot in open_slots:
            # Urza orders candidates best recorded outcome first; the schedule takes the first that fits.
            kernels = affordable(snapshot, candidates.get(slot.slot_id, ()))
            if kernels:
                k = kernels[0]
                d = _decision(
                    decision_pb2.DECISION_KIND_GERMINATE,
                    slot.slot_id,
                    f"germinate {slot.slot_id} with {k.label}: scheduled at epoch {snapshot.epoch} "
                    f"({cfg.slot_order} open dormant slot, first kernel in Urza's outcome order that fits)",
                    self.name,
                )
                d.blueprint_id, d.kernel_id = k.blueprint_id, k.kernel_id
                return d, ""
        return None, (
            f"scheduled germination at epoch {snapshot.epoch}, but no open dormant slot has a kernel "
            f"within {snapshot.parameters_left} parameters left"
        )
