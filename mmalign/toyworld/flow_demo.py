"""The toyworld demo on the flow-matching pipeline: an online trainer of the GRPO family (Flow-GRPO by default, or
its variants and DiffusionNFT) fine-tunes ``assets/toyworld/flow_pipeline`` on the training prompts with the
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
from dataclasses import asdict, fields
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
    "trainer": "flow-grpo",
    "out": "runs/demo-flow",
    # 12 prompts × 8 samples per step and a cosine decay of the lr to 0 over the 160 steps (flow_overrides): at
    # 4 prompts per step and a constant lr every run collapsed after its peak (benchmarks/results/toy_flow_demo.md,
    # runs A-N); the demo still keeps the weights of the best validation evaluation
    "steps": 160,
    "cpu_budget": 480.0,
    "batch_size": 96,
    "lr": 1e-3,
    "lora_rank": 16,
    "sample_steps": 10,
    "eval_every": 20,
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
#: the video, audio and multi-view demos' Flow-GRPO: the SDE on the first 3 of the 10 sampling steps, the ODE after
#: them, all 3 trained (:func:`trained_step_options`): with the SDE on every step the 7 untrained steps' noise set
#: most of a group's reward spread (mmalign/toyworld/README.md, "Where the SDE runs"). Held-out gains over seeds 0-2
#: with it / without: video +0.103 / +0.198 / +0.136 against +0.107 / +0.140 / +0.091, audio +0.187 / +0.229 /
#: +0.132 against +0.132 / +0.097 / +0.104, multi-view +0.117 against +0.073 on average over six / five seeds
WORLD_SDE_STEPS = 3
#: the lr's schedule over ``steps``: a short warm-up, then a cosine decay to 0. With sample_batches 1 the PPO ratio is
#: 1 at every step (the clip never acts), the gradient norm (~0.01) stays far below max_grad_norm and Adam's step
#: does not shrink with the gradient: nothing else bounds how far the weights wander once the reward stops rising
LR_SCHEDULER, LR_WARMUP_STEPS = "cosine", 5
#: training prompts set aside for validation (early stopping: the best-judged weights are kept); neither trained
#: on nor part of the held-out test prompts
VALIDATION_PROMPTS = 16


def flow_overrides(
    config: DemoConfig,
    model: Path,
    prompts: Path,
    output_dir: Path,
    validation: Path | None = None,
    reward: str = "toyworld-judge",
    lora_targets: tuple[str, ...] = FLOW_LORA_TARGETS,
    lr_scheduler: str = LR_SCHEDULER,
    output: tuple[str, ...] = ("resolution=32",),
    sde_steps: int | None = None,
) -> list[str]:
    """``key=value`` options of the flow trainer: groups of 8 samples per prompt, one optimizer step per round, no
    CFG (the judge is computed on guidance-1 samples), the exact judge as the reward, 30 % of the steps trained
    (Flow-GRPO: the first 3 of 10, the noisiest, where colour, shape, count and position are decided;
    DiffusionNFT: 3 random ones per sample), an EMA of the weights (decay 0.95: what is evaluated and saved) and
    the lr's warm-up and cosine decay to 0 over ``steps`` (:data:`LR_SCHEDULER`; by the CPU budget when that ends
    first: :func:`budget_schedule`). ``reward``, ``lora_targets`` and ``output`` (what the generator makes: its
    ``resolution``, ``views_grid``, ...): the image world's judge, the SD3 projections and 32 px by default (the
    video, audio and multi-view demos pass their own). ``sde_steps``: see :func:`trained_step_options`."""
    return [
        f"trainer={config.trainer}",
        f"model={model}",
        f"data={prompts}",
        f"output_dir={output_dir}",
        *output,
        f"sample_steps={config.sample_steps}",
        f"guidance={config.guidance}",
        f"group_size={GROUP_SIZE}",
        f"batch_size={config.batch_size}",
        "sample_batches=1",
        *trained_step_options(config.trainer, sde_steps),
        "ema_decay=0.95",
        f"lr={config.lr}",
        f"lr_scheduler={lr_scheduler}",
        f"lr_warmup_steps={LR_WARMUP_STEPS}",
        f"lora_rank={config.lora_rank}",
        f"lora_alpha={2 * config.lora_rank}",
        f"lora_targets=[{','.join(lora_targets)}]",
        f"max_steps={config.steps}",
        f"seed={config.seed}",
        f"reward={reward}",
        "checkpoint_every=1000000",
        "tracker=none",
        f"progress={str(config.progress).lower()}",
        "log_every=1",
        *(
            [f"eval_prompts={validation}", "eval_every=10", f"eval_reward={reward}", "eval_samples=2"]
            + ["eval_keep_best=true"]
            if validation is not None
            else []
        ),
        *config.overrides,
    ]


def trained_step_options(trainer: str, sde_steps: int | None = None) -> list[str]:
    """Which sampling steps are stochastic and trained: by default the SDE on every step and the first 30 % trained
    (``timestep_fraction=0.3``). ``sde_steps`` n, for a trainer with a fixed SDE window (Flow-GRPO): the SDE on the
    first n steps only, the deterministic ODE after them, and all n trained (``sde_window=[0,n]``,
    ``timestep_fraction=1.0``) — MixGRPO's mixed sampler (Li et al. 2025) with its window held at the start, as
    Flow-GRPO-Fast's ``train_sd3_fast.py`` does in a random place. A group's rewards then differ only by the noise
    of the trained steps (the ODE adds none after them), so their advantages credit those steps alone."""
    if sde_steps is not None:
        from ..registry import TRAINERS

        config_class = TRAINERS.entry(trainer).load().config_class
        if {f.name: f.default for f in fields(config_class)}.get("window") == "fixed":
            return [f"sde_window=[0,{sde_steps}]", "timestep_fraction=1.0"]
    return ["timestep_fraction=0.3"]


def budget_schedule(trainer_class: type, cpu_budget: float) -> type:
    """A subclass of ``trainer_class`` (a :func:`~mmalign.toyworld.demo.hooked_trainer`, which counts
    ``cpu_used``) whose lr schedule runs on ``max(step, cpu_used / cpu_budget · N)``, ``N`` the scheduler's step
    count: the schedule ends by the CPU budget even where the budget stops training before ``max_steps`` (a slower
    or busier machine), instead of stopping at a high lr. Where the steps run out first, as on the machine the
    defaults were measured on, the lr is the scheduler's own."""

    class Budgeted(trainer_class):  # type: ignore[misc, valid-type]
        def _train_step(self) -> dict[str, float]:
            scheduler = self.lr_scheduler
            lr = None
            if cpu_budget > 0 and getattr(self, "cpu_used", 0.0) > 0:
                total = getattr(self, "_budget_steps", None) or self.config.max_steps
                self._budget_steps = total  # max_steps itself is cut short when the budget runs out
                position = max(float(self.step), self.cpu_used / cpu_budget * total)
                for group, base, factor in zip(self.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                    group["lr"] = base * factor(min(position, float(total)))
                lr = self.optimizer.param_groups[0]["lr"]
            metrics = super()._train_step()
            if lr is not None and "lr" in metrics:
                metrics["lr"] = lr  # the lr this step used (the scheduler reports its step-based value)
            return metrics

    Budgeted.__name__ = Budgeted.__qualname__ = f"Budgeted{trainer_class.__name__}"
    return Budgeted


def evaluate_trained(
    trainer: Any, heldout: list, guidance: float, options: dict[str, Any], evaluate: Callable[..., Any] = evaluate_flow
) -> Evaluation:
    """Held-out judge of the trained network, with its EMA weights when the trainer keeps an EMA (``ema_decay``:
    what the run saves); ``evaluate``: :func:`~mmalign.toyworld.sampling.evaluate_flow` or, for videos,
    :func:`~mmalign.toyworld.sampling.evaluate_video`."""
    network = trainer.accelerator.unwrap_model(trainer.model)
    network.eval()
    if trainer.ema is not None:
        trainer.ema.store(trainer.trainable)
        trainer.ema.copy_to(trainer.trainable)
    try:
        return evaluate(trainer.policy, heldout, guidance=guidance, model=network, **options)
    finally:
        if trainer.ema is not None:
            trainer.ema.restore(trainer.trainable)
        network.train()


def train_flow(
    config: DemoConfig,
    model: Path,
    train_prompts: list,
    heldout: list,
    out: Path,
    log: Callable[[str], None],
    evaluate_fn: Callable[..., Any] = evaluate_flow,
    reward: str = "toyworld-judge",
    lora_targets: tuple[str, ...] = FLOW_LORA_TARGETS,
    lr_scheduler: str = LR_SCHEDULER,
    policy: Callable[[Path], Any] | None = None,
    output: tuple[str, ...] = ("resolution=32",),
    sde_steps: int | None = None,
) -> dict[str, Any]:
    """Train ``config.trainer`` on the flow pipeline ``model`` with the judge as reward on ``train_prompts`` until
    ``config.cpu_budget`` CPU seconds (or ``config.steps``), evaluating ``heldout`` every ``eval_every`` steps;
    returns the final evaluation, the curve, the history, the trainer's config and its CPU and wall time.
    ``evaluate_fn``, ``reward``, ``lora_targets``, ``lr_scheduler``, ``output``, ``sde_steps``: the image world's
    by default (the other worlds' demos pass their own). ``policy``: the generator the trainer trains, built from
    ``model`` (default: the trainer loads ``model`` itself; the audio demo passes a flow view of its v-diffusion
    pipeline)."""
    from ..commands.train import resolve_trainer_config

    evaluate = dict(samples_per_prompt=config.eval_samples, seed=config.seed, steps=config.sample_steps)
    out.mkdir(parents=True, exist_ok=True)
    order = random.Random(config.seed).sample(range(len(train_prompts)), len(train_prompts))
    held = set(order[:VALIDATION_PROMPTS]) if len(train_prompts) > 2 * VALIDATION_PROMPTS else set()
    prompts, validation = out / "train_prompts.txt", out / "validation_prompts.txt"
    prompts.write_text("".join(f"{p.text}\n" for i, p in enumerate(train_prompts) if i not in held))
    validation.write_text("".join(f"{train_prompts[i].text}\n" for i in sorted(held)))
    curve: list[dict[str, float]] = []

    def hook(trainer: Any, step: int) -> None:
        result = evaluate_trained(trainer, heldout, config.guidance, evaluate, evaluate_fn)
        reward = trainer.history[-1].get("reward", float("nan")) if trainer.history else float("nan")
        curve.append({"step": step, **result.scores, "train_reward": reward, "train_cpu_s": trainer.cpu_used})
        log(f"  step {step}: held-out adherence {result.scores['overall']:.3f}, training reward {reward:.3f}")

    held_out = validation if held else None
    overrides = flow_overrides(
        config, model, prompts, out / "lora", held_out, reward, lora_targets, lr_scheduler, output, sde_steps
    )
    trainer_class, trainer_config = resolve_trainer_config(None, overrides)
    log(f"training {config.trainer} for {config.cpu_budget:.0f} CPU s (LoRA rank {config.lora_rank})")
    hooked = hooked_trainer(trainer_class, hook, config.eval_every, config.cpu_budget)
    trainer = budget_schedule(hooked, config.cpu_budget)(trainer_config, None if policy is None else policy(model))
    summary = trainer.train()
    return {
        "after": evaluate_trained(trainer, heldout, config.guidance, evaluate, evaluate_fn),
        "steps": summary["steps"],
        "best_step": getattr(trainer, "best_step", None),
        "train_cpu_seconds": round(trainer.cpu_used, 1),
        "train_wall_seconds": round(trainer.wall_used, 1),
        "curve": curve,
        "history": summary["history"],
        "config": asdict(trainer_config),
    }


def training_reward_gain(history: list[dict[str, float]], window: int = 10) -> float:
    """The training reward's rise: mean of the last ``window`` logged rewards minus the first ``window``."""
    rewards = [row["reward"] for row in history if "reward" in row]
    if not rewards:
        return float("nan")
    window = max(1, min(window, len(rewards) // 2 or 1))
    return sum(rewards[-window:]) / window - sum(rewards[:window]) / window


def demo_report(
    head: dict[str, Any],
    before: Evaluation,
    after: Evaluation,
    run: dict[str, Any],
    config: DemoConfig,
    heldout: int,
    started: float,
    cpu0: float,
) -> dict[str, Any]:
    """The ``report.json`` content of a flow-trainer demo (image or video world): ``head`` first, then the held-out
    scores before and after and their gain, the training reward's gain, the run's curve and history, both configs
    and the timing."""
    return {
        **head,
        "before": before.scores,
        "after": after.scores,
        "gain": {k: after.scores[k] - before.scores[k] for k in before.scores},
        "training_reward_gain": training_reward_gain(run["history"]),
        "heldout": {"prompts": heldout, "samples_per_prompt": config.eval_samples, "seed": config.seed},
        "training": {
            k: run[k] for k in ("steps", "best_step", "train_cpu_seconds", "train_wall_seconds", "curve", "history")
        },
        "trainer_config": run["config"],
        "demo_config": asdict(config),
        "timing": {"total_s": round(time.time() - started, 1), "total_cpu_s": round(time.process_time() - cpu0, 1)},
        "torch_threads": config.threads or torch.get_num_threads(),
    }


def run_flow_demo(config: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train and evaluate; write the report; return the ``report.json`` content."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started, cpu0 = time.time(), time.process_time()
    with threads(config.threads):
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        model = Path(config.pipeline) if config.pipeline else asset_dir("flow_pipeline")
        train_prompts, heldout = demo_prompts(config)
        before = evaluate_flow(
            load_flow_generator(model),
            heldout,
            samples_per_prompt=config.eval_samples,
            seed=config.seed,
            steps=config.sample_steps,
            guidance=config.guidance,
        )
        log(f"before: held-out adherence {before.scores['overall']:.3f} ({len(before.verdicts)} images)")
        run = train_flow(config, model, train_prompts, heldout, out, log)
        after = run["after"]
        gain = after.scores["overall"] - before.scores["overall"]
        log(f"after: held-out adherence {after.scores['overall']:.3f} ({gain:+.3f})")
    report = demo_report({"generator": "flow"}, before, after, run, config, len(heldout), started, cpu0)
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
        f"{report['torch_threads']} threads), reward: the exact judge on the training prompts; the weights kept are"
        f" those of step {training.get('best_step')} (best judge on {VALIDATION_PROMPTS} validation prompts).",
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


def run_world_demo(
    config: DemoConfig,
    log: Callable[[str], None],
    world: str,
    split: Callable[..., tuple[list[Any], list[Any]]],
    evaluate_fn: Callable[..., Any],
    unit: str,
    policy: Callable[[Path], Any] | None = None,
    sde_steps: int | None = WORLD_SDE_STEPS,
    **train_options: Any,
) -> tuple[dict[str, Any], Any, Any, list[Any]]:
    """The video, audio and multi-view worlds' demo: held-out adherence of the shipped
    ``assets/toyworld/<world>_pipeline`` (``evaluate_fn``), :func:`train_flow` on the training prompts of ``split``
    (``train_options``: reward, LoRA targets, lr schedule; the reward is the world's exact judge unless
    ``config.reward`` names another, such as the world's learned reward; Flow-GRPO's SDE on the first ``sde_steps``
    steps, :data:`WORLD_SDE_STEPS`), adherence after; returns the ``report.json`` content (:func:`demo_report`, not
    written yet), the two evaluations and the held-out prompts."""
    from ..models.generator import load_generator

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started, cpu0 = time.time(), time.process_time()
    with threads(config.threads):
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        model = Path(config.pipeline) if config.pipeline else asset_dir(f"{world}_pipeline")
        train_prompts, heldout = split(config.heldout, seed=0)
        if 0 < config.train_prompts < len(train_prompts):
            train_prompts = sorted(random.Random(config.seed).sample(train_prompts, config.train_prompts))
        options = dict(samples_per_prompt=config.eval_samples, seed=config.seed, steps=config.sample_steps)
        before = evaluate_fn(load_generator(str(model)), heldout, guidance=config.guidance, **options)
        log(f"before: held-out adherence {before.scores['overall']:.3f} ({len(before.verdicts)} {unit})")
        extra = {} if policy is None else {"policy": policy}
        if config.reward:  # e.g. the world's learned reward instead of its judge (held-out: still the judge)
            train_options = {**train_options, "reward": config.reward}
        run = train_flow(
            config,
            model,
            train_prompts,
            heldout,
            out,
            log,
            evaluate_fn=evaluate_fn,
            sde_steps=sde_steps,
            **extra,
            **train_options,
        )
        after = run["after"]
        gain = after.scores["overall"] - before.scores["overall"]
        log(f"after: held-out adherence {after.scores['overall']:.3f} ({gain:+.3f})")
    report = demo_report({"world": world}, before, after, run, config, len(heldout), started, cpu0)
    return report, before, after, heldout


def write_world_markdown(
    report: dict[str, Any],
    config: DemoConfig,
    heldout: int,
    title: str,
    unit: str,
    attributes: tuple[str, ...],
) -> None:
    """``report.md`` and ``report.json`` of a world demo (video, multi-view) in ``config.out``: held-out scores
    before / after / gain for ``overall``, ``exact`` and ``attributes``."""
    out = Path(config.out)
    training = report["training"]
    lines = [
        title,
        "",
        f"Held-out judge adherence, {heldout} prompts x {config.eval_samples} {unit} (seed {config.seed}); training "
        f"{training['steps']} steps in {training['train_cpu_seconds']:.0f} CPU s; reward: "
        f"`{report['trainer_config']['reward']}` on the training prompts; weights kept: step "
        f"{training.get('best_step')}.",
        "",
        "| | before | after | gain |",
        "|---|---:|---:|---:|",
        *[
            f"| {name} | {report['before'][name]:.3f} | {report['after'][name]:.3f} | {report['gain'][name]:+.3f} |"
            for name in ("overall", "exact", *attributes)
        ],
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")


__all__ = [
    "FLOW_DEMO_DEFAULTS",
    "FLOW_LORA_TARGETS",
    "budget_schedule",
    "demo_report",
    "flow_overrides",
    "run_flow_demo",
    "train_flow",
    "training_reward_gain",
    "write_flow_report",
    "write_world_markdown",
]
