"""Online objectives on the sampler's per-step log-probabilities: D3PO and DDPO (the DDIM step density they
consume is :func:`mmalign.models.sampling.ddim_step_log_prob`, re-exported here)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...models.sampling import DDIMLogProb, ddim_step_log_prob  # noqa: F401  (re-exported)
from .base import LossOutput, _check_batch, _check_positive, _fraction


# ----------------------------------------------------------------------------------------------------------
# Online RL on the sampler: DDIM step log-probability, D3PO, DDPO
# ----------------------------------------------------------------------------------------------------------
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
