"""The options ``mmalign label`` and ``mmalign generate`` share (a helper module, not a command): the generator,
the reward, the prompts, the sampler, and what the generator makes (``--frames`` of a video generator,
``--duration`` of an audio one, ``--views-grid`` to read an image generator's images as views)."""

from __future__ import annotations

import argparse
from typing import Any

REWARD_HELP = "reward name, weighted list 'hpsv2.1:1.0,aesthetic:0.5' or http://HOST:PORT/NAME"


def add_generator_args(p: argparse.ArgumentParser, steps_help: str) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="diffusers pipeline folder or hub id: any generator of the project (SD/SDXL, flow matching, Wan, "
        "AnimateDiff, Stable Audio)",
    )
    p.add_argument("--reward", required=True, help=REWARD_HELP)
    p.add_argument("--reward-weights", help="reward checkpoint path (comma list, one per reward)")
    p.add_argument("--prompts", required=True, help="prompt file: .txt (one per line) or .jsonl with 'prompt'")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=50, help=steps_help)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument(
        "--guidance-2",
        type=float,
        default=None,
        help="Wan 2.2 A14B: the low-noise expert's guidance scale (guidance_scale_2; default --guidance)",
    )
    p.add_argument("--resolution", type=int, default=512, help="image / video side in pixels (not used for audio)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    media = p.add_argument_group("what the generator makes")
    media.add_argument("--frames", type=int, default=0, help="frames per video (0: the video generator's own)")
    media.add_argument("--duration", type=float, default=0.0, help="seconds of audio (0: the audio generator's own)")
    media.add_argument(
        "--views-grid",
        default="",
        metavar="RxC",
        help="read an image generator's images as a rows x cols grid of views (multi-view; e.g. 2x2)",
    )
    media.add_argument("--fps", type=int, default=8, help="frame rate the videos are written with")


def load_generator_from_args(args: argparse.Namespace, device: Any) -> Any:
    """The ``--model`` generator on ``device``, set up as ``--frames`` / ``--duration`` / ``--views-grid`` (and
    ``--guidance-2`` for Wan 2.2 A14B) say."""
    from ..models.generator import configure_output, load_generator

    generator = load_generator(args.model, device=device)
    return configure_output(
        generator,
        args.frames,
        args.duration,
        args.views_grid,
        where=f"--model {args.model}",
        guidance_2=getattr(args, "guidance_2", None),
    )
