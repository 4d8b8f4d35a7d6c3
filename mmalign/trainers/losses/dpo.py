"""Offline preference objectives on the denoising MSE: Diffusion-DPO (sigmoid, hinge, IPO), SFT, SmPO,
Adaptive-DPO and Diffusion-KTO."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import LossOutput, _check_batch, _check_positive, _compute_dtype, _fraction, _left_broadcast, _per_sample


# ----------------------------------------------------------------------------------------------------------
# Denoising MSE
# ----------------------------------------------------------------------------------------------------------
def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over all non-batch elements -> ``[B]``, computed in (at least) float32.

    As every reference here: ``F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, ...])``
    (diffusers ``train_diffusion_dpo.py``; SalesforceAIResearch/DiffusionDPO ``train.py`` reduces
    ``dim=[1, 2, 3]``, the same for images; video latents ``[B, C, T, H, W]`` average over frames too).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.ndim < 2:
        raise ValueError(f"expected a batch [B, ...] with at least one non-batch dim, got {tuple(pred.shape)}")
    dtype = _compute_dtype(pred, target)
    return (pred.to(dtype) - target.to(dtype)).pow(2).mean(dim=tuple(range(1, pred.ndim)))


def sft_loss(model_mse_w: Tensor) -> LossOutput:
    """Supervised fine-tuning on the winners: the plain mean denoising MSE of the preferred images.

    SalesforceAIResearch/DiffusionDPO ``train.py`` (``--sft``) uses ``F.mse_loss(pred, target,
    reduction="mean")`` over the winners, which equals the batch mean of :func:`per_sample_mse` (every sample
    has the same element count). Input: ``model_mse_w`` ``[B]``.
    """
    _check_batch(model_mse_w=model_mse_w)
    loss = model_mse_w.mean()
    return LossOutput(loss, {"model_mse": loss})


# ----------------------------------------------------------------------------------------------------------
# Diffusion-DPO and relatives (offline pairs, denoising MSE as the implicit log-likelihood)
# ----------------------------------------------------------------------------------------------------------
DPOLossType = Literal["sigmoid", "hinge", "ipo"]


def dpo_logits(model_mse_w: Tensor, model_mse_l: Tensor, ref_mse_w: Tensor, ref_mse_l: Tensor) -> Tensor:
    """Per-pair ``ℓ = d_ref − d_θ`` with ``d = mse_w − mse_l``; the reference part is detached.

    ``ℓ > 0`` means the model lowered the winner's error relative to the loser's more than the reference did.
    This is the ``logits`` of the diffusers DPO script and of Adaptive-DPO; the official Diffusion-DPO
    ``inside_term`` is ``½·β·ℓ``.
    """
    _check_batch(model_mse_w=model_mse_w, model_mse_l=model_mse_l, ref_mse_w=ref_mse_w, ref_mse_l=ref_mse_l)
    return (ref_mse_w - ref_mse_l).detach() - (model_mse_w - model_mse_l)


def beta_from_diffusers(beta_dpo: float) -> float:
    """diffusers' ``--beta_dpo`` (β′, default 2500, no ½) -> this module's official β (= 2·β′).

    The diffusers script computes ``−log σ(β′·(d_ref − d_θ))``; the official script computes
    ``−log σ(−½·β·(d_θ − d_ref))``. They are the same function when ``β = 2·β′`` (β = 5000 ⇔ β′ = 2500).
    """
    return 2.0 * beta_dpo


def _pair_metrics(
    inside: Tensor,
    model_mse_w: Tensor,
    model_mse_l: Tensor,
    ref_mse_w: Tensor,
    ref_mse_l: Tensor,
) -> dict[str, Tensor]:
    return {
        # Ties (inside exactly 0) count as wrong, as in the official train.py: mean(inside > 0).
        # (The diffusers script adds ½ per tie; ties have measure zero with float MSEs.)
        "implicit_acc": _fraction(inside > 0, inside),
        "reward_margin": inside.mean(),
        "model_diff": (model_mse_w - model_mse_l).mean(),
        "ref_diff": (ref_mse_w - ref_mse_l).mean(),
        "model_mse": 0.5 * (model_mse_w.mean() + model_mse_l.mean()),
        "ref_mse": 0.5 * (ref_mse_w.mean() + ref_mse_l.mean()),
    }


def diffusion_dpo_loss(
    model_mse_w: Tensor,
    model_mse_l: Tensor,
    ref_mse_w: Tensor,
    ref_mse_l: Tensor,
    beta: float = 5000.0,
    loss_type: DPOLossType = "sigmoid",
    ipo_tau: float | None = None,
) -> LossOutput:
    """Diffusion-DPO (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference Optimization").

    Reference: SalesforceAIResearch/DiffusionDPO ``train.py`` (official convention, used here) and diffusers
    ``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py`` (hinge and ipo variants).

    Inputs are per-sample denoising MSEs ``[B]`` (:func:`per_sample_mse`, mean over non-batch elements) of the
    trained model and of the frozen reference at the SAME timestep and noise for winner and loser. With
    ``d_θ = mse_w − mse_l``, ``d_ref = sg(ref_w − ref_l)`` (stop-gradient) and

        inside = −½·β·(d_θ − d_ref) = ½·β·ℓ,    ℓ = d_ref − d_θ,

    the per-pair losses are

    * ``"sigmoid"`` (default): ``−log σ(inside)`` via ``logsigmoid``. β = 5000 (SD1.5 and SDXL in the paper).
      This equals diffusers' ``−log σ(β′·ℓ)`` with ``β′ = β/2`` (diffusers' default ``--beta_dpo 2500``; see
      :func:`beta_from_diffusers`).
    * ``"hinge"``: ``relu(1 − inside)`` (diffusers' ``relu(1 − β′·ℓ)``, the same with β′ = β/2).
    * ``"ipo"``: IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
      Preferences"), per pair ``(h − 1/(2τ))²`` on the unscaled log-ratio difference ``h``. diffusers writes
      ``(logits − 1/(2·args.beta))²`` with ``logits = ℓ``, but its parser defines no ``--beta`` (only
      ``--beta_dpo``; the line raises ``AttributeError`` as published), so τ is ambiguous there. Here
      ``h = ℓ`` and τ = ``ipo_tau``, default ``β/2`` (= diffusers' β′, the coefficient that multiplies ℓ in
      the sigmoid form):  ``(ℓ − 1/(2τ))²`` = ``(ℓ − 1/β)²`` by default. The minimiser is ``τ·ℓ = ½``, i.e.
      ``inside = ½``. (The Adaptive-DPO fork passes a separate IPO ``--beta``, default 100: give it as
      ``ipo_tau``.)

    The loss is the batch mean. Metrics: ``implicit_acc`` = mean(inside > 0) (an exact tie counts 0, as the
    official script; diffusers counts ½), ``reward_margin`` = mean(inside), ``model_diff``/``ref_diff`` (batch
    means of d_θ, d_ref), ``model_mse``/``ref_mse`` (½ of the winner and loser means, as logged officially).
    """
    _check_batch(model_mse_w=model_mse_w, model_mse_l=model_mse_l, ref_mse_w=ref_mse_w, ref_mse_l=ref_mse_l)
    _check_positive(beta=beta)
    ref_mse_w, ref_mse_l = ref_mse_w.detach(), ref_mse_l.detach()
    model_diff = model_mse_w - model_mse_l
    ref_diff = ref_mse_w - ref_mse_l
    inside = -0.5 * beta * (model_diff - ref_diff)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(inside)
    elif loss_type == "hinge":
        losses = F.relu(1.0 - inside)
    elif loss_type == "ipo":
        tau = 0.5 * beta if ipo_tau is None else ipo_tau
        _check_positive(ipo_tau=tau)
        losses = ((ref_diff - model_diff) - 1.0 / (2.0 * tau)).pow(2)
    else:
        raise ValueError(f"unknown Diffusion-DPO loss_type {loss_type!r}; use 'sigmoid', 'hinge' or 'ipo'")
    return LossOutput(losses.mean(), _pair_metrics(inside, model_mse_w, model_mse_l, ref_mse_w, ref_mse_l))


def flow_dpo_defaults() -> dict[str, object]:
    """Flow-DPO's settings for SD3.5-M (Liu et al. 2025, "Improving Video Generation with Human Feedback"): its
    loss is :func:`diffusion_dpo_loss` (sigmoid) on velocity MSEs with β = 100, nothing else differs.

    KwaiVGI/VideoAlign (commit 219ab9db64c045e5181a2202d11f686439351292) releases only the VideoReward model;
    its README points Flow-DPO to yifan123/flow_grpo ``scripts/single_node/dpo.sh`` -> ``scripts/train_sd3_dpo.py``
    with ``config/dpo.py:geneval_sd3`` (commit ac4c86e8cae021841f1fde853d340e0db67690dd). There (lines
    924-939) ``target = ε − x0``, ``mse = mean over non-batch elements of (v.float() − target)²`` for the model
    and the reference, and ``loss = mean −log σ(−½·β·((mse_w − ref_w) − (mse_l − ref_l)))``: exactly
    :func:`diffusion_dpo_loss` on :func:`per_sample_mse` of velocities (no timestep weight, mean not sum),
    β = ``config.train.beta`` = 100 (``config/dpo.py`` lines 53 and 92).

    Other settings, returned as a dict (keys below): the winner and loser share the noise and the timestep
    (lines 884-899); ``timestep_sampling``: u ~ logit-normal(0, 1) (diffusers
    ``compute_density_for_timestep_sampling``; ``mode_scale`` 1.29 is passed but unused), index ⌊u·1000⌋ into
    the training scheduler's 1000 shifted timesteps (``FlowMatchEulerDiscreteScheduler`` from the model, shift
    3), σ = sigmas[index], a fresh draw for each of ``int(40 · 0.99)`` = 39 passes per batch (lines 871-903);
    ``reference``: a second LoRA adapter "ref" initialised with B = 0, i.e. the base model, never updated
    (``ref_update_step`` 1e7; a small value makes it online DPO by copying the learner into it); pairs: of 24
    images per prompt sampled by the reference (SDE, noise level 0.7, 40 steps, CFG 4.5, 512 px), the highest
    and lowest reward (``flow_grpo/stat_tracking.py`` type ``'dpo'``); training forward without CFG; LoRA r 32,
    α 64 on the attention projections; AdamW lr 3e-4, weight decay 1e-4, grad-norm clip 1.0, fp16
    (``config/base.py`` lines 21, 63-76); eval EMA decay 0.9 every 8 steps (``train_sd3_dpo.py`` line 422).
    """
    return {
        "beta": 100.0,
        "loss_type": "sigmoid",
        "timestep_sampling": "logit_normal",
        "logit_mean": 0.0,
        "logit_std": 1.0,
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "shared_noise_and_timestep": True,
        "reference": "base model (zero-initialised LoRA adapter, frozen)",
        "sample_num_steps": 40,
        "sample_guidance_scale": 4.5,
        "sample_noise_level": 0.7,
        "images_per_prompt": 24,
        "timestep_fraction": 0.99,
        "resolution": 512,
        "learning_rate": 3e-4,
        "adam_weight_decay": 1e-4,
        "max_grad_norm": 1.0,
        "lora_rank": 32,
        "lora_alpha": 64,
        "mixed_precision": "fp16",
        "ema_decay": 0.9,
        "ema_update_step_interval": 8,
    }


SMPO_SCORE_LOW = 0.11543526500463486
"""Lower bound of SmPO's PickScore normalisation (JaydenLyh/SmPO ``train.py``, ``min_val``)."""
SMPO_SCORE_HIGH = 0.28201571106910706
"""Upper bound of SmPO's PickScore normalisation (JaydenLyh/SmPO ``train.py``, ``max_val``)."""


