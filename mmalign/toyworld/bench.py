"""``mmalign bench trainers --world toy``: every registered trainer, the same pairs and the same CPU budget.

One set of pairs is sampled from the shipped pipeline and labelled by the learned reward (as in the demo); each
trainer then trains a LoRA from the same base with the same options until its training has used
``--cpu-minutes`` of CPU time, and the judge measures held-out adherence with the same seeds. The table gives
the gain and the gain per CPU-minute of training. Light at import: the CLI imports this module to build its parser.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import DemoConfig, config_from_args


def add_trainers(sub: argparse._SubParsersAction) -> None:
    """Add ``bench trainers`` to the ``mmalign bench`` subparsers."""
    d = DemoConfig()
    p = sub.add_parser(
        "trainers",
        help="compare every trainer on the toyworld: judge gain per CPU-minute for the same CPU budget",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("--world", choices=["toy"], default="toy", help="the benchmark world (only the toyworld so far)")
    p.add_argument("--trainers", default="all", help="comma list of registered trainers, or 'all' (default)")
    p.add_argument("--cpu-minutes", type=float, default=1.5, help="CPU time of each training run (default 1.5)")
    p.add_argument("--out", default="runs/bench-trainers", help="bench.json, bench.md and per-trainer LoRAs go here")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--beta", type=float, default=d.beta, help="beta of every trainer that has one")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank)
    p.add_argument("--eval-samples", type=int, default=d.eval_samples, help="samples per held-out prompt")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_trainers)


def bench_trainers(
    names: list[str], cpu_seconds: float, config: DemoConfig, log=print, out: Path | None = None
) -> dict[str, Any]:
    """Train each named trainer for ``cpu_seconds`` of CPU on the same pairs; returns the rows and settings."""
    import torch

    from ..rewards import load_reward
    from .demo import configured_pairs, demo_prompts, evaluate_heldout, reward_of, train_with_curves
    from .sampling import asset_dir, load_pipeline, threads

    out = Path(out or config.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    with threads(config.threads):
        model = Path(config.pipeline) if config.pipeline else asset_dir("pipeline")
        base = load_pipeline(model)
        reward = load_reward("toyworld", weights=config.reward)
        train_prompts, heldout = demo_prompts(config)
        before = evaluate_heldout(base, heldout, config)
        log(f"base: held-out adherence {before.scores['overall']:.3f}")
        pairs = configured_pairs(base, reward, train_prompts, config, out / "pairs")
        log(f"pairs: {pairs['pairs']} (label agreement with the judge {pairs['label_agreement_with_judge']:.3f})")
        from ..models.generator import parametrisation_of
        from ..registry import TRAINERS

        kind = parametrisation_of(model)
        flow_model = asset_dir("flow_pipeline")
        flow_before = None
        for name in names:
            supported = TRAINERS.entry(name).load().parametrisations
            run = replace(config, trainer=name, steps=1_000_000, cpu_budget=cpu_seconds, eval_every=0)
            if kind not in supported and "flow" in supported and flow_model.is_dir():
                flow_before = flow_before or flow_baseline(flow_model, heldout, run)
                rows.append(flow_row(name, run, flow_model, train_prompts, heldout, flow_before, out / name, log))
                continue
            if kind not in supported:
                skipped.append(
                    {"trainer": name, "reason": f"needs a {' or '.join(supported)} generator; {model} is {kind}"}
                )
                log(f"{name}: skipped ({skipped[-1]['reason']})")
                continue
            log(f"{name}: training for {cpu_seconds:.0f} CPU s")
            started = time.time()
            training = train_with_curves(run, model, pairs["file"], out / name, base, reward, heldout, log)
            after = evaluate_heldout(load_pipeline(model, lora=out / name), heldout, config)
            cpu_minutes = training["train_cpu_seconds"] / 60
            gain = after.scores["overall"] - before.scores["overall"]
            rows.append(
                {
                    "trainer": name,
                    "generator": "unet",
                    "reward_gain": reward_of(reward, after) - reward_of(reward, before),
                    "steps": training["steps"],
                    "train_cpu_s": training["train_cpu_seconds"],
                    "train_wall_s": training["train_wall_seconds"],
                    "before": before.scores["overall"],
                    "after": after.scores["overall"],
                    "gain": gain,
                    "exact_gain": after.scores["exact"] - before.scores["exact"],
                    "gain_per_cpu_minute": gain / cpu_minutes if cpu_minutes else float("nan"),
                    "after_scores": after.scores,
                    "total_wall_s": round(time.time() - started, 1),
                }
            )
            log(f"{name}: adherence {after.scores['overall']:.3f} ({gain:+.3f}) after {training['steps']} steps")
    result = {
        "world": "toy",
        "cpu_seconds_per_trainer": cpu_seconds,
        "torch_threads": config.threads or torch.get_num_threads(),
        "before": before.scores,
        "pairs": pairs,
        "settings": {
            "batch_size": config.batch_size,
            "lr": config.lr,
            "beta": config.beta,
            "lora_rank": config.lora_rank,
            "heldout_prompts": config.heldout,
            "eval_samples": config.eval_samples,
            "seed": config.seed,
        },
        "rows": rows,
        "skipped": skipped,
    }
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench.md").write_text(table_markdown(result))
    return result


def flow_baseline(model: Path, heldout: list, config: DemoConfig) -> Any:
    """Held-out judge of the shipped flow pipeline (the flow rows' "before"), sampled as the flow demo does."""
    from .flow_demo import FLOW_DEMO_DEFAULTS
    from .sampling import evaluate_flow, load_flow_generator

    return evaluate_flow(
        load_flow_generator(model),
        heldout,
        samples_per_prompt=config.eval_samples,
        seed=config.seed,
        steps=FLOW_DEMO_DEFAULTS["sample_steps"],
        guidance=config.guidance,
    )


def flow_row(
    name: str, config: DemoConfig, model: Path, train_prompts: list, heldout: list, before: Any, out: Path, log
) -> dict[str, Any]:
    """A flow-matching trainer on the flow pipeline with the flow demo's settings (the judge as training reward on
    the training prompts) for the same CPU budget; the training reward's rise sits beside the held-out gain."""
    from .flow_demo import FLOW_DEMO_DEFAULTS, train_flow, training_reward_gain

    keys = ("batch_size", "lora_rank", "lr", "sample_steps")
    flow = replace(config, **{key: FLOW_DEMO_DEFAULTS[key] for key in keys})
    started = time.time()
    log(f"{name}: training the flow pipeline for {config.cpu_budget:.0f} CPU s")
    run = train_flow(flow, model, train_prompts, heldout, out, log)
    after = run["after"].scores
    cpu_minutes = run["train_cpu_seconds"] / 60
    gain = after["overall"] - before.scores["overall"]
    log(f"{name}: adherence {after['overall']:.3f} ({gain:+.3f}) after {run['steps']} steps")
    return {
        "trainer": name,
        "generator": "flow",
        "reward_gain": training_reward_gain(run["history"]),
        "steps": run["steps"],
        "train_cpu_s": run["train_cpu_seconds"],
        "train_wall_s": run["train_wall_seconds"],
        "before": before.scores["overall"],
        "after": after["overall"],
        "gain": gain,
        "exact_gain": after["exact"] - before.scores["exact"],
        "gain_per_cpu_minute": gain / cpu_minutes if cpu_minutes else float("nan"),
        "after_scores": after,
        "total_wall_s": round(time.time() - started, 1),
    }


def table_markdown(result: dict[str, Any]) -> str:
    """The comparison table, sorted by gain per CPU-minute."""
    s = result["settings"]
    lines = [
        f"Toyworld trainers: {result['cpu_seconds_per_trainer']:.0f} CPU s each ({result['torch_threads']} threads), "
        f"{result['pairs']['pairs']} pairs, batch {s['batch_size']}, lr {s['lr']}, beta {s['beta']}, LoRA rank "
        f"{s['lora_rank']}; held-out adherence of the base {result['before']['overall']:.3f} "
        f"({s['heldout_prompts']} prompts x {s['eval_samples']} samples, seed {s['seed']}).",
        "",
        "| trainer | generator | steps | CPU s | adherence | gain | exact gain | gain / CPU-min | reward gain |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in sorted(result["rows"], key=lambda r: -r["gain_per_cpu_minute"]):
        lines.append(
            f"| {row['trainer']} | {row.get('generator', 'unet')} | {row['steps']} | {row['train_cpu_s']:.0f} | "
            f"{row['after']:.3f} | {row['gain']:+.3f} | {row['exact_gain']:+.3f} | {row['gain_per_cpu_minute']:+.4f}"
            f" | {row.get('reward_gain', float('nan')):+.4f} |"
        )
    for row in result.get("skipped", []):
        lines.append(f"| {row['trainer']} | skipped: {row['reason']} | | | | | | | |")
    return "\n".join(lines) + "\n"


def run_trainers(args: argparse.Namespace) -> int:
    from ..errors import MMAlignError
    from ..registry import TRAINERS

    names = TRAINERS.names() if args.trainers == "all" else [n.strip() for n in args.trainers.split(",") if n.strip()]
    for name in names:
        TRAINERS.entry(name)  # unknown names fail here, with close matches
    if args.cpu_minutes <= 0:
        raise MMAlignError("--cpu-minutes must be positive")
    config = config_from_args(args)
    result = bench_trainers(
        names, args.cpu_minutes * 60, config, log=lambda m: print(m, file=sys.stderr, flush=True), out=Path(args.out)
    )
    sys.stdout.write(table_markdown(result))
    print(f"mmalign bench trainers: wrote bench.json and bench.md to {args.out}", file=sys.stderr)
    return 0
