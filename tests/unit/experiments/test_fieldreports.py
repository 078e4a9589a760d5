"""Field reports of in-process runs (the top floor's collection for the learned policy)."""

from __future__ import annotations

from esper.experiments.fieldreports import collect_inprocess
from esper.tamiyo.fieldreports import boundary_rewards
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
