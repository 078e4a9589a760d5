"""Where a platform's parts are: `esper up`'s endpoints file and the ESPER_* variables.

`esper up` writes `<data-dir>/endpoints.json` once it serves (`PlatformInfo`) and removes it
on a clean exit; every command that talks to a platform finds a part the same way
(`find_part`): an explicit "host:port", else ESPER_ENDPOINTS (`part=host:port,...`), else
the endpoints file of a local `esper up` (data dir: argument, ESPER_DATA_DIR, ".esper").
The key comes from the argument or ESPER_API_KEY, else (a local platform only, so that its
admin key is never sent to another address) from the API-key file `esper up` created.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esper.errors import ConfigError, UnavailableError
from esper.fsutil import atomic_write
from esper.runtime.spec import PARTS

ENDPOINTS_FILE = "endpoints.json"
ENV_ENDPOINTS = "ESPER_ENDPOINTS"
ENV_NATS_URL = "ESPER_NATS_URL"
ENV_API_KEY = "ESPER_API_KEY"
"""Key this process sends on its own outbound calls (e.g. Tolaria → Tamiyo)."""
ENV_DATA_DIR = "ESPER_DATA_DIR"
DEFAULT_DATA_DIR = ".esper"


def parse_endpoints(text: str) -> dict[str, str]:
    """"urza=host:port,tamiyo=host:port" → {part: target}.

    Raises:
        ConfigError: an entry that is not part=host:port or names an unknown part.
    """
    out: dict[str, str] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        part, eq, target = entry.partition("=")
        if not eq or part not in PARTS or ":" not in target:
            raise ConfigError(f"{ENV_ENDPOINTS} entry {entry!r} must be part=host:port with part in {list(PARTS)}")
        out[part] = target
    return out


@dataclass(kw_only=True, frozen=True)
class PlatformInfo:
    """What `esper up` says of itself in `<data-dir>/endpoints.json`."""

    pid: int = 0
    """Process id of the `esper up` serving (0: not recorded)."""
    endpoints: Mapping[str, str] = field(default_factory=dict)
    """part → "host:port"."""
    services: Mapping[str, str] = field(default_factory=dict)
    """part → full proto service name (health checks)."""
    nats_url: str | None = None
    nats_pid: int | None = None
    nats_credentials_dir: str | None = None
    """Password files of the bus's users (roles), when the bus has authentication."""
    api_keys_file: str | None = None
    """The API-key file `esper up` created (None: keys came from the environment)."""
    auth: bool = True
    """Whether the services check API keys."""

    @staticmethod
    def path(data_dir: str | Path) -> Path:
        return Path(data_dir) / ENDPOINTS_FILE

    @classmethod
    def read(cls, data_dir: str | Path) -> PlatformInfo | None:
        """The file's content, or None when there is no file (no local `esper up`)."""
        p = cls.path(data_dir)
        try:
            raw: dict[str, Any] = json.loads(p.read_text())
        except FileNotFoundError:
            return None
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def write(self, data_dir: str | Path) -> Path:
        """Write the file atomically (a reader sees the old file, none, or this one)."""
        doc = {k: getattr(self, k) for k in self.__dataclass_fields__}
        doc["endpoints"], doc["services"] = dict(self.endpoints), dict(self.services)
        return atomic_write(self.path(data_dir), json.dumps(doc, indent=2) + "\n")

    def key(self, part: str) -> str | None:
        """A key from the API-key file that may call `part` ("*", "<part>:*", "<part>:write"
        in that order of preference); None without auth or a key file."""
        return self._key_with("*", f"{part}:*", f"{part}:write")

    def admin_key(self) -> str | None:
        """The API-key file's key of scope "*" (what `esper up` creates), if any."""
        return self._key_with("*")

    def _key_with(self, *wanted: str) -> str | None:
        if not self.auth or not self.api_keys_file:
            return None
        from esper.runtime.auth import parse_keys

        path = Path(self.api_keys_file)
        keys = parse_keys(path.read_text(), source=str(path), separator="\n")
        for want in wanted:
            for key, scopes in keys.items():
                if want in scopes:
                    return key
        return None


@dataclass(frozen=True, kw_only=True)
class PartEndpoint:
    """Where a part is and the key to send it."""

    target: str
    api_key: str | None
    source: str
    """Where `target` came from (for error messages)."""


def find_part(part: str, *, endpoint: str | None = None, api_key: str | None = None,
              data_dir: str | Path | None = None, env: Mapping[str, str] | None = None
              ) -> PartEndpoint:
    """Resolve a part's address and key (see the module docstring for the order).

    Raises:
        ConfigError: ESPER_ENDPOINTS is malformed or has no entry for `part`.
        UnavailableError: nothing says where the part is.
    """
    env = os.environ if env is None else env
    key = api_key or env.get(ENV_API_KEY) or None
    if endpoint:
        return PartEndpoint(target=endpoint, api_key=key, source="--endpoint")
    if env.get(ENV_ENDPOINTS):
        found = parse_endpoints(env[ENV_ENDPOINTS])
        if part not in found:
            raise ConfigError(f"{ENV_ENDPOINTS}={env[ENV_ENDPOINTS]!r} has no {part}=host:port entry")
        return PartEndpoint(target=found[part], api_key=key, source=ENV_ENDPOINTS)
    root = Path(data_dir or env.get(ENV_DATA_DIR) or DEFAULT_DATA_DIR)
    info = PlatformInfo.read(root)
    path = PlatformInfo.path(root)
    if info is None:
        raise UnavailableError(
            f"no {part} to talk to: no {path} (start one with `esper up --data-dir {root}`), "
            f"no {ENV_ENDPOINTS} and no --endpoint")
    target = info.endpoints.get(part)
    if not target:
        raise UnavailableError(f"{path} names no {part} endpoint")
    return PartEndpoint(target=target, api_key=key if key is not None else info.key(part),
                        source=str(path))


__all__ = ["DEFAULT_DATA_DIR", "ENDPOINTS_FILE", "ENV_API_KEY", "ENV_DATA_DIR", "ENV_ENDPOINTS",
           "ENV_NATS_URL", "PartEndpoint", "PlatformInfo", "find_part", "parse_endpoints"]
