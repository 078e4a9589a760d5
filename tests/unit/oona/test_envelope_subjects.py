from __future__ import annotations

from datetime import UTC, datetime

import pytest
from opentelemetry.sdk.trace import TracerProvider

from esper.errors import ConfigError, InvalidArgumentError
from esper.oona import envelope as E
from esper.oona.subjects import (
    EVENTS_STREAM,
    KERNELS_PUBLISHED,
    NO_RUN,
    TELEMETRY_STREAM,
    StreamSpec,
    event_subject,
    run_events_filter,
    telemetry_subject,
)
from generated.esper.common.v1 import health_pb2
from generated.esper.oona.v1 import events_pb2 as ev


def _payload(kind: str):
    from google.protobuf import message_factory

    field = ev.EventEnvelope.DESCRIPTOR.fields_by_name[kind]
    return message_factory.GetMessageClass(field.message_type)()


@pytest.mark.parametrize("kind", E.PAYLOAD_KINDS)
def test_every_payload_kind_has_a_subject(kind: str) -> None:
    env = E.make_envelope(_payload(kind), run_id="run-1", source="test")
    assert E.payload_kind(env) == kind
    subject = E.subject_for(env)
    if kind == "kernel_published":
        assert subject == KERNELS_PUBLISHED == "esper.kernels.v1.published"
    elif kind == "health":
        assert subject == "esper.telemetry.v1.run-1"
    else:
        assert subject == f"esper.events.v1.run-1.{kind}"
    # Each subject is captured by exactly one of the two streams.
    from fnmatch import fnmatch

    def captured(spec: StreamSpec) -> bool:
        return any(fnmatch(subject, s.replace(">", "*")) for s in spec.subjects)

    assert captured(EVENTS_STREAM) != captured(TELEMETRY_STREAM)


def test_envelope_fields_and_fresh_event_ids() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    a = E.make_envelope(
        ev.LifecycleEvent(slot_id="s"),
        run_id="r",
        source="kasmina",
        step=10,
        epoch=2,
        sequence=7,
        emitted_at=at,
    )
    b = E.make_envelope(ev.LifecycleEvent(slot_id="s"), run_id="r", source="kasmina")
    assert (a.run_id, a.step, a.epoch, a.sequence, a.source) == ("r", 10, 2, 7, "kasmina")
    assert a.emitted_at.ToDatetime(tzinfo=UTC) == at
    assert a.lifecycle.slot_id == "s"
    assert a.event_id != b.event_id and len(a.event_id) == 36
    assert E.make_envelope(ev.GateEvent(), source="x", event_id="fixed").event_id == "fixed"


def test_empty_run_id_uses_no_run_token() -> None:
    env = E.make_envelope(ev.DegradationEvent(component="urza"), source="urza")
    assert E.subject_for(env) == f"esper.events.v1.{NO_RUN}.degradation"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"source": ""}, "source"),
        ({"source": "x", "step": -1}, "step"),
        ({"source": "x", "epoch": -3}, "epoch"),
        ({"source": "x", "event_id": ""}, "event_id"),
    ],
)
def test_bad_envelope_arguments(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        E.make_envelope(ev.GateEvent(), **kwargs)
    assert info.value.field == field


def test_foreign_payload_type_is_rejected_by_name() -> None:
    with pytest.raises(InvalidArgumentError, match="esper.common.v1.SlotHealth"):
        E.make_envelope(health_pb2.SlotHealth(), source="x")


def test_envelope_without_payload_has_no_subject() -> None:
    with pytest.raises(InvalidArgumentError, match="no payload"):
        E.subject_for(ev.EventEnvelope(event_id="e"))


@pytest.mark.parametrize("run_id", ["a.b", "a b", "*", ">", "_x", "-x", "x" * 129])
def test_run_ids_that_cannot_be_subject_tokens(run_id: str) -> None:
    with pytest.raises(InvalidArgumentError, match="run_id"):
        telemetry_subject(run_id)


def test_subject_helpers() -> None:
    assert event_subject("r1", "epoch_metrics") == "esper.events.v1.r1.epoch_metrics"
    assert run_events_filter("r1") == "esper.events.v1.r1.>"
    with pytest.raises(InvalidArgumentError, match="kind"):
        event_subject("r1", "Epoch.Metrics")


def test_headers_carry_msg_id_and_w3c_traceparent() -> None:
    tracer = TracerProvider().get_tracer("test")
    env = E.make_envelope(ev.GateEvent(), source="x")
    assert E.headers_for(env) == {"Nats-Msg-Id": env.event_id}  # no active span: no trace headers
    with tracer.start_as_current_span("emit") as span:
        headers = E.headers_for(env)
    sc = span.get_span_context()
    assert headers["Nats-Msg-Id"] == env.event_id
    assert (
        headers["traceparent"]
        == f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"
    )
    assert sc.trace_flags.sampled
    from opentelemetry import trace

    restored = trace.get_current_span(E.extract_context(headers)).get_span_context()
    assert (restored.trace_id, restored.span_id, restored.is_remote) == (
        sc.trace_id,
        sc.span_id,
        True,
    )


def test_encode_decode_round_trip_and_garbage() -> None:
    env = E.make_envelope(ev.EpochMetrics(epoch=3, val_accuracy=0.5), run_id="r", source="tolaria")
    assert E.decode(E.encode(env)) == env
    with pytest.raises(InvalidArgumentError, match="not an EventEnvelope"):
        E.decode(b"\xff\xff\xff")


def test_stream_definitions() -> None:
    for spec in (EVENTS_STREAM, TELEMETRY_STREAM):
        cfg = spec.to_nats()
        assert cfg.storage.value == "file" and cfg.retention.value == "limits"
        assert cfg.duplicate_window == 120.0 and cfg.max_age > 0 and cfg.max_bytes > 0
    assert TELEMETRY_STREAM.max_msgs_per_subject == 100_000
    assert EVENTS_STREAM.max_msgs_per_subject == -1


@pytest.mark.parametrize(
    ("override", "word"),
    [
        ({"name": "lower"}, "name"),
        ({"subjects": ()}, "subjects"),
        ({"max_age_s": 0}, "max_age_s"),
        ({"max_bytes": -1}, "max_bytes"),
        ({"max_msgs_per_subject": 0}, "max_msgs_per_subject"),
        ({"duplicate_window_s": 10 * 24 * 3600.0}, "duplicate_window_s"),
        ({"replicas": 2}, "replicas"),
        ({"discard": "middle"}, "discard"),
    ],
)
def test_stream_spec_validation(override: dict, word: str) -> None:
    base = {"name": "S", "subjects": ("a.>",), "max_age_s": 3600.0, "max_bytes": 1024}
    with pytest.raises(ValueError, match=word):
        StreamSpec(**{**base, **override})


def test_stream_spec_from_dict() -> None:
    spec = StreamSpec.from_dict(
        {"name": "S", "subjects": ["a.>"], "max_age_s": 600.0, "max_bytes": 10}
    )
    assert (
        spec.subjects == ("a.>",) and spec.max_age_s == 600.0 and spec.duplicate_window_s == 120.0
    )
    with pytest.raises(ConfigError, match="duplicate_window_s"):
        StreamSpec.from_dict({"name": "S", "subjects": ["a.>"], "max_age_s": 60.0, "max_bytes": 10})
    with pytest.raises(ConfigError, match="retention"):
        StreamSpec.from_dict({"name": "S", "retention": "work"})
