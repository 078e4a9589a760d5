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

**Run credentials.** A training worker never gets an API key: Tolaria mints it a *run
token*, sent the same way (`x-api-key`), that grants only the scopes the run's calls need
and only until it expires:

    esper-rt1.<base64url(JSON {"v": 1, "kid", "run", "scp": [scopes], "iat", "exp"})>.<base64url(signature)>

signed with Tolaria's Ed25519 key (`ESPER_RUN_TOKEN_KEY_FILE`, PKCS#8 PEM; `RunTokenSigner`).
Every service verifies it with the public key alone (`ESPER_RUN_TOKEN_PUBLIC_KEY_FILE`, one
or more SubjectPublicKeyInfo PEM blocks, so keys can be rotated; `RunTokenVerifier`): no
database is shared and no service but Tolaria can mint one. Logs name a token's caller
`run:<run id>`. `openssl genpkey -algorithm ed25519 -out run-token.pem` and
`openssl pkey -in run-token.pem -pubout -out run-token.pub` make a pair; `esper up`
makes one under its data dir (`ensure_run_token_keys`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from esper.errors import AuthError, ConfigError

ENV_KEYS = "ESPER_API_KEYS"
ENV_KEYS_FILE = "ESPER_API_KEYS_FILE"
METADATA_KEY = "x-api-key"
_SCOPE_RE = re.compile(r"^(\*|[a-z][a-z0-9_]*:(read|write|\*))$")
MIN_KEY_LEN = 16
"""Shortest API key accepted: short keys are guessable."""
ENV_RUN_TOKEN_KEY_FILE = "ESPER_RUN_TOKEN_KEY_FILE"
"""Tolaria's Ed25519 private key (PEM) that signs run tokens; Tolaria alone reads it."""
ENV_RUN_TOKEN_PUBLIC_KEY_FILE = "ESPER_RUN_TOKEN_PUBLIC_KEY_FILE"
"""The public key(s) (PEM) every service verifies run tokens with."""
RUN_TOKEN_PREFIX = "esper-rt1."
MAX_RUN_TOKEN_LEN = 4096
"""Longer presented tokens are refused before any decoding."""
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


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
    run_tokens: RunTokenVerifier | None = None
    """Verifies run tokens (None: none is accepted)."""

    def __post_init__(self) -> None:
        if self.disabled and self.run_tokens is not None:
            raise ConfigError("auth is disabled but run-token keys were given; choose one")
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
        run_tokens = None
        if env.get(ENV_RUN_TOKEN_PUBLIC_KEY_FILE):
            run_tokens = RunTokenVerifier.from_file(Path(env[ENV_RUN_TOKEN_PUBLIC_KEY_FILE]))
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
        return cls(keys=keys, run_tokens=run_tokens)


class KeyChecker:
    """Constant-time key lookup and scope checks."""

    def __init__(self, config: AuthConfig) -> None:
        # Comparing fixed-length digests keeps compare_digest's time independent of the
        # presented key's length as well as its content.
        self._keys = [(hashlib.sha256(k.encode()).digest(), (key_id(k), s)) for k, s in config.keys.items()]
        self.disabled = config.disabled
        self.run_tokens = config.run_tokens

    def key_ids(self) -> list[tuple[str, list[str]]]:
        """(key id, sorted scopes) of every configured key, for the start-up log."""
        return [(kid, sorted(s)) for _, (kid, s) in self._keys]

    def match(self, presented: str) -> tuple[str, frozenset[str]] | None:
        """(key id, scopes) of the presented key, or None when it matches no key.

        Every configured key is compared (no early exit), so timing does not reveal
        which key, or how much of one, matched. A run token (see the module docstring) is
        verified instead; its key id is "run:<run id>".
        """
        if presented.startswith(RUN_TOKEN_PREFIX) and self.run_tokens is not None:
            try:
                token = self.run_tokens.verify(presented)
            except RunTokenError:
                return None
            return f"run:{token.run_id}", token.scopes
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

    def why_not(self, presented: str) -> str:
        """Why `presented` matched nothing, for the refusal's message (never the key)."""
        if presented.startswith(RUN_TOKEN_PREFIX):
            if self.run_tokens is None:
                return "it is a run token, and this service was given no key to verify run tokens"
            try:
                self.run_tokens.verify(presented)
            except RunTokenError as e:
                return str(e)
        return "it is not one of the configured API keys"

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


# ---- run tokens -------------------------------------------------------------------------

class RunTokenError(AuthError):
    """A presented run token is malformed, forged, signed by an unknown key, or expired."""

    reason = "RUN_TOKEN_INVALID"


@dataclass(frozen=True, kw_only=True)
class RunToken:
    """What a verified run token grants."""

    run_id: str
    scopes: frozenset[str]
    issued_at: int
    expires_at: int
    key_id: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_key_id(key: Ed25519PublicKey) -> str:
    """8 hex digits naming a run-token public key (in tokens and logs)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(b"esper-run-token-key:" + raw).hexdigest()[:8]


class RunTokenSigner:
    """Mints run tokens (Tolaria's side; see the module docstring)."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_key = key.public_key()
        self.key_id = public_key_id(self.public_key)

    @classmethod
    def generate(cls) -> RunTokenSigner:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_file(cls, path: Path) -> RunTokenSigner:
        """Raises ConfigError: unreadable, or not an unencrypted Ed25519 private key PEM."""
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except OSError as e:
            raise ConfigError(f"run-token signing key {str(path)!r} cannot be read: {e.strerror}") from e
        except (ValueError, TypeError) as e:
            raise ConfigError(f"run-token signing key {str(path)!r} is not an unencrypted PEM "
                              f"private key ({e}); make one with: openssl genpkey -algorithm "
                              "ed25519 -out run-token.pem") from e
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"run-token signing key {str(path)!r} is a {type(key).__name__}; "
                              "it must be Ed25519 (openssl genpkey -algorithm ed25519)")
        return cls(key)

    def private_pem(self) -> bytes:
        return self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)

    def verifier(self) -> RunTokenVerifier:
        return RunTokenVerifier([self.public_key])

    def mint(self, run_id: str, scopes: Iterable[str], ttl_s: float, *, now: float | None = None) -> str:
        """A token for `run_id` granting `scopes` for `ttl_s` seconds from `now`.

        Raises:
            ConfigError: a bad run id, scope or lifetime.
        """
        scopes = sorted(set(scopes))
        bad = [s for s in scopes if not _SCOPE_RE.match(s) or s == "*"]
        if not _RUN_ID_RE.match(run_id) or bad or not scopes or not 0 < ttl_s <= 366 * 86400:
            raise ConfigError(f"cannot mint a run token for run {run_id!r} with scopes {scopes} "
                              f"for {ttl_s!r} s: scopes must be '<part>:read|write|*' (not '*'), "
                              "the lifetime in (0, 366 days]")
        issued = int(time.time() if now is None else now)
        payload = {"v": 1, "kid": self.key_id, "run": run_id, "scp": scopes, "iat": issued,
                   "exp": issued + max(1, int(ttl_s))}
        body = RUN_TOKEN_PREFIX + _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
        return body + "." + _b64(self._key.sign(body.encode()))


