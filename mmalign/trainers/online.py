"""Online trainers: the model samples while it learns (DDPO, D3PO, ReFL, DRaFT, AlignProp).

They share the loop of :mod:`mmalign.trainers.loop` (LoRA or full fine-tuning, accumulation, checkpoints, exact
resume) and read *prompts* instead of pairs: ``data`` is a ``.txt`` file (one prompt per line) or a JSONL file
of ``{"prompt": ...}`` rows. Every random draw of step ``s`` (prompt order, x_T, step noise, truncation
indices) comes from generators seeded by ``(seed, s)`` and drawn for the global batch, as in the offline loop.

Rewards: ``reward`` is a registered name or a weighted list ``hpsv2.1:1.0,aesthetic:0.5`` (their weighted
sum), ``reward_weights`` a checkpoint path (a comma list, one per reward, when several). A name may be the address
of a served reward (``http://127.0.0.1:8000/hpsv2.1``, :mod:`mmalign.serve`), which scores without gradients.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import torch
from torch import Tensor

from ..errors import ConfigError, MMAlignError
from ..models import sampling
from . import losses
from .loop import Schedule, TrainConfig, Trainer, _generator, logger

# random streams of a micro-batch (the offline loop uses 1 and 2)
_SAMPLE_STREAM, _TRUNCATION_STREAM, _LV_STREAM, _TIMESTEP_STREAM = 3, 4, 5, 6


# ----------------------------------------------------------------------------------------------------------
# Prompts and rewards
# ----------------------------------------------------------------------------------------------------------
def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a ``.txt`` (one per non-empty line) or ``.jsonl``/``.json`` (``{"prompt": ...}`` rows)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data={path}: online trainers read a prompt file (.txt or .jsonl), not found")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    if path.suffix in (".jsonl", ".json"):
        prompts = []
        for number, line in enumerate(lines, 1):
            if not line:
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ConfigError(f'{path}:{number}: expected a JSON object with a "prompt" string')
            prompts.append(row["prompt"])
    else:
        prompts = [line for line in lines if line]
    if not prompts:
        raise MMAlignError(f"{path}: no prompts")
    return prompts


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """``"hpsv2.1:1.0,aesthetic:0.5"`` -> ``[("hpsv2.1", 1.0), ("aesthetic", 0.5)]``; a bare name weighs 1.

    A served reward's address is a name too: ``http://127.0.0.1:8000/hps`` weighs 1 and
    ``http://127.0.0.1:8000/hps:0.5`` weighs 0.5 (the port's colon is followed by the reward's path, a weight's is
    not). So is a fitted ensemble: ``ensemble:runs/ens.json`` weighs 1 and ``ensemble:runs/ens.json:0.5`` weighs
    0.5 (the colon after ``ensemble`` is the prefix's; a last ``:NUMBER`` is the weight)."""
    from ..rewards import is_reward_url
    from ..rewards.ensemble import PREFIX, is_ensemble_spec

    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if is_ensemble_spec(part):
            path, sep, weight = part[len(PREFIX) :].rpartition(":")
            if not (sep and path and _is_number(weight)):
                path, weight = part[len(PREFIX) :], "1"
            if not path.strip():
                raise ConfigError(f"reward={spec!r}: {part!r} names no ensemble file (ensemble:FILE)")
            out.append((PREFIX + path.strip(), float(weight)))
            continue
        name, sep, weight = part.rpartition(":")
        if not sep or (is_reward_url(part) and ("/" in weight or urlsplit(name).path in ("", "/"))):
            name, weight = part, "1"  # that colon is the URL's own (scheme or port)
        try:
            out.append((name.strip(), float(weight)))
        except ValueError:
            raise ConfigError(f"reward={spec!r}: weight {weight!r} of {name!r} is not a number") from None
    if not out:
        raise ConfigError("reward is empty: give a reward name or a list like 'hpsv2.1:1.0,aesthetic:0.5'")
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class WeightedReward:
    """A weighted sum of rewards ``Σ w_k·r_k``; :meth:`components` gives each ``r_k`` (for Pareto dominance)."""

    def __init__(self, rewards: Sequence[Any], weights: Sequence[float]):
        if len(rewards) != len(weights) or not rewards:
            raise ValueError("one weight per reward, at least one reward")
        self.rewards, self.weights = list(rewards), [float(w) for w in weights]

    @property
    def is_differentiable(self) -> bool:
        return all(getattr(r, "is_differentiable", False) for r in self.rewards)

    def to(self, device: torch.device) -> WeightedReward:
        for reward in self.rewards:
            if hasattr(reward, "to"):
                reward.to(device)
        return self

    def components(self, images: Tensor, prompts: list[str]) -> Tensor:
        """``[B, K]`` scores; non-differentiable rewards are scored without gradients."""
        scores = []
        for reward in self.rewards:
            if reward.is_differentiable and torch.is_grad_enabled():
                scores.append(reward.score_tensor(images, prompts).float())
            else:
                with torch.no_grad():
                    scores.append(reward.score_tensor(images.detach(), prompts).float())
        return torch.stack([s.to(images.device) for s in scores], dim=1)

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        weights = torch.tensor(self.weights, device=images.device)
        return (self.components(images, prompts) * weights).sum(dim=1)

    @torch.no_grad()
    def score_images(self, images: Sequence[Any], prompts: list[str]) -> Tensor:
        """Weighted sum over files or Pillow images, each reward with its reference preprocessing."""
        scores = torch.stack([r.score_images(list(images), prompts).float().cpu() for r in self.rewards], dim=1)
        return (scores * torch.tensor(self.weights)).sum(dim=1)


def build_reward(spec: str, weights: str | None = None) -> WeightedReward:
    """Load the rewards of a spec (:func:`parse_reward_spec`) with optional checkpoint paths."""
    from ..rewards import load_reward

    parsed = parse_reward_spec(spec)
    paths: list[str | None] = [None] * len(parsed)
    if weights:
        given = [w.strip() or None for w in weights.split(",")]
        if len(given) != len(parsed):
            raise ConfigError(f"reward_weights has {len(given)} paths for {len(parsed)} rewards")
        paths = given
    rewards = [load_reward(name, **({"weights": p} if p else {})) for (name, _), p in zip(parsed, paths)]
    return WeightedReward(rewards, [w for _, w in parsed])


def pareto_preference(scores_a: Tensor, scores_b: Tensor) -> tuple[Tensor, Tensor]:
    """D3PO's ``compare`` (yk7333/d3po): ``a`` wins if it is ≥ on every reward and > on one, and vice versa;
    otherwise a tie. Scores ``[B, K]``; returns ``(a_wins, tie)`` booleans ``[B]``."""
    a_dom = (scores_a >= scores_b).all(dim=1) & (scores_a > scores_b).any(dim=1)
    b_dom = (scores_b >= scores_a).all(dim=1) & (scores_b > scores_a).any(dim=1)
    return a_dom, ~(a_dom | b_dom)


class AtSampleRate:
    """An audio reward scoring waveforms of the generator's ``sample_rate`` (``score_tensor(audio, prompts,
    sample_rate=...)``; CLAP resamples to its own 48 kHz differentiably), so that :class:`WeightedReward` can call
    it as it calls every reward."""

    def __init__(self, reward: Any, sample_rate: int):
        self.reward, self.sample_rate = reward, int(sample_rate)
        self.modality = getattr(reward, "modality", "audio")
        self.name = getattr(reward, "name", type(reward).__name__)

    @property
    def is_differentiable(self) -> bool:
        return bool(getattr(self.reward, "is_differentiable", False))

    def to(self, device: torch.device) -> AtSampleRate:
        if hasattr(self.reward, "to"):
            self.reward.to(device)
        return self

    def score_tensor(self, audio: Tensor, prompts: list[str]) -> Tensor:
        return self.reward.score_tensor(audio, prompts, sample_rate=self.sample_rate)

    def score_images(self, media: Sequence[Any], prompts: list[str]) -> Tensor:
        return self.reward.score_images(media, prompts)


def for_modality(reward: WeightedReward, modality: str, sample_rate: int | None = None) -> WeightedReward:
    """``reward`` scoring what the generator makes (its ``modality``): rewards of that modality as they are (audio
    rewards told the generator's ``sample_rate``: :class:`AtSampleRate`), image rewards lifted to videos
    (:class:`~mmalign.rewards.lifted.VideoReward`: the mean over up to 8 uniformly spaced frames) or multi-view
    sets; anything else (an image or video reward on an audio generator, an audio reward on an image one) is
    refused with a :class:`ConfigError` naming both."""
    from ..rewards.lifted import lift

    adapted = []
    for item in reward.rewards:
        own = getattr(item, "modality", "image")
        name = getattr(item, "name", type(item).__name__)
        if own == modality == "audio":
            if sample_rate is None:
                raise ConfigError(f"reward {name} scores audio: the generator's sample rate is needed")
            adapted.append(item if isinstance(item, AtSampleRate) else AtSampleRate(item, sample_rate))
        elif own == modality:
            adapted.append(item)
        elif own == "image" and modality in ("video", "multiview") and hasattr(item, "with_members"):
            adapted.append(item.with_members(lambda member: lift(member, modality)))  # an ensemble: lift each member
        elif own == "image" and modality in ("video", "multiview"):
            adapted.append(lift(item, modality))
        elif modality == "audio":
            raise ConfigError(
                f"reward {name} scores {own}s; the generator makes audio: use an audio reward (e.g. clap, which "
                "compares the audio with the prompt)"
            )
        else:
            raise ConfigError(f"reward {name} scores {own}; the generator makes {modality}")
    if all(a is b for a, b in zip(adapted, reward.rewards)):
        return reward
    return WeightedReward(adapted, reward.weights)


class PerPromptStatTracker:
    """Per-prompt reward normalisation of kvablack/ddpo-pytorch ``stat_tracking.py``: advantages
    ``(r − mean)/(std + 1e-6)`` over the last ``buffer_size`` rewards of the prompt once it has ``min_count``
    of them, over the whole batch before that."""

    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards: Tensor) -> Tensor:
        rewards = rewards.detach().double().cpu()
        advantages = torch.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):
            mask = torch.tensor([p == prompt for p in prompts])
            buffer = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mask].tolist())
            ref = torch.tensor(list(buffer), dtype=torch.float64) if len(buffer) >= self.min_count else rewards
            advantages[mask] = (rewards[mask] - ref.mean()) / (ref.std(unbiased=False) + 1e-6)
        return advantages.float()

    def state_dict(self) -> dict[str, list[float]]:
        return {prompt: list(buffer) for prompt, buffer in self.stats.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.stats = {p: deque(v, maxlen=self.buffer_size) for p, v in state.items()}


# ----------------------------------------------------------------------------------------------------------
# The shared online base
# ----------------------------------------------------------------------------------------------------------
@dataclass
class OnlineConfig(TrainConfig):
    """Options of every online trainer: the reward, and the sampler (DDIM ``sample_steps``, CFG ``guidance``,
    η ``eta``). ``gradient_checkpointing`` (true, false or ``auto``, the default: on when the device's free memory
    is short for the UNet calls the loss keeps in its graph, see
    :func:`~mmalign.trainers.loop.resolve_gradient_checkpointing`) recomputes each UNet call of a chain in
    backward (ReFL: the UNet's blocks, as the reference's ``--gradient_checkpointing``): less memory, more time.
    ``checkpoint_unet`` is its former name, still read (it wins when given)."""

    trainer: str = "ddpo"
    reward: str = "aesthetic"
    reward_weights: str | None = None
    sample_steps: int = 50
    guidance: float = 5.0
    eta: float = 1.0
    lora_rank: int = 4
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    checkpoint_unet: bool | None = None
    # video generators whose VAE decodes frames apart (AnimateDiff): decode and score only this many evenly spaced
    # frames of each sample for the reward (VADER's frame subsampling: less memory in reward backpropagation);
    # 0: every frame
    reward_frames: int = 0
    # UNets: the DDIM timestep spacing of the sampler ("leading", "linspace", "trailing"); empty: the scheduler's
    # own. A linspace schedule (AnimateDiff's) ends with a deterministic step (t = 0), which DDPO / D3PO refuse
    timestep_spacing: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.timestep_spacing not in ("", "leading", "linspace", "trailing"):
            raise ValueError(f"timestep_spacing must be leading, linspace or trailing, got {self.timestep_spacing!r}")
        if self.reward_frames < 0:
            raise ValueError(f"reward_frames must be >= 0 (0: every frame), got {self.reward_frames}")
        if self.checkpoint_unet is not None:
            self.gradient_checkpointing = self.checkpoint_unet
        if self.sample_steps < 1:
            raise ValueError(f"sample_steps must be at least 1, got {self.sample_steps}")
        fraction = getattr(self, "timestep_fraction", 1.0)
        if not 0.0 < fraction <= 1.0 or int(self.sample_steps * fraction) < 1:
            raise ValueError(
                f"timestep_fraction must be in (0, 1] and keep at least one of the {self.sample_steps} steps "
                f"(int(sample_steps * timestep_fraction) >= 1), got {fraction}"
            )
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if self.reference == "precomputed":  # the samples depend on the weights of the moment
            raise ValueError("online trainers cannot precompute the reference; use reference=adapters or copy")


class OnlineTrainer(Trainer):
    """Reads prompts; :meth:`make_batch` gives this process's prompts, their embeddings and the seeded
    generator of the micro-batch. ``reward`` (a :class:`~mmalign.rewards.base.Reward` or a
    :class:`WeightedReward`) replaces the configured one, e.g. in tests."""

    config_class: ClassVar[type[TrainConfig]] = OnlineConfig
    needs_differentiable_reward: ClassVar[bool] = False
    #: the loss uses the log-density of every sampled DDIM step (DDPO, D3PO): a σ = 0 step is refused
    needs_step_densities: ClassVar[bool] = False
    checkpoint_blocks: ClassVar[bool] = False  # whole UNet calls are checkpointed (``torch.utils.checkpoint``)

    def __init__(self, config: OnlineConfig, policy: Any = None, reward: Any = None):
        self._reward = reward if reward is None or isinstance(reward, WeightedReward) else WeightedReward([reward], [1])
        super().__init__(config, policy)
        self._set_timestep_spacing()
        if config.reward_frames and not getattr(self.policy, "decodes_frames_apart", False):
            raise ConfigError(
                f"reward_frames={config.reward_frames}: model={config.model} cannot decode some frames of a video "
                "without the others (only video generators whose VAE decodes frames apart, e.g. AnimateDiff)"
            )
        if self.needs_differentiable_reward and not self.reward.is_differentiable:
            raise ConfigError(f"trainer={config.trainer} backpropagates through the reward: {config.reward} is not")

    def _set_timestep_spacing(self) -> None:
        """``timestep_spacing`` (when given) onto a UNet's noise scheduler; with η > 0, a trainer that needs every
        step's density refuses a schedule with a deterministic step
        (:func:`~mmalign.models.sampling.deterministic_steps`)."""
        config = self.config
        if config.timestep_spacing:
            if self.uses_conditions:
                raise ConfigError(
                    f"timestep_spacing={config.timestep_spacing}: a DDIM option; model={config.model} is a flow family"
                )
            scheduler = self.policy.noise_scheduler
            self.policy.noise_scheduler = type(scheduler).from_config(
                scheduler.config, timestep_spacing=config.timestep_spacing
            )
        if self.needs_step_densities and config.eta > 0 and not self.uses_conditions:
            schedule = sampling.ddim_schedule(self.policy.noise_scheduler, config.sample_steps)
            dead = sampling.deterministic_steps(schedule)
            if dead:
                spacing = self.policy.noise_scheduler.config.get("timestep_spacing", "leading")
                raise ConfigError(
                    f"trainer={config.trainer}: step(s) {dead} of the {config.sample_steps}-step DDIM schedule "
                    f"({spacing} spacing, timesteps {schedule.timesteps.tolist()}) are deterministic (σ = 0: the "
                    "step from t = 0 goes to ᾱ_0) and have no log-density; set timestep_spacing=leading (Stable "
                    "Diffusion's, as DDPO / D3PO sample) or trailing"
                )

    @property
    def reward(self) -> WeightedReward:
        if self._reward is None:
            self._reward = build_reward(self.config.reward, self.config.reward_weights)
        if not getattr(self, "_reward_placed", False):  # once: .to() drops the text-feature caches of rewards
            self._reward = for_modality(
                self._reward, getattr(self.policy, "modality", "image"), getattr(self.policy, "sample_rate", None)
            )
            self._reward.to(self.accelerator.device)
            self._reward_placed = True
        return self._reward

    def check_generator(self, parametrisation: str, model: object) -> None:
        super().check_generator(parametrisation, model)
        if parametrisation == "v-diffusion" and 0.0 < self.config.eta < 1.0:
            raise ConfigError(
                f"eta={self.config.eta}: on a v-diffusion generator ({model}) the chains are the pipeline's "
                "SDE-DPM-Solver++ (eta=1) or its deterministic DPM-Solver++ ODE (eta=0); nothing in between"
            )

    @property
    def v_diffusion(self) -> bool:
        """Whether the generator is a "v-diffusion" one (Stable Audio): its chains are DPM-Solver++ steps."""
        return getattr(self.policy, "parametrisation", "diffusion") == "v-diffusion"

    def _setup_data(self) -> None:
        config = self.config
        if not config.data:
            raise ConfigError("data is empty: give a prompt file (.txt, one per line, or .jsonl with 'prompt')")
        prompts = read_prompts(config.data)
        if config.max_train_samples:
            prompts = prompts[: config.max_train_samples]
        self.prompts = self.pairs = prompts
        self.data_skipped: list[Any] = []
        self.global_batch = config.batch_size * self.accelerator.num_processes
        self.schedule = Schedule(len(prompts), self.global_batch, config.seed)
        self._prompt_cache: dict[str, Any] = {}

    def make_batch(self, micro_index: int) -> dict[str, Any]:
        config, acc = self.config, self.accelerator
        global_prompts = [self.prompts[index] for _, index in self.schedule.batch(micro_index)]
        lo, hi = acc.process_index * config.batch_size, (acc.process_index + 1) * config.batch_size
        prompts = global_prompts[lo:hi]
        return {
            "prompts": prompts,
            "global_prompts": global_prompts,
            "embeds": self._embeds(prompts),
            "uncond": self._uncond(len(prompts)),
            "time_ids": self._time_ids(len(prompts)),
            "generator": _generator(config.seed, micro_index, _SAMPLE_STREAM),
            "micro_index": micro_index,
            "slice": (lo, hi),
        }

    def _uncond(self, count: int) -> Any:
        """The unconditional embeddings of classifier-free guidance (None without guidance): the empty prompt's,
        or zeros for a pipeline whose config sets ``force_zeros_for_empty_prompt`` (SDXL), as diffusers'
        ``StableDiffusionXLPipeline.encode_prompt`` does for an absent negative prompt."""
        if self.config.guidance == 1.0:
            return None
        if self.uses_conditions:  # flow families: the pipeline's own unconditional branch
            return self.policy.unconditional(count).to(self.accelerator.device)
        return self.policy.unconditional(self._embeds([""] * count))

    def graph_unet_calls(self) -> float:
        """UNet calls per prompt whose activations the loss keeps for backward (for ``gradient_checkpointing=auto``)."""
        return float(self.config.sample_steps)

    def _graph_calls(self) -> float:
        config = self.config
        rows = config.batch_size * (2 if config.guidance != 1.0 else 1)
        return self.graph_unet_calls() * rows / 2 * (config.resolution / 512) ** 2

    def _time_ids(self, count: int) -> Tensor | None:
        """SDXL's micro-conditioning for ``count`` square samples at the training resolution (None for SD)."""
        if not getattr(self.policy, "is_sdxl", False):
            return None
        size = self.config.resolution
        sizes = torch.tensor([[size, size]] * count)
        return self.policy.time_ids(sizes, torch.zeros_like(sizes), size)

    def sample(self, batch: dict[str, Any], pairs: bool = False) -> sampling.Trajectory:
        """DDIM chains (no gradients) under the current model, for this process's slice of the global batch."""
        config = self.config
        with self.accelerator.autocast():  # the precision the loss will recompute the log-probs in
            return sampling.sample_trajectories(
                self.policy,
                self.predict,
                batch["embeds"],
                batch["uncond"],
                batch["generator"],
                steps=config.sample_steps,
                guidance=config.guidance,
                eta=config.eta,
                resolution=config.resolution,
                time_ids=batch["time_ids"],
                pairs=pairs,
                global_batch=self.global_batch,
                offset=batch["slice"][0],
            )

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """``(C, h, w)`` of one latent at the training resolution (video generators: ``(C, F', h, w)``)."""
        size = self.config.resolution
        return tuple(self.policy.latent_shape(size, size))

    def x_T(self, batch: dict[str, Any]) -> Tensor:
        """Initial noise of this process's slice, from the micro-batch's sampling stream."""
        lo, hi = batch["slice"]
        shape = (self.global_batch, *self.latent_shape)
        return torch.randn(shape, generator=batch["generator"])[lo:hi].to(self.accelerator.device)

    def decode_with_grad(self, latents: Tensor) -> Tensor:
        """Latents → the media the reward scores, in [0, 1], keeping the graph (reward backpropagation)."""
        return self.policy.decode(latents, grad=True, **self._decode_options(latents))

    def _decode_options(self, latents: Tensor) -> dict[str, Any]:
        """``frames``: the ``reward_frames`` evenly spaced frame indices of video latents ``[B, C, F, h, w]`` (first
        and last included) when fewer than ``F``; else nothing."""
        wanted = getattr(self.config, "reward_frames", 0)
        count = latents.shape[2] if latents.ndim == 5 else 0
        if not wanted or wanted >= count:
            return {}
        return {"frames": torch.linspace(0, count - 1, wanted).round().long().tolist()}

    # -- flow-matching chains (reward backpropagation on flow families) -----------------------------------------
    def flow_schedule(self):
        """The generator's ``sample_steps``-step schedule at the training resolution."""
        return self.policy.sampling_schedule(self.config.sample_steps, latent_shape=self.latent_shape)

    def flow_velocity(self, batch: dict[str, Any], x: Tensor, t: Tensor) -> Tensor:
        """The trained model's (guided) velocity at ``x`` and model timestep ``t``."""
        from ..models.flow_rollout import guided_velocity

        return guided_velocity(
            self.policy, self.model, x, t, batch["embeds"], batch["uncond"], float(self.config.guidance)
        )

    def flow_chain(self, batch: dict[str, Any], grad_from: Tensor | int, checkpoint: bool = False) -> Tensor:
        """The Euler ODE chain from x_T on a flow family; sample ``b`` keeps gradients from step ``grad_from[b]``
        on (earlier velocities detached, as :meth:`DRaFTTrainer.chain` does for DDIM); each velocity call under
        ``checkpoint`` is recomputed in backward."""
        from ..models.flow_sampling import flow_ode_step

        if self.v_diffusion:
            return self.v_chain(batch, grad_from, checkpoint)
        schedule = self.flow_schedule()
        sigmas = schedule.sigmas.to(torch.float32)
        x = self.x_T(batch)
        grad_from = torch.as_tensor(grad_from, device=x.device).expand(x.shape[0])
        first = int(grad_from.min())
        for j, t in enumerate(schedule.timesteps):
            if j < first:
                with torch.no_grad():
                    v = self.flow_velocity(batch, x, t)
            else:
                if checkpoint:
                    v = torch.utils.checkpoint.checkpoint(self.flow_velocity, batch, x, t, use_reentrant=False)
                else:
                    v = self.flow_velocity(batch, x, t)
                keep = (j >= grad_from).view(-1, *([1] * (x.ndim - 1)))
                v = torch.where(keep, v, v.detach())
            x = flow_ode_step(x, v, sigmas[j].to(x.device), sigmas[j + 1].to(x.device))
        return x

    # -- v-diffusion chains (Stable Audio: the pipeline's DPM-Solver++ in σ) ---------------------------------------
    def v_output(self, batch: dict[str, Any], x: Tensor, schedule: Any, j: int) -> Tensor:
        """The trained model's guided output at the state ``x`` (``x0 + σ·ε`` scale) of step ``j``."""
        sigma = schedule.sigmas[j].to(x.device)
        x_in = self.policy.model_input(x, sigma)
        t = schedule.timesteps[j]
        return self.policy.guided_velocity(
            self.model, x_in, t, batch["embeds"], batch["uncond"], float(self.config.guidance)
        )

    def v_noise(self, batch: dict[str, Any], like: Tensor) -> Tensor | None:
        """A step's SDE noise (``eta=1``: the pipeline's stochastic solver, drawn for the global batch from the
        micro-batch's stream), or ``None`` (``eta=0``: the deterministic DPM-Solver++ ODE)."""
        return self.step_noise(batch, like) if self.config.eta > 0 else None

    def v_chain(
        self, batch: dict[str, Any], grad_from: Tensor | int, checkpoint: bool = False, stop: int | None = None
    ) -> Tensor:
        """The v-diffusion generator's sampler from ``x_T·init_noise_sigma`` (:meth:`StableAudioGenerator.chain_step`
        with :meth:`v_noise`); sample ``b`` keeps gradients from step ``grad_from[b]`` on (earlier outputs detached);
        each model call under ``checkpoint`` is recomputed in backward. ``stop``: the state before step ``stop``."""
        schedule = self.flow_schedule()
        x = self.x_T(batch) * self.policy.init_noise_sigma
        grad_from = torch.as_tensor(grad_from, device=x.device).expand(x.shape[0])
        first = int(grad_from.min())
        state: dict[str, Any] = {}
        for j in range(len(schedule) if stop is None else stop):
            noise = self.v_noise(batch, x)
            if j < first:
                with torch.no_grad():
                    out = self.v_output(batch, x, schedule, j)
            else:
                if checkpoint:
                    out = torch.utils.checkpoint.checkpoint(self.v_output, batch, x, schedule, j, use_reentrant=False)
                else:
                    out = self.v_output(batch, x, schedule, j)
                keep = (j >= grad_from).view(-1, *([1] * (x.ndim - 1)))
                out = torch.where(keep, out, out.detach())
            x = self.policy.chain_step(x, out, schedule, j, state, noise)
        return x

    def step_noise(self, batch: dict[str, Any], like: Tensor) -> Tensor:
        lo, hi = batch["slice"]
        noise = torch.randn((self.global_batch, *like.shape[1:]), generator=batch["generator"])
        return noise[lo:hi].to(like.device)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return self.policy.decode(latents, **self._decode_options(latents))

    def train_steps(self, batch: dict[str, Any]) -> Tensor:
        """The steps each of this process's samples trains on, ``[B, n]``: all of them, or with
        ``timestep_fraction`` < 1 the first ``n = int(sample_steps · timestep_fraction)`` of an independent random
        permutation per sample (kvablack/ddpo-pytorch ``scripts/train.py``: ``perms`` per sample and
        ``num_train_timesteps``; yk7333/d3po the same per pair). The permutations are drawn for the global
        micro-batch in the order of its samples from the micro-batch's own stream: a function of (seed,
        micro-batch, global sample index), whatever the process count, and exact on resume."""
        config, (lo, hi) = self.config, batch["slice"]
        steps = config.sample_steps
        count = int(steps * getattr(config, "timestep_fraction", 1.0))
        if count >= steps:
            return torch.arange(steps).expand(hi - lo, steps)
        gen = _generator(config.seed, batch["micro_index"], _TIMESTEP_STREAM)
        perms = torch.stack([torch.randperm(steps, generator=gen) for _ in range(self.global_batch)])
        return perms[lo:hi, :count]


# ----------------------------------------------------------------------------------------------------------
# DDPO
# ----------------------------------------------------------------------------------------------------------
@dataclass
class DDPOConfig(OnlineConfig):
    """DDPO (Black et al. 2023; kvablack/ddpo-pytorch ``config/base.py``): DDIM 50 steps, η 1, CFG 5, PPO clip
    1e-4, advantages clipped to ±5, per-prompt stat tracking 16/16, lr 3e-4, Adam weight decay 1e-4,
    ``sample_batches`` 2 (``num_batches_per_epoch``: optimizer steps per sampling round); ``timestep_fraction``
    < 1 trains each sample on the first ``int(sample_steps · timestep_fraction)`` steps of its own permutation
    (``scripts/train.py``), the loss averaged over them."""

    trainer: str = "ddpo"
    reward: str = "jpeg-compressibility"
    lr: float = 3e-4
    adam_weight_decay: float = 1e-4
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    per_prompt_stat_tracking: bool = True
    stat_buffer_size: int = 16
    stat_min_count: int = 16
    timestep_fraction: float = 1.0
    sample_batches: int = 2


class DDPOTrainer(OnlineTrainer):
    """DDPO-clip (Black et al. 2023, "Training Diffusion Models with Reinforcement Learning";
    kvablack/ddpo-pytorch): sample, score with any (non-differentiable) reward, normalise per prompt, and take
    the PPO-clip loss of every sampled DDIM step (:func:`~mmalign.trainers.losses.ddpo_ppo_loss`), averaged
    over the trained steps. Each sampling round serves ``sample_batches`` optimizer steps (ddpo-pytorch's
    ``num_batches_per_epoch``, one inner epoch): the first is on-policy (ratio 1), later ones are off-policy
    and the PPO clip acts."""

    config_class: ClassVar[type[TrainConfig]] = DDPOConfig
    needs_step_densities: ClassVar[bool] = True
    uses_reference: ClassVar[bool] = False

    def __init__(self, config: DDPOConfig, policy: Any = None, reward: Any = None):
        if config.sample_batches < 1:
            raise ConfigError(f"sample_batches must be at least 1, got {config.sample_batches}")
        if config.checkpoint_every % config.sample_batches:
            raise ConfigError(
                f"checkpoint_every ({config.checkpoint_every}) must be a multiple of sample_batches "
                f"({config.sample_batches}) so that a resumed run starts a sampling round"
            )
        self.tracker = PerPromptStatTracker(config.stat_buffer_size, config.stat_min_count)
        self._round: tuple[int, list[dict[str, Any]]] | None = None
        super().__init__(config, policy, reward)

    def make_batch(self, micro_index: int) -> dict[str, Any]:
        """Micro-batch ``micro_index`` of its sampling round; the round (``sample_batches`` optimizer steps)
        is sampled and scored when its first micro-batch is asked for, with the weights of that moment."""
        per_round = self.config.sample_batches * self.config.grad_accum
        round_index = micro_index // per_round
        if self._round is None or self._round[0] != round_index:
            first = round_index * per_round
            self._round = (round_index, self._sample_round(range(first, first + per_round)))
        return self._round[1][micro_index - round_index * per_round]

    def _sample_round(self, micro_indices: range) -> list[dict[str, Any]]:
        acc = self.accelerator
        batches = []
        for micro_index in micro_indices:
            batch = super().make_batch(micro_index)
            batch["trajectory"] = self.sample(batch)
            with torch.no_grad():
                batch["rewards"] = self.reward(self.decode(batch["trajectory"].final), batch["prompts"])
            batches.append(batch)
        rewards = [acc.gather(b["rewards"].to(acc.device)) if acc.num_processes > 1 else b["rewards"] for b in batches]
        global_rewards = torch.cat([r.float().cpu() for r in rewards])
        prompts = [p for b in batches for p in b["global_prompts"]]
        if self.config.per_prompt_stat_tracking:  # one update per round, as ddpo-pytorch per epoch
            advantages = self.tracker.update(prompts, global_rewards)
        else:
            advantages = (global_rewards - global_rewards.mean()) / (global_rewards.std(unbiased=False) + 1e-8)
        for i, batch in enumerate(batches):
            lo, hi = batch["slice"]
            own = advantages[i * self.global_batch : (i + 1) * self.global_batch][lo:hi]
            batch["advantages"] = own.to(acc.device)
        return batches

    def compute_loss(self, batch: dict[str, Any]) -> losses.LossOutput:
        config, trajectory = self.config, batch["trajectory"]
        steps = self.train_steps(batch)  # [B, n]: column k holds each sample's k-th step
        rows, count = torch.arange(steps.shape[0]), steps.shape[1]
        total, metrics = 0.0, {}
        for k in range(count):  # ddpo-pytorch: one batch mean per k, accumulated over the n of them
            j = steps[:, k]
            logp = sampling.step_log_prob(self.policy, self.predict, trajectory, j, self.gradient_checkpointing)
            old = trajectory.log_probs[rows, j.to(trajectory.log_probs.device)]
            out = losses.ddpo_ppo_loss(logp, old, batch["advantages"], config.clip_range, config.adv_clip_max)
            total = total + out.loss / count
            for key, value in out.metrics.items():
                metrics[key] = metrics.get(key, 0.0) + value / count
        metrics["reward"] = batch["rewards"].mean()
        return losses.LossOutput(total, metrics)

    def graph_unet_calls(self) -> float:  # every trained step of the chain, one backward
        return float(int(self.config.sample_steps * self.config.timestep_fraction))

    def save_extra_state(self, folder: Path) -> None:
        (folder / "stat_tracker.json").write_text(json.dumps(self.tracker.state_dict()))

    def load_extra_state(self, folder: Path) -> None:
        path = folder / "stat_tracker.json"
        if path.is_file():
            self.tracker.load_state_dict(json.loads(path.read_text()))


# ----------------------------------------------------------------------------------------------------------
# D3PO
# ----------------------------------------------------------------------------------------------------------
@dataclass
class D3POConfig(OnlineConfig):
    """D3PO (Yang et al. 2024; yk7333/d3po ``scripts/rm/train_d3po.py``, ``config/base.py`` at 40d3175): two DDIM
    chains per prompt from the same x_T (20 steps, η 1, CFG 5), β 0.1, ratio clamp 1 ± 0.1, lr 3e-5, Adam weight
    decay 1e-4, LoRA; ``timestep_fraction`` < 1 trains each pair on its own random subset of the steps."""

    trainer: str = "d3po"
    reward: str = "aesthetic"
    sample_steps: int = 20
    lr: float = 3e-5
    adam_weight_decay: float = 1e-4
    beta: float = 0.1
    d3po_clip: float = 0.1
    timestep_fraction: float = 1.0
    feedback: str | None = None
    human: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.human and not self.feedback:
            raise ValueError("human= scores need feedback= (the `mmalign label --trajectories` folder they score)")


class D3POTrainer(OnlineTrainer):
    """D3PO (Yang et al. 2024, "Using Human Feedback to Fine-tune Diffusion Models without Any Reward Model";
    yk7333/d3po): per denoising step, :func:`~mmalign.trainers.losses.d3po_loss` between the preferred and the
    other trajectory of each pair, against the reference (adapters disabled, or a frozen copy). The preference
    is the reward's (Pareto dominance across several rewards, ties give no gradient). Gradients go through the
    accelerate-prepared UNet, so they are synchronised across processes (the reference's LoRA ones are not)."""

    config_class: ClassVar[type[TrainConfig]] = D3POConfig
    needs_step_densities: ClassVar[bool] = True
    uses_reference: ClassVar[bool] = True

    # -- offline: stored chains scored by people (feedback=DIR, human=SCORES) ---------------------------------
    def _setup_data(self) -> None:
        config = self.config
        if not config.feedback:
            return super()._setup_data()
        from ..data.feedback import feedback_pairs, read_human_scores, read_labelled_samples

        samples = read_labelled_samples(config.feedback)
        groups = samples.groups
        unstored = [i for i, g in enumerate(groups) if g.trajectory is None]
        if unstored:
            raise ConfigError(
                f"{config.feedback}: prompt {unstored[0]} has no stored chains; "
                "label with `mmalign label --trajectories`"
            )
        settings = samples.settings  # the chains were sampled so: their log-probs are recomputed the same way
        for key in ("sample_steps", "guidance", "eta", "resolution"):
            stored = settings["steps" if key == "sample_steps" else key]
            if getattr(config, key) != stored:
                logger.info(
                    "feedback=%s: %s=%s (as sampled; the config said %s)",
                    config.feedback,
                    key,
                    stored,
                    getattr(config, key),
                )
                setattr(config, key, type(getattr(config, key))(stored))
        scores = read_human_scores(config.human, groups) if config.human else [list(g.scores) for g in groups]
        pairs = feedback_pairs(groups, scores)
        if config.max_train_samples:
            pairs = pairs[: config.max_train_samples]
        if not pairs:
            raise MMAlignError(f"{config.human or config.feedback}: no pair of images with different scores")
        self.feedback_groups, self.pairs = groups, pairs
        self.data_skipped = [(f"prompt {i}", "not scored") for i, s in enumerate(scores) if s is None]
        self.global_batch = config.batch_size * self.accelerator.num_processes
        self.schedule = Schedule(len(pairs), self.global_batch, config.seed)
        self._prompt_cache = {}
        self._chains: dict[int, dict[str, Tensor]] = {}

    def _stored(self, group: int) -> dict[str, Tensor]:
        from ..data.feedback import load_trajectories

        if group not in self._chains:
            chains = load_trajectories(self.feedback_groups[group].trajectory)
            expected = sampling.ddim_schedule(self.policy.noise_scheduler, self.config.sample_steps).timesteps
            if not torch.equal(chains["timesteps"], expected):
                raise MMAlignError(
                    f"{self.feedback_groups[group].trajectory}: timesteps {chains['timesteps'].tolist()} are not this "
                    f"model's {self.config.sample_steps}-step DDIM schedule {expected.tolist()}"
                )
            self._chains[group] = chains
        return self._chains[group]

    def _feedback_batch(self, micro_index: int) -> dict[str, Any]:
        """This process's slice of the global batch of stored pairs, as a paired :class:`Trajectory`."""
        config, acc = self.config, self.accelerator
        lo, hi = acc.process_index * config.batch_size, (acc.process_index + 1) * config.batch_size
        pairs = [self.pairs[index] for _, index in self.schedule.batch(micro_index)][lo:hi]
        prompts = [self.feedback_groups[p.group].prompt for p in pairs]
        device = acc.device
        chains = [self._stored(p.group) for p in pairs]

        def paired(key: str) -> Tensor:  # rows 0..B-1: image a of each pair; B..2B-1: image b (as sampled pairs)
            rows = [c[key][p.a] for c, p in zip(chains, pairs)] + [c[key][p.b] for c, p in zip(chains, pairs)]
            return torch.stack(rows).to(device)

        latents, log_probs = paired("latents"), paired("log_probs")
        time_ids = self._time_ids(len(pairs))
        time_ids = None if time_ids is None else time_ids.repeat(2, 1)
        embeds = self._embeds(prompts).repeat(2)
        uncond = self._uncond(len(pairs))
        uncond = None if uncond is None else uncond.repeat(2)
        trajectory = sampling.Trajectory(
            latents,
            log_probs,
            sampling.ddim_schedule(self.policy.noise_scheduler, config.sample_steps),
            embeds,
            uncond,
            time_ids,
            config.guidance,
            config.eta,
        )
        a_wins = torch.tensor([p.a_wins for p in pairs], device=device)
        rewards = torch.tensor([max(p.score_a, p.score_b) for p in pairs], device=device)
        return {
            "prompts": prompts,
            "trajectory": trajectory,
            "a_wins": a_wins,
            "tie": torch.zeros_like(a_wins),
            "rewards": rewards,
            "micro_index": micro_index,
            "slice": (lo, hi),
        }

    def make_batch(self, micro_index: int) -> dict[str, Any]:
        if self.config.feedback:
            return self._feedback_batch(micro_index)
        batch = super().make_batch(micro_index)
        trajectory = self.sample(batch, pairs=True)
        with torch.no_grad():
            scores = self.reward.components(self.decode(trajectory.final), batch["prompts"] * 2)
        scores_a, scores_b = scores.chunk(2)
        a_wins, tie = pareto_preference(scores_a, scores_b)
        batch.update(trajectory=trajectory, a_wins=a_wins, tie=tie, rewards=scores.sum(dim=1))
        return batch

    def compute_loss(self, batch: dict[str, Any]) -> losses.LossOutput:
        config, trajectory = self.config, batch["trajectory"]
        a_wins, tie = batch["a_wins"], batch["tie"]
        steps = self.train_steps(batch)  # [B, n] per pair; both trajectories of a pair train on the same steps
        count = steps.shape[1]
        total, metrics = 0.0, {}
        for k in range(count):
            j = steps[:, k].repeat(2)  # rows 0..B-1: first of each pair, B..2B-1: second
            logp = sampling.step_log_prob(self.policy, self.predict, trajectory, j, self.gradient_checkpointing)
            with torch.no_grad():
                ref = sampling.step_log_prob(self.policy, self.predict_reference, trajectory, j)
            (la, lb), (ra, rb) = logp.chunk(2), ref.chunk(2)
            out = losses.d3po_loss(
                torch.where(a_wins, la, lb),
                torch.where(a_wins, lb, la),
                torch.where(a_wins, ra, rb),
                torch.where(a_wins, rb, ra),
                beta=config.beta,
                clip=config.d3po_clip,
                tie=tie,
            )
            total = total + out.loss / count
            for key, value in out.metrics.items():
                metrics[key] = metrics.get(key, 0.0) + value / count
        metrics["reward"] = batch["rewards"].mean()
        return losses.LossOutput(total, metrics)

    def graph_unet_calls(self) -> float:  # both chains of a pair, every trained step, one backward
        return 2.0 * int(self.config.sample_steps * self.config.timestep_fraction)


# ----------------------------------------------------------------------------------------------------------
# Reward backpropagation
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ReFLConfig(OnlineConfig):
    """ReFL (Xu et al. 2023; THUDM/ImageReward ``ImageReward/ReFL.py`` and ``scripts/train_refl.sh`` at c1392c6):
    DDPM 40 steps, no CFG, mid step in [30, 39], ``relu(2 − r)·1e-3``; the script's training setting: full
    fine-tuning of the UNet (``lora_rank`` 0) with EMA (``--use_ema``: diffusers ``EMAModel`` at its default
    decay 0.9999), lr 1e-5 constant, 2 prompts per process and 4 accumulation steps (8 GPUs: 64 per update),
    gradient clipping 1, AdamW weight decay 1e-2 (its default), gradient checkpointing (the UNet's blocks), fp16
    and 100 updates in the recipe. ``lora_rank=4`` trains a LoRA instead: its learning rate is not the
    reference's and is not tuned here (raise it, e.g. as DRaFT's 2e-4)."""

    trainer: str = "refl"
    reward: str = "imagereward"
    sample_steps: int = 40
    guidance: float = 1.0
    lr: float = 1e-5
    lora_rank: int = 0
    ema_decay: float = 0.9999
    batch_size: int = 2
    grad_accum: int = 4
    gradient_checkpointing: bool | Literal["auto"] = True
    refl_min_step: int = 30
    refl_max_step: int = 39
    refl_target: float = 2.0
    refl_scale: float = 1e-3


class ReFLTrainer(OnlineTrainer):
    """ReFL (Xu et al. 2023, "ImageReward"; THUDM/ImageReward ``ReFL.py``): DDPM sampling without gradients up
    to a random step ``mid``, one UNet call with gradients there, its predicted x0 decoded and scored;
    :func:`~mmalign.trainers.losses.refl_loss`. The DDPM variance noise is drawn per process."""

    config_class: ClassVar[type[TrainConfig]] = ReFLConfig
    # DDIM, Euler ODE or DPM-Solver++ chains
    parametrisations: ClassVar[tuple[str, ...]] = ("diffusion", "flow", "v-diffusion")
    uses_reference: ClassVar[bool] = False
    needs_differentiable_reward: ClassVar[bool] = True
    checkpoint_blocks: ClassVar[bool] = True  # one UNet call with gradients: its blocks are checkpointed

    def graph_unet_calls(self) -> float:
        return 1.0

    def compute_loss(self, batch: dict[str, Any]) -> losses.LossOutput:
        if self.uses_conditions:
            return self._flow_loss(batch)
        from diffusers import DDPMScheduler

        config = self.config
        scheduler = DDPMScheduler.from_config(self.policy.noise_scheduler.config)
        scheduler.set_timesteps(config.sample_steps)
        gen = batch["generator"]
        low = min(config.refl_min_step, config.sample_steps - 1)
        high = min(config.refl_max_step, config.sample_steps - 1)
        mid = int(torch.randint(low, high + 1, (1,), generator=gen))
        x = self.x_T(batch)
        embeds, time_ids = batch["embeds"], batch["time_ids"]
        with torch.no_grad():
            for t in scheduler.timesteps[:mid]:
                out = self.predict(x, t.expand(x.shape[0]).to(x.device), embeds, time_ids)
                x = scheduler.step(out, t, x, generator=gen).prev_sample
        t = scheduler.timesteps[mid]
        out = self.predict(x, t.expand(x.shape[0]).to(x.device), embeds, time_ids)
        x0 = scheduler.step(out, t, x, generator=gen).pred_original_sample
        rewards = self.reward(self.decode_with_grad(x0), batch["prompts"])
        return losses.refl_loss(rewards, config.refl_target, config.refl_scale)

    def _flow_loss(self, batch: dict[str, Any]) -> losses.LossOutput:
        """ReFL on a flow family: Euler ODE steps without gradients up to ``mid``, one velocity with gradients
        there and its clean estimate ``x̂0 = x − σ·v`` decoded and scored (the flow analogue of DDPM's predicted
        x0; deterministic, so no step noise)."""
        from ..models.flow_sampling import flow_ode_step

        config = self.config
        low = min(config.refl_min_step, config.sample_steps - 1)
        high = min(config.refl_max_step, config.sample_steps - 1)
        mid = int(torch.randint(low, high + 1, (1,), generator=batch["generator"]))
        if self.v_diffusion:  # the pipeline's solver up to mid, then its denoised estimate x̂0 = c_skip·x + c_out·F
            schedule = self.flow_schedule()
            with torch.no_grad():
                x = self.v_chain(batch, config.sample_steps, stop=mid)
            out = self.v_output(batch, x, schedule, mid)
            x0 = self.policy.denoised(x, out, schedule.sigmas[mid].to(x.device))
            rewards = self.reward(self.decode_with_grad(x0), batch["prompts"])
            return losses.refl_loss(rewards, config.refl_target, config.refl_scale)
        schedule = self.flow_schedule()
        sigmas = schedule.sigmas.to(torch.float32)
        x = self.x_T(batch)
        with torch.no_grad():
            for j in range(mid):
                v = self.flow_velocity(batch, x, schedule.timesteps[j])
                x = flow_ode_step(x, v, sigmas[j].to(x.device), sigmas[j + 1].to(x.device))
        v = self.flow_velocity(batch, x, schedule.timesteps[mid])
        x0 = x - sigmas[mid].to(x.device) * v
        rewards = self.reward(self.decode_with_grad(x0), batch["prompts"])
        return losses.refl_loss(rewards, config.refl_target, config.refl_scale)


@dataclass
class DRaFTConfig(OnlineConfig):
    """DRaFT (Clark et al. 2024): DDIM 50 steps (η 0 here), CFG 7.5; ``draft_mode`` ``k`` (gradients through the
    last ``draft_k`` = 1 steps) or ``lv`` (``draft_lv_n`` = 2 re-noised one-step estimates of the final x0)."""

    trainer: str = "draft"
    reward: str = "hpsv2.1"
    sample_steps: int = 50
    guidance: float = 7.5
    eta: float = 0.0
    lr: float = 2e-4
    draft_mode: Literal["k", "lv"] = "k"
    draft_k: int = 1
    draft_lv_n: int = 2
    loss_scale: float = 1.0


class DRaFTTrainer(OnlineTrainer):
    """DRaFT-K / DRaFT-LV (Clark et al. 2024, "Directly Fine-Tuning Diffusion Models on Differentiable
    Rewards"; no official code): maximise the reward of the sample (:func:`~mmalign.trainers.losses.draft_loss`)
    with gradients through the last K sampler steps, or (LV) through ``n`` one-step denoisings of the re-noised
    final sample at the last timestep, averaged."""

    config_class: ClassVar[type[TrainConfig]] = DRaFTConfig
    # DDIM, Euler ODE or DPM-Solver++ chains
    parametrisations: ClassVar[tuple[str, ...]] = ("diffusion", "flow", "v-diffusion")
    uses_reference: ClassVar[bool] = False
    needs_differentiable_reward: ClassVar[bool] = True

    def _eps(self, batch: dict[str, Any], x: Tensor, t: Tensor, alpha: Tensor) -> Tensor:
        config = self.config
        return sampling.guided_eps(
            self.predict,
            x,
            t.to(x.device),
            alpha.to(x.device),
            batch["embeds"],
            batch["uncond"],
            config.guidance,
            self.policy.prediction_type,
            batch["time_ids"],
        )

    def chain(self, batch: dict[str, Any], grad_from: Tensor | int, checkpoint: bool = False) -> Tensor:
        """Run the DDIM chain from x_T; sample ``b`` keeps gradients from step ``grad_from[b]`` on (earlier UNet
        outputs detached, as AlignProp); each UNet call under ``checkpoint`` is recomputed in backward."""
        config = self.config
        schedule = sampling.ddim_schedule(self.policy.noise_scheduler, config.sample_steps)
        x = self.x_T(batch)
        grad_from = torch.as_tensor(grad_from, device=x.device).expand(x.shape[0])
        first = int(grad_from.min())
        for j, t in enumerate(schedule.timesteps):
            a_t, a_prev = schedule.alpha_bar[j].to(x.device), schedule.alpha_bar_prev[j].to(x.device)
            noise = self.step_noise(batch, x)
            if j < first:
                with torch.no_grad():
                    eps = self._eps(batch, x, t, a_t)
            else:
                if checkpoint:
                    eps = torch.utils.checkpoint.checkpoint(self._eps, batch, x, t, a_t, use_reentrant=False)
                else:
                    eps = self._eps(batch, x, t, a_t)
                keep = (j >= grad_from).view(-1, *([1] * (x.ndim - 1)))
                eps = torch.where(keep, eps, eps.detach())
            mean, std = sampling.ddim_mean_std(x, eps, a_t, a_prev, config.eta)
            x = mean + std * noise
        return x

    def any_chain(self, batch: dict[str, Any], grad_from: Tensor | int, checkpoint: bool = False) -> Tensor:
        """:meth:`chain` (DDIM) on a UNet, :meth:`flow_chain` (Euler ODE) on a flow family."""
        if self.uses_conditions:
            return self.flow_chain(batch, grad_from, checkpoint)
        return self.chain(batch, grad_from, checkpoint)

    def compute_loss(self, batch: dict[str, Any]) -> losses.LossOutput:
        config = self.config
        if config.draft_mode == "k":
            checkpoint = self.gradient_checkpointing and config.draft_k > 1  # one step: nothing saved by recomputing
            x0 = self.any_chain(batch, max(0, config.sample_steps - config.draft_k), checkpoint=checkpoint)
            rewards = self.reward(self.decode_with_grad(x0), batch["prompts"])
            return losses.draft_loss(rewards, config.loss_scale)
        if config.draft_mode != "lv":
            raise ConfigError(f"draft_mode must be 'k' or 'lv', got {config.draft_mode!r}")
        with torch.no_grad():
            x0 = self.any_chain(batch, config.sample_steps)
        gen = _generator(config.seed, batch["micro_index"], _LV_STREAM)
        lo, hi = batch["slice"]
        total = 0.0
        for _ in range(config.draft_lv_n):
            noise = torch.randn((self.global_batch, *x0.shape[1:]), generator=gen)[lo:hi].to(x0.device)
            total = total + self.reward(self.decode_with_grad(self._lv_estimate(batch, x0, noise)), batch["prompts"])
        return losses.draft_loss(total / config.draft_lv_n, config.loss_scale)

    def _lv_estimate(self, batch: dict[str, Any], x0: Tensor, noise: Tensor) -> Tensor:
        """DRaFT-LV's one-step estimate of ``x0`` re-noised at the last sampling timestep: DDIM's predicted x0 on
        a UNet, ``x_t − σ·v`` on a flow family (``x_t = (1 − σ)·x0 + σ·ε``), the denoised estimate of ``x0 + σ·ε``
        at the last non-zero σ on a v-diffusion one."""
        if self.v_diffusion:
            schedule = self.flow_schedule()
            j = len(schedule) - 1
            sigma = schedule.sigmas[j].to(x0.device)
            x_t = x0 + sigma * noise
            return self.policy.denoised(x_t, self.v_output(batch, x_t, schedule, j), sigma)
        if self.uses_conditions:
            schedule = self.flow_schedule()
            t, sigma = schedule.timesteps[-1], schedule.sigmas[-2].to(x0.device, torch.float32)
            x_t = (1.0 - sigma) * x0 + sigma * noise
            return x_t - sigma * self.flow_velocity(batch, x_t, t)
        schedule = sampling.ddim_schedule(self.policy.noise_scheduler, self.config.sample_steps)
        t, alpha = schedule.timesteps[-1], schedule.alpha_bar[-1].to(x0.device)
        x_t = alpha.sqrt() * x0 + (1.0 - alpha).sqrt() * noise
        return sampling.pred_x0(x_t, self._eps(batch, x_t, t, alpha), alpha)

    def graph_unet_calls(self) -> float:
        return float(self.config.draft_k if self.config.draft_mode == "k" else self.config.draft_lv_n)


@dataclass
class AlignPropConfig(OnlineConfig):
    """AlignProp (Prabhudesai et al. 2023) as mihirp1998/AlignProp at commit b22918a
    (``config/alignprop_config.py``, ``sd_pipeline.py``): DDIM 50 steps, η 1, CFG 5.0, one truncation index per
    batch ``int(N(42, 5))`` redrawn until in [1, 49] (scaled to ``sample_steps``, bounds [1, sample_steps − 1]),
    loss ``0.01·|r − 10|`` (its ``reward_fn=aesthetic``, ``aesthetic_target`` 10, ``loss_coeff`` 0.01; its default
    ``reward_fn`` is HPSv2 with loss ``0.01·(1 − hps)``: ``reward=hpsv2 loss_target=1``), lr 1e-3, Adam weight
    decay 1e-4, LoRA rank 4, one prompt per step. The reference checkpoints every UNet call; here
    ``gradient_checkpointing`` decides (``auto`` by default). (Its older ml_collections configuration used CFG
    7.5; this one is not mixed with it.)"""

    trainer: str = "alignprop"
    reward: str = "aesthetic"
    sample_steps: int = 50
    guidance: float = 5.0
    eta: float = 1.0
    lr: float = 1e-3
    adam_weight_decay: float = 1e-4
    truncation_mean: float = 42.0
    truncation_std: float = 5.0
    loss_target: float | None = 10.0
    loss_scale: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sample_steps < 2:
            raise ValueError(
                f"alignprop needs sample_steps >= 2 (truncation index in [1, steps - 1]), got {self.sample_steps}"
            )


class AlignPropTrainer(DRaFTTrainer):
    """AlignProp (Prabhudesai et al. 2023, "Aligning Text-to-Image Diffusion Models with Reward
    Backpropagation"; mihirp1998/AlignProp): backpropagate the reward through the DDIM chain, each UNet call
    gradient-checkpointed (``torch.utils.checkpoint``) when ``gradient_checkpointing`` is on, UNet outputs
    detached before one random truncation index per global batch
    (:func:`~mmalign.models.sampling.truncation_index`, from the micro-batch's seeded stream: the same in every
    process and on resume). Loss :func:`~mmalign.trainers.losses.target_distance_loss` (``loss_target`` None:
    :func:`~mmalign.trainers.losses.draft_loss`)."""

    config_class: ClassVar[type[TrainConfig]] = AlignPropConfig

    def compute_loss(self, batch: dict[str, Any]) -> losses.LossOutput:
        config = self.config
        cut = self.truncation(batch)
        x0 = self.any_chain(batch, cut, checkpoint=self.gradient_checkpointing)
        rewards = self.reward(self.decode_with_grad(x0), batch["prompts"])
        if config.loss_target is None:
            out = losses.draft_loss(rewards, config.loss_scale)
        else:
            out = losses.target_distance_loss(rewards, config.loss_target, config.loss_scale)
        return losses.LossOutput(out.loss, {**out.metrics, "truncation": torch.tensor(float(cut))})

    def truncation(self, batch: dict[str, Any]) -> int:
        """The micro-batch's truncation index (one for the global batch)."""
        config = self.config
        gen = _generator(config.seed, batch["micro_index"], _TRUNCATION_STREAM)
        try:
            return sampling.truncation_index(config.sample_steps, gen, config.truncation_mean, config.truncation_std)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def graph_unet_calls(self) -> float:  # the expected steps after the truncation index
        steps = self.config.sample_steps
        return max(1.0, steps - self.config.truncation_mean * steps / 50.0)


__all__ = [
    "AlignPropConfig",
    "AlignPropTrainer",
    "AtSampleRate",
    "D3POConfig",
    "D3POTrainer",
    "DDPOConfig",
    "DDPOTrainer",
    "DRaFTConfig",
    "DRaFTTrainer",
    "OnlineConfig",
    "OnlineTrainer",
    "PerPromptStatTracker",
    "ReFLConfig",
    "ReFLTrainer",
    "WeightedReward",
    "build_reward",
    "pareto_preference",
    "parse_reward_spec",
    "read_prompts",
]
