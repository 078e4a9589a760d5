"""Build, address and (de)serialise `EventEnvelope`s; carry trace context in NATS headers.

Every message on the bus is one `esper.oona.v1.EventEnvelope`. Its subject follows from
the payload kind (see `esper.oona.subjects`); its headers carry `Nats-Msg-Id = event_id`
(JetStream de-duplication) and the W3C `traceparent`/`tracestate` of the emitting span,
injected with OpenTelemetry's global propagator so a consumer can link its work to it.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime

from google.protobuf.message import DecodeError, Message
from opentelemetry import propagate
from opentelemetry.context import Context

from esper.errors import InvalidArgumentError
from esper.oona.subjects import KERNELS_PUBLISHED, event_subject, telemetry_subject
from generated.esper.oona.v1.events_pb2 import EventEnvelope

MSG_ID_HEADER = "Nats-Msg-Id"

_PAYLOAD = EventEnvelope.DESCRIPTOR.oneofs_by_name["payload"]
_FIELD_BY_TYPE: dict[str, str] = {f.message_type.full_name: f.name for f in _PAYLOAD.fields}
PAYLOAD_KINDS: tuple[str, ...] = tuple(f.name for f in _PAYLOAD.fields)
"""Every payload kind, i.e. the field names of EventEnvelope's `payload` oneof."""

TELEMETRY_KINDS = frozenset({"health"})
"""Kinds published on the telemetry stream instead of the events stream."""


def make_envelope(
    payload: Message,
    *,
    run_id: str = "",
    source: str,
    step: int = 0,
    epoch: int = 0,
    sequence: int = 0,
    event_id: str | None = None,
    emitted_at: datetime | None = None,
) -> EventEnvelope:
    """Wrap `payload` (one of the envelope's payload messages) in a new envelope.

    Raises:
        InvalidArgumentError: the payload type is not one the envelope carries, or a
            number is negative, or `source` is empty.
    """
    field = _FIELD_BY_TYPE.get(payload.DESCRIPTOR.full_name)
    if field is None:
        raise InvalidArgumentError(
            f"payload type {payload.DESCRIPTOR.full_name} is not an EventEnvelope payload; "
            f"allowed: {sorted(_FIELD_BY_TYPE)}",
            field="payload",
        )
    if not source:
        raise InvalidArgumentError(
            "source must name the emitting component, got ''", field="source"
        )
    for name, value in (("step", step), ("epoch", epoch), ("sequence", sequence)):
        if value < 0:
            raise InvalidArgumentError(f"{name} must be >= 0, got {value}", field=name)
    env = EventEnvelope(
        event_id=event_id if event_id is not None else str(uuid.uuid4()),
        run_id=run_id,
        step=step,
        epoch=epoch,
        source=source,
        sequence=sequence,
    )
    if not env.event_id:
        raise InvalidArgumentError("event_id must be non-empty when given", field="event_id")
    env.emitted_at.FromDatetime(emitted_at or datetime.now(UTC))
    getattr(env, field).CopyFrom(payload)
    return env


def payload_kind(env: EventEnvelope) -> str:
    """Name of the payload field that is set ("lifecycle", "epoch_metrics", ...)."""
    kind = env.WhichOneof("payload")
    if kind is None:
        raise InvalidArgumentError(
            f"envelope {env.event_id!r} has no payload; set one of {list(PAYLOAD_KINDS)}",
            field="payload",
        )
    return kind


def subject_for(env: EventEnvelope) -> str:
    """The subject an envelope is published on, from its payload kind and run id."""
    kind = payload_kind(env)
    if kind == "kernel_published":
        return KERNELS_PUBLISHED
    if kind in TELEMETRY_KINDS:
        return telemetry_subject(env.run_id)
    return event_subject(env.run_id, kind)


def headers_for(env: EventEnvelope, *, context: Context | None = None) -> dict[str, str]:
    """`Nats-Msg-Id` plus the trace context of `context` (default: the current one)."""
    if not env.event_id:
        raise InvalidArgumentError(
            "envelope event_id is empty; it is the Nats-Msg-Id", field="event_id"
        )
    headers: dict[str, str] = {}
    propagate.inject(headers, context=context)
    headers[MSG_ID_HEADER] = env.event_id
    return headers


def extract_context(headers: Mapping[str, str] | None) -> Context:
    """The OpenTelemetry context carried in a message's headers (empty when none)."""
    return propagate.extract(dict(headers or {}))


def encode(env: EventEnvelope) -> bytes:
    return env.SerializeToString()


def decode(data: bytes) -> EventEnvelope:
    """Parse an envelope; raises `InvalidArgumentError` for bytes that are not one."""
    env = EventEnvelope()
    try:
        env.ParseFromString(data)
    except DecodeError as exc:
        raise InvalidArgumentError(
            f"message of {len(data)} bytes is not an EventEnvelope: {exc}", field="data"
        ) from exc
    return env