def smpo_preference(
    score_w: Tensor,
    score_l: Tensor,
    low: float = SMPO_SCORE_LOW,
    high: float = SMPO_SCORE_HIGH,
) -> Tensor:
    """SmPO's smoothed preference ``p = σ(n(s_w) − n(s_l))``, ``n(s) = (s − low)/(high − low)``.

    Reference: JaydenLyh/SmPO ``train.py`` (``exp(n0)/(exp(n0) + exp(n1))``, the same number), where ``s`` is
    the raw PickScore cosine (logit scale removed) and the constants are the dataset's min/max. Returns a
    detached tensor shaped like the scores; ``p = ½`` when the scores are equal.
    """
    if high <= low:
        raise ValueError(f"high ({high}) must be greater than low ({low})")
    score_w = torch.as_tensor(score_w).detach()
    score_l = torch.as_tensor(score_l, device=score_w.device).detach()
    dtype = _compute_dtype(score_w, score_l)
    span = high - low
    return torch.sigmoid((score_w.to(dtype) - low) / span - (score_l.to(dtype) - low) / span)


def smpo_loss(
    model_mse_w: Tensor,
    model_mse_l: Tensor,
    ref_mse_w: Tensor,
    ref_mse_l: Tensor,
    preference: float | Tensor,
    beta: float = 2000.0,
    scale: float = 10.0,
) -> LossOutput:
    """SmPO (Lu et al. 2025, "Smoothed Preference Optimization via ReNoise Inversion").

    Reference: JaydenLyh/SmPO ``train.py``. Diffusion-DPO (:func:`diffusion_dpo_loss`, sigmoid form) with the
    scale ``−½·β·(2p − 1)·scale`` in place of ``−½·β``:

        inside = −½·β·(2p − 1)·10·(d_θ − d_ref),   L = mean −log σ(inside),

    ``p`` the smoothed preference of :func:`smpo_preference` (detached), a float or one per pair ``[B]``
    (the reference script applies the first pair's ``p`` to its whole per-device batch of one). ``p = ½`` gives
    a constant loss ``log 2`` and zero gradient. Defaults: β = 2000 (SD1.5; 5000 for SDXL), scale 10.
    Its training target is the ReNoise-inverted noise, see :func:`epsilon_from_x0`.
    Metrics as :func:`diffusion_dpo_loss` (``implicit_acc`` = mean(inside > 0), ties 0) plus ``preference``.
    """
    size = _check_batch(model_mse_w=model_mse_w, model_mse_l=model_mse_l, ref_mse_w=ref_mse_w, ref_mse_l=ref_mse_l)
    _check_positive(beta=beta, scale=scale)
    p = _per_sample(preference, size, model_mse_w, "preference")
    ref_mse_w, ref_mse_l = ref_mse_w.detach(), ref_mse_l.detach()
    inside = -0.5 * beta * (2.0 * p - 1.0) * scale * ((model_mse_w - model_mse_l) - (ref_mse_w - ref_mse_l))
    metrics = _pair_metrics(inside, model_mse_w, model_mse_l, ref_mse_w, ref_mse_l)
    metrics["preference"] = p.mean()
    return LossOutput(-F.logsigmoid(inside).mean(), metrics)


