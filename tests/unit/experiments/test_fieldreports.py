"""Field reports of in-process runs (the top floor's collection for the learned policy)."""

from __future__ import annotations

import pytest

from esper.blueprints.artifact import SigningKey
from esper.errors import ConfigError
from esper.experiments.fieldreports import collect_inprocess
from esper.tamiyo.fieldreports import boundary_rewards
from esper.tamiyo.gnn.fit import TrainSpec, train_policy
from generated.esper.common.v1 import decision_pb2 as D
from tests.unit.tamiyo.snapshots import S


def test_in_process_collection_records_boundaries_exploration_and_a_baseline() -> None:
    (report,) = collect_inprocess(task="spirals", seeds=[7], epsilon=0.5, epochs=6)
    assert report.run_id == "collect-spirals-7" and report.task == "spirals"
    assert [b.snapshot.epoch for b in report.boundaries] == [1, 2, 3, 4, 5]
    assert any(b.explored for b in report.boundaries)
    assert all(b.candidates for b in report.boundaries if any(s.stage == S.SEED_STAGE_DORMANT for s in b.snapshot.slots))
    assert report.baseline_val_accuracy is not None and 0.0 < report.baseline_val_accuracy <= 1.0
    germinated = [d.slot_id for b in report.boundaries for i, d in enumerate(b.decisions)
                  if d.kind == D.DECISION_KIND_GERMINATE and i not in b.rejected]
    assert sorted(o.slot_id for o in report.seeds) == sorted(germinated)
    assert len(boundary_rewards(report)) == len(report.boundaries)


def test_policy_training_asks_for_a_collector_when_it_should_collect(tmp_path) -> None:
    spec = TrainSpec.from_dict({"tasks": ("spirals",), "seeds": (0,), "collect_runs": 1})
    # Tamiyo does not run Tolaria: the in-process runs come from the caller (the top floor).
    with pytest.raises(ConfigError, match="collect_runs=1 needs a collector"):
        train_policy(spec, tmp_path, signing_key=SigningKey.generate())
