"""``mmalign`` command line; each subcommand lives in :mod:`mmalign.commands`.

Flags, JSONL keys and resume behaviour of the commands are a contract that scripts rely on: extend, never rename.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__
from .commands import COMMANDS
from .errors import MMAlignError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmalign", description="Align generative media models with human preferences."
    )
    parser.add_argument("--version", action="version", version=f"mmalign {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__package__}.commands.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MMAlignError as error:
        print(f"mmalign {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmalign {args.command}: interrupted; completed results are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
