"""``mmalign convert``: a trusted pickled checkpoint to safetensors."""

from __future__ import annotations

import argparse
import sys

from ..errors import MMAlignError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a trusted pickled checkpoint to safetensors",
        description="Executes the pickle to convert it: only for files from a source you trust.",
    )
    p.add_argument("source")
    p.add_argument("target")
    p.add_argument("--trust-pickle", action="store_true", help="required: confirms you trust the file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..hub import convert_pickle_to_safetensors

    if not args.trust_pickle:
        raise MMAlignError("converting runs the pickle's code; add --trust-pickle if you trust the file")
    target = convert_pickle_to_safetensors(args.source, args.target)
    print(f"wrote {target}", file=sys.stderr)
    return 0
