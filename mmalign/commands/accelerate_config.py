"""``mmalign accelerate-config [NAME]``: the path of a shipped accelerate config file (FSDP2, hybrid shard,
DeepSpeed ZeRO-2/3), for ``accelerate launch --config_file $(mmalign accelerate-config fsdp2) -m mmalign.cli train``;
without NAME, the names and their first comment line."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "accelerate-config",
        help="print the path of a shipped accelerate config (fsdp2, fsdp2-hybrid, deepspeed-zero2, deepspeed-zero3)",
    )
    p.add_argument("name", nargs="?", help="config name; omit to list them")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..trainers.distributed import CONFIG_DIR, accelerate_config

    if args.name:
        print(accelerate_config(args.name))
        return 0
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        first = path.read_text().splitlines()[0].lstrip("# ")
        print(f"{path.stem:<16}  {first}")
    return 0
