"""Every training objective of mmalign as a pure function of tensors.

No modules, no I/O, no global state: each function takes the per-sample quantities a trainer computed (per-sample
MSEs, per-step log-probabilities, rewards) and returns a :class:`LossOutput` (the scalar loss plus detached
metrics) or a tensor. Each function is its own objective, with its reference and defaults in its docstring; no
string switch over families.

Conventions shared by every function here:

* "mean" over a sample is the mean over all non-batch elements (C·H·W, and frames for video), exactly as the
  references reduce: their betas and clip ranges were tuned against means, and a sum would change them by the
  element count. :func:`per_sample_mse` gives that reduction; log-probabilities come from
  :func:`ddim_step_log_prob`, which also averages over non-batch elements.
* Paired inputs are 1-D tensors ``[B]`` with the winner ("w", preferred) and loser ("l") of pair ``b`` at the same
  index. The losses are means over the batch.
* Reference-model quantities (``ref_*``) and sampling-time quantities (``old_logp``) are detached inside the
  function (stop-gradient), whatever the caller passes; each docstring names every other stop-gradient.
* Metrics in :attr:`LossOutput.metrics` are detached tensors (scalars unless stated).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SMPO_SCORE_HIGH",
    "SMPO_SCORE_LOW",
    "DDIMLogProb",
    "LossOutput",
    "adaptive_dpo_loss",
    "alignprop_aesthetic_loss",
    "beta_from_diffusers",
    "d3po_loss",
    "ddim_step_log_prob",
    "ddpo_ppo_loss",
    "flow_grpo_loss",
    "diffusion_dpo_loss",
    "diffusion_kto_loss",
    "dpo_logits",
    "draft_loss",
    "epsilon_from_x0",
    "group_advantages",
    "per_sample_mse",
    "refl_loss",
    "sft_loss",
    "smpo_loss",
    "smpo_preference",
    "target_distance_loss",
]


# ----------------------------------------------------------------------------------------------------------
# Output type and small helpers
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossOutput:
    """A scalar ``loss`` (differentiable) and named ``metrics`` (detached; read-only mapping).

    Metrics can also be read as attributes: ``out.implicit_acc`` is ``out.metrics["implicit_acc"]``.
    """

    loss: Tensor
    metrics: Mapping[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        detached = {name: value.detach() for name, value in self.metrics.items()}
        object.__setattr__(self, "metrics", MappingProxyType(detached))

    def __getattr__(self, name: str) -> Tensor:
        metrics = self.__dict__.get("metrics")
        if metrics is not None and name in metrics:
            return metrics[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or metric {name!r}")

    def scalars(self) -> dict[str, float]:
        """``loss`` and every metric (means of any non-scalar metric) as Python floats, for logging."""
        out = {"loss": float(self.loss.detach().float())}
        out.update({name: float(value.float().mean()) for name, value in self.metrics.items()})
        return out


def _check_batch(**tensors: Tensor) -> int:
    """All tensors 1-D of the same length; returns that length."""
    size = None
    for name, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.ndim != 1:
            raise ValueError(f"{name} must be a 1-D per-sample tensor [B], got shape {tuple(tensor.shape)}")
        if size is None:
            size = tensor.shape[0]
        elif tensor.shape[0] != size:
            shapes = ", ".join(f"{key}={tuple(value.shape)}" for key, value in tensors.items())
            raise ValueError(f"per-sample tensors have different batch sizes: {shapes}")
    if not size:
        raise ValueError("empty batch: every per-sample tensor has length 0")
    return size


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def _per_sample(value: float | Tensor, size: int, like: Tensor, name: str) -> Tensor:
    """A float or a tensor of shape [] / [B] -> a detached tensor [B] on ``like``'s device and dtype."""
    tensor = torch.as_tensor(value, device=like.device, dtype=like.dtype).detach()
    if tensor.ndim == 0:
        return tensor.expand(size)
    if tensor.shape != (size,):
        raise ValueError(f"{name} must be a scalar or shape ({size},), got {tuple(tensor.shape)}")
    return tensor


def _left_broadcast(value: float | Tensor, like: Tensor, name: str) -> Tensor:
    """A float, a 0-d tensor or a per-sample tensor ``[B]`` -> shaped to broadcast against ``like`` [B, ...]."""
    tensor = torch.as_tensor(value, device=like.device, dtype=like.dtype)
    if tensor.ndim == 0:
        return tensor
    if tensor.ndim != 1 or tensor.shape[0] != like.shape[0]:
        raise ValueError(
            f"{name} must be a scalar or a per-sample tensor [{like.shape[0]}], got shape {tuple(tensor.shape)}"
        )
    return tensor.reshape(tensor.shape + (1,) * (like.ndim - 1))


