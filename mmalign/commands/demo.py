"""``mmalign demo``: the embedded default job - the whole alignment loop on the toyworld, offline on a CPU.

Sample pairs from the shipped tiny pipeline, label them with the shipped learned reward, train Diffusion-DPO with
LoRA, and measure the exact judge's adherence on held-out prompts before and after (fixed seed); writes
``report.html``, ``report.md`` and ``report.json`` to ``--out``. ``--generator flow``: the GRPO family instead, on
the shipped flow-matching pipeline (DiffusionNFT by default, the exact judge as the reward on the training prompts,
a CPU budget of 8 minutes; see ``mmalign.toyworld.flow_demo``). ``--world video``: the toy video world (moving
shapes), Flow-GRPO on its tiny Wan pipeline with the exact video judge as the reward (``mmalign.toyworld.video_demo``).
``--world audio``: the toy audio world (beeps), Flow-GRPO on its tiny Stable Audio pipeline with the exact audio
judge as the reward (``mmalign.toyworld.audio_demo``). ``--world multiview``: the toy multi-view world (an object
seen from four azimuths), Flow-GRPO on its tiny 2x2-grid SD3 pipeline with the exact multi-view judge as the reward
(``mmalign.toyworld.multiview_demo``).
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..toyworld.config import DemoConfig

    d = DemoConfig()
    p = sub.add_parser(
        "demo",
        help="the whole alignment loop on the toyworld (sample, label, DPO with LoRA, evaluate), offline on a CPU",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument(
        "--generator",
        choices=["unet", "flow"],
        default="unet",
        help="unet: DPO on the UNet pipeline (default); flow: the GRPO family on the flow-matching pipeline",
    )
    p.add_argument(
        "--world",
        choices=["image", "video", "audio", "multiview"],
        default="image",
        help="image: the image toyworld (default); video: the toy video world on its tiny Wan pipeline; audio: the "
        "toy audio world on its tiny Stable Audio pipeline; multiview: the toy multi-view world (4 views of an object "
        "as a 2x2 grid) on its tiny SD3 pipeline (video, audio and multiview: the GRPO family; --generator does not "
        "apply)",
    )
    p.add_argument("--out", default=d.out, help=f"report folder (default {d.out}; runs/demo-flow for flow)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"training steps of each round (default {d.steps})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of sampling, training and evaluation")
    p.add_argument("--trainer", default=d.trainer, help="registered trainer: dpo, sft, smpo, adaptive-dpo, kto")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per step")
    p.add_argument("--lr", type=float, default=d.lr, help="LoRA learning rate")
    p.add_argument("--beta", type=float, default=d.beta, help="DPO beta (official convention)")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank)
    p.add_argument(
        "--timestep-range",
        type=float,
        nargs=2,
        default=list(d.timestep_range),
        metavar=("LOW", "HIGH"),
        help="fractions of the training timesteps the DPO-family losses draw from (default %(default)s)",
    )
    p.add_argument(
        "--samples-per-prompt", type=int, default=d.samples_per_prompt, help="samples of each training prompt"
    )
    p.add_argument(
        "--pairing",
        choices=["extremes", "halves"],
        default=d.pairing,
        help="pairs of a prompt's samples: best vs worst, or every better-half vs worse-half sample",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=d.rounds,
        help="on-policy rounds: sample, label and train again from the model so far (default %(default)s)",
    )
    p.add_argument("--eval-samples", type=int, default=d.eval_samples, help="samples per held-out prompt")
    p.add_argument("--heldout", type=int, default=d.heldout, help="held-out prompts (of 144)")
    p.add_argument("--train-prompts", type=int, default=d.train_prompts, help="training prompts to sample (0: all)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between curve points (0: none)")
    p.add_argument("--guidance", type=float, default=d.guidance, help="classifier-free guidance of all sampling")
    p.add_argument("--sample-steps", type=int, default=d.sample_steps, help="DDIM steps of all sampling")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (0: torch's default)")
    p.add_argument("--cpu-budget", type=float, default=d.cpu_budget, help="stop training after this many CPU s")
    p.add_argument("--pipeline", help="pipeline folder (default assets/toyworld/pipeline)")
    p.add_argument(
        "--reward",
        help="learned reward folder (default assets/toyworld/reward); with --world video/audio/multiview: the "
        "training reward's registered name (default the world's exact judge; e.g. toyworld-video, the world's "
        "learned reward; held-out adherence is always judged exactly)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="more trainer options, e.g. loss_type=hinge")
    p.set_defaults(func=run)


def flow_config(args: argparse.Namespace):
    """The flow demo's config: its own defaults (:data:`~mmalign.toyworld.flow_demo.FLOW_DEMO_DEFAULTS`) for every
    option left at the UNet demo's default."""
    import dataclasses

    from ..toyworld.config import DemoConfig, config_from_args
    from ..toyworld.flow_demo import FLOW_DEMO_DEFAULTS

    config, unet = config_from_args(args), DemoConfig()
    changes = {k: v for k, v in FLOW_DEMO_DEFAULTS.items() if getattr(config, k) == getattr(unet, k)}
    return dataclasses.replace(config, **changes)


