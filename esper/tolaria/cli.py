"""Tolaria's subcommands: `esper run ...` and `esper jobs list` (a running platform,
esper/tolaria/commands.py) and `esper export` (a platform run's grown model,
esper/tolaria/export.py).

Heavy imports (torch, the platform) stay inside the commands: every `esper` invocation
imports this module. (`esper demo` and `esper bench ...` are the experiments', registered
by esper/experiments/cli.py.)
"""

from __future__ import annotations

import argparse


def register_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from esper.tolaria import commands

    commands.register(sub)
