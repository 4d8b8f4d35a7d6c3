"""The GRPO family on flow-matching samplers: group-relative advantages and the Flow-GRPO loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import LossOutput, _check_batch, _check_positive, _compute_dtype, _fraction, _per_sample
from .policy_gradient import ddpo_ppo_loss


# ----------------------------------------------------------------------------------------------------------
# GRPO family on flow-matching samplers (Flow-GRPO)
# ----------------------------------------------------------------------------------------------------------
def group_advantages(
    rewards: Tensor,
    group_ids: Tensor | Sequence[object],
    global_std: bool = True,
    eps: float = 1e-4,
    ddof: int = 0,
) -> Tensor:
    """Group-relative advantages of Flow-GRPO: each reward minus its group's (prompt's) mean, over a std.

    Reference: yifan123/flow_grpo ``flow_grpo/stat_tracking.py`` (``PerPromptStatTracker.update``, type
    ``'grpo'``, commit ac4c86e8cae021841f1fde853d340e0db67690dd), as ``scripts/train_sd3.py`` uses it (cleared
    after every epoch, so the statistics are those of this batch alone):

        A_i = (r_i − mean_{g(i)}) / (std + eps),   std = population std (ddof 0) of all ``rewards`` when
        ``global_std`` (the default, ``config.sample.global_std = True``), else of group g(i)'s rewards,

    eps = 1e-4. ``ddof`` 1 and ``eps`` 1e-8 give DanceGRPO's ``(r − mean) / (group_rewards.std() + 1e-8)`` (torch's
    unbiased std; XueZeyue/DanceGRPO ``fastvideo/train_grpo_flux.py``). ``rewards`` ``[N]`` (every process's rewards,
    gathered); ``group_ids`` ``[N]``: a tensor of ints or
    a sequence of hashables (the prompts). Computed in float64 (the reference uses numpy float64) and returned
    detached in the rewards' dtype (at least float32). A group of one gets advantage 0.
    ``benchmarks/parity_flow_grpo.py``: max |Δ| 8.9e-16 from the reference's tracker (48 prompts × 24 rewards,
    float64, either std mode).
    """
    size = _check_batch(rewards=rewards)
    _check_positive(eps=eps)
    if isinstance(group_ids, Tensor):
        if group_ids.shape != (size,):
            raise ValueError(f"group_ids must have shape ({size},), got {tuple(group_ids.shape)}")
        _, inverse = torch.unique(group_ids.detach().cpu(), return_inverse=True)
    else:
        group_ids = list(group_ids)
        if len(group_ids) != size:
            raise ValueError(f"group_ids must have {size} entries, got {len(group_ids)}")
        index: dict[object, int] = {}
        inverse = torch.tensor([index.setdefault(key, len(index)) for key in group_ids])
    inverse = inverse.to(rewards.device)
    values = rewards.detach().to(torch.float64)
    groups = int(inverse.max()) + 1
    counts = torch.zeros(groups, dtype=torch.float64, device=values.device).index_add_(
        0, inverse, torch.ones_like(values)
    )
    sums = torch.zeros_like(counts).index_add_(0, inverse, values)
    group_mean = (sums / counts)[inverse]
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 (population std) or 1 (unbiased), got {ddof}")
    if global_std:
        std = ((values - values.mean()).pow(2).sum() / max(size - ddof, 1)).sqrt()
    else:
        squares = torch.zeros_like(counts).index_add_(0, inverse, (values - group_mean).pow(2))
        std = (squares / (counts - ddof).clamp(min=1)).sqrt()[inverse]
    return ((values - group_mean) / (std + eps)).to(_compute_dtype(rewards))


def flow_grpo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_range: float = 1e-4,
    adv_clip_max: float = 5.0,
    mean: Tensor | None = None,
    ref_mean: Tensor | None = None,
    std: float | Tensor | None = None,
    beta: float = 0.0,
) -> LossOutput:
    """Flow-GRPO's loss for one denoising step (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via
    Online RL").

    Reference: yifan123/flow_grpo ``scripts/train_sd3.py`` (commit ac4c86e8cae021841f1fde853d340e0db67690dd),
    defaults from ``config/base.py``. Per sample ``[B]``: ``log_prob`` of the recorded ``x_prev`` under the
    trained model (:func:`mmalign.models.flow_sampling.flow_sde_step`), ``old_log_prob`` recorded at sampling
    time and ``advantages`` (:func:`group_advantages`), both detached here:

        A = clamp(advantages, −adv_clip_max, adv_clip_max),   ratio = exp(log_prob − old_log_prob),
        policy = mean max(−A·ratio, −A·clamp(ratio, 1 − ε, 1 + ε)),
        KL = mean_b [mean over non-batch elements of (mean − ref_mean)²] / (2·std_b²),
        L = policy + β·KL,

    ε = ``clip_range`` = 1e-4, ``adv_clip_max`` = 5, β = 0 (``config/base.py``; 0.04 in the SD3 GenEval
    configs). ``mean`` is the SDE step's mean under the trained model (differentiable), ``ref_mean`` the same
    under the reference (detached here), ``std`` the step's std_t (``flow_sde_step(...).std``: a float, 0-d,
    ``[B]`` or ``[B, 1, ..., 1]``; detached, it depends on σ only). The KL term is computed whenever the three
    are given (logged as ``kl_loss``) and they are required when β > 0. The policy term is the one of
    :func:`ddpo_ppo_loss`.

    Metrics as the reference logs them: ``policy_loss``, ``approx_kl = ½·mean((log_prob − old_log_prob)²)``,
    ``clipfrac = mean(|ratio − 1| > ε)``, ``clipfrac_gt_one = mean(ratio − 1 > ε)``,
    ``clipfrac_lt_one = mean(1 − ratio > ε)``, ``kl_loss`` (when computed); also ``ratio`` and ``advantage``.
    """
    policy = ddpo_ppo_loss(log_prob, old_log_prob, advantages, clip_range=clip_range, adv_clip_max=adv_clip_max)
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    ratio = torch.exp(log_prob.detach() - old_log_prob.detach())
    metrics = dict(policy.metrics)
    metrics["policy_loss"] = policy.loss
    metrics["clipfrac_gt_one"] = _fraction(ratio - 1.0 > clip_range, ratio)
    metrics["clipfrac_lt_one"] = _fraction(1.0 - ratio > clip_range, ratio)
    loss = policy.loss
    given = [value is not None for value in (mean, ref_mean, std)]
    if beta > 0 and not all(given):
        raise ValueError("beta > 0 needs mean, ref_mean and std for the KL term")
    if any(given) and not all(given):
        raise ValueError("mean, ref_mean and std go together: give all three or none")
    if all(given):
        if mean.shape != ref_mean.shape or mean.ndim < 2 or mean.shape[0] != log_prob.shape[0]:
            raise ValueError(
                f"mean {tuple(mean.shape)} and ref_mean {tuple(ref_mean.shape)} must both be [B, ...] with "
                f"B = {log_prob.shape[0]}"
            )
        dtype = _compute_dtype(mean, ref_mean)
        mean, ref_mean = mean.to(dtype), ref_mean.detach().to(dtype)
        std_b = torch.as_tensor(std, device=mean.device, dtype=dtype).detach()
        if std_b.ndim > 1:
            if std_b.numel() != mean.shape[0]:
                raise ValueError(f"std must be a scalar, [B] or [B, 1, ..., 1], got {tuple(std_b.shape)}")
            std_b = std_b.reshape(-1)
        std_b = _per_sample(std_b, mean.shape[0], mean, "std")
        squared = (mean - ref_mean).pow(2)
        kl = (squared.mean(dim=tuple(range(1, squared.ndim))) / (2.0 * std_b.pow(2))).mean()
        metrics["kl_loss"] = kl
        if beta > 0:
            loss = loss + beta * kl
    return LossOutput(loss, metrics)
