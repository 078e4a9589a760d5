"""NATS users of the Esper bus and what each may do (the server side of Oona's auth).

A nats-server with an `authorization { users: [...] }` block refuses every connection that
does not log in as one of them, so an anonymous client can do nothing at all: not list the
streams, not publish, not subscribe. Each role below may publish only its own subjects
and the JetStream API calls its client code makes, and may subscribe only to its own
inbox prefix (`_INBOX_<user>`, see `NatsCredentials.inbox_prefix`):

    admin    creates and reconciles the streams (`esper up` at start, `esper streams`,
             the `esper-streams` Job in deploy/k8s); every subject. No service runs as it.
    tolaria  Tolaria's run workers: publishes run events and health telemetry, may look
             the two streams up (the publisher checks they exist) but not create, change,
             purge or delete them.
    reader   consumers (`esper events`, Tamiyo's field-report reader, operators' tools):
             creates/reads its own consumers on the two streams and acks their messages;
             publishes nothing to Esper's subjects.

Tezzeret, Tamiyo, Karn and Urza do not use the bus today, so they get no NATS user.
`esper.kernels.v1.published` (declared in the envelope for Tezzeret) is publishable only by
admin until Tezzeret publishes it; then it gets a role of its own here.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from esper.errors import ConfigError
from esper.fsutil import atomic_write
from esper.oona.connection import NatsCredentials
from esper.oona.subjects import EVENTS_PREFIX, EVENTS_STREAM, TELEMETRY_PREFIX, TELEMETRY_STREAM

_STREAMS = (EVENTS_STREAM.name, TELEMETRY_STREAM.name)


@dataclass(frozen=True)
class Role:
    """One NATS user's permissions (None: no restriction)."""

    name: str
    publish: tuple[str, ...] | None
    subscribe: tuple[str, ...] | None


def _inbox(user: str) -> str:
    return f"_INBOX_{user}.>"


def _consumer_api(stream: str) -> tuple[str, ...]:
    # The subjects nats-py (js/manager.py, js/client.py) uses for durable and ordered
    # consumers, their acks and flow control, and single-message reads.
    return (
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.*",
        f"$JS.API.CONSUMER.INFO.{stream}.*",
        f"$JS.API.CONSUMER.DELETE.{stream}.*",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.*",
        f"$JS.ACK.{stream}.>",
        f"$JS.FC.{stream}.>",
    )


ROLES: dict[str, Role] = {
    "admin": Role("admin", publish=None, subscribe=None),
    "tolaria": Role(
        "tolaria",
        publish=(
            f"{EVENTS_PREFIX}.>",
            f"{TELEMETRY_PREFIX}.>",
            *(f"$JS.API.STREAM.INFO.{s}" for s in _STREAMS),
        ),
        subscribe=(_inbox("tolaria"),),
    ),
    "reader": Role(
        "reader",
        publish=(
            "$JS.API.INFO",
            "$JS.API.STREAM.NAMES",
            *(subject for s in _STREAMS for subject in _consumer_api(s)),
        ),
        subscribe=(_inbox("reader"),),
    ),
}
"""Every NATS user Esper defines, by name."""


def password_env(role: str) -> str:
    """The environment variable a nats-server container reads `role`'s password from."""
    return f"NATS_{role.upper()}_PASSWORD"


def authorization_block(passwords: Mapping[str, str] | None = None, *, indent: str = "") -> str:
    """The nats.conf `authorization` block for every role in ROLES.

    Args:
        passwords: role → password written literally (the embedded server, whose config
            file is mode 0600); None writes `$NATS_<ROLE>_PASSWORD` references, which
            nats-server resolves from its environment (deploy/k8s fills it from a Secret).
    """
    lines = ["authorization {", "  users: ["]
    for name, role in ROLES.items():
        if passwords is None:
            pw = f"${password_env(name)}"
        else:
            if not passwords.get(name):
                raise ConfigError(f"no password for NATS user {name!r}; roles are {sorted(ROLES)}")
            pw = json.dumps(passwords[name])
        entry = [f"user: {name}", f"password: {pw}"]
        perms = []
        if role.publish is not None:
            perms.append(f"publish: {{allow: {json.dumps(list(role.publish))}}}")
        if role.subscribe is not None:
            perms.append(f"subscribe: {{allow: {json.dumps(list(role.subscribe))}}}")
        if perms:
            entry.append(f"permissions: {{{', '.join(perms)}}}")
        lines.append(f"    {{{', '.join(entry)}}}")
    lines += ["  ]", "}"]
    return "\n".join(indent + line for line in lines) + "\n"


class CredentialsDir:
    """One password file per role (`<dir>/<role>.password`, mode 0600), created once and
    reused, so a restarted nats-server and the clients that outlive it agree."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)

    def password_file(self, role: str) -> Path:
        if role not in ROLES:
            raise ConfigError(f"unknown NATS role {role!r}; roles are {sorted(ROLES)}")
        return self.directory / f"{role}.password"

    def ensure(self) -> dict[str, str]:
        """Create the missing password files; return role → password."""
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        out: dict[str, str] = {}
        for role in ROLES:
            path = self.password_file(role)
            if not path.exists():
                atomic_write(path, secrets.token_urlsafe(32) + "\n", mode=0o600)
            out[role] = NatsCredentials.from_file(role, path).password
        return out

    def credentials(self, role: str) -> NatsCredentials:
        return NatsCredentials.from_file(role, self.password_file(role))

    def client_env(self, role: str) -> dict[str, str]:
        """ESPER_NATS_USER / ESPER_NATS_PASSWORD_FILE for a process that connects as `role`."""
        from esper.oona.connection import ENV_PASSWORD_FILE, ENV_USER

        return {ENV_USER: role, ENV_PASSWORD_FILE: str(self.password_file(role).resolve())}


__all__ = ["ROLES", "CredentialsDir", "Role", "authorization_block", "password_env"]