class RunTokenVerifier:
    """Checks run tokens against one or more trusted public keys (every service's side)."""

    def __init__(self, keys: Iterable[Ed25519PublicKey]) -> None:
        self.keys = {public_key_id(k): k for k in keys}
        if not self.keys:
            raise ConfigError("a run-token verifier needs at least one public key")

    @classmethod
    def from_file(cls, path: Path) -> RunTokenVerifier:
        """Every PEM public key in `path` (concatenated blocks: old and new during a rotation).

        Raises:
            ConfigError: unreadable, no key in it, or a key that is not Ed25519.
        """
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"{ENV_RUN_TOKEN_PUBLIC_KEY_FILE}={str(path)!r} cannot be read: "
                              f"{e.strerror}") from e
        blocks = re.findall(r"-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----", text, re.DOTALL)
        keys = []
        for i, block in enumerate(blocks):
            try:
                key = serialization.load_pem_public_key(block.encode())
            except ValueError as e:
                raise ConfigError(f"{path} public key {i + 1} is not valid PEM: {e}") from e
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigError(f"{path} public key {i + 1} is a {type(key).__name__}; run "
                                  "tokens are signed with Ed25519")
            keys.append(key)
        if not keys:
            raise ConfigError(f"{path} holds no PEM public key ('-----BEGIN PUBLIC KEY-----'); "
                              "make one with: openssl pkey -in run-token.pem -pubout -out run-token.pub")
        return cls(keys)

    def verify(self, token: str, *, now: float | None = None) -> RunToken:
        """The grant of a genuine, unexpired token.

        Raises:
            RunTokenError: malformed, unknown key, bad signature, or expired (the message
                says which, never the token).
        """
        if len(token) > MAX_RUN_TOKEN_LEN or not token.startswith(RUN_TOKEN_PREFIX):
            raise RunTokenError("the run token is malformed")
        body, dot, sig = token.rpartition(".")
        try:
            payload = json.loads(_unb64(body[len(RUN_TOKEN_PREFIX):]))
            signature = _unb64(sig)
        except (ValueError, binascii.Error, RecursionError):
            raise RunTokenError("the run token is malformed") from None
        if not dot or not isinstance(payload, dict) or payload.get("v") != 1:
            raise RunTokenError("the run token is malformed")
        key = self.keys.get(payload.get("kid")) if isinstance(payload.get("kid"), str) else None
        if key is None:
            raise RunTokenError(f"the run token is signed by key {str(payload.get('kid'))[:16]!r}, "
                                f"which this service does not trust (it trusts {sorted(self.keys)})")
        try:
            key.verify(signature, body.encode())
        except InvalidSignature:
            raise RunTokenError("the run token's signature does not verify") from None
        run, scopes, iat, exp = (payload.get(k) for k in ("run", "scp", "iat", "exp"))
        if (not isinstance(run, str) or not _RUN_ID_RE.match(run) or not isinstance(scopes, list)
                or not all(isinstance(x, str) and _SCOPE_RE.match(x) and x != "*" for x in scopes)
                or type(iat) is not int or type(exp) is not int):
            raise RunTokenError("the run token is malformed")
        current = time.time() if now is None else now
        if current >= exp:
            raise RunTokenError(f"the run token of run {run} expired {int(current - exp)} s ago "
                                "(a worker gets a new one each time it is started)")
        return RunToken(run_id=run, scopes=frozenset(scopes), issued_at=iat, expires_at=exp,
                        key_id=payload["kid"])


