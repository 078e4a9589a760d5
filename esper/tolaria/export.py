"""`esper export <run>`: a platform run's grown model, as a plain module you can take away.

    esper export run-1a2b3c --data-dir .esper --out grown/      # model.safetensors + manifest.json

From the run's directory (`<data-dir>/tolaria/runs/<run id>`: its `config.pb` and newest
checkpoint) the job's model is rebuilt through the job registry (the run's job and
parameters, under the run's seed), wrapped and restored exactly as the worker would resume
it (seeds rebuilt from their kernels: Urza's verified artifacts from the platform's kernel
cache, else fetched from Urza; `local:` ids from the built-in catalog), and then written
by `esper.grow.export`: fossilized seeds folded in, safetensors weights plus a manifest
that rebuilds the model (`esper.grow.load_exported(job model, out)`). Before it returns,
the export is loaded back onto a freshly built model and its outputs on the job's example
batch compared with the wrapped model's; a difference above 1e-6 is an error.

Seeds still in flight (not fossilized) are refused, or left out with `--drop-live`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esper.errors import NotFoundError
from esper.jobs.registry import JobRegistry
from esper.tolaria.trainer import Trainer, build_job, build_trainer

TOLERANCE = 1e-6
"""Largest output difference between the exported and the wrapped model that is accepted."""


@dataclass(kw_only=True)
class ExportResult:
    manifest: Path
    checkpoint: Path
    epoch: int
    """Epochs the checkpoint had completed."""
    fossilized: dict[str, str]
    """slot id → kernel id of each seed folded into the export."""
    dropped: dict[str, str]
    """slot id → stage of each live seed left out (`live="drop"`)."""
    max_difference: float
    """Largest |exported − wrapped| output on the job's example batch."""


def restore_run(run_dir: Path, kernels: Any, *, registry: JobRegistry | None = None) -> Trainer:
    """The run's trainer, rebuilt from its config and resumed from its newest checkpoint.

    Raises:
        NotFoundError: the directory holds no run config or no checkpoint.
        JobConfigError, JobBuildError: the run's job cannot be built here.
    """
    from esper.tolaria.config import RunConfig
    from esper.tolaria.runs import read_config

    if not (run_dir / "config.pb").is_file():
        raise NotFoundError(f"{run_dir} is not a run directory (no config.pb)")
    cfg = RunConfig.from_proto(read_config(run_dir))
    trainer = build_trainer(cfg, run_id=run_dir.name, job=build_job(cfg, registry), kernels=kernels,
                            checkpoint_dir=run_dir / "checkpoints")
    if not trainer.resume():
        raise NotFoundError(f"run {run_dir.name} has no checkpoint in {run_dir / 'checkpoints'} yet; "
                            "a run writes one at its first checkpoint interval")
    return trainer


def export_run(run_dir: Path, out: Path, kernels: Any, *, registry: JobRegistry | None = None,
               live: str = "refuse") -> ExportResult:
    """Export the grown model of the run in `run_dir` to `out` (see the module doc).

    Raises:
        FailedPreconditionError: a seed is in flight and `live="refuse"`.
        ExportError: the export does not reproduce the wrapped model's outputs.
    """
    from esper.grow import ExportError, export, load_exported

    trainer = restore_run(run_dir, kernels, registry=registry)
    mm = trainer.model
    fossilized = trainer.grower.fossilized()
    dropped = {s: stage for s, stage in trainer.grower.live().items() if stage != "FOSSILIZED"}
    manifest = export(mm, out, live=live)  # type: ignore[arg-type]
    again = load_exported(build_job(trainer.config, registry).model, out)
    x = trainer.job.example_input
    mm.eval()
    again.eval()
    with torch.no_grad():
        want, got = _call(mm, x), _call(again, x)
    diff = float((got - want).abs().max()) if isinstance(want, torch.Tensor) else 0.0
    if dropped and live == "drop":
        diff = 0.0  # the wrapped model still blends the dropped seeds in: nothing to compare
    elif diff > TOLERANCE:
        raise ExportError(f"the export of run {run_dir.name} differs from the wrapped model by "
                          f"{diff:.3g} on the job's example batch (more than {TOLERANCE})")
    checkpoint = trainer.checkpointer.latest() if trainer.checkpointer is not None else None
    assert checkpoint is not None
    return ExportResult(manifest=manifest, checkpoint=checkpoint, epoch=trainer.epoch,
                        fossilized=fossilized, dropped=dropped, max_difference=diff)


