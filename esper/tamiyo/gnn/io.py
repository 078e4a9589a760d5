"""Policy files: safetensors weights plus a signed JSON config that pins their SHA-256. No pickle.

    <name>.json          {"format": "esper.tamiyo.gnn", "weights_sha256": ..., "net": {...}, "vocab": [...],
                          ..., "signature": {"key_id": ..., "ed25519": ...}}
    <name>.safetensors   every ensemble parameter, by its state_dict name

A policy is trusted the way a kernel is: the JSON (every key but `signature`, in canonical
form) is signed with Ed25519 by an `esper.blueprints.artifact.SigningKey`, and a loader
accepts it only under a key in its `TrustedKeys`. The signature covers the weights through
their pinned SHA-256, so editing the weights and re-computing the pin is refused, and so is
a policy signed by a key the loader does not trust. The signed bytes carry their own
domain prefix, so a policy signature can never pass as a kernel manifest's or back.

Loading checks, before any tensor reaches the network: the JSON has exactly the known keys
and a supported format; its signature verifies under a trusted key; the feature version
is the one this build computes; the weights file is within a size bound and its SHA-256
equals the one in the JSON (so a weights file changed after training is refused); the
tensors' names, shapes and dtypes are exactly the ones the configured network has.

Keys (`signing_key_for`, `trusted_keys_for`) are found the way Tezzeret finds the key it
signs kernels with and the way Kasmina's loaders find the keys they trust; see
docs/LEARNED_CONTROL.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from cryptography.exceptions import InvalidSignature
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from esper.blueprints.artifact import SigningKey, TrustedKeys
from esper.errors import ArtifactError, ConfigError, UntrustedKeyError
from esper.fsutil import atomic_write
from esper.tamiyo.gnn.features import FEATURE_VERSION, GLOBAL_FEATURES, NODE_FEATURES
from esper.tamiyo.gnn.model import Ensemble, NetConfig

FORMAT = "esper.tamiyo.gnn"
FORMAT_VERSION = 2
"""2: the config is signed (1 was pinned by an unsigned SHA-256 only, and is refused)."""
MAX_WEIGHTS_BYTES = 256 * 1024 * 1024
_KEYS = frozenset(
    {
        "format",
        "format_version",
        "feature_version",
        "node_features",
        "global_features",
        "net",
        "vocab",
        "version",
        "weights_file",
        "weights_sha256",
        "training",
        "signature",
    }
)
_SIGNED_PREFIX = b"esper.tamiyo.gnn policy config v2\n"
"""Domain separation: these signed bytes can never be a kernel manifest, nor one of these."""


class PolicyFileError(ArtifactError):
    """A learned-policy file is malformed, does not match its config, or was tampered with."""

    reason = "POLICY_FILE_INVALID"


class PolicySignatureError(PolicyFileError):
    """A policy's signature is missing, malformed, or does not verify (it was changed after signing)."""

    reason = "POLICY_SIGNATURE_INVALID"


class UntrustedPolicyKeyError(PolicyFileError, UntrustedKeyError):
    """A policy is signed by a key the loader does not trust."""

    reason = "POLICY_KEY_UNTRUSTED"


def signed_bytes(config: dict[str, Any]) -> bytes:
    """What a policy's signature covers: every key but `signature`, canonical JSON."""
    body = {k: v for k, v in config.items() if k != "signature"}
    return _SIGNED_PREFIX + json.dumps(body, sort_keys=True, separators=(",", ":"),
                                       ensure_ascii=True).encode()


