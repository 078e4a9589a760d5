"""Oona: Esper's event bus on NATS JetStream (server launcher, streams, envelope, publisher, consumer).

Submodules are imported lazily so that `import esper.oona` (e.g. from the CLI) does not
pull in nats-py or OpenTelemetry until they are used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "NatsServer": "esper.oona.natsd",
    "NatsServerConfig": "esper.oona.natsd",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'esper.oona' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_EXPORTS)
