"""The toyworld demo on the flow-matching pipeline: an online trainer of the GRPO family (DiffusionNFT by default,
or Flow-GRPO and its variants) fine-tunes ``assets/toyworld/flow_pipeline`` on the training prompts with the
exact judge as its (verifiable) reward, as Flow-GRPO trains on GenEval's rule-based reward, and the judge measures
held-out adherence before and after, and along the way, on prompts the training never sees.

``mmalign demo --generator flow`` (``make demo-flow``) runs it; the report (``report.json``, ``report.md``, grids
and curves) goes to ``--out``. Training stops after ``cpu_budget`` CPU seconds (evaluation excluded).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .config import DemoConfig
from .demo import demo_prompts, hooked_trainer
from .sampling import Evaluation, asset_dir, evaluate_flow, load_flow_generator, threads
from .world import ATTRIBUTES

#: the flow demo's defaults where they differ from the UNet demo's (``mmalign demo --generator flow``): measured in
#: benchmarks/results/toy_flow_demo.md
FLOW_DEMO_DEFAULTS: dict[str, Any] = {
    "trainer": "diffusionnft",
    "out": "runs/demo-flow",
    "steps": 100_000,
    "cpu_budget": 480.0,
    "batch_size": 32,
    "lr": 3e-4,
    "lora_rank": 16,
    "sample_steps": 10,
    "eval_every": 25,
}
#: LoRA on every projection of the tiny SD3 blocks (attention of both streams, their feed-forwards and the
#: adaptive-norm modulation): in a 0.6 M-parameter transformer the attention alone is too narrow a window
FLOW_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "norm1.linear",
)
GROUP_SIZE = 8


def flow_overrides(config: DemoConfig, model: Path, prompts: Path, output_dir: Path) -> list[str]:
    """``key=value`` options of the flow trainer: groups of 8 samples per prompt, no CFG (the judge is computed
    on guidance-1 samples, as DiffusionNFT samples), the exact judge as the reward."""
    return [
        f"trainer={config.trainer}",
        f"model={model}",
        f"data={prompts}",
        f"output_dir={output_dir}",
        "resolution=32",
        f"sample_steps={config.sample_steps}",
        f"guidance={config.guidance}",
        f"group_size={GROUP_SIZE}",
        f"batch_size={config.batch_size}",
        "sample_batches=1",
        f"lr={config.lr}",
        f"lora_rank={config.lora_rank}",
        f"lora_alpha={2 * config.lora_rank}",
        f"lora_targets=[{','.join(FLOW_LORA_TARGETS)}]",
        f"max_steps={config.steps}",
        f"seed={config.seed}",
        "reward=toyworld-judge",
        "checkpoint_every=1000000",
        "tracker=none",
        f"progress={str(config.progress).lower()}",
        "log_every=1",
        *config.overrides,
    ]


def run_flow_demo(config: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train and evaluate; write the report; return the ``report.json`` content."""
    from ..commands.train import resolve_trainer_config

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started, cpu0 = time.time(), time.process_time()
    evaluate = dict(samples_per_prompt=config.eval_samples, seed=config.seed, steps=config.sample_steps)
    with threads(config.threads):
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        model = Path(config.pipeline) if config.pipeline else asset_dir("flow_pipeline")
        generator = load_flow_generator(model)
        train_prompts, heldout = demo_prompts(config)
        before = evaluate_flow(generator, heldout, guidance=config.guidance, **evaluate)
        log(f"before: held-out adherence {before.scores['overall']:.3f} ({len(before.verdicts)} images)")
        prompts = out / "train_prompts.txt"
        prompts.write_text("".join(f"{p.text}\n" for p in train_prompts))
        curve: list[dict[str, float]] = []

        def hook(trainer: Any, step: int) -> None:
            network = trainer.accelerator.unwrap_model(trainer.model)
            network.eval()
            result = evaluate_flow(trainer.policy, heldout, guidance=config.guidance, model=network, **evaluate)
            network.train()
            reward = trainer.history[-1].get("reward", float("nan")) if trainer.history else float("nan")
            curve.append({"step": step, **result.scores, "train_reward": reward, "train_cpu_s": trainer.cpu_used})
            log(f"  step {step}: held-out adherence {result.scores['overall']:.3f}, training reward {reward:.3f}")

        trainer_class, trainer_config = resolve_trainer_config(
            None, flow_overrides(config, model, prompts, out / "lora")
        )
        log(f"training {config.trainer} for {config.cpu_budget:.0f} CPU s (LoRA rank {config.lora_rank})")
        trainer = hooked_trainer(trainer_class, hook, config.eval_every, config.cpu_budget)(trainer_config)
        summary = trainer.train()
        network = trainer.accelerator.unwrap_model(trainer.model).eval()
        after = evaluate_flow(trainer.policy, heldout, guidance=config.guidance, model=network, **evaluate)
        gain = after.scores["overall"] - before.scores["overall"]
        log(f"after: held-out adherence {after.scores['overall']:.3f} ({gain:+.3f})")
    report = {
        "generator": "flow",
        "before": before.scores,
        "after": after.scores,
        "gain": {k: after.scores[k] - before.scores[k] for k in before.scores},
        "heldout": {"prompts": len(heldout), "samples_per_prompt": config.eval_samples, "seed": config.seed},
        "training": {
            "steps": summary["steps"],
            "train_cpu_seconds": round(trainer.cpu_used, 1),
            "train_wall_seconds": round(trainer.wall_used, 1),
            "curve": curve,
            "history": summary["history"],
        },
        "trainer_config": asdict(trainer_config),
        "demo_config": asdict(config),
        "timing": {"total_s": round(time.time() - started, 1), "total_cpu_s": round(time.process_time() - cpu0, 1)},
        "torch_threads": config.threads or torch.get_num_threads(),
    }
    report["files"] = write_flow_report(report, before, after, out)
    return report


