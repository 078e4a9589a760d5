"""Oona: Esper's event bus on NATS JetStream.

Server launcher, streams, envelope, publisher, consumer.

Submodules are imported lazily so that `import esper.oona` (e.g. from the CLI) does not
pull in nats-py or OpenTelemetry until they are used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "NatsServer": "esper.oona.natsd",
    "NatsServerConfig": "esper.oona.natsd",
    "Publisher": "esper.oona.publisher",
    "PublisherConfig": "esper.oona.publisher",
    "PublisherStats": "esper.oona.publisher",
    "Consumer": "esper.oona.consumer",
    "ConsumerConfig": "esper.oona.consumer",
    "MemorySeenStore": "esper.oona.consumer",
    "SqliteSeenStore": "esper.oona.consumer",
    "drain": "esper.oona.consumer",
    "adrain": "esper.oona.consumer",
    "make_envelope": "esper.oona.envelope",
    "subject_for": "esper.oona.envelope",
    "headers_for": "esper.oona.envelope",
    "extract_context": "esper.oona.envelope",
    "ensure_streams": "esper.oona.subjects",
    "DEFAULT_STREAMS": "esper.oona.subjects",
    "tail": "esper.oona.tap",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'esper.oona' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "DEFAULT_STREAMS",
    "Consumer",
    "ConsumerConfig",
    "MemorySeenStore",
    "NatsServer",
    "NatsServerConfig",
    "Publisher",
    "PublisherConfig",
    "PublisherStats",
    "SqliteSeenStore",
    "adrain",
    "drain",
    "ensure_streams",
    "extract_context",
    "headers_for",
    "make_envelope",
    "subject_for",
    "tail",
]
