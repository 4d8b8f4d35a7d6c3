"""DDIM sampling with per-step Gaussian log-probabilities, for the online trainers.

Follows kvablack/ddpo-pytorch and yk7333/d3po ``diffusers_patch/ddim_with_logprob.py`` (DDIM, Song et al. 2021,
eqs. 12 and 16, η > 0): each step ``x_t → x_prev`` is a Gaussian with mean μ and std σ_t, and its log-density is
:func:`ddim_step_log_prob` (mean over non-batch elements). Trajectories are kept
compactly (detached latents per step, timesteps, log-probs, prompt embeddings) so that a trainer can recompute
any step's log-prob with gradients later, under the current UNet or the reference.

Model calls go through a ``predict(noisy, timesteps, embeds, time_ids) -> model output`` callable (the trainer's
``predict`` / ``predict_reference``); the output is converted to ε for ε-, v- and x0-prediction models, then
classifier-free guidance ``ε_u + g·(ε_c − ε_u)`` is applied. Random draws come from a CPU ``torch.Generator``
and cover a *global* batch of which this process keeps a slice, so results do not depend on the process count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..tensors import compute_dtype as _compute_dtype
from ..tensors import left_broadcast as _left_broadcast
from .policy import PromptEmbeds

Predict = Callable[[Tensor, Tensor, PromptEmbeds, "Tensor | None"], Tensor]

__all__ = [
    "DDIMSchedule",
    "Trajectory",
    "ddim_mean_std",
    "ddim_schedule",
    "decode_with_grad",
    "deterministic_steps",
    "guided_eps",
    "model_output_to_eps",
    "pred_x0",
    "sample_trajectories",
    "step_log_prob",
    "truncation_index",
]


# ----------------------------------------------------------------------------------------------------------
# Pure math
# ----------------------------------------------------------------------------------------------------------
class DDIMLogProb(NamedTuple):
    """Output of :func:`ddim_step_log_prob`: ``log_prob`` ``[B]``, the Gaussian ``mean`` (shaped like the
    sample) and ``std`` σ_t (broadcastable to the sample: a 0-d tensor or ``[B, 1, ..., 1]``)."""

    log_prob: Tensor
    mean: Tensor
    std: Tensor


def ddim_step_log_prob(
    prev_sample: Tensor,
    x_t: Tensor,
    eps_pred: Tensor,
    alpha_bar_t: float | Tensor,
    alpha_bar_prev: float | Tensor,
    eta: float = 1.0,
) -> DDIMLogProb:
    """Gaussian log-probability of a DDIM step ``x_t → x_prev`` under an ε-prediction.

    Reference: kvablack/ddpo-pytorch and yk7333/d3po ``diffusers_patch/ddim_with_logprob.py`` (DDIM paper
    eqs. 12 and 16; ``clip_sample`` and thresholding off, as for Stable Diffusion):

        σ_t   = η·√((1 − ᾱ_prev)/(1 − ᾱ_t))·√(1 − ᾱ_t/ᾱ_prev)
        x̂0    = (x_t − √(1 − ᾱ_t)·ε)/√ᾱ_t
        μ     = √ᾱ_prev·x̂0 + √(1 − ᾱ_prev − σ_t²)·ε
        log p = mean over non-batch elements of [−(x_prev − μ)²/(2σ_t²) − log σ_t − log √(2π)]

    ``alpha_bar_t`` / ``alpha_bar_prev`` are floats, 0-d tensors or per-sample ``[B]`` (each trajectory may be
    at another step); for the last step ``alpha_bar_prev`` is the scheduler's ``final_alpha_cumprod``. η must be
    in (0, 1] (η = 1 in DDPO and D3PO; η = 0 is deterministic and has no density). ``prev_sample`` is detached
    (as the reference): gradients flow only through ``eps_pred`` (and ``x_t`` if it requires grad) into μ.
    Computed in at least float32.
    """
    if not 0.0 < eta <= 1.0:
        raise ValueError(f"eta must be in (0, 1] for a DDIM step to have a density, got {eta}")
    if not (prev_sample.shape == x_t.shape == eps_pred.shape):
        raise ValueError(
            f"prev_sample {tuple(prev_sample.shape)}, x_t {tuple(x_t.shape)} and eps_pred "
            f"{tuple(eps_pred.shape)} must have the same shape"
        )
    dtype = _compute_dtype(prev_sample, x_t, eps_pred)
    x_t, eps_pred = x_t.to(dtype), eps_pred.to(dtype)
    prev_sample = prev_sample.detach().to(dtype)
    alpha_t = _left_broadcast(alpha_bar_t, x_t, "alpha_bar_t")
    alpha_prev = _left_broadcast(alpha_bar_prev, x_t, "alpha_bar_prev")
    variance = (1.0 - alpha_prev) / (1.0 - alpha_t) * (1.0 - alpha_t / alpha_prev)
    std = eta * variance.sqrt()
    x0_pred = (x_t - (1.0 - alpha_t).sqrt() * eps_pred) / alpha_t.sqrt()
    mean = alpha_prev.sqrt() * x0_pred + (1.0 - alpha_prev - std.pow(2)).sqrt() * eps_pred
    log_prob = -(prev_sample - mean).pow(2) / (2.0 * std.pow(2)) - std.log() - math.log(math.sqrt(2.0 * math.pi))
    return DDIMLogProb(log_prob.mean(dim=tuple(range(1, log_prob.ndim))), mean, std)


def model_output_to_eps(output: Tensor, x_t: Tensor, alpha_bar_t: Tensor, prediction_type: str) -> Tensor:
    """ε from a model output: ε-prediction as is; v: ``ε = √ᾱ·v + √(1−ᾱ)·x_t``; sample (x0):
    ``ε = (x_t − √ᾱ·x0)/√(1−ᾱ)`` (diffusers ``DDIMScheduler.step``). ``alpha_bar_t`` 0-d or ``[B]``."""
    a = _bcast(alpha_bar_t, x_t)
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return a.sqrt() * output + (1.0 - a).sqrt() * x_t
    if prediction_type == "sample":
        return (x_t - a.sqrt() * output) / (1.0 - a).sqrt()
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def pred_x0(x_t: Tensor, eps: Tensor, alpha_bar_t: Tensor) -> Tensor:
    """``x̂0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t``."""
    a = _bcast(alpha_bar_t, x_t)
    return (x_t - (1.0 - a).sqrt() * eps) / a.sqrt()


def ddim_mean_std(x_t: Tensor, eps: Tensor, alpha_bar_t: Tensor, alpha_bar_prev: Tensor, eta: float) -> tuple:
    """DDIM step mean μ and std σ_t (the formulas of :func:`ddim_step_log_prob`);
    differentiable in ``x_t`` and ``eps``. η = 0 gives the deterministic DDIM step (σ = 0)."""
    a_t, a_prev = _bcast(alpha_bar_t, x_t), _bcast(alpha_bar_prev, x_t)
    std = eta * ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)).sqrt()
    mean = a_prev.sqrt() * pred_x0(x_t, eps, a_t) + (1.0 - a_prev - std.pow(2)).clamp(min=0).sqrt() * eps
    return mean, std


def _bcast(value: Tensor | float, like: Tensor) -> Tensor:
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    return value.reshape(value.shape + (1,) * (like.ndim - value.ndim)) if value.ndim else value


# ----------------------------------------------------------------------------------------------------------
# Schedule and model calls
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DDIMSchedule:
    """Timesteps ``[T]`` (descending) and ᾱ at each timestep and at the next one (``[T]`` each)."""

    timesteps: Tensor
    alpha_bar: Tensor
    alpha_bar_prev: Tensor

    def __len__(self) -> int:
        return len(self.timesteps)


def ddim_schedule(noise_scheduler: Any, steps: int) -> DDIMSchedule:
    """The DDIM timesteps of ``steps`` steps for a pipeline's scheduler config, as diffusers'
    ``DDIMScheduler`` with ``set_alpha_to_one=False`` (Stable Diffusion's setting: the last step goes to ᾱ_0,
    so σ > 0 at every step and each step has a density)."""
    from diffusers import DDIMScheduler

    config = dict(noise_scheduler.config)
    config["set_alpha_to_one"] = False
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.clone().long()
    alphas = scheduler.alphas_cumprod.float()
    prev = timesteps - scheduler.config.num_train_timesteps // steps
    final = torch.as_tensor(float(scheduler.final_alpha_cumprod))
    alpha_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], final)
    return DDIMSchedule(timesteps, alphas[timesteps], alpha_prev)


def deterministic_steps(schedule: DDIMSchedule) -> list[int]:
    """Indices of the steps of ``schedule`` whose DDIM σ_t is 0 whatever η (``ᾱ_prev = ᾱ_t``, or ``ᾱ_prev = 1``):
    they have no density, so a log-prob trainer cannot use them. A ``linspace``-spaced schedule (AnimateDiff's
    DDIM settings) ends at ``t = 0``, whose step goes to ``ᾱ_0`` itself."""
    a_t, a_prev = schedule.alpha_bar.double(), schedule.alpha_bar_prev.double()
    variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    return [int(j) for j in torch.nonzero(variance <= 0).flatten()]


def guided_eps(
    predict: Predict,
    x_t: Tensor,
    t: Tensor,
    alpha_bar_t: Tensor,
    embeds: PromptEmbeds,
    uncond: PromptEmbeds | None,
    guidance: float,
    prediction_type: str,
    time_ids: Tensor | None = None,
) -> Tensor:
    """ε with classifier-free guidance (one batched call for the unconditional and conditional halves);
    no guidance when ``uncond`` is None or ``guidance`` is 1."""
    batch = x_t.shape[0]
    timesteps = t.expand(batch) if t.ndim == 0 else t
    if uncond is None or guidance == 1.0:
        out = predict(x_t, timesteps, embeds, time_ids)
        return model_output_to_eps(out, x_t, alpha_bar_t, prediction_type)
    both = PromptEmbeds.cat([uncond, embeds])
    ids = None if time_ids is None else torch.cat([time_ids, time_ids])
    alpha = torch.as_tensor(alpha_bar_t)
    alpha = torch.cat([alpha, alpha]) if alpha.ndim else alpha  # per-sample ᾱ: one per row of both halves
    out = predict(torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps]), both, ids)
    eps_u, eps_c = model_output_to_eps(out, torch.cat([x_t, x_t]), alpha, prediction_type).chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


def decode_with_grad(policy: Any, latents: Tensor) -> Tensor:
    """``policy.decode(latents, grad=True)``: the canonical media tensor (images ``[B, 3, H, W]``, videos
    ``[B, T, 3, H, W]``) in [0, 1] keeping the graph."""
    return policy.decode(latents, grad=True)


# ----------------------------------------------------------------------------------------------------------
# Trajectories
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Trajectory:
    """A batch of sampled DDIM chains: ``latents [B, T+1, *latent]`` (x_T … x_0, detached; a latent is
    ``[C, h, w]``, or ``[C, F, h, w]`` for a video policy),
    ``log_probs [B, T]`` (of each sampled step at sampling time), the schedule, and the conditioning."""

    latents: Tensor
    log_probs: Tensor
    schedule: DDIMSchedule
    embeds: PromptEmbeds
    uncond: PromptEmbeds | None
    time_ids: Tensor | None
    guidance: float
    eta: float

    @property
    def final(self) -> Tensor:
        return self.latents[:, -1]

    def select(self, index: Tensor | slice) -> Trajectory:
        """A sub-batch (e.g. the first or second trajectory of each pair)."""
        return Trajectory(
            self.latents[index],
            self.log_probs[index],
            self.schedule,
            self.embeds.select(index),
            None if self.uncond is None else self.uncond.select(index),
            None if self.time_ids is None else self.time_ids[index],
            self.guidance,
            self.eta,
        )


def _global_randn(generator: torch.Generator, global_count: int, lo: int, shape: tuple, count: int) -> Tensor:
    """``count`` rows ``[lo, lo + count)`` of a ``[global_count, *shape]`` standard normal draw."""
    return torch.randn((global_count, *shape), generator=generator)[lo : lo + count]


def sample_trajectories(
    policy: Any,
    predict: Predict,
    embeds: PromptEmbeds,
    uncond: PromptEmbeds | None,
    generator: torch.Generator,
    steps: int = 50,
    guidance: float = 5.0,
    eta: float = 1.0,
    resolution: int = 512,
    time_ids: Tensor | None = None,
    pairs: bool = False,
    global_batch: int | None = None,
    offset: int = 0,
    shared_start: bool = False,
) -> Trajectory:
    """Sample DDIM chains without gradients, recording each step's log-prob (0 when η = 0).

    ``pairs``: two trajectories per prompt from the SAME x_T (D3PO), returned as ``[2B]``: rows ``0..B-1`` are
    the first of each pair and ``B..2B-1`` the second. Noise is drawn for ``global_batch`` prompts (default: this
    batch) and rows ``offset…`` are kept, so a multi-process run draws exactly what one process would.
    ``shared_start``: every chain starts from the first row's x_T (D3PO's human-feedback sampling: the K images
    of a prompt share x_T; the noise of their steps is independent).
    """
    device = embeds.hidden.device
    batch = embeds.hidden.shape[0]
    total = global_batch or batch
    schedule = ddim_schedule(policy.noise_scheduler, steps)
    shape = tuple(policy.latent_shape(resolution, resolution))  # (C, h, w); video policies (C, F, h, w)
    x = _global_randn(generator, total, offset, shape, batch).to(device)
    if shared_start:
        x = x[:1].expand_as(x).clone()
    if pairs:
        embeds, uncond = embeds.repeat(2), None if uncond is None else uncond.repeat(2)
        time_ids = None if time_ids is None else time_ids.repeat(2, 1)
        x = torch.cat([x, x])
    latents, log_probs = [x], []
    with torch.no_grad():
        for j, t in enumerate(schedule.timesteps):
            a_t, a_prev = schedule.alpha_bar[j].to(device), schedule.alpha_bar_prev[j].to(device)
            eps = guided_eps(predict, x, t.to(device), a_t, embeds, uncond, guidance, policy.prediction_type, time_ids)
            mean, std = ddim_mean_std(x, eps, a_t, a_prev, eta)
            noise = _global_randn(generator, total * (2 if pairs else 1), 0, shape, total * (2 if pairs else 1))
            if pairs:
                noise = torch.cat([noise[offset : offset + batch], noise[total + offset : total + offset + batch]])
            else:
                noise = noise[offset : offset + batch]
            prev = mean + std * noise.to(device)
            if eta > 0:
                log_probs.append(ddim_step_log_prob(prev, x, eps, a_t, a_prev, eta).log_prob)
            else:
                log_probs.append(torch.zeros(x.shape[0], device=device))
            x = prev
            latents.append(x)
    return Trajectory(
        torch.stack(latents, dim=1), torch.stack(log_probs, dim=1), schedule, embeds, uncond, time_ids, guidance, eta
    )


def step_log_prob(
    policy: Any,
    predict: Predict,
    trajectory: Trajectory,
    j: int | Tensor,
    checkpoint: bool = False,
) -> Tensor:
    """Log-prob ``[B]`` of step ``j`` (``latents[:, j] → latents[:, j + 1]``) of a recorded trajectory under
    ``predict`` (the trained UNet: with gradients; ``predict_reference``: without), with the trajectory's
    guidance and η. ``j`` is one step for every row or a ``[B]`` tensor, one step per row (ddpo-pytorch trains
    each sample on its own permutation of the steps). ``checkpoint`` recomputes the UNet call in backward
    (``torch.utils.checkpoint``)."""
    s = trajectory.schedule
    if isinstance(j, int):
        x_t, prev = trajectory.latents[:, j], trajectory.latents[:, j + 1]
    else:
        j = j.cpu().long()
        rows = torch.arange(len(j))
        x_t, prev = trajectory.latents[rows, j], trajectory.latents[rows, j + 1]
    device = x_t.device
    a_t, a_prev = s.alpha_bar[j].to(device), s.alpha_bar_prev[j].to(device)
    t = s.timesteps[j].to(device)

    def eps_fn(x: Tensor) -> Tensor:
        return guided_eps(
            predict,
            x,
            t,
            a_t,
            trajectory.embeds,
            trajectory.uncond,
            trajectory.guidance,
            policy.prediction_type,
            trajectory.time_ids,
        )

    eps = torch.utils.checkpoint.checkpoint(eps_fn, x_t, use_reentrant=False) if checkpoint else eps_fn(x_t)
    return ddim_step_log_prob(prev, x_t, eps, a_t, a_prev, trajectory.eta).log_prob


#: redraws of :func:`truncation_index` before giving up (the mean and std put no mass in the range)
MAX_TRUNCATION_DRAWS = 10_000


def truncation_index(steps: int, generator: torch.Generator, mean: float = 42.0, std: float = 5.0) -> int:
    """AlignProp's truncation index, one per batch: mihirp1998/AlignProp ``sd_pipeline.py``
    (``pipeline_step_with_grad``, commit b22918a) draws ``int(Normal(42, 5).sample())`` (truncation toward zero)
    and draws again until ``1 <= index <= steps − 1``; UNet outputs of the steps before it are detached (so the
    first step never has a gradient). The draw is scaled by ``steps / 50`` (the reference's 50 steps: unchanged
    there) before truncation; the bounds follow ``steps``. Raises when the range is empty (``steps`` < 2) or
    ``mean`` and ``std`` never land in it."""
    if steps < 2:
        raise ValueError(f"AlignProp truncation needs at least 2 sampling steps (index in [1, steps - 1]), got {steps}")
    for _ in range(MAX_TRUNCATION_DRAWS):
        draw = float(torch.randn((), generator=generator, dtype=torch.float64)) * std + mean
        index = int(draw * steps / 50.0)  # int(): toward zero, as the reference
        if 1 <= index <= steps - 1:
            return index
    raise ValueError(
        f"truncation_mean={mean}, truncation_std={std}: no index in [1, {steps - 1}] after "
        f"{MAX_TRUNCATION_DRAWS} draws (the mean is on a 50-step scale)"
    )
