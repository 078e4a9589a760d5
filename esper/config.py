"""What every config dataclass shares: unknown keys are an error, never ignored."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from esper.errors import ConfigError


def reject_unknown_keys(cls: type, data: Mapping[str, Any], what: str) -> None:
    """Raise ConfigError naming every key of `data` that `cls` (a dataclass) has no field for.

    `what` names the keys in the message: "unknown {what} [...]; allowed: [...]".
    """
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {what} {unknown}; allowed: {sorted(known)}")
