"""Policy files: safetensors weights plus a JSON config that pins their SHA-256. No pickle.

    <name>.json          {"format": "esper.tamiyo.gnn", "weights_sha256": ..., "net": {...}, "vocab": [...], ...}
    <name>.safetensors   every ensemble parameter, by its state_dict name

Loading checks, before any tensor reaches the network: the JSON has exactly the known keys
and a supported format and feature version; the weights file is within a size bound and its
SHA-256 equals the one in the JSON (so a weights file changed after training is refused);
the tensors' names, shapes and dtypes are exactly the ones the configured network has.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from esper.errors import ArtifactError, ConfigError
from esper.tamiyo.gnn.features import FEATURE_VERSION, GLOBAL_FEATURES, NODE_FEATURES
from esper.tamiyo.gnn.model import Ensemble, NetConfig

FORMAT = "esper.tamiyo.gnn"
FORMAT_VERSION = 1
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
    }
)


class PolicyFileError(ArtifactError):
    """A learned-policy file is malformed, does not match its config, or was tampered with."""

    reason = "POLICY_FILE_INVALID"


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_policy(ensemble: Ensemble, path: Path, *, version: str, training: dict[str, Any] | None = None) -> Path:
    """Write `path` (JSON) and its weights next to it; returns the JSON path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights_path = path.with_suffix(".safetensors")
    tensors = {k: v.detach().contiguous().clone() for k, v in ensemble.state_dict().items()}
    data = st_save(tensors, metadata={"format": FORMAT, "version": version})
    _atomic_write(weights_path, data)
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
    _atomic_write(path, json.dumps(config, indent=2, sort_keys=True).encode())
    return path


def load_policy(path: Path) -> tuple[Ensemble, dict[str, Any]]:
    """The ensemble a policy file describes, in eval mode, and its JSON config.

    Raises:
        PolicyFileError: anything about the file is not as the config says.
    """
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PolicyFileError(f"policy config {path} cannot be read as JSON: {e}") from e
    if not isinstance(config, dict) or set(config) != _KEYS:
        got = sorted(config) if isinstance(config, dict) else type(config).__name__
        raise PolicyFileError(f"policy config {path} has keys {got}; expected exactly {sorted(_KEYS)}")
    if config["format"] != FORMAT or config["format_version"] != FORMAT_VERSION:
        raise PolicyFileError(
            f"policy config {path} is format {config['format']!r} v{config['format_version']}; "
            f"this build reads {FORMAT!r} v{FORMAT_VERSION}"
        )
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
