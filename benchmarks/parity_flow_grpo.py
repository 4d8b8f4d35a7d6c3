"""Parity of :func:`mmalign.models.flow_sampling.flow_sde_step` with flow_grpo's own ``sde_step_with_logprob``.

    .venv/bin/python benchmarks/parity_flow_grpo.py /path/to/flow_grpo   # a checkout of yifan123/flow_grpo

flow_grpo's ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`` imports only ``math``, ``typing``, ``torch``
and ``diffusers``, so the file alone is loaded with ``importlib`` (nothing else of flow_grpo, nothing stubbed).
On fixed random fp32 tensors (seed 0, latents ``[B, 16, 32, 32]``, B = 4) and a ``FlowMatchEulerDiscreteScheduler``
with ``shift=3.0`` and 10 steps (SD3's set-up), every step is taken twice:

1. sampling: flow_grpo with a seeded ``torch.Generator``; mmalign with the same standard-normal draw passed as
   ``noise`` (same generator, same seed, same shape: ``randn_tensor`` on CPU is ``torch.randn``);
2. evaluation: both recompute the log-prob of flow_grpo's ``prev_sample`` (``prev_sample=``), as the trainer does.

It also compares :func:`mmalign.trainers.losses.group_advantages` with ``flow_grpo/stat_tracking.py``'s
``PerPromptStatTracker`` (numpy and torch only; loaded the same way) on 48 prompts × 24 random float64 rewards.

Prints the max absolute (and relative) difference of prev_sample, log_prob, mean and std over all steps; exits
non-zero if any exceeds ``--tol`` (1e-5). Used only by hand: the test suite does not depend on flow_grpo.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from mmalign.models.flow_sampling import flow_sde_step
from mmalign.trainers.losses import group_advantages


def load_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_reference(checkout: Path):
    path = checkout / "flow_grpo" / "diffusers_patch" / "sd3_sde_with_logprob.py"
    return load_file(path, "flow_grpo_sd3_sde_with_logprob").sde_step_with_logprob


def advantages_parity(checkout: Path) -> dict[str, float]:
    """Max |diff| of :func:`group_advantages` and flow_grpo's ``PerPromptStatTracker.update`` (a fresh tracker
    per call, as ``train_sd3.py`` clears it every epoch) on 48 groups of 24 random rewards, both std modes."""
    tracker_cls = load_file(checkout / "flow_grpo" / "stat_tracking.py", "flow_grpo_stat_tracking").PerPromptStatTracker
    gen = torch.Generator().manual_seed(1)
    prompts = [f"prompt {i % 48}" for i in range(48 * 24)]
    rewards = torch.rand(len(prompts), generator=gen, dtype=torch.float64)
    out = {}
    for global_std in (True, False):
        theirs = torch.from_numpy(tracker_cls(global_std).update(prompts, rewards.numpy()))
        ours = group_advantages(rewards, prompts, global_std=global_std)
        out[f"advantages (global_std={global_std})"] = (ours - theirs).abs().max().item()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a checkout of yifan123/flow_grpo")
    parser.add_argument("--noise-level", type=float, default=0.7)
    parser.add_argument("--tol", type=float, default=1e-5)
    args = parser.parse_args(argv)
    reference = load_reference(args.checkout)

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(10)
    sigmas = scheduler.sigmas
    gen = torch.Generator().manual_seed(0)
    batch, shape = 4, (16, 32, 32)
    x = torch.randn(batch, *shape, generator=gen)
    worst: dict[str, list[float]] = {}

    def record(name, ours, theirs):
        diff = (ours.double() - theirs.double()).abs().max().item()
        rel = diff / max(theirs.double().abs().max().item(), 1e-30)
        best = worst.setdefault(name, [0.0, 0.0])
        best[0], best[1] = max(best[0], diff), max(best[1], rel)

    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(batch, *shape, generator=gen)
        timestep = t.expand(batch)
        step_seed = 1000 + i
        theirs = reference(
            scheduler, v, timestep, x, noise_level=args.noise_level, generator=torch.Generator().manual_seed(step_seed)
        )
        noise = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(step_seed))
        sigma = sigmas[i].expand(batch)
        sigma_prev = sigmas[i + 1].expand(batch)
        ours = flow_sde_step(x, v, sigma, sigma_prev, args.noise_level, noise=noise, sigma_max=sigmas[1].item())
        for name, a, b in zip(("prev_sample", "log_prob", "mean", "std"), ours, theirs):
            record(name, a, b)
        # evaluation of a recorded sample under another velocity
        v_eval = v + 0.05 * torch.randn(batch, *shape, generator=gen)
        theirs_eval = reference(scheduler, v_eval, timestep, x, noise_level=args.noise_level, prev_sample=theirs[0])
        ours_eval = flow_sde_step(
            x, v_eval, sigma, sigma_prev, args.noise_level, prev_sample=theirs[0], sigma_max=sigmas[1].item()
        )
        record("log_prob (evaluate)", ours_eval.log_prob, theirs_eval[1])
        x = theirs[0]

    print(
        f"flow_grpo sde_step_with_logprob vs mmalign flow_sde_step, 10 steps, shift 3, noise_level {args.noise_level}"
    )
    failed = False
    for name, (diff, rel) in worst.items():
        print(f"  {name:22s} max |diff| {diff:.3g}   max rel {rel:.3g}")
        failed |= diff > args.tol
    for name, diff in advantages_parity(args.checkout).items():
        print(f"  {name:32s} max |diff| {diff:.3g}   (float64)")
        failed |= diff > 1e-12
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