def signing_key_for(key_file: str | Path | None = None, *, data_dir: str | Path,
                    trusted_keys_dir: str | Path | None = None) -> tuple[SigningKey, Path]:
    """The key a policy is signed with, found in the order Tezzeret finds its kernel key.

    1. `key_file` (a PEM or 64-hex private key file);
    2. `ESPER_SIGNING_KEY` (PEM or hex) or `ESPER_SIGNING_KEY_FILE`;
    3. `<data_dir>/tezzeret/signing_key.pem`, the embedded platform's Tezzeret key, created
       on first use exactly as Tezzeret creates it.

    Like Tezzeret at start, its public key is then written to
    `<trusted_keys_dir>/tezzeret-<key_id>.pub` (`trusted_keys_dir`, else
    `ESPER_TRUSTED_KEYS_DIR`, else `<data_dir>/trusted_keys`), where `esper up`'s services
    and loaders look for the keys they trust. Returns the key and that public key file.

    Raises:
        ConfigError: a named key file is missing or is not an Ed25519 private key.
    """
    if key_file:
        key = SigningKey.from_file(key_file)
    elif os.environ.get("ESPER_SIGNING_KEY") or os.environ.get("ESPER_SIGNING_KEY_FILE"):
        key = SigningKey.from_env()
    else:
        key = SigningKey.load_or_create(Path(data_dir) / "tezzeret" / "signing_key.pem")
    directory = Path(trusted_keys_dir or os.environ.get("ESPER_TRUSTED_KEYS_DIR")
                     or Path(data_dir) / "trusted_keys")
    directory.mkdir(parents=True, exist_ok=True)
    pub = directory / f"tezzeret-{key.key_id}.pub"
    if not pub.exists():
        _write(pub, key.public_pem())
    return key, pub


def trusted_keys_for(trusted_keys_dir: str | Path | None = None, *,
                     data_dir: str | Path | None) -> TrustedKeys:
    """The keys a policy loader trusts: `trusted_keys_dir`, else `ESPER_TRUSTED_KEYS_DIR`,
    else `<data_dir>/trusted_keys` (the same directory Kasmina's loaders and Urza trust).

    Raises:
        ConfigError: none of them is given, or the directory does not exist.
    """
    directory = trusted_keys_dir or os.environ.get("ESPER_TRUSTED_KEYS_DIR") or (
        Path(data_dir) / "trusted_keys" if data_dir is not None else None)
    if not directory:
        raise ConfigError("a GNN policy is only loaded under trusted keys: set tamiyo.gnn.trusted_keys_dir "
                          "or ESPER_TRUSTED_KEYS_DIR to a directory of Ed25519 public keys (*.pub/*.pem)")
    return TrustedKeys.from_dir(directory)


def _verify_signature(config: dict[str, Any], path: Path, trusted: TrustedKeys) -> str:
    sig = config["signature"]
    if not (isinstance(sig, dict) and set(sig) == {"key_id", "ed25519"}
            and all(isinstance(v, str) for v in sig.values())):
        raise PolicySignatureError(f"policy config {path}: signature must be {{\"key_id\": str, \"ed25519\": hex}}, "
                                   f"got {sig!r}")
    public = trusted.get(sig["key_id"])
    if public is None:
        raise UntrustedPolicyKeyError(
            f"policy {path} is signed by key id {sig['key_id']!r}, which is not trusted (trusted: "
            f"{trusted.key_ids}); add its public key to the trusted keys directory if you trust it")
    try:
        public.verify(bytes.fromhex(sig["ed25519"]), signed_bytes(config))
    except (ValueError, InvalidSignature) as e:
        raise PolicySignatureError(
            f"policy {path}: signature does not verify under key {sig['key_id']}: the config (or the "
            "weights pin in it) was changed after signing; refusing to load it") from e
    return sig["key_id"]


def _write(path: Path, data: bytes) -> None:
    # Owner-only, as the policy files and keys were written before (through mkstemp).
    atomic_write(path, data, mode=0o600)


