"""DiffusionNFT (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process"):
the optimality probability, the negative-aware flow-matching loss, its timestep subsets and the old-policy update.

Reference: NVlabs/DiffusionNFT, commit 24af5554898d85e93efa492f42b5e9cdf4156e9b, ``scripts/train_nft_sd3.py``
(``main``: the loss is inline in the training loop, lines 862-971; ``return_decay``, lines 169-189) with the
defaults of ``config/base.py`` and ``config/nft.py``. The reference uses diffusers' flow notation, as mmalign:
``t = timestep / 1000`` is σ, ``x_t = (1 − σ)·x0 + σ·ε`` (line 870) and the SD3 transformer predicts
``v = ε − x0``, so ``x̂0 = x_t − σ·v`` (line 940). No mapping is needed.

Per trajectory the reference stores only the clean sample ``x0`` (the sampler's last latent) and the sampler's
timesteps; training re-noises ``x0`` with fresh noise at each trained timestep (forward process), so no
log-probabilities or SDE are involved.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from .base import LossOutput, _check_batch, _check_positive, _compute_dtype
from .grpo import group_advantages

NFTAdvMode = Literal["all", "positive_only", "negative_only", "one_only", "binary"]

_DECAY_SCHEDULES = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}


def nft_optimality_from_advantages(
    advantages: Tensor,
    adv_clip_max: float = 5.0,
    adv_mode: NFTAdvMode = "all",
) -> Tensor:
    """The optimality probability ``r ∈ [0, 1]`` of DiffusionNFT from group advantages (``train_nft_sd3.py``
    lines 910-929):

        A = clamp(advantages, −adv_clip_max, adv_clip_max),  A ← mode(A),
        r = clamp(A / adv_clip_max / 2 + ½, 0, 1),

    ``adv_clip_max`` = 5 (``config/base.py`` ``train.adv_clip_max``), ``adv_mode`` = ``"all"`` (``config/nft.py``
    ``train.adv_mode``; mode(A) = A). The other modes, as the reference: ``"positive_only"`` clamps A to
    [0, adv_clip_max], ``"negative_only"`` to [−adv_clip_max, 0], ``"one_only"`` maps A > 0 to 1 and else 0
    (so r ∈ {0.6, 0.5} with the default clip), ``"binary"`` is sign(A) (r ∈ {0.6, 0.5, 0.4}).
    Returns a detached tensor ``[B]`` in the advantages' dtype (at least float32); A = 0 gives r = ½.
    """
    _check_batch(advantages=advantages)
    _check_positive(adv_clip_max=adv_clip_max)
    a = advantages.detach().to(_compute_dtype(advantages)).clamp(-adv_clip_max, adv_clip_max)
    if adv_mode == "positive_only":
        a = a.clamp(0.0, adv_clip_max)
    elif adv_mode == "negative_only":
        a = a.clamp(-adv_clip_max, 0.0)
    elif adv_mode == "one_only":
        a = (a > 0).to(a.dtype)
    elif adv_mode == "binary":
        a = torch.sign(a)
    elif adv_mode != "all":
        raise ValueError(
            f"unknown adv_mode {adv_mode!r}; use 'all', 'positive_only', 'negative_only', 'one_only' or 'binary'"
        )
    return (a / adv_clip_max / 2.0 + 0.5).clamp(0.0, 1.0)


def nft_optimality(
    rewards: Tensor,
    group_ids: Tensor | Sequence[object],
    global_std: bool = True,
    adv_clip_max: float = 5.0,
    adv_mode: NFTAdvMode = "all",
    eps: float = 1e-4,
) -> Tensor:
    """Rewards -> DiffusionNFT's optimality probability ``r ∈ [0, 1]`` ``[N]`` (detached).

    The reference (``train_nft_sd3.py`` lines 744-769, ``flow_grpo/stat_tracking.py``) first computes Flow-GRPO's
    group-relative advantages with the same ``PerPromptStatTracker`` (per-prompt mean, global population std of
    all gathered rewards + 1e-4 since ``config.sample.global_std = True``; cleared each epoch), i.e.
    :func:`group_advantages`, then maps them with :func:`nft_optimality_from_advantages`:

        r = clamp(clamp(A, −5, 5)/5/2 + ½, 0, 1),   A = (R − mean_group(R)) / (std_global(R) + 1e-4).

    ``rewards`` are every process's rewards (gathered); groups are the prompts (the reference decodes the prompt
    token ids back to strings and groups equal strings). ``benchmarks/parity_diffusionnft.py`` compares this
    with the reference's stat tracker and lines 910-929.
    """
    advantages = group_advantages(rewards, group_ids, global_std=global_std, eps=eps)
    return nft_optimality_from_advantages(advantages, adv_clip_max=adv_clip_max, adv_mode=adv_mode)


def _sigma(sigma: float | Tensor, like: Tensor, dtype: torch.dtype) -> Tensor:
    """σ as a float, 0-d, ``[B]`` or ``[B, 1, ..., 1]`` -> detached, shaped to broadcast against ``like``."""
    tensor = torch.as_tensor(sigma, device=like.device, dtype=dtype).detach()
    if tensor.ndim == 0:
        return tensor
    if tensor.numel() != like.shape[0] or (tensor.ndim > 1 and tensor.shape[0] != like.shape[0]):
        raise ValueError(
            f"sigma must be a scalar, [B] or [B, 1, ..., 1] with B = {like.shape[0]}, got {tuple(tensor.shape)}"
        )
    return tensor.reshape((like.shape[0],) + (1,) * (like.ndim - 1))


def diffusion_nft_loss(
    v_theta: Tensor,
    v_old: Tensor,
    x0: Tensor,
    x_t: Tensor,
    sigma: float | Tensor,
    r: Tensor,
    beta: float = 1.0,
    v_ref: Tensor | None = None,
    kl_beta: float = 1e-4,
    adv_clip_max: float = 5.0,
    min_weight: float = 1e-5,
) -> LossOutput:
    """DiffusionNFT's negative-aware flow-matching loss at one timestep (``train_nft_sd3.py`` lines 927-971).

    Inputs ``[B, ...]``: ``v_theta`` the trained model's velocity (differentiable), ``v_old`` the sampling
    ("old") policy's velocity and ``v_ref`` the frozen reference's (the LoRA model with adapters disabled, i.e.
    the base model; both detached here), all at the same ``x_t = (1 − σ)·x0 + σ·ε`` built from the sampled clean
    latent ``x0`` with fresh noise ε; ``sigma`` (float, ``[B]`` or ``[B, 1, ..., 1]``, detached) and ``r`` ``[B]``
    the optimality probability (:func:`nft_optimality`, detached, in [0, 1]). With stop-gradient ``sg``:

        v⁺ = β·v_θ + (1 − β)·sg(v_old)                 (implicit positive policy)
        v⁻ = (1 + β)·sg(v_old) − β·v_θ                 (implicit negative policy)
        x̂0^± = x_t − σ·v^±
        w^± = sg(max(mean |x̂0^± − x0|, min_weight))   (per sample, adaptive weighting, in float64)
        L^± = mean (x̂0^± − x0)² / w^±
        policy = adv_clip_max · mean_b [(r·L⁺ + (1 − r)·L⁻) / β]
        KL = mean_b mean (v_θ − sg(v_ref))²
        L = policy + kl_beta·KL

    (means without subscript are over all non-batch elements). In velocity terms x̂0 − x0 = σ·(v* − v) with
    v* = ε − x0, so L^± = σ·mean(v^± − v*)² / mean|v^± − v*|: r = 1 pulls v⁺ (hence v_θ) toward v*, r = 0 pulls
    v⁻ toward v*, i.e. pushes v_θ away from it (by reflection through v_old).

    Defaults (SD3.5-M, ``config/nft.py``): β = ``config.beta`` = 1.0 (0.1 for ``sd3_ocr`` and
    ``sd3_multi_reward``), at β = 1 v⁺ = v_θ and v⁻ = 2·v_old − v_θ; ``kl_beta`` = ``config.train.beta`` = 1e-4
    (``config/nft.py`` line 24); ``adv_clip_max`` = 5 (the reference multiplies the policy loss by it, line 960;
    only a scale); ``min_weight`` = 1e-5 (line 945). ``v_ref`` is required when ``kl_beta`` > 0; given with
    ``kl_beta`` = 0 the KL is only logged. The reference always adds the KL (its β is never 0 in the configs).

    Precision: inputs are cast to at least float32 before mixing (the reference mixes the fp16/bf16 autocast
    outputs and squares the KL in that precision); as in the reference the weights are float64 and the division
    promotes L^±, the policy term and the loss to float64.

    Metrics as the reference logs them: ``policy_loss`` (the policy term; the reference's logged
    ``policy_loss`` is in fact the total loss, because ``loss = policy_loss; loss += ...`` adds the KL in place
    to the tensor it logged, lines 960-970), ``unweighted_policy_loss`` (the policy term without the
    ``adv_clip_max`` factor), ``kl_div_loss`` (= ``kl_div``, 0 without ``v_ref``), ``old_kl_div``
    (mean (v_old − v_ref)², with ``v_ref``), ``old_deviate`` / ``old_deviate_max`` (mean / max (v_θ − v_old)²),
    ``x0_norm`` / ``x0_norm_max`` (mean / max x0²); also ``positive_loss``, ``negative_loss`` (batch means of
    L^±) and ``optimality`` (mean r).
    """
    tensors = {"v_theta": v_theta, "v_old": v_old, "x0": x0, "x_t": x_t}
    if v_ref is not None:
        tensors["v_ref"] = v_ref
    for name, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if v_theta.ndim < 2:
        raise ValueError(f"v_theta must be a batch [B, ...] with a non-batch dim, got shape {tuple(v_theta.shape)}")
    if any(tensor.shape != v_theta.shape for tensor in tensors.values()):
        shapes = ", ".join(f"{name}={tuple(tensor.shape)}" for name, tensor in tensors.items())
        raise ValueError(f"velocities and latents must have the same shape [B, ...]: {shapes}")
    size = _check_batch(r=r)
    if size != v_theta.shape[0]:
        raise ValueError(f"r has {size} entries but the batch has {v_theta.shape[0]}")
    _check_positive(beta=beta, adv_clip_max=adv_clip_max, min_weight=min_weight)
    if kl_beta < 0:
        raise ValueError(f"kl_beta must be >= 0, got {kl_beta}")
    if kl_beta > 0 and v_ref is None:
        raise ValueError("kl_beta > 0 needs v_ref (the reference model's velocity) for the KL term")
    r = r.detach()
    if not bool(((r >= 0) & (r <= 1)).all()):
        raise ValueError("r must lie in [0, 1] (the optimality probability; see nft_optimality)")

    dtype = _compute_dtype(*tensors.values())
    dims = tuple(range(1, v_theta.ndim))
    v_theta = v_theta.to(dtype)
    v_old = v_old.detach().to(dtype)
    x0 = x0.detach().to(dtype)
    x_t = x_t.detach().to(dtype)
    sigma_b = _sigma(sigma, v_theta, dtype)

    positive = beta * v_theta + (1.0 - beta) * v_old
    negative = (1.0 + beta) * v_old - beta * v_theta

    def weighted(velocity: Tensor) -> Tensor:
        x0_hat = x_t - sigma_b * velocity
        with torch.no_grad():
            weight = (x0_hat.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp(min=min_weight)
        return ((x0_hat - x0).pow(2) / weight).mean(dim=dims)

    positive_loss = weighted(positive)
    negative_loss = weighted(negative)
    r = r.to(positive_loss.dtype)
    per_sample = r * positive_loss / beta + (1.0 - r) * negative_loss / beta
    policy = (per_sample * adv_clip_max).mean()

    with torch.no_grad():
        deviation = (v_theta - v_old).pow(2)
        squares = x0.pow(2)
        metrics = {
            "policy_loss": policy,
            "unweighted_policy_loss": per_sample.mean(),
            "positive_loss": positive_loss.mean(),
            "negative_loss": negative_loss.mean(),
            "optimality": r.mean(),
            "old_deviate": deviation.mean(),
            "old_deviate_max": deviation.max(),
            "x0_norm": squares.mean(),
            "x0_norm_max": squares.max(),
        }
    loss = policy
    if v_ref is not None:
        v_ref = v_ref.detach().to(dtype)
        kl = (v_theta - v_ref).pow(2).mean(dim=dims).mean()
        metrics["kl_div_loss"] = kl
        metrics["kl_div"] = kl
        metrics["old_kl_div"] = (v_old - v_ref).pow(2).mean(dim=dims).mean()
        if kl_beta > 0:
            loss = loss + kl_beta * kl
    else:
        metrics["kl_div_loss"] = torch.zeros((), dtype=dtype, device=v_theta.device)
    return LossOutput(loss, metrics)


def nft_timestep_indices(
    batch_size: int,
    num_steps: int,
    timestep_fraction: float = 0.99,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Which of the sampler's timesteps each sample trains on, in order: ``[batch_size, K]`` (long),
    ``K = int(num_steps · timestep_fraction)``.

    DiffusionNFT trains on the sampling schedule's own discrete timesteps (``pipeline.scheduler.timesteps``,
    σ = timestep/1000, i.e. ``sigmas[:-1]``; SD3's shift 3 schedule of ``config.sample.num_steps`` = 10 steps),
    not on a continuous density: every sample gets an independent random permutation of the ``num_steps``
    indices and its first K are trained, one per backward pass (``train_nft_sd3.py`` lines 569, 810-816,
    854-870), with fresh noise each time. Defaults: ``timestep_fraction`` = 0.99 (``config/base.py``), so
    K = int(9.9) = 9 of 10 (24 of 25 for ``sd3_multi_reward``). Each row holds distinct indices.
    """
    if batch_size < 1 or num_steps < 1:
        raise ValueError(f"batch_size and num_steps must be >= 1, got {batch_size} and {num_steps}")
    if not 0 < timestep_fraction <= 1:
        raise ValueError(f"timestep_fraction must be in (0, 1], got {timestep_fraction}")
    count = int(num_steps * timestep_fraction)
    if count < 1:
        raise ValueError(f"int(num_steps * timestep_fraction) = int({num_steps} * {timestep_fraction}) is 0")
    rows = [torch.randperm(num_steps, generator=generator)[:count] for _ in range(batch_size)]
    return torch.stack(rows).to(device)


