"""``mmalign score``: score media with a reward model, one JSON line per item (a stable contract)."""

from __future__ import annotations

import argparse
import sys

from ..errors import MMAlignError
from ..modalities.image import DEFAULT_MAX_PIXELS


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..rewards import load_reward
    from ..scoring import device_and_threads, items_from_pairs, items_from_paths, run_scoring

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
