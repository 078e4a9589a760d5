"""`esper demo` end to end: `esper up` in a child process, Tezzeret's catalog, a run over
gRPC, and a report whose numbers are the run's own events."""

from __future__ import annotations

import re

import pytest

from esper.experiments.demo import DemoConfig, run_demo
from esper.tolaria.report import RunHistory
from esper.tolaria.runs import EventLog

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_runs_the_platform_and_writes_a_report(tmp_path):
    report = run_demo(DemoConfig(out_dir=tmp_path, epochs=6, host="mlp"))
    text = report.read_text()
    assert "final state **succeeded**" in text
    for png in ("training.png", "alpha.png", "parameters.png"):
        assert (report.parent / png).stat().st_size > 10_000
    # The report's final accuracy is the last epoch's in the run's own event log.
    (run_dir,) = (tmp_path / "platform" / "tolaria" / "runs").iterdir()
    history = RunHistory.from_events(EventLog(run_dir / "events.log").replay())
    assert [m.epoch for m in history.epochs] == list(range(1, 7))
    shown = re.search(r"final validation accuracy \| ([0-9.]+)%", text).group(1)
    assert float(shown) == pytest.approx(100 * history.epochs[-1].val_accuracy, abs=0.005)
    # The platform was shut down: its endpoints file is gone.
    assert not (tmp_path / "platform" / "endpoints.json").exists()
