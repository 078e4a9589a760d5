"""The README's main command, `esper demo`, really grows the model.

`test_demo.py` checks that the demo runs and reports; this checks what the README says it
shows: seeds germinated by the controller over gRPC, and each one's fate (fossilized or
pruned), read from the run's own events. A Tolaria that ignored every decision, or a
controller that never germinates, would still run and report; it fails here.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from esper.tolaria.runs import EventLog
from generated.esper.common.v1 import decision_pb2
from generated.esper.common.v1 import seed_pb2 as S

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_FATES = {S.SEED_STAGE_FOSSILIZED: "fossilized", S.SEED_STAGE_PRUNED: "pruned"}


def test_esper_demo_germinates_seeds_and_each_is_fossilized_or_pruned(tmp_path):
    # Exactly the README's command (defaults: MNIST-1D, the CNN host, 30 epochs), in a
    # fresh output directory.
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "esper.cli", "demo", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    (run_dir,) = (out / "platform" / "tolaria" / "runs").iterdir()
    events = list(EventLog(run_dir / "events.log").replay())
    assert events[-1].run_state.state == "succeeded", events[-1]

    germinated: dict[str, list[str]] = {}  # slot -> kernel ids, in order
    fate: dict[tuple[str, int], str] = {}  # (slot, n-th seed there) -> fossilized | pruned
    for e in events:
        if not e.HasField("lifecycle"):
            continue
        lc = e.lifecycle
        if lc.to_stage == S.SEED_STAGE_GERMINATED:
            germinated.setdefault(lc.slot_id, []).append(lc.kernel_id)
        elif lc.to_stage in _FATES:
            fate[(lc.slot_id, len(germinated[lc.slot_id]) - 1)] = _FATES[lc.to_stage]
    # The controller's germinations reached the model (each with a kernel from Urza).
    assert germinated, "no seed germinated in the README's demo"
    assert all(k.startswith("sha256:") for ks in germinated.values() for k in ks)
    decided = [d for e in events if e.HasField("decision") for d in e.decision.decisions
               if d.kind == decision_pb2.DECISION_KIND_GERMINATE]
    assert len(decided) >= sum(map(len, germinated.values()))
    # Every seed ended fossilized or pruned: none was left mid-lifecycle at the end.
    seeds = [(slot, i) for slot, ks in germinated.items() for i in range(len(ks))]
    assert sorted(fate) == sorted(seeds), (germinated, fate)
    kept = [s for s, f in fate.items() if f == "fossilized"]
    assert kept, f"no seed was kept: {fate}"
    # The grown model is what the events say: the final epoch shows the kept seeds as
    # FOSSILIZED and more parameters than the host started with.
    metrics = [e.epoch_metrics for e in events if e.HasField("epoch_metrics")]
    assert [m.epoch for m in metrics] == list(range(1, 31))
    final = metrics[-1]
    for slot, _ in kept:
        assert final.stages[slot] == S.SEED_STAGE_FOSSILIZED
    assert final.parameters > metrics[0].parameters
    assert f"{len(kept)} seed(s) fossilized" in events[-1].run_state.detail
