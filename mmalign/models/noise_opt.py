"""Inference-time alignment on any generator (images, videos, audio, view grids): deterministic chains from given
initial noise (for best-of-N sampling) and reward-guided optimisation of that noise (ReNO).

:class:`NoiseSampler` runs a generator's deterministic sampler from a given ``x_T``, with or without gradients:
DDIM with η = 0 for the UNet families (:class:`~mmalign.models.policy.DiffusionPolicy`: the DDIM step of
:mod:`mmalign.models.sampling`, classifier-free guidance by :func:`~mmalign.models.sampling.guided_eps`; what
diffusers' ``StableDiffusionPipeline`` with a ``DDIMScheduler`` and its default ``eta=0`` does) and the Euler ODE
for the flow-matching families (:func:`~mmalign.models.flow_rollout.guided_velocity` and
:func:`~mmalign.models.flow_sampling.flow_ode_step`, as :func:`mmalign.toyworld.sampling.sample_flow`; Wan's videos
too), and Stable Audio's DPM-Solver++ without step noise for its v-diffusion (the pipeline's chain, the ODE). The
initial noise of candidate ``j`` of prompt ``i`` is ``torch.randn(latent_shape)`` of a CPU generator seeded with
:func:`candidate_seed` (``seed + i + j·SEED_STRIDE``): candidate 0 is plain sampling with seed ``seed + i``, and the
N candidates of a prompt are the first N of any larger N (best-of-16 contains best-of-4's candidates).

ReNO (Eyring et al. 2024, "ReNO: Enhancing One-step Text-to-Image Models through Reward-based Noise
Optimization"; code ExplainableML/ReNO at commit bd6f6acfe369ee9c90e2c97c536113bdc1b6dcdb,
``training/trainer.py`` ``LatentNoiseTrainer.train``, ``training/optim.py``, ``arguments.py``). What is matched:

* objective per iteration: ``loss = Σ_k w_k·loss_k + λ·(½‖z‖² − (d − 1)·log‖z‖)``, ``d`` = the number of elements of
  one latent (``math.prod(latents.shape[1:])``), ‖·‖ the Euclidean norm of the latent (``torch.linalg.vector_norm``
  in float32); the regulariser is the negative log-density of ‖z‖ under N(0, I) (a χ distribution with ``d``
  degrees of freedom, constants dropped), so it keeps ‖z‖ near √(d − 1) where the noise is likely
  (:func:`chi_norm_regulariser`). ReNO's ``loss_k`` are per-reward losses (e.g. CLIP's ``100 − scale·cos``); here
  ``Σ w_k·loss_k`` is ``−Σ w_k·r_k``, the weighted reward of the spec, negated (:func:`noise_objective`);
* λ = 0.01 (``--reg_weight``), SGD with momentum 0.9 and Nesterov (``--optim sgd``, ``--nesterov``), learning
  rate 5 (``--lr``), gradient norm clipped to 0.1 on the latent (``clip_grad_norm_(latents, 0.1)``);
* iterations: each runs the whole sampler on the current noise with gradients, scores the image, and (but the
  last) steps the noise; the image kept is the one of the best reward over all iterates, the initial one included
  (ReNO keeps the lowest reward loss, the regulariser excluded; ``mmalign generate`` compares the iterates by the
  scores it writes for every image, the reward of the saved PNG, see :mod:`mmalign.commands.generate`).
  ``steps`` gradient steps here = ReNO's ``n_iters = steps + 1`` (``steps + 1`` images: ``steps + 1`` forward
  chains, ``steps`` backward chains).

ReNO takes the norm of its whole ``[1, C, h, w]`` latent; here each row's own (the same for its batch of one).
ReNO re-seeds its sampler's generator every iteration; the samplers here are deterministic (DDIM η = 0, Euler ODE).

Not matched: ReNO optimises one-step (or few-step) distilled models (SD-Turbo, SDXL-Turbo, PixArt-α DMD, FLUX
schnell) where a chain is one network call; here the chain is whatever ``steps`` the sampler is given, and its
backward goes through every step (memory grows with the steps; no gradient checkpointing). ReNO's rewards
(HPSv2, PickScore, ImageReward, CLIP, with its own CLIP preprocessing at 224 px) are here any differentiable
reward of the project through its tensor path (``score_tensor``). Its ``multi_apply`` (re-rendering the best
noise with another model) is not implemented.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = [
    "RENO_CLIP",
    "RENO_LR",
    "RENO_REG",
    "SEED_STRIDE",
    "NoiseOptResult",
    "NoiseSampler",
    "candidate_seed",
    "chi_norm_regulariser",
    "initial_noise",
    "noise_objective",
    "optimise_noise",
]

#: ReNO's defaults (``arguments.py``): learning rate, regulariser weight, gradient-norm clip
RENO_LR, RENO_REG, RENO_CLIP = 5.0, 0.01, 0.1
#: candidate ``j`` of prompt ``i`` is seeded ``seed + i + j·SEED_STRIDE`` (distinct for up to SEED_STRIDE prompts)
SEED_STRIDE = 1_000_003


def candidate_seed(seed: int, index: int, candidate: int) -> int:
    """The seed of candidate ``candidate`` of prompt ``index``: ``seed + index + candidate·SEED_STRIDE``."""
    return int(seed) + int(index) + int(candidate) * SEED_STRIDE


def initial_noise(shape: Sequence[int], seeds: Sequence[int]) -> Tensor:
    """``[len(seeds), *shape]``: row ``j`` is ``torch.randn(shape)`` of a CPU generator seeded ``seeds[j]`` (what a
    diffusers pipeline draws for a list of generators, one per image)."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def chi_norm_regulariser(z: Tensor) -> Tensor:
    """ReNO's noise regulariser per sample ``[B]``: ``½‖z_b‖² − (d − 1)·log‖z_b‖`` with ``d`` the elements of one
    latent, computed in float32: the negative log-density of the norm of ``d`` i.i.d. standard normals (χ_d), up
    to a constant; its minimum is at ‖z‖ = √(d − 1)."""
    flat = z.reshape(z.shape[0], -1).float()
    dim = flat.shape[1]
    norm = torch.linalg.vector_norm(flat, dim=1)
    return 0.5 * norm.pow(2) - (dim - 1) * torch.log(norm)