def _fraction(mask: Tensor, like: Tensor) -> Tensor:
    """Mean of a boolean mask, in ``like``'s floating dtype (at least float32)."""
    return mask.to(_compute_dtype(like)).mean()


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """At least float32: the references cast model outputs with ``.float()`` before reducing."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


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


# ----------------------------------------------------------------------------------------------------------
# Reward backpropagation (ReFL, DRaFT, AlignProp)
# ----------------------------------------------------------------------------------------------------------
def refl_loss(rewards: Tensor, target: float = 2.0, scale: float = 1e-3) -> LossOutput:
    """ReFL (Xu et al. 2023, "ImageReward"): ``L = mean relu(target − r)·scale``.

    Reference: THUDM/ImageReward ``ReFL.py`` (``F.relu(-rewards + 2)``, ``.mean() * args.grad_scale``,
    ``grad_scale`` 1e-3), ``rewards`` ``[B]`` from ImageReward on the predicted x0 (differentiable).
    Metrics: ``reward`` (mean).
    """
    _check_batch(rewards=rewards)
    return LossOutput(F.relu(target - rewards).mean() * scale, {"reward": rewards.mean()})


def target_distance_loss(rewards: Tensor, target: float, scale: float = 0.01) -> LossOutput:
    """AlignProp-style distance to a target reward: ``L = mean |r − target|·scale``.

    Reference: mihirp1998/AlignProp (``aesthetic_loss_fn``: ``|aesthetic − 10|``, ``hps_loss_fn``:
    ``1 − hps``, which is ``|hps − 1|`` for cosine scores ≤ 1; ``loss_coeff`` 0.01). Metrics: ``reward``.
    """
    _check_batch(rewards=rewards)
    return LossOutput((rewards - target).abs().mean() * scale, {"reward": rewards.mean()})


def alignprop_aesthetic_loss(rewards: Tensor, target: float = 10.0, scale: float = 0.01) -> LossOutput:
    """AlignProp's aesthetic objective ``0.01·mean |aesthetic − 10|`` (:func:`target_distance_loss`)."""
    return target_distance_loss(rewards, target=target, scale=scale)


def draft_loss(rewards: Tensor, scale: float = 1.0) -> LossOutput:
    """DRaFT (Clark et al. 2024, "Directly Fine-Tuning Diffusion Models on Differentiable Rewards"):
    maximise the reward, ``L = −mean(r)·scale``. No official code; the truncation (DRaFT-K, DRaFT-LV) lives
    in the sampler, not in the loss. Metrics: ``reward``."""
    _check_batch(rewards=rewards)
    return LossOutput(-rewards.mean() * scale, {"reward": rewards.mean()})


# ----------------------------------------------------------------------------------------------------------
# GRPO family on flow-matching samplers (Flow-GRPO)
# ----------------------------------------------------------------------------------------------------------
def group_advantages(
    rewards: Tensor,
    group_ids: Tensor | Sequence[object],
    global_std: bool = True,
    eps: float = 1e-4,
) -> Tensor:
    """Group-relative advantages of Flow-GRPO: each reward minus its group's (prompt's) mean, over a std.

    Reference: yifan123/flow_grpo ``flow_grpo/stat_tracking.py`` (``PerPromptStatTracker.update``, type
    ``'grpo'``, commit ac4c86e8cae021841f1fde853d340e0db67690dd), as ``scripts/train_sd3.py`` uses it (cleared
    after every epoch, so the statistics are those of this batch alone):

        A_i = (r_i − mean_{g(i)}) / (std + eps),   std = population std (ddof 0) of all ``rewards`` when
        ``global_std`` (the default, ``config.sample.global_std = True``), else of group g(i)'s rewards,

    eps = 1e-4. ``rewards`` ``[N]`` (every process's rewards, gathered); ``group_ids`` ``[N]``: a tensor of ints or
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
    if global_std:
        std = (values - values.mean()).pow(2).mean().sqrt()
    else:
        squares = torch.zeros_like(counts).index_add_(0, inverse, (values - group_mean).pow(2))
        std = (squares / counts).sqrt()[inverse]
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
