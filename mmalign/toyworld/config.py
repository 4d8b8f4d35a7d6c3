"""Options of the toyworld demo and bench (light: no torch import, so the CLI starts fast)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

SAMPLE_STEPS = 20
# the demo samples without classifier-free guidance: the pipeline's errors are then the hedging it learnt from its
# noisy captions (it draws a wrong colour about as often as its captions named one), which preference training
# removes; guidance 3 removes much of it too (adherence 0.53 -> 0.71 on all prompts)
GUIDANCE = 1.0
# LoRA on the attention projections and on the ResNet convolutions and their time(+text)-embedding projections:
# in this tiny UNet the attention projections are under a tenth of the weights, and the global attributes
# (colour, count) live mostly in the ResNet path
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "time_emb_proj", "conv1", "conv2", "proj_in", "proj_out")


@dataclass
class DemoConfig:
    """Options of the demo; the defaults are what ``make demo`` runs."""

    out: str = "runs/demo"
    seed: int = 0
    trainer: str = "dpo"
    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    beta: float = 1000.0
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = LORA_TARGETS
    # the noisier half of the training timesteps, where colour, shape, count and position are decided
    timestep_range: tuple[float, float] = (0.5, 1.0)
    samples_per_prompt: int = 8
    pairing: str = "halves"
    # on-policy rounds: each samples and labels fresh pairs from the model so far and trains a new LoRA on them,
    # with the model so far as the reference (iterated DPO); 1 = plain offline Diffusion-DPO
    rounds: int = 3
    heldout: int = 32
    train_prompts: int = 0
    eval_samples: int = 8
    eval_every: int = 125
    sample_steps: int = SAMPLE_STEPS
    guidance: float = GUIDANCE
    threads: int = 0
    cpu_budget: float = 0.0
    pipeline: str | None = None
    reward: str | None = None
    overrides: list[str] = field(default_factory=list)
    progress: bool = True


def config_from_args(args: Any) -> DemoConfig:
    """The :class:`DemoConfig` of a parsed command line: every option named like a field (lists become the tuples
    those fields hold), ``--quiet`` turning progress bars off; options it does not have keep their defaults."""
    given = vars(args)
    values = {
        f.name: tuple(given[f.name]) if isinstance(f.default, tuple) else given[f.name]
        for f in fields(DemoConfig)
        if f.name in given
    }
    return DemoConfig(**values, progress=not given.get("quiet", False))
