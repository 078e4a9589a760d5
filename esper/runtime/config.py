"""Platform configuration: one YAML file and/or ESPER_* environment variables.

    # esper.yaml
    data_dir: .esper
    host: 127.0.0.1
    base_port: 0           # 0: the OS picks the port
    grace_s: 3.0
    log_level: INFO
    settings:              # part-specific, handed to create_service via PlatformContext
      urza: {database_url: "sqlite:///..."}

Precedence: command-line flags > environment (ESPER_DATA_DIR, ESPER_HOST, ESPER_BASE_PORT,
ESPER_GRACE_S, ESPER_LOG_LEVEL) > file > defaults. Unknown keys are an error.

A part's settings can come from the environment too (how deploy/k8s configures pods):
`ESPER_<PART>_<KEY>=<value>` sets `settings.<part>.<key>`, e.g.
`ESPER_URZA_DATABASE_URL=postgresql://esper@postgres/urza`. The value is read as a YAML
scalar or flow mapping (`8` is a number, `{max_active_runs: 2}` a mapping); a key the
part does not know is refused when the part starts, like one from the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from esper.config import from_dict, to_dict
from esper.errors import ConfigError
from esper.runtime.spec import PARTS

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_ENV = {
    "ESPER_DATA_DIR": "data_dir",
    "ESPER_HOST": "host",
    "ESPER_BASE_PORT": "base_port",
    "ESPER_GRACE_S": "grace_s",
    "ESPER_LOG_LEVEL": "log_level",
}
_PART_ENV = re.compile(rf"ESPER_({'|'.join(p.upper() for p in PARTS)})_([A-Z0-9_]+)")


@dataclass(kw_only=True, frozen=True)
class PlatformConfig:
    """Where the platform keeps its state and how its services listen."""

    data_dir: Path = Path(".esper")
    """Root of all state: each part under data_dir/<part>, NATS under data_dir/nats."""
    host: str = "127.0.0.1"
    """Address the services bind; loopback unless they must be reachable from elsewhere."""
    base_port: int = 0
    """Port of the gRPC server (`esper up` hosts every service on it); 0 picks a free one."""
    grace_s: float = 3.0
    """How long in-flight calls may finish after SIGTERM before they are cancelled."""
    log_level: str = "INFO"
    """DEBUG, INFO, WARNING, ERROR or CRITICAL."""
    insecure_no_auth: bool = False
    """Accept calls without API keys. Logged loudly; for private experiments only."""
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Part name → that part's own settings (PlatformContext.settings)."""

    def __post_init__(self) -> None:
        if not isinstance(self.data_dir, Path):
            object.__setattr__(self, "data_dir", Path(self.data_dir))
        if not self.host:
            raise ValueError("host must be a non-empty address, e.g. '127.0.0.1'")
        if not isinstance(self.base_port, int) or not 0 <= self.base_port <= 65535:
            raise ValueError(f"base_port must be an integer in 0..65535 (0 = pick a free one), got {self.base_port!r}")
        if not isinstance(self.grace_s, (int, float)) or not 0 <= self.grace_s <= 600:
            raise ValueError(f"grace_s must be a number of seconds in [0, 600], got {self.grace_s!r}")
        if str(self.log_level).upper() not in _LEVELS:
            raise ValueError(f"log_level must be one of {_LEVELS}, got {self.log_level!r}")
        object.__setattr__(self, "log_level", str(self.log_level).upper())
        unknown = sorted(set(self.settings) - set(PARTS))
        if unknown:
            raise ValueError(f"settings for unknown parts {unknown}; parts are {list(PARTS)}")
        for part, values in self.settings.items():
            if not isinstance(values, Mapping):
                raise TypeError(f"settings.{part} must be a mapping, got {type(values).__name__}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> PlatformConfig:
        """Build from a mapping; unknown keys raise ConfigError naming the allowed ones."""
        return from_dict(cls, data, what="platform config keys")

    @classmethod
    def load(cls, path: Path | str | None = None, env: Mapping[str, str] | None = None) -> PlatformConfig:
        """File (if given), then ESPER_* environment variables on top."""
        data: dict[str, Any] = {}
        if path is not None:
            p = Path(path)
            try:
                loaded = yaml.safe_load(p.read_text())
            except OSError as e:
                raise ConfigError(f"cannot read config file {str(p)!r}: {e.strerror}") from e
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
            if loaded is not None and not isinstance(loaded, dict):
                raise ConfigError(f"config file {str(p)!r} must hold a mapping, got {type(loaded).__name__}")
            data.update(loaded or {})
        env = os.environ if env is None else env
        for var, key in _ENV.items():
            if env.get(var):
                raw = env[var]
                try:
                    data[key] = int(raw) if key == "base_port" else float(raw) if key == "grace_s" else raw
                except ValueError as e:
                    raise ConfigError(f"{var}={raw!r} is not a number") from e
        part_env = sorted((var, raw) for var, raw in env.items() if _PART_ENV.fullmatch(var))
        if part_env:
            settings = data.get("settings") or {}
            if not isinstance(settings, Mapping):
                raise ConfigError(f"settings must be a mapping, got {type(settings).__name__}")
            settings = {part: dict(values) if isinstance(values, Mapping) else values
                        for part, values in settings.items()}
            for var, raw in part_env:
                m = _PART_ENV.fullmatch(var)
                assert m is not None
                part = settings.setdefault(m.group(1).lower(), {})
                if isinstance(part, dict):
                    part[m.group(2).lower()] = _env_value(var, raw)
            data["settings"] = settings
        return cls.from_dict(data)

    def with_overrides(self, **changes: Any) -> PlatformConfig:
        """A copy with the given fields replaced (None values are ignored).

        Raises:
            ConfigError: a value is invalid (e.g. a command-line flag).
        """
        given = {k: v for k, v in changes.items() if v is not None}
        return from_dict(type(self), {**to_dict(self), **given}, what="platform config keys")


def _env_value(var: str, raw: str) -> Any:
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{var}={raw!r} is not a valid YAML value: {e}") from e
    # A lone word stays the string it is ("on"/"no" are not booleans here), numbers and
    # flow mappings/lists are parsed.
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        return raw
    return raw if value is None else value
