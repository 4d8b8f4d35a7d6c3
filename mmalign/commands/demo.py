"""``mmalign demo``: the embedded default job."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="score the sample images shipped in assets/ (needs no weights)")
    p.add_argument("--assets", default=str(Path(__file__).resolve().parents[2] / "assets" / "samples"))
    p.add_argument("--out", default="runs/demo/scores.jsonl")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..rewards import load_reward
    from ..scoring import items_from_paths, run_scoring

    items = items_from_paths([args.assets], "")
    out = Path(args.out)
    out.unlink(missing_ok=True)
    for name in ("jpeg-compressibility", "jpeg-incompressibility"):
        run_scoring(load_reward(name), items, out=out, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    print(f"{'image':<28} {'reward':<24} {'score':>8}")
    for row in rows:
        print(f"{Path(row['path']).name:<28} {row['reward']:<24} {row['score']:>8.3f}")
    print(f"\nwrote {out}")
    return 0