def _call(model: nn.Module, x: Any) -> Any:
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, tuple | list):
        return model(*x)
    return model(x)


class PlatformKernels:
    """Seed modules for a run's checkpoint: `local:` kernel ids from the built-in catalog,
    Urza's (`sha256:...`) through Kasmina's verifying loader over the platform's kernel cache,
    fetching what it lacks from Urza when `fetch` is given."""

    def __init__(self, *, trusted_keys_dir: Path, cache_dir: Path,
                 fetch: Callable[[str, float], bytes] | None) -> None:
        from esper.blueprints.artifact import TrustedKeys
        from esper.grow import BuiltinKernels
        from esper.kasmina.loader import KernelLoader

        self.builtin = BuiltinKernels()
        self._keys_dir = trusted_keys_dir

        def missing(kernel_id: str, timeout_s: float) -> bytes:
            raise NotFoundError(f"kernel {kernel_id!r} is not in the kernel cache {cache_dir} and no "
                                "platform is running to fetch it from (start `esper up` on this "
                                "data dir, or pass --endpoint)")

        self._loader = None
        if trusted_keys_dir.is_dir():
            self._loader = KernelLoader(fetch or missing, TrustedKeys.from_dir(trusted_keys_dir), cache_dir)

    def candidates(self, site: Any) -> list[Any]:
        return []

    def load(self, kernel_id: str, site: Any = None) -> nn.Module:
        if kernel_id.startswith("local:"):
            return self.builtin.load(kernel_id, site)
        if self._loader is None:
            raise NotFoundError(f"kernel {kernel_id!r} is an Urza kernel, and there is no trusted-keys "
                                f"directory {self._keys_dir} to verify it with (pass --trusted-keys)")
        return self._loader.load(kernel_id, 30.0)


def cmd_export(args: argparse.Namespace) -> int:
    """`esper export` (registered by esper/tolaria/cli.py)."""
    from esper.jobs.registry import JobRegistry

    data_dir = args.data_dir or Path(os.environ.get("ESPER_DATA_DIR") or ".esper")
    given = Path(args.run)
    run_dir = given if (given / "config.pb").is_file() else data_dir / "tolaria" / "runs" / args.run
    if not run_dir.is_dir():
        raise NotFoundError(f"no run {args.run!r}: {run_dir} does not exist (is --data-dir the "
                            "platform's data dir?)")
    part_dir = run_dir.parent.parent
    keys = args.trusted_keys or Path(os.environ.get("ESPER_TRUSTED_KEYS_DIR")
                                     or part_dir.parent / "trusted_keys")
    closers: list[Any] = []
    try:
        kernels = PlatformKernels(trusted_keys_dir=keys, cache_dir=part_dir / "kernel-cache",
                                  fetch=_urza_fetch(part_dir.parent, closers))
        registry = JobRegistry.discover(json.loads(args.jobs) if args.jobs else None)
        out = args.out or Path(f"{run_dir.name}-export")
        result = export_run(run_dir, out, kernels, registry=registry,
                            live="drop" if args.drop_live else "refuse")
    finally:
        for c in closers:
            c.close()
    print(f"exported run {run_dir.name} (checkpoint after epoch {result.epoch}) to {result.manifest.parent}: "
          f"{len(result.fossilized)} fossilized seed(s) folded in"
          + (f" {sorted(result.fossilized)}" if result.fossilized else "")
          + (f"; left out live seed(s) {result.dropped}" if result.dropped else "")
          + f"; reloaded, max output difference {result.max_difference:.2g}")
    return 0


def _urza_fetch(data_dir: Path, closers: list[Any]) -> Callable[[str, float], bytes] | None:
    """Urza's GetKernel when a local `esper up` serves this data dir (its endpoints.json names
    Urza), else None: the kernel cache alone must then hold the run's kernels."""
    path = data_dir / "endpoints.json"
    if not path.is_file():
        return None
    target = json.loads(path.read_text()).get("endpoints", {}).get("urza")
    if not target:
        return None
    from esper.tolaria.client import find_platform
    from esper.urza.client import UrzaClient, fetcher

    # The key of the same local platform (find_platform reads its key file, never another's).
    key = find_platform(data_dir=data_dir, env={}).api_key
    urza = UrzaClient(target, key)
    closers.append(urza)
    return fetcher(urza)