def noise_objective(rewards: Tensor, z: Tensor, weight: float = RENO_REG) -> Tensor:
    """The loss ReNO minimises, summed over the batch: ``Σ_b [−r_b + weight·chi_norm_regulariser(z)_b]``
    (``rewards [B]``: the weighted reward of the images of ``z``, with gradients)."""
    return (-rewards.float() + weight * chi_norm_regulariser(z)).sum()


class NoiseSampler:
    """A generator's deterministic sampler for given prompts, from given initial noise, with or without gradients.

    ``generator``: any generator of :mod:`mmalign.models.generator`, of every modality (images, videos, audio, view
    grids): parametrisation "diffusion" (:class:`~mmalign.models.policy.DiffusionPolicy` and the AnimateDiff video
    policy: DDIM with η = 0), "flow" (the flow-matching transformers, Wan: the Euler ODE) or "v-diffusion"
    (Stable Audio: its pipeline's DPM-Solver++ without step noise, :meth:`~mmalign.models.stable_audio.
    StableAudioGenerator.chain_step`; x_T is scaled by ``init_noise_sigma`` as the pipeline scales it).
    :meth:`media` decodes to the generator's canonical tensor (:attr:`modality`)."""

    def __init__(self, generator: Any, steps: int, guidance: float, resolution: int):
        kind = getattr(generator, "parametrisation", "diffusion")
        if kind not in ("diffusion", "flow", "v-diffusion"):
            raise ConfigError(
                f"best-of-N / noise optimisation samples diffusion, flow-matching and v-diffusion generators; "
                f"{type(generator).__name__} is of parametrisation {kind!r}"
            )
        if steps < 1:
            raise ConfigError(f"steps must be at least 1, got {steps}")
        self.generator, self.steps, self.guidance, self.resolution = generator, int(steps), float(guidance), resolution
        self.modality: str = getattr(generator, "modality", "image")
        self.flow, self.v_diffusion = kind == "flow", kind == "v-diffusion"
        self.latent_shape = tuple(generator.latent_shape(resolution, resolution))
        if self.flow or self.v_diffusion:
            self.schedule = generator.sampling_schedule(self.steps, latent_shape=self.latent_shape)
        else:
            from .sampling import ddim_schedule

            self.schedule = ddim_schedule(generator.noise_scheduler, self.steps)
        self._cache: dict[str, Any] = {}

    @property
    def device(self) -> torch.device:
        return self.generator.device

    @property
    def guided(self) -> bool:
        """Whether an unconditional branch is run (Stable Audio's pipeline guides when g > 1, the others when g ≠ 1)."""
        return self.guidance > 1.0 if self.v_diffusion else self.guidance != 1.0

    def conditioning(self, prompt: str, count: int) -> tuple[Any, Any, Tensor | None]:
        """(conditions, unconditional branch or None, SDXL time ids or None) for ``count`` samples of ``prompt``."""
        if prompt not in self._cache:
            self._cache = {}  # one prompt at a time: keep only its encoding
            gen = self.generator
            with torch.no_grad():
                if self.flow or self.v_diffusion:
                    cond = gen.encode_conditions([prompt])
                    uncond = gen.unconditional(1) if self.guided else None
                else:
                    cond = gen.encode_prompt([prompt])
                    uncond = gen.unconditional(gen.encode_prompt([""])) if self.guided else None
            self._cache[prompt] = (cond, uncond)
        cond, uncond = self._cache[prompt]
        cond, uncond = cond.repeat(count), None if uncond is None else uncond.repeat(count)
        if self.flow or self.v_diffusion:
            return cond.to(self.device), None if uncond is None else uncond.to(self.device), None
        time_ids = None
        if getattr(self.generator, "is_sdxl", False):
            sizes = torch.tensor([[self.resolution, self.resolution]] * count)
            time_ids = self.generator.time_ids(sizes, torch.zeros_like(sizes), self.resolution)
        return cond, uncond, time_ids

    def latents(self, x_T: Tensor, prompt: str) -> Tensor:
        """The final latents of the chains from ``x_T [B, *latent_shape]``; differentiable in ``x_T`` (and the
        network) when gradients are enabled."""
        gen, device = self.generator, self.device
        x = x_T.to(device)
        cond, uncond, time_ids = self.conditioning(prompt, x.shape[0])
        if self.flow:
            from .flow_rollout import guided_velocity
            from .flow_sampling import flow_ode_step

            sigmas = self.schedule.sigmas
            for j, t in enumerate(self.schedule.timesteps):
                v = guided_velocity(gen, gen.trainable, x, t, cond, uncond, self.guidance)
                x = flow_ode_step(x, v, sigmas[j], sigmas[j + 1])
            return x
        if self.v_diffusion:
            x = x * gen.init_noise_sigma
            state: dict[str, Any] = {}
            for j, t in enumerate(self.schedule.timesteps):
                net_input = gen.model_input(x, self.schedule.sigmas[j])
                output = gen.guided_velocity(gen.trainable, net_input, t, cond, uncond, self.guidance)
                x = gen.chain_step(x, output.to(x.dtype), self.schedule, j, state, None)
            return x
        from .sampling import ddim_mean_std, guided_eps

        def predict(noisy, timesteps, embeds, ids):
            return gen.predict(gen.unet, noisy, timesteps, embeds, ids)

        s = self.schedule
        for j, t in enumerate(s.timesteps):
            a_t, a_prev = s.alpha_bar[j].to(device), s.alpha_bar_prev[j].to(device)
            eps = guided_eps(predict, x, t.to(device), a_t, cond, uncond, self.guidance, gen.prediction_type, time_ids)
            x, _ = ddim_mean_std(x, eps, a_t, a_prev, 0.0)
        return x

    def media(self, x_T: Tensor, prompt: str) -> Tensor:
        """The decoded media of the chains from ``x_T``: images ``[B, 3, H, W]`` / views ``[B, V, 3, h, w]`` /
        videos ``[B, T, 3, H, W]`` in [0, 1], audio ``[B, C, S]`` in [-1, 1]; the graph kept when gradients are on."""
        return self.generator.decode(self.latents(x_T, prompt), grad=torch.is_grad_enabled())

    images = media  # the name of the image-only sampler this was