def nft_old_decay(step: int, decay_type: int = 1) -> float:
    """The decay of DiffusionNFT's old (sampling) policy after ``step`` optimizer steps (``return_decay``,
    ``train_nft_sd3.py`` lines 169-189):

        decay = 0 if step < flat else min((step − flat)·uprate, uphold),

    ``decay_type`` 1 (default, ``config/nft.py`` line 60): flat 0, uprate 0.001, uphold 0.5 (decay 0.5 from step
    500 on); 2 (``sd3_ocr``): flat 75, uprate 0.0075, uphold 0.999; 0: always 0 (old = current).
    """
    if decay_type not in _DECAY_SCHEDULES:
        raise ValueError(f"decay_type must be 0, 1 or 2, got {decay_type}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    flat, uprate, uphold = _DECAY_SCHEDULES[decay_type]
    if step < flat:
        return 0.0
    return min((step - flat) * uprate, uphold)


def nft_old_policy_update(old: Tensor, current: Tensor, decay: float) -> Tensor:
    """One EMA update of an old-policy parameter: ``decay·old + (1 − decay)·current`` (a new detached tensor).

    The reference (``train_nft_sd3.py`` lines 1034-1039) applies it to every LoRA parameter of the "old" adapter
    once per epoch, after that epoch's optimizer steps, with ``decay = nft_old_decay(global_step)``
    (``global_step`` = optimizer steps taken so far); at start the old adapter is a copy of the trained one
    (lines 576-580). The old adapter samples the epoch's images and gives ``v_old``.
    """
    if old.shape != current.shape:
        raise ValueError(f"old {tuple(old.shape)} and current {tuple(current.shape)} differ in shape")
    if not 0 <= decay <= 1:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    return old.detach() * decay + current.detach() * (1.0 - decay)
