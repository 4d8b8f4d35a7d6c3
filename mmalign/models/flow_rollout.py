"""Flow-matching rollouts for the GRPO family (Flow-GRPO, Flow-GRPO-Fast, MixGRPO, DanceGRPO) on any
:class:`mmalign.models.generator.Generator`.

:func:`sample_flow_trajectories` walks the generator's sampling schedule without gradients, with classifier-free
guidance, taking Flow-GRPO's SDE step (:func:`mmalign.models.flow_sampling.flow_sde_step`), CPS
(:func:`mmalign.models.flow_sampling.cps_step`) or DanceGRPO's SDE (:func:`mmalign.models.flow_sampling.dance_sde_step`,
``noise_level`` playing its η) inside an SDE window and the Euler ODE step
(:func:`mmalign.models.flow_sampling.flow_ode_step`) elsewhere, and records every latent and every SDE step's
log-probability in a :class:`FlowTrajectory`. :func:`flow_step_log_prob` recomputes one recorded step's
log-probability (and the Gaussian's mean and std, for the KL term) under a model, with gradients: the policy
ratio of the PPO-clipped loss and the reference term.

Randomness: the initial latents and each step's noise are drawn from one CPU ``torch.Generator`` for the *global*
batch (``global_batch`` rows) and rows ``[offset, offset + B)`` are kept (as :mod:`mmalign.models.sampling`
does for DDIM), so a multi-process run draws exactly what one process would. Noise is drawn at every step, ODE
steps included, so that step ``j``'s noise does not depend on the SDE window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .flow_generator import cfg_branches, cfg_velocity, check_guidance
from .flow_sampling import FlowStep, cps_step, dance_sde_step, flow_dpm2_step, flow_ode_step, flow_sde_step
from .generator import Conditions, Generator, Schedule
from .sampling import _global_randn

__all__ = [
    "FlowTrajectory",
    "flow_step_log_prob",
    "guided_velocity",
    "guided_velocity_and_uncond",
    "sample_flow_trajectories",
    "velocity_with_detached_uncond",
]

SAMPLERS = ("sde", "cps", "dance")


@dataclass
class FlowTrajectory:
    """A batch of ``B`` recorded flow-matching chains of ``T`` steps.

    ``latents [B, T + 1, *latent_shape]`` (``[B, T + 1, C, h, w]``; videos ``[B, T + 1, C, F', h, w]``; detached,
    float32; ``latents[:, 0]`` the initial noise, ``latents[:, -1]`` the final sample), ``log_probs [B, T]`` (0 at
    ODE steps), ``sigmas [T + 1]`` and ``timesteps [T]`` of the schedule, ``sde [T]`` (bool: which steps were
    stochastic), the ``conditions`` (and ``uncond``, the classifier-free guidance branch, ``None`` when
    ``guidance == 1``) that produced them, ``guidance``, ``noise_level`` and ``sampler`` ("sde", "cps" or "dance").
    ``uncond_velocities [B, T, *latent_shape]``: the unconditional branch's velocity at every step, when the
    rollout was asked to keep it (``keep_uncond``), for a training step that detaches that branch under the
    weights that sampled (:func:`flow_step_log_prob` ``reuse_uncond``)."""

    latents: Tensor
    log_probs: Tensor
    sigmas: Tensor
    timesteps: Tensor
    sde: Tensor
    conditions: Conditions
    uncond: Conditions | None
    guidance: float
    noise_level: float
    sampler: str
    uncond_velocities: Tensor | None = None

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def sde_steps(self) -> list[int]:
        """Indices of the stochastic steps (those with a log-probability to train on)."""
        return [int(j) for j in torch.nonzero(self.sde).flatten()]

    @property
    def final(self) -> Tensor:
        """The final latents ``[B, *latent_shape]`` (decode them for the reward)."""
        return self.latents[:, -1]


def guided_velocity(
    generator: Generator,
    model: torch.nn.Module,
    x: Tensor,
    t: Tensor | float,
    conditions: Conditions,
    uncond: Conditions | None,
    guidance: float,
) -> Tensor:
    """The velocity at ``x`` and model timesteps ``t`` (a scalar or per sample ``[B]``) with classifier-free
    guidance ``guidance``: the generator's own ``guided_velocity`` when it has one (the family's pipeline CFG:
    Qwen-Image's norm rescaling, Z-Image's conventions; standard CFG for the others of
    :class:`~mmalign.models.flow_generator.FlowMatchingGenerator`), else ``generator.predict`` on ``conditions``
    when ``guidance == 1`` and ``v_u + g·(v_c − v_u)`` from ONE batched call on ``cat([uncond, conditions])``
    (as the diffusers pipelines batch it)."""
    own = getattr(generator, "guided_velocity", None)
    if own is not None:
        return own(model, x, t, conditions, uncond, guidance)
    return cfg_velocity(generator, model, x, t, conditions, uncond, guidance)


def guided_velocity_and_uncond(
    generator: Generator,
    model: torch.nn.Module,
    x: Tensor,
    t: Tensor | float,
    conditions: Conditions,
    uncond: Conditions | None,
    guidance: float,
) -> tuple[Tensor, Tensor | None]:
    """``(v, v_uncond)``: :func:`guided_velocity` and the unconditional branch it was combined from (``None`` at
    ``guidance == 1``, or for a generator whose own guidance does not expose its branches). The same batched call
    and the same combination as :func:`guided_velocity`, so ``v`` is bitwise the same."""
    if guidance == 1.0:
        return guided_velocity(generator, model, x, t, conditions, uncond, guidance), None
    check_guidance(conditions, uncond, guidance)
    branches = getattr(generator, "guidance_branches", None)
    if branches is not None:
        v_uncond, v_cond = branches(model, x, t, conditions, uncond)
        return generator.combine_guidance(v_uncond, v_cond, guidance, t), v_uncond
    if getattr(generator, "guided_velocity", None) is not None:
        return guided_velocity(generator, model, x, t, conditions, uncond, guidance), None
    v_uncond, v_cond = cfg_branches(generator, model, x, t, conditions, uncond)
    return v_uncond + guidance * (v_cond - v_uncond), v_uncond


def velocity_with_detached_uncond(
    generator: Generator,
    model: torch.nn.Module,
    x: Tensor,
    t: Tensor | float,
    conditions: Conditions,
    uncond: Conditions | None,
    guidance: float,
    uncond_velocity: Tensor | None = None,
) -> Tensor:
    """The guided velocity with gradients through the conditional branch only, as flow_grpo trains
    (``scripts/train_sd3.py`` ``compute_log_prob``: ``noise_pred_uncond.detach()``): the unconditional branch is
    computed apart under ``no_grad`` (its activations are not kept: backward covers half the rows) and the two are
    combined as the family's pipeline does (``generator.combine_guidance``). Values equal :func:`guided_velocity`
    up to the rounding of two calls of ``B`` rows instead of one of ``2B``.

    ``uncond_velocity``: that branch already computed (recorded by the rollout under the same weights): no
    unconditional call at all."""
    if guidance == 1.0:
        return generator.predict(model, x, t, conditions)
    check_guidance(conditions, uncond, guidance)
    if uncond_velocity is not None:
        v_uncond = uncond_velocity.detach().to(x)
    else:
        with torch.no_grad():
            v_uncond = generator.predict(model, x, t, uncond)
    v_cond = generator.predict(model, x, t, conditions)
    combine = getattr(generator, "combine_guidance", None)
    if combine is None:
        return v_uncond + guidance * (v_cond - v_uncond)
    return combine(v_uncond, v_cond, guidance, t)


def _window(sde_window: tuple[int, int] | None, steps: int) -> Tensor:
    start, end = (0, steps) if sde_window is None else (int(sde_window[0]), int(sde_window[1]))
    if not 0 <= start <= end <= steps:
        raise ValueError(f"sde_window {sde_window} must satisfy 0 <= start <= end <= steps ({steps})")
    mask = torch.zeros(steps, dtype=torch.bool)
    mask[start:end] = True
    return mask


def _stochastic_step(
    sampler: str,
    x: Tensor,
    v: Tensor,
    sigmas: Tensor,
    j: int,
    noise_level: float,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
) -> FlowStep:
    sigma, sigma_prev = sigmas[j], sigmas[j + 1]
    if sampler == "sde":
        return flow_sde_step(
            x, v, sigma, sigma_prev, noise_level, noise=noise, prev_sample=prev_sample, sigma_max=float(sigmas[1])
        )
    if sampler == "dance":
        return dance_sde_step(x, v, sigma, sigma_prev, noise_level, noise=noise, prev_sample=prev_sample)
    return cps_step(x, v, sigma, sigma_prev, noise_level, noise=noise, prev_sample=prev_sample)


def sample_flow_trajectories(
    generator: Generator,
    model: torch.nn.Module,
    conditions: Conditions,
    uncond: Conditions | None,
    rng: torch.Generator,
    steps: int,
    guidance: float,
    *,
    latent_shape: tuple[int, ...],
    noise_level: float = 0.7,
    sampler: str = "sde",
    sde_window: tuple[int, int] | None = None,
    global_batch: int | None = None,
    offset: int = 0,
    shared_noise_per: int | None = None,
    schedule: Schedule | None = None,
    ode_solver: str = "euler",
    keep_uncond: bool = False,
    **schedule_kwargs: Any,
) -> FlowTrajectory:
    """Sample ``B = len(conditions)`` chains of ``steps`` steps without gradients.

    ``latent_shape`` = ``(C, h, w)`` of one latent (SD3 at 512 px: ``(16, 64, 64)``; videos ``(C, F', h, w)``:
    Wan's 81 frames at 480x832 ``(16, 21, 60, 104)``). ``rng`` (a CPU generator) draws the initial latents and
    each step's noise for ``global_batch`` rows (default ``B``), of which rows
    ``[offset, offset + B)`` are this call's. ``shared_noise_per=G``: groups of ``G`` consecutive *global* rows
    start from the same initial latents (DanceGRPO; ``global_batch`` must be a multiple of ``G``); the step
    noise stays independent.

    ``guidance``: classifier-free guidance scale (``uncond`` required unless it is 1), applied as the family's
    pipeline does (:func:`guided_velocity`: one batched ``generator.predict`` per step). ``sampler``: "sde"
    (Flow-GRPO; ``sigma_max`` = ``schedule.sigmas[1]``), "cps" or "dance" (DanceGRPO; ``noise_level`` is its η,
    0.3 in its scripts), with ``noise_level`` (> 0).
    ``sde_window=(start, end)``: steps ``start <= j < end`` are stochastic, the others Euler ODE steps with
    log-prob 0 (Flow-GRPO-Fast, MixGRPO; :mod:`mmalign.models.sde_windows` picks them); default every step.

    ``schedule`` overrides ``generator.sampling_schedule(steps, latent_shape=latent_shape, **schedule_kwargs)``
    (the latent shape gives dynamically shifted schedules their image tokens). ``ode_solver``: "euler", or
    "dpm2" (MixGRPO-Flash: DPM-Solver++(2M), :func:`~mmalign.models.flow_sampling.flow_dpm2_step`, for the ODE
    steps from σ < 1, with the previous step's data prediction ``x − σ·v`` as its history, whatever that step was).

    ``keep_uncond``: record the unconditional branch's velocity of every step
    (:attr:`FlowTrajectory.uncond_velocities`; with guidance ≠ 1 and a generator that exposes its branches).
    """
    if ode_solver not in ("euler", "dpm2"):
        raise ValueError(f"ode_solver must be 'euler' or 'dpm2', got {ode_solver!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    batch = len(conditions)
    total = batch if global_batch is None else int(global_batch)
    if offset < 0 or offset + batch > total:
        raise ValueError(f"rows [{offset}, {offset + batch}) are not inside the global batch of {total}")
    if schedule is None:
        schedule = generator.sampling_schedule(steps, latent_shape=tuple(latent_shape), **schedule_kwargs)
    if len(schedule) != steps:
        raise ValueError(f"the schedule has {len(schedule)} steps, not {steps}")
    sde = _window(sde_window, steps)
    if bool(sde.any()) and not noise_level > 0:
        raise ValueError(f"SDE steps need noise_level > 0 (no density at {noise_level}); use sde_window=(0, 0)")
    if guidance != 1.0 and uncond is None:
        raise ValueError(f"guidance {guidance} needs the unconditional branch (uncond)")
    shape = tuple(int(s) for s in latent_shape)
    device = next(iter(conditions.tensors.values())).device
    sigmas = schedule.sigmas.detach().to("cpu", torch.float32)
    timesteps = schedule.timesteps.detach()

    if shared_noise_per is not None and shared_noise_per > 1:
        group = int(shared_noise_per)
        if total % group:
            raise ValueError(f"global_batch {total} is not a multiple of shared_noise_per {group}")
        x = torch.randn((total // group, *shape), generator=rng).repeat_interleave(group, dim=0)
        x = x[offset : offset + batch]
    else:
        x = _global_randn(rng, total, offset, shape, batch)
    x = x.to(device=device, dtype=torch.float32)

    latents, log_probs, uncond_velocities = [x], [], []
    history: tuple[Tensor, Tensor] | None = None  # (x̂0, σ) of the previous step, for DPM-Solver++(2M)
    with torch.no_grad():
        for j in range(steps):
            noise = _global_randn(rng, total, offset, shape, batch).to(device)
            v, v_uncond = guided_velocity_and_uncond(generator, model, x, timesteps[j], conditions, uncond, guidance)
            if keep_uncond and v_uncond is not None:
                uncond_velocities.append(v_uncond.float())
            x0 = x - sigmas[j].to(device) * v
            if bool(sde[j]):
                step = _stochastic_step(sampler, x, v, sigmas, j, noise_level, noise=noise)
                x, log_prob = step.prev_sample, step.log_prob
            elif ode_solver == "dpm2" and float(sigmas[j]) < 1.0:
                prev_x0, sigma_before = history if history is not None else (None, None)
                x = flow_dpm2_step(x, v, sigmas[j], sigmas[j + 1], prev_x0, sigma_before).prev_sample
                log_prob = torch.zeros(batch, device=device)
            else:
                x = flow_ode_step(x, v, sigmas[j], sigmas[j + 1])
                log_prob = torch.zeros(batch, device=device)
            history = (x0, sigmas[j])
            latents.append(x.float())
            log_probs.append(log_prob.float())
    return FlowTrajectory(
        latents=torch.stack(latents, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        sigmas=sigmas,
        timesteps=timesteps,
        sde=sde,
        conditions=conditions,
        uncond=uncond if guidance != 1.0 else None,
        guidance=float(guidance),
        noise_level=float(noise_level),
        sampler=sampler,
        uncond_velocities=torch.stack(uncond_velocities, dim=1) if len(uncond_velocities) == steps > 0 else None,
    )


def flow_step_log_prob(
    generator: Generator,
    model: torch.nn.Module,
    trajectory: FlowTrajectory,
    j: int,
    rows: Tensor | slice | None = None,
    conditions: Conditions | None = None,
    uncond: Conditions | None = None,
    detach_uncond: bool = False,
    reuse_uncond: bool = False,
) -> FlowStep:
    """Recompute step ``j`` of ``trajectory`` under ``model`` (with gradients when enabled): the velocity at the
    recorded ``latents[:, j]`` (with the trajectory's guidance) and the step's Gaussian evaluated at the recorded
    ``latents[:, j + 1]`` (``prev_sample=``). Returns :class:`mmalign.models.flow_sampling.FlowStep`:
    ``log_prob [b]`` plus ``mean`` and ``std`` for the KL term.

    ``rows`` selects a micro-batch of the trajectory; ``conditions`` / ``uncond`` override the recorded ones
    (already restricted to ``rows``). ``detach_uncond``: gradients through the conditional branch only
    (:func:`velocity_with_detached_uncond`, flow_grpo's training). ``reuse_uncond`` (with ``detach_uncond``): take
    that branch from the trajectory's :attr:`~FlowTrajectory.uncond_velocities` instead of calling ``model``:
    exact when ``model`` has the weights that sampled (the caller's to know), and one call of ``b`` rows saved.
    Only SDE steps have a density: ``j`` must be one of :attr:`FlowTrajectory.sde_steps`."""
    steps = trajectory.steps
    if not 0 <= j < steps:
        raise IndexError(f"step {j} outside the trajectory's {steps} steps")
    if not bool(trajectory.sde[j]):
        raise ValueError(f"step {j} was an ODE step (no density); SDE steps: {trajectory.sde_steps}")
    select = slice(None) if rows is None else rows
    if conditions is None:
        conditions = trajectory.conditions if rows is None else trajectory.conditions.select(select)
    if uncond is None and trajectory.uncond is not None:
        uncond = trajectory.uncond if rows is None else trajectory.uncond.select(select)
    device = next(iter(conditions.tensors.values())).device
    x = trajectory.latents[select, j].to(device)
    recorded = trajectory.latents[select, j + 1].to(device)
    t = trajectory.timesteps[j]
    if detach_uncond:
        recorded_uncond = None
        if reuse_uncond:
            if trajectory.uncond_velocities is None:
                raise ValueError("reuse_uncond needs a trajectory sampled with keep_uncond=True (and guidance != 1)")
            recorded_uncond = trajectory.uncond_velocities[select, j].to(device)
        v = velocity_with_detached_uncond(
            generator, model, x, t, conditions, uncond, trajectory.guidance, uncond_velocity=recorded_uncond
        )
    else:
        v = guided_velocity(generator, model, x, t, conditions, uncond, trajectory.guidance)
    return _stochastic_step(
        trajectory.sampler, x, v, trajectory.sigmas, j, trajectory.noise_level, prev_sample=recorded
    )