def save_policy(ensemble: Ensemble, path: Path, *, version: str, signing_key: SigningKey,
                training: dict[str, Any] | None = None) -> Path:
    """Write `path` (JSON, signed with `signing_key`) and its weights next to it; returns the JSON path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights_path = path.with_suffix(".safetensors")
    tensors = {k: v.detach().contiguous().clone() for k, v in ensemble.state_dict().items()}
    data = st_save(tensors, metadata={"format": FORMAT, "version": version})
    _write(weights_path, data)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "feature_version": FEATURE_VERSION,
        "node_features": list(NODE_FEATURES),
        "global_features": list(GLOBAL_FEATURES),
        "net": ensemble.cfg.to_dict(),
        "vocab": list(ensemble.vocab),
        "version": version,
        "weights_file": weights_path.name,
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        "training": training or {},
    }
    # Through JSON once, so what is signed is exactly what a loader will read back.
    config = json.loads(json.dumps(config))
    config["signature"] = {"key_id": signing_key.key_id,
                           "ed25519": signing_key.sign(signed_bytes(config)).hex()}
    _write(path, json.dumps(config, indent=2, sort_keys=True).encode())
    return path


def load_policy(path: Path, trusted: TrustedKeys) -> tuple[Ensemble, dict[str, Any]]:
    """The ensemble a policy file describes, in eval mode, and its JSON config.

    Raises:
        UntrustedPolicyKeyError: it is signed by a key not in `trusted`.
        PolicySignatureError: its signature does not verify (config or weights pin edited).
        PolicyFileError: anything else about the file is not as the config says.
    """
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PolicyFileError(f"policy config {path} cannot be read as JSON: {e}") from e
    if isinstance(config, dict) and config.get("format") == FORMAT and config.get("format_version") == 1:
        raise PolicySignatureError(
            f"policy {path} is an unsigned policy file (format v1, pinned by an unsigned SHA-256 only); "
            "this build loads only signed policies (v2): retrain it with `esper tamiyo train`, which signs")
    if isinstance(config, dict) and "signature" not in config:
        raise PolicySignatureError(f"policy {path} has no signature; only signed policies are loaded "
                                   "(`esper tamiyo train` signs what it writes)")
    if not isinstance(config, dict) or set(config) != _KEYS:
        got = sorted(config) if isinstance(config, dict) else type(config).__name__
        raise PolicyFileError(f"policy config {path} has keys {got}; expected exactly {sorted(_KEYS)}")
    if config["format"] != FORMAT or config["format_version"] != FORMAT_VERSION:
        raise PolicyFileError(
            f"policy config {path} is format {config['format']!r} v{config['format_version']}; "
            f"this build reads {FORMAT!r} v{FORMAT_VERSION}"
        )
    # Nothing else in the config is believed before its signature is checked.
    _verify_signature(config, path, trusted)
    if (
        config["feature_version"] != FEATURE_VERSION
        or config["node_features"] != list(NODE_FEATURES)
        or config["global_features"] != list(GLOBAL_FEATURES)
    ):
        raise PolicyFileError(
            f"policy {path} was trained on feature version {config['feature_version']}; "
            f"this build computes version {FEATURE_VERSION}: retrain it"
        )
    name = config["weights_file"]
    if not isinstance(name, str) or Path(name).name != name:
        raise PolicyFileError(f"weights_file={name!r} in {path} must be a bare file name next to the config")
    weights_path = path.parent / name
    try:
        size = weights_path.stat().st_size
        if size > MAX_WEIGHTS_BYTES:
            raise PolicyFileError(f"weights {weights_path} are {size} bytes; at most {MAX_WEIGHTS_BYTES} allowed")
        data = weights_path.read_bytes()
    except OSError as e:
        raise PolicyFileError(f"weights {weights_path} cannot be read: {e}") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != config["weights_sha256"]:
        raise PolicyFileError(
            f"weights {weights_path} have SHA-256 {digest}, but {path} pins {config['weights_sha256']}: "
            "the file was changed after training; refusing to load it"
        )
    try:
        cfg = NetConfig(**config["net"])
    except (TypeError, ConfigError) as e:
        raise PolicyFileError(f"net config in {path} is invalid: {e}") from e
    vocab = config["vocab"]
    if not (isinstance(vocab, list) and all(isinstance(v, str) for v in vocab)):
        raise PolicyFileError(f"vocab in {path} must be a list of blueprint ids")
    try:
        tensors = st_load(data)
    except SafetensorError as e:
        raise PolicyFileError(f"weights {weights_path} are not a valid safetensors file: {e}") from e
    ensemble = Ensemble(cfg, vocab)
    expected = ensemble.state_dict()
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise PolicyFileError(f"weights {weights_path}: missing tensors {missing[:5]}, unexpected {extra[:5]}")
    for k, v in expected.items():
        t = tensors[k]
        if t.shape != v.shape or t.dtype != v.dtype:
            raise PolicyFileError(
                f"weights {weights_path}: tensor {k!r} is {t.dtype} {tuple(t.shape)}, "
                f"the configured network needs {v.dtype} {tuple(v.shape)}"
            )
        if not torch.isfinite(t).all():
            raise PolicyFileError(f"weights {weights_path}: tensor {k!r} has non-finite values")
    ensemble.load_state_dict(tensors, strict=True)
    ensemble.eval()
    return ensemble, config
