"""Flow-matching sampler steps with per-step Gaussian log-probabilities (Flow-GRPO SDE, CPS, Euler ODE).

Notation of diffusers' ``FlowMatchEulerDiscreteScheduler``: ``sigmas`` run from 1 (noise) to 0, the forward
process is ``x_σ = (1 − σ)·x0 + σ·ε`` and the model predicts the velocity ``v = ε − x0``. One step goes from
``sigma`` to ``sigma_prev`` (< ``sigma``) with ``dt = sigma_prev − sigma < 0``.

References (formulas re-derived here, no code taken):

* Flow-GRPO SDE: yifan123/flow_grpo ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``,
  ``sde_step_with_logprob``, at commit ac4c86e8cae021841f1fde853d340e0db67690dd (Liu et al. 2025, "Flow-GRPO:
  Training Flow Matching Models via Online RL").
* CPS (coefficients-preserving sampling, Wang & Yu 2025): flow_grpo's ``sde_type='cps'`` branch of the same
  function in its later versions (absent from the commit above), as summarised in the project's
  ``REFERENCES.md``.
* DanceGRPO's SDE (:func:`dance_sde_step`): XueZeyue/DanceGRPO ``fastvideo/train_grpo_flux.py``, ``flux_step``
  (lines 131-171), at commit 15cc71d53cc2e6e18a68ee607d5fb6ba9a99e344 (Xue et al. 2025, "DanceGRPO").
* DPM-Solver++(2M) for flow matching (:func:`flow_dpm2_step`), the ODE solver MixGRPO-Flash uses after the SDE
  window: Tencent-Hunyuan/MixGRPO ``fastvideo/utils/sampling_utils.py`` (``dpm_step``,
  ``dpm_solver_first_order_update``, ``multistep_dpm_solver_second_order_update``, lines 273-561), at commit
  e5cdd6a427778d8c8b2e7a48ce16972141adbe7c (Li et al. 2025, "MixGRPO"); the update itself is Lu et al. 2022,
  "DPM-Solver++", with α = 1 − σ.

Every function is pure (tensors in, tensors out), computed in at least float32 (the reference casts to fp32
because bf16 overflows in the mean), and accepts ``sigma`` / ``sigma_prev`` as floats, 0-d tensors or
per-sample tensors ``[B]`` (each trajectory may be at another step). Log-probabilities are means over all
non-batch elements, as the reference reduces (its clip range and β were tuned against means). The sampled
``prev_sample`` is detached inside the log-density (stop-gradient, as the reference): gradients reach only the
mean, through ``v`` (and ``x`` if it requires grad).

Parity: ``benchmarks/parity_flow_grpo.py`` runs flow_grpo's own ``sde_step_with_logprob`` (commit ac4c86e, loaded
from its file with diffusers 0.42.1, torch 2.14.1 CPU) against :func:`flow_sde_step` on fixed random fp32
tensors (``[4, 16, 32, 32]``) over all 10 steps of a shift-3 schedule, sampling with the same draw and
re-evaluating a recorded sample under another velocity: max |Δ| = 0 (bitwise equal) for prev_sample, log_prob,
mean and std alike. ``benchmarks/parity_grpo_family.py`` runs DanceGRPO's ``flux_step`` (commit 15cc71d, cut
out of its training script) against :func:`dance_sde_step` (16 steps, shift 3, η 0.3, same draws; sampling and
evaluation): max |Δ| 3.6e-7 (fp32) for prev_sample and log_prob; and MixGRPO's DPM-Solver++ updates (commit
e5cdd6a) against :func:`flow_dpm2_step`: max |Δ| 4.8e-7 (first and second order, midpoint and heun), 4.2e-7 on
whole MixGRPO-Flash chains (``run_sample_step``, 25 steps). ``tests/models/test_flow_sampling.py`` also matches
:func:`flow_dpm2_step` to diffusers' ``DPMSolverMultistepScheduler`` (flow sigmas, 2M midpoint) within 5e-6.

Nothing here imports ``mmalign.trainers`` (sampler math lives in models; losses consume log-probs).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["DPMStep", "FlowStep", "cps_step", "dance_sde_step", "flow_dpm2_step", "flow_ode_step", "flow_sde_step"]

_LOG_SQRT_2PI = math.log(math.sqrt(2.0 * math.pi))


class FlowStep(NamedTuple):
    """One stochastic step: the sample ``prev_sample`` (shaped like ``x``), its ``log_prob`` ``[B]``, the Gaussian
    ``mean`` (shaped like ``x``) and ``std`` (broadcastable to ``x``: 0-d or ``[B, 1, ..., 1]``); what ``std``
    means depends on the sampler (see :func:`flow_sde_step` and :func:`cps_step`)."""

    prev_sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor


def _dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _sigma(value: float | Tensor, like: Tensor, name: str) -> Tensor:
    """A float, a 0-d tensor or a per-sample ``[B]`` tensor -> broadcastable against ``like`` ``[B, ...]``."""
    tensor = torch.as_tensor(value, device=like.device).to(like.dtype)
    if tensor.ndim == 0:
        return tensor
    if tensor.ndim != 1 or tensor.shape[0] != like.shape[0]:
        raise ValueError(f"{name} must be a scalar or a per-sample tensor [{like.shape[0]}], got {tuple(tensor.shape)}")
    return tensor.reshape(tensor.shape + (1,) * (like.ndim - 1))


def _prepare(x: Tensor, v: Tensor, noise: Tensor | None, prev_sample: Tensor | None) -> tuple:
    if x.shape != v.shape:
        raise ValueError(f"x {tuple(x.shape)} and v {tuple(v.shape)} must have the same shape")
    if x.ndim < 2:
        raise ValueError(f"x must be batched [B, ...], got shape {tuple(x.shape)}")
    for name, other in (("noise", noise), ("prev_sample", prev_sample)):
        if other is not None and other.shape != x.shape:
            raise ValueError(f"{name} {tuple(other.shape)} must have the shape of x {tuple(x.shape)}")
    dtype = _dtype(x, v)
    return x.to(dtype), v.to(dtype)


def _sample(
    mean: Tensor, scale: Tensor, noise: Tensor | None, generator: torch.Generator | None, recorded: Tensor | None
) -> Tensor:
    """``recorded`` when given (evaluation only), else ``mean + scale·z`` with ``z`` = ``noise`` or a fresh draw."""
    if recorded is not None:
        return recorded.to(mean.dtype)
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device="cpu")
    return mean + scale * noise.to(device=mean.device, dtype=mean.dtype)


def _mean_over_sample(values: Tensor) -> Tensor:
    return values.mean(dim=tuple(range(1, values.ndim)))


def flow_ode_step(x: Tensor, v: Tensor, sigma: float | Tensor, sigma_prev: float | Tensor) -> Tensor:
    """Euler ODE step ``x_prev = x + v·(σ_prev − σ)`` of diffusers' ``FlowMatchEulerDiscreteScheduler.step``
    (``stochastic_sampling`` off), in at least float32."""
    x, v = _prepare(x, v, None, None)
    return x + v * (_sigma(sigma_prev, x, "sigma_prev") - _sigma(sigma, x, "sigma"))


def flow_sde_step(
    x: Tensor,
    v: Tensor,
    sigma: float | Tensor,
    sigma_prev: float | Tensor,
    noise_level: float = 0.7,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    sigma_max: float | None = None,
    generator: torch.Generator | None = None,
) -> FlowStep:
    """Flow-GRPO's SDE step ``x → x_prev`` and its Gaussian log-probability.

    Reference: yifan123/flow_grpo ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`` (``sde_step_with_logprob``,
    commit ac4c86e8cae021841f1fde853d340e0db67690dd); with ``dt = σ_prev − σ``:

        std_t  = noise_level·√(σ / (1 − σ')),   σ' = sigma_max where σ = 1, else σ
        mean   = x·(1 + std_t²/(2σ)·dt) + v·(1 + std_t²·(1 − σ)/(2σ))·dt
        x_prev = mean + std_t·√(−dt)·z,   z ~ N(0, I)
        log p  = mean over non-batch elements of [−(x_prev − mean)²/(2·s²) − log s − log √(2π)],  s = std_t·√(−dt)

    ``sigma_max`` is the scheduler's ``sigmas[1]`` (the reference's replacement for σ = 1, where √(σ/(1 − σ))
    is infinite); it is required when some σ equals 1. ``noise_level`` 0.7 is the reference default; 0 gives
    the Euler ODE step (:func:`flow_ode_step`) and a log-probability that is not finite (no density).

    ``noise`` (z, shaped like ``x``) is used when given, else drawn from ``generator`` (on the CPU, then moved).
    Given ``prev_sample``, no step is taken: only its log-probability under this step is evaluated (as when the
    trainer recomputes the log-prob of a recorded trajectory under the current or reference model).

    Returns :class:`FlowStep`; its ``std`` is the reference's ``std_dev_t`` (= std_t, before the √(−dt)
    factor; the transition's standard deviation is ``std·√(−dt)``), broadcastable to ``x``, which is the
    denominator of Flow-GRPO's KL term (``flow_grpo_loss`` in :mod:`mmalign.trainers.losses`).
    """
    x, v = _prepare(x, v, noise, prev_sample)
    sig = _sigma(sigma, x, "sigma")
    sig_prev = _sigma(sigma_prev, x, "sigma_prev")
    if bool((sig <= sig_prev).any()) or bool((sig <= 0).any()) or bool((sig > 1).any()):
        raise ValueError("flow_sde_step needs 0 < sigma <= 1 and sigma_prev < sigma")
    at_one = sig == 1
    if bool(at_one.any()):
        if sigma_max is None:
            raise ValueError("sigma == 1 needs sigma_max (the scheduler's sigmas[1]) for the SDE's std")
        if not 0.0 < sigma_max < 1.0:
            raise ValueError(f"sigma_max must be in (0, 1), got {sigma_max}")
        denominator_sigma = torch.where(at_one, torch.as_tensor(sigma_max, dtype=x.dtype, device=x.device), sig)
    else:
        denominator_sigma = sig
    dt = sig_prev - sig
    std_t = torch.sqrt(sig / (1.0 - denominator_sigma)) * noise_level
    var_t = std_t.pow(2)
    mean = x * (1.0 + var_t / (2.0 * sig) * dt) + v * (1.0 + var_t * (1.0 - sig) / (2.0 * sig)) * dt
    step_std = std_t * torch.sqrt(-dt)
    prev_sample = _sample(mean, step_std, noise, generator, prev_sample)
    log_prob = -(prev_sample.detach() - mean).pow(2) / (2.0 * step_std.pow(2)) - torch.log(step_std) - _LOG_SQRT_2PI
    return FlowStep(prev_sample, _mean_over_sample(log_prob), mean, std_t)


def cps_step(
    x: Tensor,
    v: Tensor,
    sigma: float | Tensor,
    sigma_prev: float | Tensor,
    noise_level: float = 0.7,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> FlowStep:
    """Coefficients-preserving sampling (CPS; Wang & Yu 2025, "Coefficients-Preserving Sampling for
    Reinforcement Learning with Flow Matching"), flow_grpo's ``sde_type='cps'``.

    Reference: flow_grpo ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``, ``cps`` branch (added after commit
    ac4c86e; formulas as recorded in the project's REFERENCES.md):

        std_t  = σ_prev·sin(noise_level·π/2)
        x̂0     = x − σ·v,   x̂1 = x + (1 − σ)·v
        mean   = x̂0·(1 − σ_prev) + x̂1·√(σ_prev² − std_t²)
        x_prev = mean + std_t·z
        log p  = −mean over non-batch elements of (x_prev − mean)²   (constants and the 1/(2·std_t²) dropped)

    The noise coefficients preserve the marginal: ``(√(σ_prev² − std_t²))² + std_t² = σ_prev²``, so ``x_prev``
    has the forward process's noise level σ_prev when x̂0 and x̂1 are exact. The log-probability is the
    reference's surrogate (its ratio ``exp(log p − log p_old)`` is what the PPO clip sees); it is not a
    normalised density. ``std`` in the output is std_t itself (the transition's standard deviation).
    ``noise``, ``prev_sample`` and ``generator`` as in :func:`flow_sde_step`.
    """
    x, v = _prepare(x, v, noise, prev_sample)
    sig = _sigma(sigma, x, "sigma")
    sig_prev = _sigma(sigma_prev, x, "sigma_prev")
    if bool((sig <= sig_prev).any()) or bool((sig_prev < 0).any()) or bool((sig > 1).any()):
        raise ValueError("cps_step needs 0 <= sigma_prev < sigma <= 1")
    std_t = sig_prev * math.sin(noise_level * math.pi / 2.0)
    x0_hat = x - sig * v
    x1_hat = x + (1.0 - sig) * v
    mean = x0_hat * (1.0 - sig_prev) + x1_hat * torch.sqrt(sig_prev.pow(2) - std_t.pow(2))
    prev_sample = _sample(mean, std_t, noise, generator, prev_sample)
    log_prob = -(prev_sample.detach() - mean).pow(2)
    return FlowStep(prev_sample, _mean_over_sample(log_prob), mean, std_t)


def dance_sde_step(
    x: Tensor,
    v: Tensor,
    sigma: float | Tensor,
    sigma_prev: float | Tensor,
    eta: float = 0.3,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> FlowStep:
    """DanceGRPO's SDE step ``x → x_prev`` and its Gaussian log-probability.

    Reference: XueZeyue/DanceGRPO ``fastvideo/train_grpo_flux.py``, ``flux_step`` with ``grpo=True,
    sde_solver=True`` (lines 131-171, commit 15cc71d); with ``dt = σ_prev − σ`` (< 0) and x̂0 = x − σ·v:

        score  = −(x − (1 − σ)·x̂0) / σ²
        mean   = x + v·dt − ½·η²·score·dt
        x_prev = mean + η·√(−dt)·z,   z ~ N(0, I)
        log p  = mean over non-batch elements of [−(x_prev − mean)²/(2·s²) − log s − log √(2π)],  s = η·√(−dt)

    Written with ε̂ = x + (1 − σ)·v (so that x − (1 − σ)·x̂0 = σ·ε̂) the mean is
    ``x + v·dt + η²/(2σ)·ε̂·dt``: the form of :func:`flow_sde_step` (``x + v·dt + std_t²/(2σ)·ε̂·dt``) with a
    *constant* diffusion coefficient η in place of Flow-GRPO's ``noise_level·√(σ/(1 − σ))``. The two steps are
    therefore different: equal only where ``noise_level²·σ/(1 − σ) = η²``; DanceGRPO's noise does not blow up
    at σ → 1 (no ``sigma_max`` needed) and is the same at every σ. DanceGRPO's default ``eta`` is 0.3
    (``scripts/finetune/finetune_flux_grpo.sh``).

    Needs ``0 ≤ σ_prev < σ ≤ 1`` and σ > 0; σ_prev = 0 (the last step) is allowed. ``noise``, ``prev_sample``
    and ``generator`` as in :func:`flow_sde_step`. Returns :class:`FlowStep` whose ``std`` is η (a 0-d tensor,
    the analogue of Flow-GRPO's ``std_dev_t``; the transition's standard deviation is ``std·√(−dt)``).

    DanceGRPO adds the constants ``−log s − log √(2π)`` inside the mean (they cancel in the PPO ratio since s
    does not depend on the model); MixGRPO's copy (``dance_grpo_step``, ``sampling_utils.py`` lines 212-253)
    leaves them on a separate statement, so its log-probability lacks them. This function includes them.
    """
    x, v = _prepare(x, v, noise, prev_sample)
    sig = _sigma(sigma, x, "sigma")
    sig_prev = _sigma(sigma_prev, x, "sigma_prev")
    if bool((sig <= sig_prev).any()) or bool((sig_prev < 0).any()) or bool((sig > 1).any()):
        raise ValueError("dance_sde_step needs 0 <= sigma_prev < sigma <= 1")
    if not eta > 0:
        raise ValueError(f"dance_sde_step needs eta > 0 (no density at {eta}); use flow_ode_step")
    dt = sig_prev - sig
    x0_hat = x - sig * v
    score = -(x - (1.0 - sig) * x0_hat) / sig.pow(2)
    mean = x + v * dt - 0.5 * eta**2 * score * dt
    step_std = eta * torch.sqrt(-dt)
    prev_sample = _sample(mean, step_std, noise, generator, prev_sample)
    log_prob = -(prev_sample.detach() - mean).pow(2) / (2.0 * step_std.pow(2)) - torch.log(step_std) - _LOG_SQRT_2PI
    return FlowStep(
        prev_sample, _mean_over_sample(log_prob), mean, torch.as_tensor(eta, dtype=x.dtype, device=x.device)
    )


class DPMStep(NamedTuple):
    """One deterministic DPM-Solver++ step: ``prev_sample`` (shaped like ``x``) and ``x0``, the data prediction
    ``x − σ·v`` at this step, which the next step takes as ``prev_x0``."""

    prev_sample: Tensor
    x0: Tensor


def _half_log_snr(sigma: Tensor) -> Tensor:
    """λ = log(α/σ) with α = 1 − σ (−inf at σ = 1, +inf at σ = 0)."""
    return torch.log(1.0 - sigma) - torch.log(sigma)


def flow_dpm2_step(
    x: Tensor,
    v: Tensor,
    sigma: float | Tensor,
    sigma_prev: float | Tensor,
    prev_x0: Tensor | None = None,
    sigma_before: float | Tensor | None = None,
    solver_type: str = "midpoint",
) -> DPMStep:
    """Deterministic multistep DPM-Solver++(2M) step ``x`` at σ → ``x_prev`` at σ_prev for flow matching, as
    MixGRPO-Flash takes after its SDE window.

    Reference: MixGRPO ``fastvideo/utils/sampling_utils.py`` ``dpm_step`` with ``dpm_algorithm_type='dpmsolver++'``,
    ``dpm_solver_order=2``, ``sde_solver=False`` (lines 273-385), ``dpm_solver_first_order_update`` (398-447)
    and ``multistep_dpm_solver_second_order_update`` (449-561), commit e5cdd6a. Re-derived with α = 1 − σ,
    λ = log(α/σ), data prediction x̂0 = x − σ·v, ``h = λ(σ_prev) − λ(σ)``:

        first order:  x_prev = (σ_prev/σ)·x − α_prev·(e^{−h} − 1)·x̂0          (= the Euler step, exactly)
        second order: D0 = x̂0,  r = (λ(σ) − λ(σ_before))/h,  D1 = (x̂0 − prev_x0)/r
            midpoint: x_prev = (σ_prev/σ)·x − α_prev·(e^{−h} − 1)·(D0 + ½·D1)
            heun:     x_prev = (σ_prev/σ)·x − α_prev·(e^{−h} − 1)·D0 + α_prev·((e^{−h} − 1)/h + 1)·D1

    ``prev_x0`` is the previous step's data prediction (:attr:`DPMStep.x0`, or ``x − σ_before·v`` of an SDE or
    Euler step: MixGRPO feeds the history from the window's steps too), made at ``sigma_before`` (> σ). Without
    it the step is first order (the reference's first step). At ``sigma_prev == 0`` the step is first order
    and returns x̂0 (the reference's ``lower_order_final``: its 2nd-order update is not finite there).
    MixGRPO's scripts use ``solver_type='midpoint'`` (its argparse default is 'heun').

    Computed in at least float32; ``sigma``, ``sigma_prev``, ``sigma_before`` are floats, 0-d or per-sample
    ``[B]`` tensors. Needs ``0 ≤ σ_prev < σ < σ_before ≤ 1`` and σ < 1 (λ is −inf at σ = 1; the reference
    never takes a DPM step from σ = 1 after a window).
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    x, v = _prepare(x, v, None, prev_x0)
    sig = _sigma(sigma, x, "sigma")
    sig_prev = _sigma(sigma_prev, x, "sigma_prev")
    if bool((sig <= sig_prev).any()) or bool((sig_prev < 0).any()) or bool((sig >= 1).any()):
        raise ValueError("flow_dpm2_step needs 0 <= sigma_prev < sigma < 1")
    if (prev_x0 is None) != (sigma_before is None):
        raise ValueError("prev_x0 and sigma_before go together (the previous step's data prediction and its sigma)")
    x0 = x - sig * v
    alpha_prev = 1.0 - sig_prev
    # e^{−h} = (σ_prev·α)/(α_prev·σ): finite everywhere, 0 at σ_prev = 0
    exp_neg_h = sig_prev * (1.0 - sig) / (alpha_prev * sig)
    first = (sig_prev / sig) * x - alpha_prev * (exp_neg_h - 1.0) * x0
    if prev_x0 is None:
        return DPMStep(first, x0)
    sig_before = _sigma(sigma_before, x, "sigma_before")
    if bool((sig_before <= sig).any()) or bool((sig_before > 1).any()):
        raise ValueError("flow_dpm2_step needs sigma < sigma_before <= 1")
    final = sig_prev == 0
    # at σ_prev = 0 the second-order terms are not finite: compute them at a harmless σ_prev and discard them
    safe_prev = torch.where(final, sig / 2.0, sig_prev)
    lam = _half_log_snr(sig)
    h = _half_log_snr(safe_prev) - lam
    ratio = (lam - _half_log_snr(sig_before)) / h  # r; +inf when σ_before = 1 (D1 = 0 then)
    d1 = (x0 - prev_x0.to(x.dtype)) / ratio
    safe_alpha = 1.0 - safe_prev
    safe_exp = torch.exp(-h)
    base = (safe_prev / sig) * x - safe_alpha * (safe_exp - 1.0) * x0
    if solver_type == "midpoint":
        second = base - 0.5 * safe_alpha * (safe_exp - 1.0) * d1
    else:
        second = base + safe_alpha * ((safe_exp - 1.0) / h + 1.0) * d1
    return DPMStep(torch.where(final, first, second), x0)
