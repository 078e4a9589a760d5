"""Shared `from_dict` for Tamiyo's frozen config dataclasses: unknown keys are an error."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from esper.config import reject_unknown_keys
from esper.errors import ConfigError

T = TypeVar("T")


def config_from_dict(cls: type[T], data: Mapping[str, Any] | None, *, where: str) -> T:
    """Build `cls` from `data`, rejecting keys `cls` does not declare.

    Lists become tuples so the frozen config stays hashable. `ValueError`s from
    `__post_init__` are re-raised as `ConfigError` with `where` in the message.
    """
    data = dict(data or {})
    reject_unknown_keys(cls, data, f"{where} key(s)")
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return cls(**data)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def settings_in_words(config: object) -> dict[str, str]:
    return {f.name: str(getattr(config, f.name)) for f in dataclasses.fields(config)}  # type: ignore[arg-type]
