"""Options of the toyworld demo and bench (light: no torch import, so the CLI starts fast)."""

from __future__ import annotations

from dataclasses import dataclass, field

SAMPLE_STEPS = 20
GUIDANCE = 3.0


@dataclass
class DemoConfig:
    """Options of the demo; the defaults are what ``make demo`` runs."""

    out: str = "runs/demo"
    seed: int = 0
    trainer: str = "dpo"
    steps: int = 300
    batch_size: int = 16
    lr: float = 5e-4
    beta: float = 1000.0
    lora_rank: int = 8
    samples_per_prompt: int = 8
    heldout: int = 32
    eval_samples: int = 8
    eval_every: int = 100
    sample_steps: int = SAMPLE_STEPS
    guidance: float = GUIDANCE
    threads: int = 0
    cpu_budget: float = 0.0
    pipeline: str | None = None
    reward: str | None = None
    overrides: list[str] = field(default_factory=list)
    progress: bool = True
