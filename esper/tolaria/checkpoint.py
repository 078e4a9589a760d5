"""Atomic, pickle-free training checkpoints.

One checkpoint is one safetensors file: every tensor (model and seed state, optimizer
state, RNG states) is a named tensor, and everything else (epoch, step, histories,
optimizer structure, controller-visible state) is JSON in the safetensors metadata under
the key "esper". safetensors runs no code on load, unlike pickle or `torch.load`.

Writing is atomic: the bytes go to a temporary file in the same directory, which is
fsynced, renamed over the final name, and the directory is fsynced, so a crash leaves
either the previous checkpoint or the new one, never a torn file. A checkpoint file
under its final name is therefore always complete.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from esper.errors import FailedPreconditionError

FORMAT = "esper.tolaria.checkpoint/1"
_NAME = re.compile(r"^ckpt-(\d{6})\.safetensors$")


def checkpoint_path(directory: Path, epoch: int) -> Path:
    return directory / f"ckpt-{epoch:06d}.safetensors"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every complete checkpoint in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(directory: Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Atomically write `tensors` and JSON-able `meta` as one safetensors file."""
    # safetensors refuses views and tensors that share storage; copies are cheap at this size.
    owned = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    body = json.dumps({"format": FORMAT, **meta}, sort_keys=True, allow_nan=True)
    write_atomic(path, st_save(owned, metadata={"esper": body}))


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a checkpoint written by `save`.

    Raises:
        FailedPreconditionError: the file is not an Esper checkpoint of this format.
    """
    with safe_open(str(path), framework="pt", device="cpu") as f:
        raw = (f.metadata() or {}).get("esper")
        if raw is None:
            raise FailedPreconditionError(f"{path} is not an Esper checkpoint (no 'esper' metadata)")
        meta = json.loads(raw)
        if meta.get("format") != FORMAT:
            raise FailedPreconditionError(
                f"{path} has checkpoint format {meta.get('format')!r}; this version reads {FORMAT!r}"
            )
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open, not a dict
    return tensors, meta


def prune_old(directory: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    for _, p in list_checkpoints(directory)[:-keep]:
        p.unlink(missing_ok=True)


# ----- optimizer state without pickle -----


def flatten_optimizer(state: Mapping[str, Any], prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into named tensors and a JSON structure.

    Per-parameter entries that are tensors become `<prefix><param>/<key>` tensors; the
    rest (and `param_groups`) stay in the JSON, where tensors are referenced by name.
    """
    tensors: dict[str, torch.Tensor] = {}
    per_param: dict[str, dict[str, Any]] = {}
    for idx, entries in state["state"].items():
        out: dict[str, Any] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                name = f"{prefix}{idx}/{key}"
                tensors[name] = value
                out[key] = {"tensor": name}
            else:
                out[key] = {"value": value}
        per_param[str(idx)] = out
    return tensors, {"state": per_param, "param_groups": state["param_groups"]}


def unflatten_optimizer(tensors: Mapping[str, torch.Tensor], structure: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten_optimizer`: a dict `optimizer.load_state_dict` accepts."""
    state: dict[int, dict[str, Any]] = {}
    for idx, entries in structure["state"].items():
        state[int(idx)] = {
            key: tensors[v["tensor"]] if "tensor" in v else v["value"] for key, v in entries.items()
        }
    return {"state": state, "param_groups": [dict(g) for g in structure["param_groups"]]}
