"""Tolaria's subcommands: `esper run ...` and `esper jobs list` (a running platform,
esper/tolaria/commands.py) and `esper export` (a platform run's grown model,
esper/tolaria/export.py).

Heavy imports (torch, the platform) stay inside the commands: every `esper` invocation
imports this module. (`esper demo` and `esper bench ...` are the experiments', registered
by esper/experiments/cli.py.)
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from esper.tolaria import commands

    commands.register(sub)
    _register_export(sub)


def _register_export(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "export", help="write a platform run's grown model (fossilized seeds folded in) as "
                       "model.safetensors + manifest.json",
        description="A platform run's grown model (fossilized seeds folded in), as a plain module "
                    "you can take away: model.safetensors + manifest.json, from the run's newest "
                    "checkpoint, the job's model rebuilt through the job registry. Load it with "
                    "esper.grow.load_exported(<the job's model>, OUT). Reads the run's files under "
                    "--data-dir; fetches kernels from the platform only when its kernel cache "
                    "lacks them. Exit 0 exported, 2 refused (the message says why).")
    p.add_argument("run", help="run id (under <data-dir>/tolaria/runs/) or the run's directory")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="the platform's data dir (default: $ESPER_DATA_DIR, else .esper)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: ./<run id>-export)")
    p.add_argument("--drop-live", action="store_true",
                   help="leave out seeds that are not fossilized (default: refuse to export them)")
    p.add_argument("--trusted-keys", type=Path, default=None,
                   help="kernel-signing public keys (default: $ESPER_TRUSTED_KEYS_DIR, else "
                        "<data-dir>/trusted_keys)")
    p.add_argument("--jobs", default=None,
                   help='JSON {"name": "package.module:function"}: the operator\'s own jobs, as the '
                        "platform's tolaria.jobs registers them")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from esper.tolaria.export import cmd_export

    return cmd_export(args)
