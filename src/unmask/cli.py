"""The `unmask` command: a thin argparse layer over the library.

Each subcommand lives next to the code it drives, in a module with `register(subparsers)` that
adds its parser and sets `func`; heavy or optional imports happen inside the handlers, so
`unmask --help` stays fast and works without the optional extras installed.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "unmask.commands.generate",
    "unmask.commands.bench",
    "unmask.commands.train",
    "unmask.commands.eval",
    "unmask.commands.serve",
    "unmask.commands.merge",
]


class UserError(Exception):
    """An error caused by the user's input; printed as one line, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unmask", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .models import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (UserError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"unmask {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unmask {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