def write_flow_report(report: dict[str, Any], before: Evaluation, after: Evaluation, out: Path) -> dict[str, str]:
    """``report.json``, ``report.md`` and the before/after grids."""
    from .report import grid_figure

    files = {
        "grid_before": str(grid_figure(before, "before (held-out prompts)", out / "grid_before.png")),
        "grid_after": str(grid_figure(after, "after (held-out prompts)", out / "grid_after.png")),
    }
    rows = ["overall", "exact", *ATTRIBUTES]
    training, config = report["training"], report["trainer_config"]
    lines = [
        f"# Toyworld flow demo: {config['trainer']} on the flow-matching pipeline",
        "",
        f"Held-out judge adherence, {report['heldout']['prompts']} prompts x {report['heldout']['samples_per_prompt']}"
        f" samples (seed {report['heldout']['seed']}); training {training['steps']} steps in "
        f"{training['train_cpu_seconds']:.0f} CPU s ({training['train_wall_seconds']:.0f} s wall, "
        f"{report['torch_threads']} threads), reward: the exact judge on the training prompts.",
        "",
        "| | before | after | gain |",
        "|---|---:|---:|---:|",
        *[
            f"| {name} | {report['before'][name]:.3f} | {report['after'][name]:.3f} | {report['gain'][name]:+.3f} |"
            for name in rows
        ],
        "",
        "| step | CPU s | held-out adherence | training reward |",
        "|---:|---:|---:|---:|",
        *[
            f"| {p['step']} | {p['train_cpu_s']:.0f} | {p['overall']:.3f} | {p['train_reward']:.3f} |"
            for p in training["curve"]
        ],
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    files["markdown"] = str(out / "report.md")
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    files["json"] = str(out / "report.json")
    return files


__all__ = ["FLOW_DEMO_DEFAULTS", "FLOW_LORA_TARGETS", "flow_overrides", "run_flow_demo", "write_flow_report"]
