"""Atomic, pickle-free training checkpoints.

One checkpoint is one safetensors file holding a nested state (the trainer's: every
component's `state_dict()`): every tensor (host weights, seed slots, optimizer state, RNG
states) is a named tensor, and everything else (epoch, step, histories, optimizer and
scheduler structure, controller memory) is JSON in the safetensors metadata under the key
"esper", referring to the tensors by name (`flatten` / `unflatten`). safetensors runs no
code on load, unlike pickle or `torch.load`.

    checkpointer = CheckpointConfig(directory=run_dir / "checkpoints", every=1).build()
    checkpointer.save(epoch, trainer.state_dict())
    trainer.load_state_dict(read_state(checkpointer.latest()))

Writing is atomic: the bytes go to a temporary file in the same directory, which is
fsynced, renamed over the final name, and the directory is fsynced, so a crash leaves
either the previous checkpoint or the new one, never a torn file. A checkpoint file
under its final name is therefore always complete.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from esper.errors import FailedPreconditionError
from esper.fsutil import atomic_write

FORMAT = "esper.tolaria.checkpoint/2"
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


def save(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Atomically write `tensors` and JSON-able `meta` as one safetensors file."""
    # safetensors refuses views and tensors that share storage; copies are cheap at this size.
    owned = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    body = json.dumps({"format": FORMAT, **meta}, sort_keys=True, allow_nan=True)
    # 0o600 like the temp files checkpoints were written through before.
    atomic_write(path, st_save(owned, metadata={"esper": body}), mode=0o600, mkdir=True)


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


# ----- nested state without pickle -----

_TENSOR = "__tensor__"
_ITEMS = "__items__"
_TUPLE = "__tuple__"


def flatten(state: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts, lists, tuples, tensors, plain values) into named tensors
    and a JSON-able structure that refers to them by name.

    A tensor at path `a -> b -> 0` is stored as `<prefix>a/b/0`. Dicts whose keys are not
    all strings (an optimizer's per-parameter state is keyed by index) keep their keys.

    Raises:
        ValueError: two paths give the same tensor name.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            name = prefix + path
            if name in tensors:
                raise ValueError(f"two tensors of the checkpoint state are both named {name!r}")
            tensors[name] = value
            return {_TENSOR: name}
        if isinstance(value, Mapping):
            if all(isinstance(k, str) for k in value) and not ({_TENSOR, _ITEMS, _TUPLE} & set(value)):
                return {k: walk(v, f"{path}/{k}" if path else k) for k, v in value.items()}
            return {_ITEMS: [[k, walk(v, f"{path}/{k}" if path else str(k))] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {_TUPLE: [walk(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(value)]
        return value

    return tensors, walk(state, "")


def unflatten(tensors: Mapping[str, torch.Tensor], structure: Any) -> Any:
    """Inverse of `flatten`."""
    if isinstance(structure, dict):
        if set(structure) == {_TENSOR}:
            return tensors[structure[_TENSOR]]
        if set(structure) == {_ITEMS}:
            return {k: unflatten(tensors, v) for k, v in structure[_ITEMS]}
        if set(structure) == {_TUPLE}:
            return tuple(unflatten(tensors, v) for v in structure[_TUPLE])
        return {k: unflatten(tensors, v) for k, v in structure.items()}
    if isinstance(structure, list):
        return [unflatten(tensors, v) for v in structure]
    return structure


@dataclass(kw_only=True, frozen=True)
class CheckpointConfig:
    """Where a run's checkpoints go and how many are kept."""

    directory: Path
    """Directory of `ckpt-<epoch>.safetensors` files (created on the first save)."""
    every: int = 1
    """Write one every N epochs; 0: only after the last epoch (and on a stop)."""
    keep: int = 2
    """Newest checkpoints kept (>= 1); older ones are deleted after each save."""

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 0:
            raise ValueError(f"CheckpointConfig.every={self.every!r} must be an integer >= 0")
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 1:
            raise ValueError(f"CheckpointConfig.keep={self.keep!r} must be an integer >= 1")
        object.__setattr__(self, "directory", Path(self.directory))

    def build(self) -> Checkpointer:
        return Checkpointer(self)


class Checkpointer:
    """Saves and finds a run's checkpoints: one atomic safetensors file per save, holding a
    nested state (every component's `state_dict()`) as named tensors + JSON metadata."""

    def __init__(self, config: CheckpointConfig) -> None:
        self.config = config

    @property
    def directory(self) -> Path:
        return self.config.directory

    def due(self, epoch: int, *, last: bool) -> bool:
        """Whether the boundary after `epoch` epochs gets a checkpoint."""
        every = self.config.every
        return last or bool(every and epoch % every == 0)

    def save(self, epoch: int, state: Mapping[str, Any]) -> Path:
        """Write `state` as the checkpoint after `epoch` epochs (a stop mid-epoch writes
        under the epochs completed); older ones beyond `keep` are deleted."""
        tensors, structure = flatten(dict(state))
        path = checkpoint_path(self.directory, epoch)
        save(path, tensors, {"state": structure})
        prune_old(self.directory, self.config.keep)
        return path

    def latest(self) -> Path | None:
        return latest_checkpoint(self.directory)



def read_state(path: Path) -> dict[str, Any]:
    """The nested state a `Checkpointer` wrote to `path`.

    Raises:
        FailedPreconditionError: not an Esper checkpoint of this format.
    """
    tensors, meta = load(path)
    return unflatten(tensors, meta["state"])
