"""Per-run memory the snapshot alone does not carry: each live seed's contribution by epoch.

Keyed by (run_id, slot_id) and reset when the slot holds a different kernel. Records are
keyed by epoch, so a retried Decide for the same boundary never counts twice. The number of
runs remembered is bounded (least recently seen run forgotten first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from generated.esper.common.v1 import health_pb2


@dataclass
class _SlotRecord:
    kernel_id: str
    # epoch -> (stage, contribution_measured, contribution)
    by_epoch: dict[int, tuple[int, bool, float]] = field(default_factory=dict)


class ContributionHistory:
    """Contribution per (run, slot, kernel) and epoch."""

    def __init__(self, *, max_runs: int = 256, max_epochs: int = 64) -> None:
        self._runs: OrderedDict[str, dict[str, _SlotRecord]] = OrderedDict()
        self._max_runs = max_runs
        self._max_epochs = max_epochs

    def observe(self, snapshot: health_pb2.HealthSnapshot) -> None:
        run = self._runs.get(snapshot.run_id)
        if run is None:
            run = self._runs[snapshot.run_id] = {}
            while len(self._runs) > self._max_runs:
                self._runs.popitem(last=False)
        else:
            self._runs.move_to_end(snapshot.run_id)
        for s in snapshot.slots:
            rec = run.get(s.slot_id)
            if rec is None or rec.kernel_id != s.kernel_id:
                rec = run[s.slot_id] = _SlotRecord(kernel_id=s.kernel_id)
            rec.by_epoch[snapshot.epoch] = (s.stage, s.contribution_measured, s.contribution)
            if len(rec.by_epoch) > self._max_epochs:
                del rec.by_epoch[min(rec.by_epoch)]

    def streak(self, run_id: str, slot_id: str, *, stage: int, up_to_epoch: int, at_least: float) -> int:
        """Consecutive epochs ending at `up_to_epoch` in `stage` with a measured contribution >= `at_least`."""
        rec = self._runs.get(run_id, {}).get(slot_id)
        if rec is None:
            return 0
        n = 0
        e = up_to_epoch
        while e in rec.by_epoch:
            st, measured, c = rec.by_epoch[e]
            if st != stage or not measured or not c >= at_least:
                break
            n += 1
            e -= 1
        return n

    def runs(self) -> int:
        return len(self._runs)

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (runs in recency order), for a trainer's checkpoint."""
        return {
            "runs": [
                [run_id, {sid: {"kernel_id": rec.kernel_id,
                                "by_epoch": [[e, st, m, c] for e, (st, m, c) in rec.by_epoch.items()]}
                          for sid, rec in slots.items()}]
                for run_id, slots in self._runs.items()
            ]
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace what is remembered by `state` (from `state_dict`)."""
        runs: OrderedDict[str, dict[str, _SlotRecord]] = OrderedDict()
        for run_id, slots in state["runs"]:
            runs[str(run_id)] = {
                str(sid): _SlotRecord(
                    kernel_id=str(rec["kernel_id"]),
                    by_epoch={int(e): (int(st), bool(m), float(c)) for e, st, m, c in rec["by_epoch"]},
                )
                for sid, rec in slots.items()
            }
        self._runs = runs
