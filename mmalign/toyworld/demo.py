"""The whole alignment loop on the toyworld, offline on a CPU: sample -> label -> train -> evaluate -> report.

1. **evaluate (before)**: the shipped pipeline draws ``eval_samples`` images of each held-out prompt (prompts
   never trained on) with fixed seeds; the exact judge scores them;
2. **sample + label**: it draws ``samples_per_prompt`` images of each training prompt; the *learned* reward
   (not the judge) ranks them, and every better-half sample is paired with every worse-half one;
3. **train**: Diffusion-DPO (or any registered trainer) with LoRA on those pairs, through the shared loop, on
   the noisier half of the timesteps; held-out adherence and learned reward are measured every ``eval_every``
   steps for the curves;
4. **rounds**: steps 2-3 again, ``rounds`` times in all, each from the model so far (the earlier LoRAs fused
   in), which is also that round's DPO reference - iterated, on-policy DPO: each round's pairs are drawn where
   the improved model now errs;
5. **evaluate (after)**: the saved LoRAs are loaded onto a fresh pipeline (``pipe.load_lora_weights``, all
   rounds' adapters active) and the same held-out prompts and seeds are sampled and judged again;
6. **report**: ``report.json`` (``{"before": {...}, "after": {...}, "gain": {...}, ...}``), ``report.md``,
   ``report.html``, before/after image grids and curves.

Sampling uses no classifier-free guidance (``GUIDANCE``): the shipped pipeline's errors are then the hedging
it learnt from noisy captions, which is what preference training removes.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import DemoConfig
from .judge import judge, mean_scores
from .sampling import GUIDANCE, SAMPLE_STEPS, Evaluation, asset_dir, evaluate, load_pipeline, sample, threads
from .world import ATTRIBUTES, Prompt, split_prompts

# ---------------------------------------------------------------- pairs


def demo_prompts(config: DemoConfig) -> tuple[list[Prompt], list[Prompt]]:
    """``(train, heldout)`` prompts: the seed-0 split, the training side cut to a seeded ``train_prompts`` subset."""
    train, heldout = split_prompts(config.heldout, seed=0)
    if 0 < config.train_prompts < len(train):
        train = sorted(random.Random(config.seed).sample(train, config.train_prompts))
    return train, heldout


PAIRINGS = ("extremes", "halves")


def pair_indices(scores: np.ndarray, pairing: str) -> list[tuple[int, int]]:
    """``(chosen, rejected)`` positions among one prompt's samples by the reward's ``scores``: ``extremes`` - the
    best and the worst; ``halves`` - every sample of the better half against every one of the worse half (all
    of a prompt's samples used, K²/4 pairs); pairs of equal scores are left out."""
    order = np.argsort(-scores, kind="stable")
    if pairing == "extremes":
        candidates = [(int(order[0]), int(order[-1]))]
    elif pairing == "halves":
        half = len(order) // 2
        candidates = [(int(w), int(l)) for w in order[:half] for l in order[len(order) - half :]]
    else:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    return [(w, l) for w, l in candidates if scores[w] > scores[l]]


def make_pairs(
    pipe: Any,
    reward: Any,
    prompts: list[Prompt],
    samples_per_prompt: int,
    seed: int,
    folder: Path,
    sample_steps: int = SAMPLE_STEPS,
    guidance: float = GUIDANCE,
    pairing: str = "extremes",
    round_index: int = 0,
) -> dict[str, Any]:
    """Sample ``samples_per_prompt`` images per prompt, pair them by the learned reward (:func:`pair_indices`),
    and write the images with ``pairs.jsonl`` (reward scores as ``score_chosen``/``score_rejected``; judge scores
    in ``judge_chosen``/``judge_rejected``, for the report only) into ``folder``. Each round draws other seeds."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    expanded = [p for p in prompts for _ in range(samples_per_prompt)]
    seeds = [1_000_000 + seed * 100_003 + round_index * 10_000_019 + i for i in range(len(expanded))]
    images = sample(pipe, expanded, seeds, steps=sample_steps, guidance=guidance)
    with torch.no_grad():
        scores = reward.score_tensor(
            torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, [p.text for p in expanded]
        )
    scores = scores.float().numpy()
    judged = np.array([judge(image, p).overall for image, p in zip(images, expanded)])
    rows, agree, saved = [], [], set()
    for k, prompt in enumerate(prompts):
        start = k * samples_per_prompt
        for w, l in pair_indices(scores[start : start + samples_per_prompt], pairing):
            best, worst = start + w, start + l
            for index in (best, worst):
                if index not in saved:
                    Image.fromarray(images[index]).save(folder / f"{k:03d}_{index - start:02d}.png")
                    saved.add(index)
            rows.append(
                {
                    "prompt": prompt.text,
                    "chosen": f"{k:03d}_{w:02d}.png",
                    "rejected": f"{k:03d}_{l:02d}.png",
                    "score_chosen": float(scores[best]),
                    "score_rejected": float(scores[worst]),
                    "judge_chosen": float(judged[best]),
                    "judge_rejected": float(judged[worst]),
                }
            )
            if judged[best] != judged[worst]:
                agree.append(judged[best] > judged[worst])
    (folder / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {
        "file": str(folder / "pairs.jsonl"),
        "pairs": len(rows),
        "pairing": pairing,
        "samples": len(expanded),
        "judge_of_samples": float(judged.mean()),
        "judge_of_chosen": float(np.mean([r["judge_chosen"] for r in rows])) if rows else 0.0,
        "judge_of_rejected": float(np.mean([r["judge_rejected"] for r in rows])) if rows else 0.0,
        "pairs_the_judge_orders": len(agree),
        "label_agreement_with_judge": float(np.mean(agree)) if agree else float("nan"),
    }


def configured_pairs(
    pipe: Any, reward: Any, prompts: list[Prompt], config: DemoConfig, folder: Path, round_index: int = 0
) -> dict:
    """:func:`make_pairs` with the sampling and pairing options of ``config``."""
    return make_pairs(
        pipe,
        reward,
        prompts,
        config.samples_per_prompt,
        config.seed,
        folder,
        config.sample_steps,
        config.guidance,
        config.pairing,
        round_index,
    )


def evaluate_heldout(pipe: Any, prompts: list[Prompt], config: DemoConfig) -> Evaluation:
    """The judge's evaluation of ``pipe`` on ``prompts`` with the seeds and sampler of ``config``."""
    return evaluate(pipe, prompts, config.eval_samples, config.seed, config.sample_steps, config.guidance)


# ---------------------------------------------------------------- training with periodic evaluation


def hooked_trainer(trainer_class: type, hook: Callable[[Any, int], None] | None, every: int, cpu_budget: float):
    """A subclass of ``trainer_class`` that calls ``hook(trainer, step)`` every ``every`` steps (evaluation time
    excluded from the CPU count) and stops once the training itself has used ``cpu_budget`` CPU seconds."""

    class Hooked(trainer_class):  # type: ignore[misc, valid-type]
        def _train_step(self) -> dict[str, float]:
            if not hasattr(self, "cpu_used"):
                self.cpu_used, self.wall_used = 0.0, 0.0
            cpu, wall = time.process_time(), time.time()
            metrics = super()._train_step()
            self.cpu_used += time.process_time() - cpu
            self.wall_used += time.time() - wall
            step = self.step + 1
            if cpu_budget and self.cpu_used >= cpu_budget:
                self.config.max_steps = step  # the loop ends after this step and saves the final weights
            if hook is not None and every and (step % every == 0 or step == self.config.max_steps):
                hook(self, step)
            return metrics

    Hooked.__name__ = Hooked.__qualname__ = f"Hooked{trainer_class.__name__}"
    return Hooked


def is_online(trainer: str) -> bool:
    """Whether a registered trainer samples while it learns (reads prompts and a reward, not pairs)."""
    from ..registry import TRAINERS
    from ..trainers.online import OnlineTrainer

    return issubclass(TRAINERS.entry(trainer).load(), OnlineTrainer)


def trainer_overrides(config: DemoConfig, model: Path, data: str, output_dir: Path) -> list[str]:
    """``key=value`` overrides of the trainer config; no flips or crops (they would move objects across halves).
    Online trainers get the training prompts of ``data`` (a pairs JSONL: its prompts, once each) and the learned
    toyworld reward; their own sampler defaults (η, truncation) stay."""
    online = [f"beta={config.beta}"]  # the offline (DPO-family) beta; online trainers keep their own
    if is_online(config.trainer):
        prompts = output_dir.parent / f"{output_dir.name}-prompts.txt"
        texts = dict.fromkeys(json.loads(line)["prompt"] for line in Path(data).read_text().splitlines() if line)
        prompts.parent.mkdir(parents=True, exist_ok=True)
        prompts.write_text("".join(f"{t}\n" for t in texts))
        data = str(prompts)
        reward_dir = Path(config.reward) if config.reward else asset_dir("reward")
        # one update per batch, no EMA: the toyworld's measured settings (ReFL's recipe defaults, taken from
        # ImageReward's 8-GPU script, accumulate 4 batches and average with EMA 0.9999)
        online = ["reward=toyworld", f"reward_weights={reward_dir}", "grad_accum=1", "ema_decay=0"]
    return [
        f"trainer={config.trainer}",
        f"model={model}",
        f"data={data}",
        *online,
        f"output_dir={output_dir}",
        "resolution=32",
        "random_crop=false",
        "hflip=false",
        f"lora_rank={config.lora_rank}",
        f"lora_targets=[{','.join(config.lora_targets)}]",
        f"timestep_range=[{','.join(str(float(v)) for v in config.timestep_range)}]",
        f"max_steps={config.steps}",
        f"batch_size={config.batch_size}",
        f"lr={config.lr}",
        f"seed={config.seed}",
        "tracker=none",
        "checkpoint_every=1000000",
        "log_every=10",
        f"sample_steps={config.sample_steps}",
        f"guidance={config.guidance}",
        f"progress={str(config.progress).lower()}",
        *config.overrides,
    ]


def swap_unet(pipe: Any, unet: torch.nn.Module):
    """The same pipeline with another UNet (the trainer's, LoRA active)."""
    from diffusers import StableDiffusionPipeline

    parts = {k: v for k, v in pipe.components.items() if k in ("vae", "text_encoder", "tokenizer", "scheduler")}
    new = StableDiffusionPipeline(
        **parts, unet=unet, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    new.set_progress_bar_config(disable=True)
    return new


def reward_of(reward: Any, result: Evaluation) -> float:
    with torch.no_grad():
        pixels = torch.from_numpy(result.images).permute(0, 3, 1, 2).float() / 255
        return float(reward.score_tensor(pixels, [p.text for p in result.prompts]).mean())


def train_with_curves(
    config: DemoConfig, model: Path, data: str, output_dir: Path, base: Any, reward: Any, heldout: list[Prompt], log
) -> dict[str, Any]:
    """Train one trainer from ``model`` on ``data``; the curves are held-out judge adherence and learned reward."""
    from ..commands.train import resolve_trainer_config

    curve: list[dict[str, float]] = []

    def hook(trainer: Any, step: int) -> None:
        unet = trainer.accelerator.unwrap_model(trainer.unet)
        unet.eval()
        result = evaluate_heldout(swap_unet(base, unet), heldout, config)
        unet.train()
        point = {"step": step, **result.scores, "reward": reward_of(reward, result), "train_cpu_s": trainer.cpu_used}
        curve.append(point)
        log(f"  step {step}: held-out adherence {point['overall']:.3f}, reward {point['reward']:.4f}")

    trainer_class, trainer_config = resolve_trainer_config(None, trainer_overrides(config, model, data, output_dir))
    shutil.rmtree(output_dir, ignore_errors=True)
    trainer = hooked_trainer(trainer_class, hook, config.eval_every, config.cpu_budget)(trainer_config)
    summary = trainer.train()
    return {
        "steps": summary["steps"],
        "pairs": summary["pairs"],
        "history": summary["history"],
        "curve": curve,
        "train_cpu_seconds": round(trainer.cpu_used, 1),
        "train_wall_seconds": round(trainer.wall_used, 1),
        "config": asdict(trainer_config),
    }


def merge_rounds(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One training summary for consecutive rounds: steps, losses and curve points numbered on from round to
    round, times summed; the config is the first round's."""
    merged: dict[str, Any] = {"steps": 0, "pairs": 0, "history": [], "curve": [], "config": parts[0]["config"]}
    merged |= {"train_cpu_seconds": 0.0, "train_wall_seconds": 0.0}
    for part in parts:
        offset = merged["steps"]
        merged["history"] += [{**row, "step": row["step"] + offset} for row in part["history"]]
        merged["curve"] += [{**point, "step": point["step"] + offset} for point in part["curve"]]
        merged["steps"] += part["steps"]
        merged["pairs"] += part["pairs"]
        for key in ("train_cpu_seconds", "train_wall_seconds"):
            merged[key] = round(merged[key] + part[key], 1)
    return merged


# ---------------------------------------------------------------- the demo


def run_demo(config: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the loop and write the report; returns the ``report.json`` content."""
    from ..rewards import load_reward

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started, cpu0 = time.time(), time.process_time()
    timing: dict[str, float] = {}
    with threads(config.threads):
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        model = Path(config.pipeline) if config.pipeline else asset_dir("pipeline")
        base = load_pipeline(model)
        reward = load_reward("toyworld", weights=config.reward)
        train_prompts, heldout = demo_prompts(config)

        t = time.time()
        before = evaluate_heldout(base, heldout, config)
        timing["evaluate_before_s"] = round(time.time() - t, 1)
        log(f"before: held-out adherence {before.scores['overall']:.3f} ({len(before.verdicts)} images)")

        rounds, current, trained_from, loras = [], base, model, []
        for r in range(config.rounds):
            suffix = "" if r == 0 else f"-{r + 1}"
            if r:  # the next round trains on (and is referenced to) the model so far: earlier LoRAs fused
                trained_from = out / f"model{suffix}"
                fused = load_pipeline(model, lora=loras)
                fused.fuse_lora()
                fused.unload_lora_weights()
                fused.save_pretrained(str(trained_from), safe_serialization=True)
                current = load_pipeline(trained_from)
            t = time.time()
            pairs = configured_pairs(current, reward, train_prompts, config, out / f"pairs{suffix}", round_index=r)
            timing["sample_and_label_s"] = round(timing.get("sample_and_label_s", 0.0) + time.time() - t, 1)
            log(
                f"{f'round {r + 1}: ' if config.rounds > 1 else ''}pairs: {pairs['pairs']} from {pairs['samples']}"
                f" samples; judge of chosen {pairs['judge_of_chosen']:.3f} vs rejected {pairs['judge_of_rejected']:.3f}"
            )
            t = time.time()
            log(f"training {config.trainer} (LoRA rank {config.lora_rank}, {config.steps} steps)")
            lora = out / f"lora{suffix}"
            part = train_with_curves(config, trained_from, pairs["file"], lora, base, reward, heldout, log)
            timing["train_and_curves_s"] = round(timing.get("train_and_curves_s", 0.0) + time.time() - t, 1)
            rounds.append({"pairs": pairs, "training": part, "lora": str(lora), "trained_from": str(trained_from)})
            loras.append(lora)
        training = merge_rounds([entry["training"] for entry in rounds])
        timing["train_s"] = training["train_wall_seconds"]
        timing["train_cpu_s"] = training["train_cpu_seconds"]

        t = time.time()
        tuned = load_pipeline(model, lora=loras[0] if len(loras) == 1 else loras)
        after = evaluate_heldout(tuned, heldout, config)
        timing["evaluate_after_s"] = round(time.time() - t, 1)
        log(f"after: held-out adherence {after.scores['overall']:.3f}")
        reward_before, reward_after = reward_of(reward, before), reward_of(reward, after)
    timing["total_s"] = round(time.time() - started, 1)
    timing["total_cpu_s"] = round(time.process_time() - cpu0, 1)

    from .report import write_report

    report = {
        "before": {**before.scores, "reward": reward_before},
        "after": {**after.scores, "reward": reward_after},
        "gain": {k: after.scores[k] - before.scores[k] for k in before.scores}
        | {"reward": reward_after - reward_before},
        "heldout": {"prompts": len(heldout), "samples_per_prompt": config.eval_samples, "seed": config.seed},
        "per_attribute": list(ATTRIBUTES),
        "pairs": rounds[0]["pairs"],
        "training": {k: v for k, v in training.items() if k != "config"},
        "rounds": [
            {"pairs": e["pairs"], "steps": e["training"]["steps"], "lora": e["lora"], "trained_from": e["trained_from"]}
            | ({"after_round": e["training"]["curve"][-1]} if e["training"]["curve"] else {})
            for e in rounds
        ],
        "trainer_config": training["config"],
        "demo_config": asdict(config),
        "timing": timing,
        "torch_threads": torch.get_num_threads() if not config.threads else config.threads,
        "files": {},
    }
    report["files"] = write_report(report, before, after, out)
    return report


def same_seed_wins(before: Evaluation, after: Evaluation) -> dict[str, int]:
    """Per image (same prompt and seed): how many the tuning improved, worsened, left equal."""
    b = np.array([v.overall for v in before.verdicts])
    a = np.array([v.overall for v in after.verdicts])
    return {"improved": int((a > b).sum()), "worsened": int((a < b).sum()), "equal": int((a == b).sum())}


__all__ = ["DemoConfig", "run_demo", "make_pairs", "hooked_trainer", "train_with_curves", "mean_scores"]
