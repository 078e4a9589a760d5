"""The `esper` command: a registry of subcommands.

Every module that wants a subcommand exposes

    def register_cli(subparsers: argparse._SubParsersAction) -> None:
        p = subparsers.add_parser("demo", help="...")
        p.add_argument(...)
        p.set_defaults(func=run)          # run(args) -> int (exit code)

and lives at `esper/<package>/cli.py` (found on disk, no list to edit) — the built-in
`serve`, `up` and `status` come from `esper/runtime/cli.py` the same way. Keep heavy
imports (torch, torch_geometric) inside `run`, not at the top of a cli module or its
package `__init__`: every `esper` invocation imports every cli module.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from esper.errors import EsperError

log = logging.getLogger("esper.cli")


def command_modules() -> list[str]:
    """Dotted names of every `esper/<package>/cli.py`, runtime first, then alphabetical."""
    root = Path(__file__).resolve().parent
    found = sorted(p.parent.name for p in root.glob("*/cli.py") if (p.parent / "__init__.py").exists())
    found.sort(key=lambda name: name != "runtime")
    return [f"esper.{name}.cli" for name in found]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esper", description="Esper: models that grow while they train.")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    missing: dict[str, str] = {}
    for name in command_modules():
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            # A command whose extra is not installed (the core install is the growth
            # library only): say so in --help instead of failing every command.
            if not e.name or e.name.split(".")[0] in ("esper", "generated"):
                raise
            missing[name] = e.name.split(".")[0]
            continue
        register = getattr(module, "register_cli", None)
        if register is None:
            raise EsperError(f"{name} has no register_cli(subparsers); every esper/<package>/cli.py must define one")
        register(sub)
    if missing:
        parser.epilog = (
            "not installed: the commands of " + ", ".join(sorted(missing)) + " (missing "
            + ", ".join(sorted(set(missing.values()))) + "); pip install 'esper[platform]'")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EsperError as e:
        print(f"esper {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
