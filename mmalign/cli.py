"""``mmalign`` command line: ``score``, ``list``, ``convert``, ``demo``.

The ``score`` flags, the JSONL keys and the resume behaviour are a contract that scripts rely on: extend,
never rename.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import MMAlignError
from .modalities.image import DEFAULT_MAX_PIXELS


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="score images with a reward model, one JSON line per image",
        description="Score images (files or folders) or the pairs of a JSONL file; resumable with --out.",
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files or folders of images")
    p.add_argument("--reward", required=True, help="reward name (see `mmalign list`)")
    p.add_argument("--weights", help="weights file, folder or hub id (default: the published hub repo)")
    p.add_argument("--processor", help="processor/tokenizer folder or hub id")
    p.add_argument("--backbone", help="CLIP backbone folder or hub id, for heads on CLIP features (aesthetic)")
    p.add_argument("--prompt", help="the prompt of every image")
    p.add_argument("--pairs", metavar="FILE.jsonl", help='lines of {"prompt": ..., "image": ...}')
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--skip-bad", action="store_true", help="skip unusable images, report them at the end")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images")
    p.add_argument("--out", metavar="FILE.jsonl", help="append results here (re-running resumes); default stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_score)


def cmd_score(args: argparse.Namespace) -> int:
    from .rewards import load_reward
    from .scoring import device_and_threads, items_from_pairs, items_from_paths, run_scoring

    if args.batch_size < 1:
        raise MMAlignError("--batch-size must be at least 1")
    if bool(args.paths) == bool(args.pairs):
        raise MMAlignError("give image PATHs or --pairs FILE.jsonl (one of the two)")
    device = device_and_threads(args.device)
    reward = load_reward(
        args.reward,
        weights=args.weights,
        processor=args.processor,
        backbone=args.backbone,
        device=device,
        dtype=args.dtype,
    )
    if args.pairs:
        items = items_from_pairs(args.pairs)
    else:
        if args.prompt is None and reward.uses_prompt:
            raise MMAlignError(f"--prompt is required: {args.reward} scores images against a prompt")
        items = items_from_paths(args.paths, args.prompt or "")
    summary = run_scoring(
        reward,
        items,
        out=args.out,
        batch_size=args.batch_size,
        skip_bad=args.skip_bad,
        max_pixels=args.max_pixels,
        progress=not args.no_progress,
    )
    parts = [f"scored {summary.scored}"]
    if summary.already_done:
        parts.append(f"{summary.already_done} already in {args.out}")
    if summary.skipped:
        parts.append(f"skipped {len(summary.skipped)}")
    print("mmalign score: " + ", ".join(parts), file=sys.stderr)
    for path, reason in summary.skipped:
        print(f"  skipped {path}: {reason}", file=sys.stderr)
    return 0


def _add_list(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list the registered reward models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)


def cmd_list(args: argparse.Namespace) -> int:
    from .registry import REWARDS

    rows = [{"name": e.name, "description": e.description} for e in REWARDS]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        width = max(len(r["name"]) for r in rows)
        for row in rows:
            print(f"{row['name']:<{width}}  {row['description']}")
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a trusted pickled checkpoint to safetensors",
        description="Executes the pickle to convert it: only for files from a source you trust.",
    )
    p.add_argument("source")
    p.add_argument("target")
    p.add_argument("--trust-pickle", action="store_true", help="required: confirms you trust the file")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from .hub import convert_pickle_to_safetensors

    if not args.trust_pickle:
        raise MMAlignError("converting runs the pickle's code; add --trust-pickle if you trust the file")
    target = convert_pickle_to_safetensors(args.source, args.target)
    print(f"wrote {target}", file=sys.stderr)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="score the sample images shipped in assets/ (needs no weights)")
    p.add_argument("--assets", default=str(Path(__file__).resolve().parent.parent / "assets" / "samples"))
    p.add_argument("--out", default="runs/demo/scores.jsonl")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from .rewards import load_reward
    from .scoring import items_from_paths, run_scoring

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmalign", description="Align generative media models with human preferences."
    )
    parser.add_argument("--version", action="version", version=f"mmalign {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_score(sub)
    _add_list(sub)
    _add_convert(sub)
    _add_demo(sub)
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