def epsilon_from_x0(x_t: Tensor, x0: Tensor, alpha_bar_t: float | Tensor) -> Tensor:
    """The noise that maps ``x0`` to ``x_t``: ``ε̂ = (x_t − √ᾱ_t·x0)/√(1 − ᾱ_t)``.

    SmPO's ReNoise target (JaydenLyh/SmPO ``train.py``: ``(noisy_latents − start_latents·ᾱ^½)/(1 − ᾱ)^½``
    after DDIM inversion). ``alpha_bar_t`` is a float, a 0-d tensor or per-sample ``[B]`` (broadcast over the
    non-batch dims). Differentiable in every input.
    """
    if x_t.shape != x0.shape:
        raise ValueError(f"x_t {tuple(x_t.shape)} and x0 {tuple(x0.shape)} differ in shape")
    alpha = _left_broadcast(alpha_bar_t, x_t, "alpha_bar_t")
    return (x_t - alpha.sqrt() * x0) / (1.0 - alpha).sqrt()


def adaptive_dpo_loss(
    logits: Tensor,
    ema_logits: Sequence[Tensor],
    beta: float = 1000.0,
    rho: float = 15.0,
    weight_scale: float = 10.0,
    weight_offset: float = 1.0,
    normalize: bool = True,
) -> LossOutput:
    """Adaptive-DPO: Diffusion-DPO reweighted and shifted by a per-pair "minority" (label-noise) score.

    Reference: fanfanffff1/Adaptive-DPO ``dpo_train_un.py`` (``cal_un_wy_wstd``, ``--use_self_logit_reweight
    --use_ema --use_logits_normalization --use_margin --margin_type quadratic --weight_type linear``).

    Inputs: ``logits`` = ``ℓ = d_ref − d_θ`` ``[B]`` of the trained model (:func:`dpo_logits`, differentiable)
    and ``ema_logits``, the same ``ℓ`` from each EMA copy (decay 0.9999 and 0.5 in the reference; their
    ``ℓ`` are detached). With ``M = 1 + len(ema_logits)`` models, all of the following is stop-gradient:

    1. ``z_k = ρ · ℓ_k / ‖ℓ_k‖₂`` — each model's ``ℓ`` L2-normalised over the batch (``normalize``; a zero
       vector stays zero instead of dividing by 0), times ρ = 15.
    2. ``s_b = min(std_k z_k,b, 1)`` — the std across the M models is the UNBIASED one (``torch.std`` default,
       divisor M − 1, as the reference's ``logit.std(dim=0)``).
    3. ``m_b = mean_k σ(z_k,b)``; minority score ``u_b = |m_b − 1|·s_b``.
    4. weight ``w_b = 1/(weight_scale·u_b + weight_offset)`` = ``1/(10·u_b + 1)``;
       margin ``m = mean_b sg(ℓ_b) − u_b²/β`` (the batch mean of the trained model's un-normalised ``ℓ``).

    Loss ``L = −mean_b[w_b · log σ(β·ℓ_b − m)]``, β = 1000. β multiplies ``ℓ`` directly (the diffusers
    convention, no ½). Only ``β·ℓ_b`` carries gradient. With no EMA logits (the reference's warm-up steps,
    before the EMA copies are used) ``u = 0``: ``w = 1`` and ``m = mean sg(ℓ)``.

    Metrics: ``implicit_acc`` = mean(ℓ > 0), ``weight`` (mean w), ``minority`` (mean u), ``margin``
    (mean over pairs of ``m``), ``model_std`` (mean s); ``weights`` and ``minority_scores`` are the ``[B]``
    vectors.
    """
    size = _check_batch(logits=logits)
    _check_positive(beta=beta, rho=rho)
    ema = [e.detach() for e in ema_logits]
    for index, other in enumerate(ema):
        if other.shape != (size,):
            raise ValueError(f"ema_logits[{index}] has shape {tuple(other.shape)}, expected ({size},)")
    current = logits.detach()
    if ema:
        stacked = torch.stack([current, *[e.to(current.dtype) for e in ema]])  # [M, B]
        if normalize:
            norm = stacked.norm(dim=1, keepdim=True)
            stacked = stacked / torch.where(norm > 0, norm, torch.ones_like(norm))
        stacked = stacked * rho
        spread = stacked.std(dim=0).clamp(max=1.0)
        minority = (torch.sigmoid(stacked).mean(dim=0) - 1.0).abs() * spread
    else:
        spread = torch.zeros_like(current)
        minority = torch.zeros_like(current)
    weights = 1.0 / (weight_scale * minority + weight_offset)
    margin = current.mean() - minority.pow(2) / beta
    loss = -(weights * F.logsigmoid(beta * logits - margin)).mean()
    metrics = {
        "implicit_acc": _fraction(current > 0, current),
        "weight": weights.mean(),
        "minority": minority.mean(),
        "margin": margin.mean(),
        "model_std": spread.mean(),
        "weights": weights,
        "minority_scores": minority,
    }
    return LossOutput(loss, metrics)


