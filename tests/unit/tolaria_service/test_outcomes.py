"""The worker's Urza field reports: one per seed, with its fate, from the run's events."""

from __future__ import annotations

from esper.tolaria.outcomes import OutcomeReporter
from esper.tolaria.runs import new_envelope
from generated.esper.common.v1 import health_pb2, seed_pb2
from generated.esper.urza.v1 import urza_service_pb2 as upb


def test_outcome_reporter_sends_one_report_per_seed_with_its_fate():
    sent: list[upb.RecordOutcomeRequest] = []
    rep = OutcomeReporter("run-o", "mnist1d", lambda req, t: sent.append(req), degrade=lambda *a: None)
    kid = "sha256:" + "b" * 64

    def lc(slot, to, epoch):
        env = new_envelope("run-o", source="kasmina", epoch=epoch)
        env.lifecycle.slot_id, env.lifecycle.to_stage, env.lifecycle.kernel_id = slot, to, kid
        return env

    m = new_envelope("run-o", source="tolaria", epoch=2)
    m.epoch_metrics.val_accuracy = 0.5
    rep.observe(m)
    rep.observe(lc("a", seed_pb2.SEED_STAGE_GERMINATED, 2))
    rep.observe(lc("b", seed_pb2.SEED_STAGE_GERMINATED, 2))
    health = new_envelope("run-o", source="tolaria", epoch=5)
    health.health.CopyFrom(health_pb2.HealthSnapshot(run_id="run-o", epoch=5))
    health.health.slots.add(slot_id="a", contribution=0.2, contribution_measured=True, seed_parameters=99)
    rep.observe(health)  # the snapshot reaches it as the run's health event
    m.epoch_metrics.val_accuracy = 0.7
    rep.observe(m)
    rep.observe(lc("a", seed_pb2.SEED_STAGE_FOSSILIZED, 6))
    rep.run_ended(8)
    fates = {r.report.slot_id: r.report for r in sent}
    assert fates["a"].fate == upb.SEED_FATE_FOSSILIZED and fates["a"].contribution == 0.2
    assert fates["a"].parameters == 99 and abs(fates["a"].accuracy_delta - 0.2) < 1e-9
    assert fates["b"].fate == upb.SEED_FATE_RUN_ENDED and fates["b"].ended_epoch == 8
    assert len(sent) == 2 and len({r.request_id for r in sent}) == 2
