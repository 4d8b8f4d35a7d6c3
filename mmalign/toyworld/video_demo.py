"""The toyworld demo on the toy video world: an online trainer of the GRPO family (Flow-GRPO by default, or
DiffusionNFT) fine-tunes the shipped tiny ``WanPipeline`` (``assets/toyworld/video_pipeline``) on the training
prompts of :mod:`mmalign.toyworld.video_world` with its exact judge as the reward (``toyworld-video-judge``), and
the judge measures held-out adherence before and after.

``mmalign demo --world video`` (``make demo-video``) runs it: the flow demo's loop (:mod:`mmalign.toyworld.flow_demo`:
groups of 8, the SDE on the first 3 of 10 Euler steps, all trained, the ODE after them, EMA, the best weights on 16
validation prompts kept) with Wan's LoRA targets and :data:`VIDEO_DEMO_DEFAULTS`; the report (``report.json``,
``report.md``) goes to ``--out``. Training stops after ``cpu_budget`` CPU seconds (evaluation excluded). Measured
(seeds 0 / 1 / 2, one thread): held-out adherence +0.103 / +0.198 / +0.136 in ~325 CPU s of training (with the SDE
on every step, 3 trained: +0.107 / +0.140 / +0.091, seed 2's final weights collapsed to 0.204).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..models.wan import WAN_LORA_TARGETS
from .config import DemoConfig
from .flow_demo import run_world_demo, write_world_markdown
from .sampling import evaluate_video
from .video_world import VIDEO_ATTRIBUTES, split_video_prompts

#: the video demo's defaults where they differ from the UNet demo's (``mmalign demo --world video``). Measured on the
#: shipped video pipeline (one thread), with the SDE on every step (3 trained): these settings 0.283 -> 0.391
#: held-out (+0.107, seed 0, best validation weights of step 340) in 358-374 CPU s; the flow demo's (160 steps, lr
#: 1e-3) 0.283 -> 0.336 (+0.052) in 145 CPU s. With the SDE on the first 3 steps
#: (:data:`~mmalign.toyworld.flow_demo.WORLD_SDE_STEPS`) +0.103 / +0.198 / +0.136 (seeds 0 / 1 / 2)
VIDEO_DEMO_DEFAULTS: dict[str, Any] = {
    "trainer": "flow-grpo",
    "out": "runs/demo-video",
    "steps": 400,
    "cpu_budget": 480.0,
    "batch_size": 32,
    "lr": 5e-4,
    "lora_rank": 16,
    "sample_steps": 10,
    "eval_every": 40,
    "eval_samples": 4,
}
#: Wan's LoRA targets (self- and cross-attention, feed-forward)
VIDEO_LORA_TARGETS = WAN_LORA_TARGETS
#: a constant lr, as measured above: the image demo's cosine decay to 0 over the 400 steps gave +0.080 (seed 0, one
#: thread, 388 CPU s; the held-out curve still rising at step 360): at lr 5e-4 this run does not collapse, and the
#: decay only slows it
VIDEO_LR_SCHEDULER = "constant"


def run_video_demo(config: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train and evaluate on the video world; write the report; return the ``report.json`` content."""
    report, _, _, heldout = run_world_demo(
        config,
        log,
        "video",
        split_video_prompts,
        evaluate_video,
        "videos",
        reward="toyworld-video-judge",
        lora_targets=VIDEO_LORA_TARGETS,
        lr_scheduler=VIDEO_LR_SCHEDULER,
    )
    title = f"# Toy video demo: {config.trainer} on the tiny Wan pipeline"
    write_world_markdown(report, config, len(heldout), title, "videos", VIDEO_ATTRIBUTES)
    return report


__all__ = ["VIDEO_DEMO_DEFAULTS", "VIDEO_LORA_TARGETS", "run_video_demo"]