@dataclass
class NoiseOptResult:
    """The ``steps + 1`` iterates of a noise optimisation: ``images [steps + 1, 3, H, W]`` (detached, in [0, 1]),
    the objective's ``rewards`` and ``losses`` (with the regulariser) per iterate, the ``noises`` (``z_0`` … ``z_K``)
    and the chains it took."""

    images: Tensor
    rewards: list[float]
    losses: list[float]
    noises: Tensor
    forward_chains: int = 0
    backward_chains: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def optimise_noise(
    sampler: NoiseSampler,
    reward: Callable[[Tensor, list[str]], Tensor],
    prompt: str,
    z0: Tensor,
    steps: int,
    lr: float = RENO_LR,
    reg: float = RENO_REG,
    clip: float = RENO_CLIP,
) -> NoiseOptResult:
    """ReNO on one initial noise ``z0 [1, *latent_shape]`` (see the module docstring): ``steps`` gradient steps of
    SGD (momentum 0.9, Nesterov, ``lr``) on :func:`noise_objective` (``reg``: λ) with the gradient's norm clipped
    to ``clip``, through the whole sampler and ``reward(images, [prompt]) -> [1]`` (differentiable: the tensor
    path of a reward or a :class:`~mmalign.trainers.online.WeightedReward`). Returns every iterate, z_0's
    included: ``steps + 1`` forward chains, ``steps`` of them with a backward chain. The generator's weights are
    not updated (their gradients are not even computed)."""
    if steps < 1:
        raise ConfigError(f"noise optimisation needs at least 1 step, got {steps}")
    trainable = [p for p in sampler.generator.trainable.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    z = torch.nn.Parameter(z0.detach().clone().float().to(sampler.device))
    optimiser = torch.optim.SGD([z], lr=lr, momentum=0.9, nesterov=True)
    images, rewards, losses, noises = [], [], [], []
    try:
        for iteration in range(steps + 1):
            noises.append(z.detach().cpu().clone())
            last = iteration == steps
            with torch.set_grad_enabled(not last):
                image = sampler.media(z, prompt)
                score = reward(image, [prompt]).float()
                loss = noise_objective(score, z, reg)
            images.append(image.detach().cpu())
            rewards.append(float(score.detach()[0]))
            losses.append(float(loss.detach()))
            if not last:
                optimiser.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_([z], clip)
                optimiser.step()
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return NoiseOptResult(
        torch.cat(images), rewards, losses, torch.cat(noises), forward_chains=steps + 1, backward_chains=steps
    )