def video_config(args: argparse.Namespace):
    """The video demo's config: :data:`~mmalign.toyworld.video_demo.VIDEO_DEMO_DEFAULTS` for every option left at
    the UNet demo's default."""
    from ..toyworld.video_demo import VIDEO_DEMO_DEFAULTS

    return world_config(args, VIDEO_DEMO_DEFAULTS)


def audio_config(args: argparse.Namespace):
    """The audio demo's config: :data:`~mmalign.toyworld.audio_demo.AUDIO_DEMO_DEFAULTS` for every option left at
    the UNet demo's default."""
    from ..toyworld.audio_demo import AUDIO_DEMO_DEFAULTS

    return world_config(args, AUDIO_DEMO_DEFAULTS)


def multiview_config(args: argparse.Namespace):
    """The multi-view demo's config: :data:`~mmalign.toyworld.multiview_demo.MULTIVIEW_DEMO_DEFAULTS` for every
    option left at the UNet demo's default."""
    from ..toyworld.multiview_demo import MULTIVIEW_DEMO_DEFAULTS

    return world_config(args, MULTIVIEW_DEMO_DEFAULTS)


def world_config(args: argparse.Namespace, defaults: dict):
    """The command line's config with ``defaults`` for every option left at the UNet demo's default."""
    import dataclasses

    from ..toyworld.config import DemoConfig, config_from_args

    config, unet = config_from_args(args), DemoConfig()
    changes = {k: v for k, v in defaults.items() if getattr(config, k) == getattr(unet, k)}
    return dataclasses.replace(config, **changes)


def run(args: argparse.Namespace) -> int:
    from ..toyworld.config import config_from_args
    from ..toyworld.demo import run_demo

    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    if getattr(args, "world", "image") == "video":
        from ..toyworld.video_demo import run_video_demo

        config = video_config(args)
        report = run_video_demo(config, log=log)
        print_flow_report(report, ("overall", "exact", "color", "shape", "count", "direction"), config.out)
        return 0
    if getattr(args, "world", "image") == "audio":
        from ..toyworld.audio_demo import run_audio_demo

        config = audio_config(args)
        report = run_audio_demo(config, log=log)
        print_flow_report(report, ("overall", "exact", "pitch", "count", "tempo"), config.out)
        return 0
    if getattr(args, "world", "image") == "multiview":
        from ..toyworld.multiview_demo import run_multiview_demo

        config = multiview_config(args)
        report = run_multiview_demo(config, log=log)
        print_flow_report(report, ("overall", "exact", "color", "shape", "dot", "consistency"), config.out)
        return 0
    if getattr(args, "generator", "unet") == "flow":
        from ..toyworld.flow_demo import run_flow_demo

        config = flow_config(args)
        report = run_flow_demo(config, log=log)
        print_flow_report(report, ("overall", "exact", "color", "shape", "count", "position"), config.out)
        return 0
    config = config_from_args(args)
    report = run_demo(config, log=log)
    print_scores(report, ("overall", "exact", "color", "shape", "count", "position", "reward"))
    t = report["timing"]
    print(f"\ntraining {t['train_s']:.0f} s, total {t['total_s']:.0f} s")
    print(f"wrote {args.out}/report.html, report.md and report.json")
    return 0


def print_scores(report: dict, names: tuple[str, ...]) -> None:
    """The held-out judge scores before and after training, and the gain, one line per score."""
    b, a = report["before"], report["after"]
    print(f"{'held-out score':<16} {'before':>8} {'after':>8} {'gain':>8}")
    for name in names:
        print(f"{name:<16} {b[name]:>8.3f} {a[name]:>8.3f} {a[name] - b[name]:>+8.3f}")


def print_flow_report(report: dict, names: tuple[str, ...], out: object) -> None:
    """The flow and video demos' summary: the scores, the training CPU time and where the report is."""
    print_scores(report, names)
    t = report["training"]
    print(f"\ntraining {t['train_cpu_seconds']:.0f} CPU s, total {report['timing']['total_s']:.0f} s")
    print(f"wrote {out}/report.md and report.json")
