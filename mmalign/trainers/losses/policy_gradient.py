"""Online objectives on the sampler's per-step log-probabilities: the DDIM step density, D3PO and DDPO."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import LossOutput, _check_batch, _check_positive, _compute_dtype, _fraction, _left_broadcast


# ----------------------------------------------------------------------------------------------------------
# Online RL on the sampler: DDIM step log-probability, D3PO, DDPO
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


def d3po_loss(
    logp_w: Tensor,
    logp_l: Tensor,
    ref_logp_w: Tensor,
    ref_logp_l: Tensor,
    beta: float = 0.1,
    clip: float = 0.1,
    tie: Tensor | None = None,
) -> LossOutput:
    """D3PO (Yang et al. 2024, "Using Human Feedback to Fine-tune Diffusion Models without Any Reward Model").

    Reference: yk7333/d3po ``scripts/train_with_rm.py`` / ``scripts/rm/train_d3po.py``. For one denoising step
    ``j`` of two trajectories from the same ``x_T``, with per-step log-probs ``[B]`` of the trained model
    (:func:`ddim_step_log_prob`, mean over non-batch elements) and of the frozen reference (detached here):

        r_k = clamp(exp(logπ_θ − logπ_ref), 1 − clip, 1 + clip),   L = mean −log σ(β·(log r_w − log r_l)),

    β = 0.1, clip = 0.1. The clamp cuts the gradient of a trajectory whose ratio left ``[1 − clip, 1 + clip]``.
    ``tie`` ``[B]`` (bool or 0/1) marks pairs with no preference (no Pareto dominance in the reference's
    ``compare``): their preference sign is 0, so they add the constant ``log 2`` to the mean and no gradient,
    exactly as the reference (which keeps them in the batch mean).

    Metrics: ``implicit_acc`` = mean(inside > 0) over non-tie pairs (0 if all tie), ``clipfrac`` = fraction of
    the 2B ratios outside the clip range, ``log_ratio_w`` / ``log_ratio_l`` (means of logπ_θ − logπ_ref),
    ``tie_fraction``.
    """
    size = _check_batch(logp_w=logp_w, logp_l=logp_l, ref_logp_w=ref_logp_w, ref_logp_l=ref_logp_l)
    _check_positive(beta=beta)
    if not 0.0 < clip < 1.0:
        raise ValueError(f"clip must be in (0, 1), got {clip}")
    log_ratio_w = logp_w - ref_logp_w.detach()
    log_ratio_l = logp_l - ref_logp_l.detach()
    ratio_w = torch.exp(log_ratio_w).clamp(1.0 - clip, 1.0 + clip)
    ratio_l = torch.exp(log_ratio_l).clamp(1.0 - clip, 1.0 + clip)
    if tie is None:
        preferred = torch.ones(size, dtype=torch.bool, device=logp_w.device)
    else:
        _check_batch(logp_w=logp_w, tie=tie)
        preferred = ~tie.to(device=logp_w.device).bool()
    sign = preferred.to(logp_w.dtype)
    inside = beta * (torch.log(ratio_w) - torch.log(ratio_l)) * sign
    loss = -F.logsigmoid(inside).mean()
    raw = torch.cat([log_ratio_w.detach(), log_ratio_l.detach()]).exp()
    n_preferred = preferred.sum()
    metrics = {
        "implicit_acc": ((inside.detach() > 0) & preferred).sum().to(inside.dtype) / n_preferred.clamp(min=1),
        "clipfrac": _fraction((raw - 1.0).abs() > clip, raw),
        "log_ratio_w": log_ratio_w.mean(),
        "log_ratio_l": log_ratio_l.mean(),
        "tie_fraction": _fraction(~preferred, inside),
    }
    return LossOutput(loss, metrics)


def ddpo_ppo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    clip_range: float = 1e-4,
    adv_clip_max: float = 5.0,
) -> LossOutput:
    """DDPO's PPO-clip policy loss for one denoising step (Black et al. 2023, "Training Diffusion Models with
    Reinforcement Learning").

    Reference: kvablack/ddpo-pytorch ``scripts/train.py``. Per sample ``[B]``: ``logp`` of the sampled
    ``x_prev`` under the trained model (:func:`ddim_step_log_prob`), ``old_logp`` recorded at sampling time
    (detached here) and the (already normalised) ``advantages`` (detached):

        A = clamp(advantages, −adv_clip_max, adv_clip_max),   ratio = exp(logp − old_logp),
        L = mean max(−A·ratio, −A·clamp(ratio, 1 − ε, 1 + ε)),

    ε = ``clip_range`` = 1e-4, ``adv_clip_max`` = 5. Metrics as the reference logs them:
    ``approx_kl = ½·mean((logp − old_logp)²)`` and ``clipfrac = mean(|ratio − 1| > ε)``; also ``ratio`` (mean)
    and ``advantage`` (mean clipped advantage).
    """
    _check_batch(logp=logp, old_logp=old_logp, advantages=advantages)
    _check_positive(clip_range=clip_range, adv_clip_max=adv_clip_max)
    adv = advantages.detach().clamp(-adv_clip_max, adv_clip_max)
    log_ratio = logp - old_logp.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    metrics = {
        "approx_kl": 0.5 * log_ratio.detach().pow(2).mean(),
        "clipfrac": _fraction((ratio.detach() - 1.0).abs() > clip_range, ratio),
        "ratio": ratio.mean(),
        "advantage": adv.mean(),
    }
    return LossOutput(loss, metrics)
