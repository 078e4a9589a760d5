"""Report from a synthetic event log: the numbers in the Markdown come from the events."""

from __future__ import annotations

import math

from esper.tolaria.report import RunHistory, write_report
from esper.tolaria.runs import new_envelope
from generated.esper.common.v1 import seed_pb2
from generated.esper.oona.v1 import events_pb2

S = seed_pb2


def _log() -> list[events_pb2.EventEnvelope]:
    out = []
    stage = S.SEED_STAGE_DORMANT
    alpha = 0.0
    params = 5000
    for e in range(1, 13):
        if e == 4:
            for a, b in [(S.SEED_STAGE_DORMANT, S.SEED_STAGE_GERMINATED), (S.SEED_STAGE_GERMINATED, S.SEED_STAGE_TRAINING)]:
                env = new_envelope("run-t", source="kasmina", epoch=e)
                env.lifecycle.slot_id, env.lifecycle.from_stage, env.lifecycle.to_stage = "body.1", a, b
                env.lifecycle.blueprint_id = "bp-conv"
                env.lifecycle.reason = "plateau"
                out.append(env)
            stage, params = S.SEED_STAGE_TRAINING, 7000
        if e == 6:
            stage, alpha = S.SEED_STAGE_BLENDING, 0.5
        if e == 7:
            stage, alpha = S.SEED_STAGE_HOLDING, 1.0
        if e == 9:
            env = new_envelope("run-t", source="kasmina", epoch=e)
            env.lifecycle.slot_id = "body.1"
            env.lifecycle.from_stage, env.lifecycle.to_stage = S.SEED_STAGE_HOLDING, S.SEED_STAGE_FOSSILIZED
            out.append(env)
            stage = S.SEED_STAGE_FOSSILIZED
        env = new_envelope("run-t", source="tolaria", epoch=e)
        m = env.epoch_metrics
        m.epoch, m.total_epochs = e, 12
        m.train_loss = 2.0 * math.exp(-e / 4)
        m.val_loss = m.train_loss + 0.1
        m.val_accuracy = 0.3 + 0.05 * e
        m.parameters = params
        m.train_flops = 1e9 * e
        m.control_ms = 2.0
        m.epoch_seconds = 0.5
        m.alphas["body.1"] = alpha
        m.alphas["head.0"] = 0.0
        m.stages["body.1"] = stage
        out.append(env)
    d = new_envelope("run-t", source="tolaria", epoch=5)
    d.degradation.component, d.degradation.kind = "tamiyo", "unavailable"
    out.append(d)
    # A resumed worker re-emits epoch 12: the later metrics win.
    again = new_envelope("run-t", source="tolaria", epoch=12)
    again.epoch_metrics.CopyFrom(out[-2].epoch_metrics)
    again.epoch_metrics.val_accuracy = 0.91
    out.append(again)
    end = new_envelope("run-t", source="tolaria", epoch=12)
    end.run_state.state = "succeeded"
    out.append(end)
    return out


def test_history_reads_marks_and_dedups_epochs():
    h = RunHistory.from_events(_log())
    assert [m.epoch for m in h.epochs] == list(range(1, 13))
    assert h.epochs[-1].val_accuracy == 0.91
    assert [(m.kind, m.epoch) for m in h.marks] == [("germinate", 4), ("fossilize", 9)]
    assert h.slots == ["body.1", "head.0"]
    assert h.final_state == "succeeded" and len(h.degradations) == 1


def test_write_report_makes_markdown_and_pngs(tmp_path):
    md = write_report(_log(), tmp_path)
    text = md.read_text()
    assert "91.00%" in text  # final accuracy
    assert "5,000 → 7,000" in text
    assert "1 / 1 / 0" in text  # germinated / fossilized / pruned
    assert "dormant → germinated" in text and "holding → fossilized" in text
    assert "| 5 | tamiyo | unavailable |" in text
    for name in ("training.png", "alpha.png", "parameters.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