# ----------------------------------------------------------------------------------------------------------
# Diffusion-KTO (unpaired binary feedback)
# ----------------------------------------------------------------------------------------------------------
def diffusion_kto_loss(
    model_mse: Tensor,
    ref_mse: Tensor,
    desirable: Tensor,
    beta: float = 1000.0,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
    kl: Tensor | float | None = None,
) -> LossOutput:
    """Diffusion-KTO (Li et al. 2024, "Aligning Diffusion Models by Optimizing Human Utility").

    Reference: jacklishufan/diffusion-kto ``train_kto_sd_v1.5.py`` (``--loss kto --halo sigmoid``). Unpaired:
    each sample has its own noise and timestep and a binary label ``desirable`` ``[B]`` (bool or 0/1).

    * per-sample ``g = −(mse_θ − sg mse_ref)`` (the reference's ``policy_KL_logps − reference_KL_logps``) and
      implicit reward ``r = β·g`` with β = 1000 (the script's ``--beta_dpo`` default; no ½);
    * reference point ``z0 = β · sg(max(mean_batch g, 0))`` — the batch mean of ``g`` over ALL samples
      (desirable and undesirable), clamped at 0 and detached (the script's ``kl``, its eq. 8; it all-reduces the
      mean across processes first: pass that global mean of ``g`` as ``kl`` to reproduce multi-GPU runs; it is
      clamped and detached here too);
    * desirable: ``λ_D·(1 − σ(r − z0))``; undesirable: ``λ_U·(1 − σ(z0 − r))``; the loss is the batch mean.
      λ_D = λ_U = 1.

    Metrics: ``implicit_acc`` = mean(sign·(r − z0) > 0), ``kl`` (the clamped mean of g), ``reward_desirable`` /
    ``reward_undesirable`` (mean ``g`` of each group, 0 when a group is empty), ``desirable_fraction``.
    """
    size = _check_batch(model_mse=model_mse, ref_mse=ref_mse, desirable=desirable)
    _check_positive(beta=beta)
    label = desirable.to(device=model_mse.device).bool()
    g = -(model_mse - ref_mse.detach())
    kl_estimate = g.detach().mean() if kl is None else torch.as_tensor(kl, device=g.device, dtype=g.dtype)
    kl_estimate = kl_estimate.detach().clamp(min=0.0)
    sign = torch.where(label, 1.0, -1.0).to(g.dtype)
    h = torch.sigmoid(sign * beta * (g - kl_estimate))
    weight = torch.where(label, lambda_d, lambda_u).to(g.dtype)
    loss = (weight * (1.0 - h)).mean()
    g_detached = g.detach()
    n_desirable = label.sum()
    n_undesirable = size - n_desirable
    metrics = {
        "implicit_acc": _fraction(sign * (g_detached - kl_estimate) > 0, g),
        "kl": kl_estimate,
        "reward_desirable": torch.where(label, g_detached, 0.0).sum() / n_desirable.clamp(min=1),
        "reward_undesirable": torch.where(label, 0.0, g_detached).sum() / n_undesirable.clamp(min=1),
        "desirable_fraction": _fraction(label, g),
    }
    return LossOutput(loss, metrics)
