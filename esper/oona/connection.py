"""How an Oona client reaches NATS: server URLs, its NATS user, the streams' replica count.

Every Oona client (`Publisher`, `Consumer`, `drain`, `tap`, `esper events`, `esper streams`)
reads the same environment, the one `deploy/k8s` and `esper up` set:

    ESPER_NATS_URL              one URL or several, comma-separated
                                ("nats://nats-0.nats:4222,nats://nats-1.nats:4222");
                                the client fails over between them.
    ESPER_NATS_USER             the NATS user this process connects as (a role in
                                `esper.oona.auth.ROLES`: tolaria, reader, admin).
    ESPER_NATS_PASSWORD_FILE    file holding that user's password (a Secret mount in
                                Kubernetes; generated, mode 0600, by `esper up`).
    ESPER_NATS_STREAM_REPLICAS  replicas (1, 3 or 5) of the Esper streams when this
                                process creates or reconciles them; unset: a new stream
                                gets 1 and an existing one keeps its count.

The password is never put into a URL or a command line: a worker's `--nats-url` is visible
to every user of the machine in `ps`, its environment and files are not.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from esper.config import PARSE, from_dict
from esper.errors import ConfigError

ENV_URL = "ESPER_NATS_URL"
ENV_USER = "ESPER_NATS_USER"
ENV_PASSWORD_FILE = "ESPER_NATS_PASSWORD_FILE"
ENV_STREAM_REPLICAS = "ESPER_NATS_STREAM_REPLICAS"

_SCHEMES = ("nats", "tls", "ws", "wss")
_USER = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
REPLICA_COUNTS = (1, 3, 5)


def parse_servers(urls: str | Sequence[str]) -> tuple[str, ...]:
    """"nats://a:4222, nats://b:4222" (or a list of URLs) → ("nats://a:4222", "nats://b:4222").

    Raises:
        ConfigError: no URL, or an entry that is not scheme://host[:port] with scheme in
            nats, tls, ws, wss.
    """
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    out = tuple(u.strip() for u in items if u.strip())
    if not out:
        raise ConfigError(f"NATS URL list {urls!r} is empty; give nats://host:port[,nats://host2:port]")
    for u in out:
        try:
            parts = urlsplit(u)
            parts.port  # noqa: B018 - raises ValueError on a port that is not a number
        except ValueError as e:
            raise ConfigError(f"NATS URL {u!r} is malformed: {e}") from e
        if parts.scheme not in _SCHEMES or not parts.hostname:
            raise ConfigError(
                f"NATS URL {u!r} must look like nats://host:port (schemes: {', '.join(_SCHEMES)})"
            )
    return out


def display_servers(servers: Sequence[str]) -> str:
    """The URLs for logs and errors, with any user:password in them masked."""
    shown = []
    for u in servers:
        parts = urlsplit(u)
        if parts.password is not None or parts.username is not None:
            u = parts._replace(netloc=f"***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")).geturl()
        shown.append(u)
    return ",".join(shown)


@dataclass(kw_only=True, frozen=True)
class NatsCredentials:
    """A NATS user and its password (the password never appears in repr or logs)."""

    user: str
    """NATS user name, e.g. "tolaria"."""
    password: str = field(repr=False)
    """Its password."""

    def __post_init__(self) -> None:
        if not _USER.match(self.user):
            raise ConfigError(
                f"NATS user {self.user!r} must be 1-64 characters of [a-z0-9_-] starting with a letter"
            )
        if not self.password:
            raise ConfigError(f"NATS user {self.user!r} has an empty password")

    @property
    def inbox_prefix(self) -> str:
        """Reply subjects of this user's requests: each user may subscribe only to its own
        inboxes, so one service cannot read another's JetStream acks or fetched messages."""
        return f"_INBOX_{self.user}"

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for `nats.connect`."""
        return {"user": self.user, "password": self.password, "inbox_prefix": self.inbox_prefix}

    @classmethod
    def from_file(cls, user: str, password_file: str | Path) -> NatsCredentials:
        """`user` with the password held in `password_file` (surrounding whitespace ignored).

        Raises:
            ConfigError: the file cannot be read or is empty.
        """
        p = Path(password_file)
        try:
            password = p.read_text().strip()
        except OSError as e:
            raise ConfigError(
                f"NATS password file {str(p)!r} for user {user!r} cannot be read: {e.strerror}"
            ) from e
        if not password:
            raise ConfigError(f"NATS password file {str(p)!r} for user {user!r} is empty")
        return cls(user=user, password=password)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NatsCredentials | None:
        """From ESPER_NATS_USER + ESPER_NATS_PASSWORD_FILE; None when neither is set.

        Raises:
            ConfigError: only one of the two is set, or the file cannot be read.
        """
        env = os.environ if env is None else env
        user, pw_file = env.get(ENV_USER, ""), env.get(ENV_PASSWORD_FILE, "")
        if not user and not pw_file:
            return None
        if not user or not pw_file:
            missing = ENV_USER if not user else ENV_PASSWORD_FILE
            raise ConfigError(f"{missing} is not set but the other NATS credential variable is; set both")
        return cls.from_file(user, pw_file)


def stream_replicas_from_env(env: Mapping[str, str] | None = None) -> int | None:
    """ESPER_NATS_STREAM_REPLICAS as a number, or None when unset.

    Raises:
        ConfigError: it is not 1, 3 or 5.
    """
    env = os.environ if env is None else env
    raw = env.get(ENV_STREAM_REPLICAS, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) not in REPLICA_COUNTS:
        raise ConfigError(f"{ENV_STREAM_REPLICAS}={raw!r}: must be one of {REPLICA_COUNTS}")
    return int(raw)


def _servers_setting(value: object) -> object:
    """`servers` as YAML/env may give it: one comma-separated string, or a list."""
    return parse_servers(value) if isinstance(value, str) else value


@dataclass(kw_only=True, frozen=True)
class OonaConfig:
    """Where Oona's clients find NATS and who they are there (YAML keys, or the ESPER_NATS_*
    variables of the module docstring)."""

    servers: tuple[str, ...] = field(default=(), metadata={PARSE: _servers_setting})
    """NATS URLs (a list, or one comma-separated string); a client fails over between them.
    Empty: no bus (events stay in the run log)."""
    user: str = ""
    """NATS user to connect as; empty: anonymous (only against a server without authorization)."""
    password_file: str = ""
    """File holding `user`'s password."""
    stream_replicas: int | None = None
    """Replicas of the Esper streams when they are created or reconciled (1, 3, 5); None: new
    streams get 1, existing ones keep theirs."""

    def __post_init__(self) -> None:
        if self.servers:
            object.__setattr__(self, "servers", parse_servers(self.servers))
        if bool(self.user) != bool(self.password_file):
            raise ValueError(
                f"oona user={self.user!r} password_file={self.password_file!r}: give both or neither"
            )
        if self.stream_replicas is not None and self.stream_replicas not in REPLICA_COUNTS:
            raise ValueError(
                f"oona stream_replicas={self.stream_replicas!r}: must be one of {REPLICA_COUNTS} or None"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> OonaConfig:
        return from_dict(cls, data, what="oona settings")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OonaConfig:
        env = os.environ if env is None else env
        url = env.get(ENV_URL, "")
        return from_dict(cls, {
            "servers": parse_servers(url) if url.strip() else (),
            "user": env.get(ENV_USER, ""),
            "password_file": env.get(ENV_PASSWORD_FILE, ""),
            "stream_replicas": stream_replicas_from_env(env),
        }, what="ESPER_NATS_* variables")

    def credentials(self) -> NatsCredentials | None:
        """The configured user's credentials (reads the password file), or None."""
        return NatsCredentials.from_file(self.user, self.password_file) if self.user else None


def connect_options(
    servers: str | Sequence[str], credentials: NatsCredentials | None
) -> dict[str, Any]:
    """`nats.connect` keyword arguments for these servers and this user (None: anonymous)."""
    opts: dict[str, Any] = {"servers": list(parse_servers(servers))}
    if credentials is not None:
        opts.update(credentials.connect_options())
    return opts


__all__ = [
    "ENV_PASSWORD_FILE",
    "ENV_STREAM_REPLICAS",
    "ENV_URL",
    "ENV_USER",
    "NatsCredentials",
    "OonaConfig",
    "connect_options",
    "display_servers",
    "parse_servers",
    "stream_replicas_from_env",
]
