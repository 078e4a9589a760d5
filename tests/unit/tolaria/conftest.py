"""Tiny runs for the Tolaria core tests: spirals with an 8-wide MLP, fast Kasmina stages."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from esper.grow import BuiltinKernels
from esper.kasmina import KasminaConfig
from esper.tolaria.config import RunConfig
from esper.tolaria.trainer import Trainer, build_trainer
from generated.esper.common.v1 import decision_pb2, health_pb2
from generated.esper.oona.v1 import events_pb2

FAST_KASMINA = KasminaConfig(incubation=5, gate_interval=2, blend_duration=10, embargo_epochs=1)


class ScriptedController:
    """A controller that returns fixed decisions at given epochs (a real `Controller`).

    `plan` maps an epoch boundary to (kind, slot id, blueprint name) triples; germinations
    resolve the blueprint to the slot's local kernel id from the snapshot.
    """

    def __init__(self, kernels: BuiltinKernels, plan: dict[int, Sequence[tuple[str, str, str]]]) -> None:
        self.kernels = kernels
        self.plan = plan
        self.snapshots: list[health_pb2.HealthSnapshot] = []

    def decide(self, snapshot: health_pb2.HealthSnapshot, candidates=None) -> list[decision_pb2.Decision]:
        self.snapshots.append(snapshot)
        out = []
        sites = {s.slot_id: s.site for s in snapshot.slots}
        for kind, slot, bp_name in self.plan.get(snapshot.epoch, ()):
            d = decision_pb2.Decision(kind=decision_pb2.DecisionKind.Value(f"DECISION_KIND_{kind}"),
                                      slot_id=slot, reason=f"scripted {kind.lower()}")
            if kind == "GERMINATE":
                bp_id = next(i for i, bp in self.kernels.blueprints.items() if bp.name == bp_name)
                d.blueprint_id = bp_id
                d.kernel_id = self.kernels.kernel_id(bp_id, sites[slot])
            out.append(d)
        return out


def tiny_config(**changes: object) -> RunConfig:
    base = {"task": "spirals", "host": "mlp", "epochs": 2, "batch_size": 128, "seed": 5,
            "checkpoint_every": 1, "optimizer": {"learning_rate": 0.02},
            "budget": {"max_seeds": 4}}
    base.update(changes)
    return RunConfig.from_dict(base)


@pytest.fixture
def make_trainer(tmp_path: Path):
    def make(config: RunConfig | None = None, *, plan: dict | None = None, ckpt: str | None = None,
             controller: object = None, kernels: object = None,
             **kw: object) -> tuple[Trainer, list[events_pb2.EventEnvelope]]:
        """A trainer of `config` (default `tiny_config()`); `plan` scripts its controller
        (or give `controller=`, and `kernels=` to replace the built-in catalog)."""
        events: list[events_pb2.EventEnvelope] = []
        builtin = BuiltinKernels()
        if controller is None and plan is not None:
            controller = ScriptedController(builtin, plan)
        trainer = build_trainer(
            config or tiny_config(), run_id="test-run", kernels=kernels or builtin,
            controller=controller, event_sink=events.append, kasmina=FAST_KASMINA,
            checkpoint_dir=tmp_path / ckpt if ckpt else None, **kw,
        )
        return trainer, events

    return make
