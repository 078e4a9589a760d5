"""Events as `esper.oona.v1.EventEnvelope` messages, numbered per run.

The grower emits `lifecycle`/`gate` (source "kasmina"), `health` (the snapshot a
controller saw), `decision` (with the reason each rejected decision was not applied),
`epoch_metrics` and `degradation`. A caller that has events of its own (Tolaria's run
state changes) emits them through the same stream, so one run has one sequence. Event ids
are `<run id>/<sequence>`: a run resumed from a checkpoint re-emits the ids of the events
it repeats, so a bus that dedups by id (JetStream's `Nats-Msg-Id`) logs them once.

The sink is any callable; it runs on the training thread, so it should be quick (the
platform's sink hands the envelope to a background publisher).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from generated.esper.oona.v1 import events_pb2

EventSink = Callable[[events_pb2.EventEnvelope], None]

PAYLOADS = frozenset(f.name for f in events_pb2.EventEnvelope.DESCRIPTOR.oneofs_by_name["payload"].fields)
"""The envelope's payload field names ("lifecycle", "gate", "decision", ...)."""


class EventStream:
    """Envelopes with one run id and a gap-free sequence, handed to an optional sink."""

    def __init__(self, run_id: str, sink: EventSink | None) -> None:
        self.run_id = run_id
        self.sink = sink
        self.sequence = 0
        """Sequence number of the last event emitted (0: none yet)."""

    def emit(self, payload: str, message: Any, *, source: str, step: int,
             epoch: int) -> events_pb2.EventEnvelope:
        """Wrap `message` as the envelope's `payload` field and hand it to the sink.

        Raises:
            ValueError: `payload` is not a field of the envelope's payload oneof.
        """
        if payload not in PAYLOADS:
            raise ValueError(f"payload {payload!r} is not one of {sorted(PAYLOADS)}")
        self.sequence += 1
        env = events_pb2.EventEnvelope(
            event_id=f"{self.run_id}/{self.sequence}",
            run_id=self.run_id,
            step=step,
            epoch=epoch,
            source=source,
            sequence=self.sequence,
        )
        ts = Timestamp()
        ts.GetCurrentTime()
        env.emitted_at.CopyFrom(ts)
        getattr(env, payload).CopyFrom(message)
        if self.sink is not None:
            self.sink(env)
        return env
