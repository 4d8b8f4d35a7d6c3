"""``mmalign score``: score media with a reward model, one JSON line per item (a stable contract).

Images, videos (mp4/webm/mov/mkv/..., GIFs with ``--modality video``, folders of frames), multi-view sets
(folders of views, ``--grid RxC`` images) and audio/music files; the modality comes from the extension or folder
contents, or ``--modality``. Image rewards are lifted to videos and view sets; audio needs an audio reward.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import MMAlignError
from ..modalities import DEFAULT_MAX_PIXELS, MODALITIES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="score images, videos, multi-view sets or audio with a reward model, one JSON line per item",
        description="Score media (files or folders) or the pairs of a JSONL file; resumable with --out.",
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="media files or folders")
    p.add_argument("--reward", required=True, help="reward name (see `mmalign list`)")
    p.add_argument("--weights", help="weights file, folder or hub id (default: the published hub repo)")
    p.add_argument("--processor", help="processor/tokenizer folder or hub id")
    p.add_argument("--backbone", help="CLIP backbone folder or hub id, for heads on CLIP features (aesthetic)")
    p.add_argument("--prompt", help="the prompt of every image")
    p.add_argument("--pairs", metavar="FILE.jsonl", help='lines of {"prompt": ..., "image": ...}')
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="model weights and compute; on a CPU bf16 halves memory but is faster only with AMX (without it, "
        "e.g. avx512_bf16 alone, bf16 matmuls run at about 0.5-0.7x fp32: benchmarks/results/pickscore_bf16.md)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--device-map",
        choices=["auto", "balanced", "balanced_low_0", "sequential"],
        help="spread a large (VLM) reward over the GPUs, the CPU and disk (accelerate's device map); --device is "
        "then unused",
    )
    p.add_argument("--max-memory", metavar="DEV=SIZE,...", help="with --device-map: e.g. '0=20GiB,1=20GiB,cpu=60GiB'")
    p.add_argument("--offload-folder", metavar="DIR", help="with --device-map: where modules sent to disk go")
    p.add_argument("--skip-bad", action="store_true", help="skip unusable media files, report them at the end")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images (and video frames)")
    p.add_argument("--out", metavar="FILE.jsonl", help="append results here (re-running resumes); default stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    media = p.add_argument_group("video, multi-view and audio")
    media.add_argument(
        "--modality",
        choices=["auto", *MODALITIES],
        default="auto",
        help="how to read PATHs (default: by extension; a folder with cameras.json is a view set)",
    )
    media.add_argument("--frames", type=int, default=8, help="video: frames sampled (segments for segmental/tar)")
    media.add_argument(
        "--aggregate",
        choices=["mean", "segmental", "tar", "min"],
        help="units -> score: video mean|segmental|tar|min; multiview and audio mean|min (default mean)",
    )
    media.add_argument("--grid", metavar="RxC", help="multiview: each image is a grid of R rows and C columns of views")
    media.add_argument(
        "--window-seconds", type=float, metavar="S", help="audio/music: window length (default: the model's 10 s)"
    )
    media.add_argument("--sample-fps", type=float, metavar="F", help="video: sample at F frames/s (at most --frames)")
    media.add_argument(
        "--consistency",
        type=float,
        default=0.0,
        metavar="W",
        help="video/multiview: add W x temporal / cross-view feature consistency",
    )
    media.add_argument("--normalize", choices=["peak", "rms", "lufs"], help="audio: level normalisation")
    media.add_argument("--video-backend", choices=["pyav", "decord"], default="pyav", help="video decoder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..modalities.multiview import parse_grid
    from ..rewards import load_reward
    from ..scoring import MediaOptions, device_and_threads, items_from_pairs, items_from_paths, run_scoring
    from ..sharding import current_shard

    if args.batch_size < 1:
        raise MMAlignError("--batch-size must be at least 1")
    if args.frames < 1:
        raise MMAlignError("--frames must be at least 1")
    if args.grid is not None:
        try:
            parse_grid(args.grid)
        except ValueError as error:
            raise MMAlignError(f"--grid: {error}") from None
    if args.window_seconds is not None and args.window_seconds <= 0:
        raise MMAlignError("--window-seconds must be positive")
    if args.sample_fps is not None and args.sample_fps <= 0:
        raise MMAlignError("--sample-fps must be positive")
    if bool(args.paths) == bool(args.pairs):
        raise MMAlignError("give media PATHs or --pairs FILE.jsonl (one of the two)")
    shard = current_shard()  # under torchrun / accelerate launch: this process's share of the items
    if shard.distributed and not args.out:
        raise MMAlignError(f"{shard.world} processes merge their results into one file: give --out FILE.jsonl")
    device = device_and_threads(shard.device(args.device))
    reward = load_reward(
        args.reward,
        weights=args.weights,
        processor=args.processor,
        backbone=args.backbone,
        device=device,
        dtype=args.dtype,
        **placement_options(args),
    )
    if args.pairs:
        items = items_from_pairs(args.pairs, args.modality, args.grid)
    else:
        if args.prompt is None and reward.uses_prompt:
            raise MMAlignError(f"--prompt is required: {args.reward} scores media against a prompt")
        items = items_from_paths(args.paths, args.prompt or "", args.modality, args.grid)
    media = MediaOptions(
        frames=args.frames,
        aggregate=args.aggregate,
        grid=args.grid,
        window_seconds=args.window_seconds,
        sample_fps=args.sample_fps,
        consistency=args.consistency,
        normalize=args.normalize,
        backend=args.video_backend,
        max_pixels=args.max_pixels,
    )
    summary = run_scoring(
        reward,
        items,
        out=args.out,
        batch_size=args.batch_size,
        skip_bad=args.skip_bad,
        max_pixels=args.max_pixels,
        progress=not args.no_progress,
        media=media,
        shard=shard,
    )
    if not shard.is_main:
        return 0  # process 0 reports the whole job
    parts = [f"scored {summary.scored}"]
    if summary.already_done:
        parts.append(f"{summary.already_done} already in {args.out}")
    if summary.skipped:
        parts.append(f"skipped {len(summary.skipped)}")
    print("mmalign score: " + ", ".join(parts), file=sys.stderr)
    for path, reason in summary.skipped:
        print(f"  skipped {path}: {reason}", file=sys.stderr)
    return 0


def placement_options(args: argparse.Namespace) -> dict[str, str]:
    """``--device-map`` / ``--max-memory`` / ``--offload-folder`` as reward keyword arguments, refused for a reward
    whose loader does not place itself across devices (the VLM rewards do)."""
    if args.device_map is None:
        if args.max_memory or args.offload_folder:
            raise MMAlignError("--max-memory and --offload-folder go with --device-map")
        return {}
    import inspect

    from ..registry import REWARDS

    if args.reward in REWARDS and "device_map" not in inspect.signature(REWARDS.entry(args.reward).load()).parameters:
        raise MMAlignError(
            f"--device-map: {args.reward} is loaded whole on --device (device maps are for the large VLM rewards: "
            "vqascore, hpsv3, videoreward)"
        )
    options = {"device_map": args.device_map}
    if args.max_memory:
        options["max_memory"] = args.max_memory
    if args.offload_folder:
        options["offload_folder"] = args.offload_folder
    return options
