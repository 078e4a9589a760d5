"""API keys and scopes.

Keys come from `ESPER_API_KEYS` ("key=scope1,scope2;key2=*") or from the file named by
`ESPER_API_KEYS_FILE` (one "key=scopes" per line, "#" comments). Scopes are
"<part>:read", "<part>:write", "<part>:*" and "*". A method listed in its
`ServiceSpec.write_methods` needs "<part>:write"; every other method "<part>:read".
Clients send the key as `x-api-key` metadata (or `authorization: Bearer <key>`).
A key has at least 16 characters (any printable ASCII except ";", "=", "#" and
whitespace at either end); `python -c "import secrets; print(secrets.token_urlsafe(32))"`
makes a good one.

Logs never show a key: each call's access-log line names it by its `key_id`, the first 8
hex digits of SHA-256("esper-key-id:" + key), which the host also logs at start-up next
to each key's scopes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from esper.errors import ConfigError

ENV_KEYS = "ESPER_API_KEYS"
ENV_KEYS_FILE = "ESPER_API_KEYS_FILE"
METADATA_KEY = "x-api-key"
_SCOPE_RE = re.compile(r"^(\*|[a-z][a-z0-9_]*:(read|write|\*))$")
MIN_KEY_LEN = 16
"""Shortest API key accepted: short keys are guessable."""


def key_id(key: str) -> str:
    """The name a key goes by in logs: 8 hex digits of SHA-256("esper-key-id:" + key)."""
    return hashlib.sha256(b"esper-key-id:" + key.encode()).hexdigest()[:8]


def parse_keys(text: str, *, source: str, separator: str = ";") -> dict[str, frozenset[str]]:
    """Parse "key=scope,scope" entries separated by `separator` ("#" starts a comment).

    Raises:
        ConfigError: an entry without "=", an empty or short key, a repeated key, or a
            scope that is not "*", "<part>:read", "<part>:write" or "<part>:*".
    """
    keys: dict[str, frozenset[str]] = {}
    for n, raw in enumerate(text.split(separator), 1):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        key, eq, scopes_text = entry.partition("=")
        key = key.strip()
        where = f"{source} entry {n}"
        if not eq:
            raise ConfigError(f"{where}: expected '<key>=<scope1>,<scope2>', got no '=' (scopes are required)")
        if len(key) < MIN_KEY_LEN:
            raise ConfigError(
                f"{where}: API keys must have at least {MIN_KEY_LEN} characters, got {len(key)}; "
                "make one with: python -c \"import secrets; "
                "print(secrets.token_urlsafe(32))\"")
        if key in keys:
            raise ConfigError(f"{where}: key ending '...{key[-4:]}' is listed twice")
        scopes = frozenset(s.strip() for s in scopes_text.split(",") if s.strip())
        bad = sorted(s for s in scopes if not _SCOPE_RE.match(s))
        if not scopes or bad:
            raise ConfigError(
                f"{where}: invalid scopes {bad or [scopes_text]}; allowed: '*', '<part>:read', "
                "'<part>:write', '<part>:*' (e.g. 'urza:read,tamiyo:*')"
            )
        keys[key] = scopes
    return keys


@dataclass(kw_only=True, frozen=True)
class AuthConfig:
    """Which API keys the host accepts, or that auth is off."""

    keys: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """API key → scopes it grants."""
    disabled: bool = False
    """Accept every call without a key. Only for local experiments; the host logs it loudly."""

    def __post_init__(self) -> None:
        if not self.disabled and not self.keys:
            raise ConfigError(
                f"no API keys configured: set {ENV_KEYS}='<key>=<scope>,...' (keys of at least "
                f"{MIN_KEY_LEN} characters) or {ENV_KEYS_FILE}=<path>, "
                "or disable auth explicitly (--insecure-no-auth)"
            )
        if self.disabled and self.keys:
            raise ConfigError("auth is disabled but API keys were given; choose one")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, disabled: bool = False) -> AuthConfig:
        """Keys from ESPER_API_KEYS and/or ESPER_API_KEYS_FILE (both may be set; keys merge)."""
        env = os.environ if env is None else env
        if disabled:
            return cls(disabled=True)
        keys: dict[str, frozenset[str]] = {}
        if env.get(ENV_KEYS):
            keys.update(parse_keys(env[ENV_KEYS], source=ENV_KEYS))
        if env.get(ENV_KEYS_FILE):
            path = Path(env[ENV_KEYS_FILE])
            try:
                text = path.read_text()
            except OSError as e:
                raise ConfigError(f"{ENV_KEYS_FILE}={str(path)!r} cannot be read: {e.strerror}") from e
            for k, v in parse_keys(text, source=str(path), separator="\n").items():
                if k in keys:
                    raise ConfigError(f"key ending '...{k[-4:]}' is in both {ENV_KEYS} and {path}")
                keys[k] = v
        return cls(keys=keys)


class KeyChecker:
    """Constant-time key lookup and scope checks."""

    def __init__(self, config: AuthConfig) -> None:
        # Comparing fixed-length digests keeps compare_digest's time independent of the
        # presented key's length as well as its content.
        self._keys = [(hashlib.sha256(k.encode()).digest(), (key_id(k), s)) for k, s in config.keys.items()]
        self.disabled = config.disabled

    def key_ids(self) -> list[tuple[str, list[str]]]:
        """(key id, sorted scopes) of every configured key, for the start-up log."""
        return [(kid, sorted(s)) for _, (kid, s) in self._keys]

    def match(self, presented: str) -> tuple[str, frozenset[str]] | None:
        """(key id, scopes) of the presented key, or None when it matches no key.

        Every configured key is compared (no early exit), so timing does not reveal
        which key, or how much of one, matched.
        """
        digest = hashlib.sha256(presented.encode()).digest()
        found: tuple[str, frozenset[str]] | None = None
        for key_digest, entry in self._keys:
            if hmac.compare_digest(digest, key_digest):
                found = entry
        return found

    def scopes_for(self, presented: str) -> frozenset[str] | None:
        """Scopes of the presented key, or None when it matches no key."""
        found = self.match(presented)
        return None if found is None else found[1]

    @staticmethod
    def allows(scopes: frozenset[str], part: str, write: bool) -> bool:
        need = f"{part}:write" if write else f"{part}:read"
        return "*" in scopes or need in scopes or f"{part}:*" in scopes


def key_from_metadata(metadata: object) -> str | None:
    """The API key in call metadata: `x-api-key`, else `authorization: Bearer <key>`."""
    bearer = None
    for k, v in metadata or ():  # type: ignore[attr-defined]
        if k == METADATA_KEY:
            return v if isinstance(v, str) else v.decode()
        if k == "authorization" and isinstance(v, str) and v[:7].lower() == "bearer ":
            bearer = v[7:].strip()
    return bearer