def ensure_run_token_keys(directory: Path) -> tuple[Path, Path]:
    """(private, public) PEM files of a run-token key pair in `directory`, made once
    (`run-token.pem`, mode 0600, and `run-token.pub`) and reused after: what `esper up`
    uses when nothing else names a pair."""
    private, public = directory / "run-token.pem", directory / "run-token.pub"
    if not private.exists():
        directory.mkdir(parents=True, exist_ok=True)
        signer = RunTokenSigner.generate()
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(signer.private_pem())
        public.write_bytes(signer.public_pem())
    elif not public.exists():
        public.write_bytes(RunTokenSigner.from_file(private).public_pem())
    return private, public


def with_run_tokens(auth: AuthConfig, data_dir: Path, env: dict[str, str] | None = None) -> AuthConfig:
    """`esper up` with zero config: `auth` that also accepts run tokens, signed with the key
    the environment names (ESPER_RUN_TOKEN_KEY_FILE) or else a pair made once under
    `data_dir`; the key's path is put in the environment for Tolaria (workers never inherit
    it). Auth that is off stays off.

    Raises:
        ConfigError: the public key file does not hold the signing key's public half.
    """
    env = os.environ if env is None else env  # type: ignore[assignment]
    assert env is not None
    if auth.disabled:
        return auth
    private = env.get(ENV_RUN_TOKEN_KEY_FILE)
    public = env.get(ENV_RUN_TOKEN_PUBLIC_KEY_FILE)
    if not private:
        made, made_public = ensure_run_token_keys(data_dir)
        private = env[ENV_RUN_TOKEN_KEY_FILE] = str(made)
        public = public or str(made_public)
    signer = RunTokenSigner.from_file(Path(private))
    verifier = RunTokenVerifier.from_file(Path(public)) if public else signer.verifier()
    if signer.key_id not in verifier.keys:
        raise ConfigError(f"{ENV_RUN_TOKEN_PUBLIC_KEY_FILE}={public!r} does not hold the public key of "
                          f"{ENV_RUN_TOKEN_KEY_FILE}={private!r} (key id {signer.key_id}): the services "
                          "would refuse every run token Tolaria mints")
    return AuthConfig(keys=auth.keys, disabled=False, run_tokens=verifier)
