"""Online trainers of flow-matching generators: the GRPO family (Flow-GRPO, Flow-GRPO-Fast, DanceGRPO, MixGRPO)
and DiffusionNFT, on any generator of the protocol (:mod:`mmalign.models.generator`) whose parametrisation is
"flow" (SD3/3.5, FLUX, Qwen-Image, Z-Image; Wan for video: latents ``[B, C, F', h, w]``, image rewards lifted
to its videos by :func:`~mmalign.trainers.online.for_modality`).

A *round* samples ``sample_batches × grad_accum`` global micro-batches with the weights of that moment, scores
them and normalises the rewards per prompt over the whole round (a prompt's group of ``group_size`` samples may
span micro-batches and processes, as flow_grpo's ``DistributedKRepeatSampler`` spreads it); the round then serves
``sample_batches`` optimizer steps. Every random draw (which prompts, initial latents, each step's noise, which
steps train, the forward-process noise of DiffusionNFT) comes from generators seeded by ``(seed, micro-batch)``
and drawn for the global batch, so the run does not depend on the process count and resumes exactly.

Several rewards: ``reward=a:1,b:0.5``. With ``advantage=per_reward`` (default) each reward is normalised within
its groups before the weighted sum (a reward with a small spread is not drowned by one with a large spread: flow_grpo
#5, #142); ``advantage=sum`` normalises the weighted sum, as flow_grpo does. Each reward is logged on its own
(``reward/<name>``), and a held-out reward can be evaluated every ``eval_every`` steps on held-out prompts
(``eval_prompts``, ``eval_reward``), logged beside the training reward, with an optional stop when the two
diverge (``eval_stop_drop``): the defence against reward hacking that flow_grpo #92/#204 and DanceGRPO #36/#55 ask
for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from ..errors import ConfigError
from ..models.flow_rollout import FlowTrajectory, flow_step_log_prob, sample_flow_trajectories
from ..models.flow_sampling import FlowStep
from ..models.generator import Conditions
from . import losses
from .distributed import is_fsdp
from .loop import Schedule, TrainConfig, _generator, adapters_disabled, logger, tile_rows
from .online import OnlineConfig, OnlineTrainer, read_prompts

# random streams of a micro-batch (the offline loop uses 1 and 2, the UNet online trainers 3 to 6)
_FLOW_SAMPLE_STREAM, _FLOW_STEPS_STREAM, _FLOW_WINDOW_STREAM, _NFT_NOISE_STREAM, _EVAL_STREAM = 11, 12, 13, 14, 15


# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------
@dataclass
class FlowOnlineConfig(OnlineConfig):
    """Options shared by the online flow-matching trainers. Defaults from yifan123/flow_grpo ``config/base.py`` and
    ``config/grpo.py`` (SD3.5-Medium): 10 sampling steps, CFG 4.5, 512 px, LoRA rank 32 / alpha 64 on the family's
    attention projections, lr 3e-4, AdamW weight decay 1e-4, group-relative advantages with the global std.

    ``batch_size``: samples per process per micro-batch; ``group_size``: samples per prompt (G); a round holds
    ``sample_batches × grad_accum × batch_size × processes`` samples, a multiple of G."""

    model: str = "stabilityai/stable-diffusion-3.5-medium"
    reward: str = "pickscore"
    resolution: int = 512
    sample_steps: int = 10
    guidance: float = 4.5
    lr: float = 3e-4
    adam_weight_decay: float = 1e-4
    lora_rank: int = 32
    lora_alpha: float | None = 64.0
    batch_size: int = 4
    group_size: int = 24
    sample_batches: int = 2
    global_std: bool = True
    # the advantages' (r − mean) / (std + std_eps), std with std_ddof (0: population, flow_grpo's numpy std;
    # 1: unbiased, DanceGRPO's torch std)
    std_eps: float = 1e-4
    std_ddof: int = 0
    adv_clip_max: float = 5.0
    timestep_fraction: float = 0.99
    advantage: Literal["per_reward", "sum"] = "per_reward"
    # deterministic steps (outside the SDE window; every step of DiffusionNFT): Euler, or DPM-Solver++(2M)
    ode_solver: Literal["euler", "dpm2"] = "euler"
    # held-out evaluation (defence against reward hacking)
    eval_every: int = 0
    eval_prompts: str | None = None
    eval_reward: str | None = None
    eval_reward_weights: str | None = None
    eval_samples: int = 1
    eval_stop_drop: float = 0.0
    # keep the weights of the best held-out evaluation and save those at the end (early stopping on a validation
    # set: give eval_prompts that are neither trained on nor used for the final test)
    eval_keep_best: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size < 1:
            raise ValueError(f"group_size must be at least 1, got {self.group_size}")
        if self.sample_batches < 1:
            raise ValueError(f"sample_batches must be at least 1, got {self.sample_batches}")
        if self.eval_every < 0 or self.eval_samples < 1 or self.eval_stop_drop < 0:
            raise ValueError("eval_every >= 0, eval_samples >= 1 and eval_stop_drop >= 0 are required")
        if self.eval_every and not self.eval_prompts:
            raise ValueError("eval_every > 0 needs eval_prompts (a held-out prompt file)")
        if self.std_ddof not in (0, 1) or not self.std_eps > 0:
            raise ValueError(f"std_ddof must be 0 or 1 and std_eps > 0, got {self.std_ddof} and {self.std_eps}")
        if self.eval_keep_best and not self.eval_every:
            raise ValueError("eval_keep_best needs eval_every > 0 (and eval_prompts)")


@dataclass
class FlowGRPOConfig(FlowOnlineConfig):
    """Flow-GRPO (Liu et al. 2025; yifan123/flow_grpo ``scripts/train_sd3.py``, ``config/grpo.py``): the SDE
    sampler (``sampler`` "sde" with ``noise_level`` 0.7, or "cps"), PPO clip 1e-4 on the per-step ratio,
    advantages clipped to ±5, KL to the reference (``beta``, 0 in ``config/base.py``, 0.04 in the SD3 GenEval
    recipe) and the first ``max(1, int(n · timestep_fraction))`` of the n SDE steps trained (n = ``sample_steps``
    without a window; a window of 3 at fraction 0.3 trains 1), in order, one backward each.

    Which steps are stochastic (ODE elsewhere), by ``window``: "fixed" (``sde_window`` ``[start, end)``, default
    every step), "fast" (Flow-GRPO-Fast: a window of ``window_size`` steps drawn in ``window_range`` for each
    global micro-batch, :func:`~mmalign.models.sde_windows.fast_window`) or "mixgrpo" (MixGRPO: a window of
    ``window_size`` steps sliding by ``window_stride`` every ``window_shift_interval`` optimizer steps,
    :func:`~mmalign.models.sde_windows.mixgrpo_window`). ``train_steps``: "first" (flow_grpo: the first steps of
    the window) or "random" (DanceGRPO: an independent random subset per sample). ``shared_noise``: the samples
    of a group start from the same initial latents (DanceGRPO). ``sampler``: "sde" (Flow-GRPO), "cps"
    (coefficients-preserving) or "dance" (DanceGRPO's step, ``noise_level`` being its η)."""

    trainer: str = "flow-grpo"
    beta: float = 0.0
    clip_range: float = 1e-4
    noise_level: float = 0.7
    sampler: Literal["sde", "cps", "dance"] = "sde"
    window: Literal["fixed", "fast", "mixgrpo"] = "fixed"
    sde_window: list[int] | None = None
    window_size: int = 2
    window_range: list[int] = field(default_factory=lambda: [0, 10])
    window_shift_interval: int = 25
    window_stride: int = 1
    train_steps: Literal["first", "random"] = "first"
    shared_noise: bool = False
    # "pipeline": the generator's own schedule; "shifted_linear": σ = s·t/(1 + (s − 1)·t) on a uniform t grid with
    # s = schedule_shift and model timesteps int(σ·1000), as DanceGRPO and MixGRPO sample FLUX
    schedule: Literal["pipeline", "shifted_linear"] = "pipeline"
    schedule_shift: float = 3.0
    # > 0: MixGRPO-Flash's compressed DPM tail after the window (its compress_ratio; needs the shifted_linear
    # schedule and the mixgrpo window)
    flash_compress_ratio: float = 0.0
    # with CFG, the training step's unconditional branch (detached, as flow_grpo's) is taken from the rollout
    # while the weights are still those that sampled (the round's first optimizer step): the same values, one
    # transformer call of the micro-batch's rows fewer per trained step; false recomputes it always
    reuse_uncond: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.flash_compress_ratio and (self.schedule != "shifted_linear" or self.window != "mixgrpo"):
            raise ValueError(
                "flash_compress_ratio > 0 (MixGRPO-Flash) needs schedule=shifted_linear and window=mixgrpo"
            )
        if not 0 <= self.flash_compress_ratio <= 1:
            raise ValueError(f"flash_compress_ratio must be in [0, 1], got {self.flash_compress_ratio}")
        if self.beta < 0:
            raise ValueError(f"beta (the KL weight) must be >= 0, got {self.beta}")
        if not self.noise_level > 0:
            raise ValueError(f"noise_level must be > 0 (the SDE steps need a density), got {self.noise_level}")
        if self.sde_window is not None:
            window = list(self.sde_window)
            if len(window) != 2 or not 0 <= window[0] < window[1] <= self.sample_steps:
                raise ValueError(
                    f"sde_window must be [start, end] with 0 <= start < end <= sample_steps ({self.sample_steps}), "
                    f"got {self.sde_window}"
                )


@dataclass
class FlowGRPOFastConfig(FlowGRPOConfig):
    """Flow-GRPO-Fast (yifan123/flow_grpo ``scripts/train_sd3_fast.py``, ``config/base.py`` lines 65-67): SDE on
    a window of 2 steps drawn in steps [0, 10) per sampling batch, ODE elsewhere, every window step trained."""

    trainer: str = "flow-grpo-fast"
    window: Literal["fixed", "fast", "mixgrpo"] = "fast"
    timestep_fraction: float = 1.0


@dataclass
class DanceGRPOConfig(FlowGRPOConfig):
    """DanceGRPO (Xue et al. 2025; XueZeyue/DanceGRPO ``scripts/finetune/finetune_flux_grpo.sh`` at 15cc71d):
    its SDE step with η 0.3 on 16 steps, initial noise shared within a group of 12, a random 60 % of the steps
    trained per sample, per-group std, lr 1e-5, clip 1e-4, advantages clipped to ±5; its advantages divide by the
    unbiased group std + 1e-8 (``std_ddof`` 1, ``std_eps`` 1e-8)."""

    trainer: str = "dance-grpo"
    sampler: Literal["sde", "cps", "dance"] = "dance"
    noise_level: float = 0.3
    sample_steps: int = 16
    group_size: int = 12
    global_std: bool = False
    std_eps: float = 1e-8
    std_ddof: int = 1
    lr: float = 1e-5
    shared_noise: bool = True
    train_steps: Literal["first", "random"] = "random"
    timestep_fraction: float = 0.6


@dataclass
class MixGRPOConfig(FlowGRPOConfig):
    """MixGRPO (Li et al. 2025; Tencent-Hunyuan/MixGRPO ``scripts/finetune/finetune_flux_grpo_MixGRPO.sh`` at
    e5cdd6a): 25 steps, Flow-GRPO's SDE (η 0.7) on a window of 4 steps moving by 1 every 25 optimizer steps
    (restarting at the end), ODE elsewhere, every window step trained, groups of 12 with their own std,
    lr 1e-5, clip 1e-4, KL 0. MixGRPO-Flash: ``ode_solver=dpm2`` with ``flash_compress_ratio`` 0.4 on
    ``schedule=shifted_linear`` (recipe ``train/flux-mixgrpo-flash``)."""

    trainer: str = "mix-grpo"
    window: Literal["fixed", "fast", "mixgrpo"] = "mixgrpo"
    window_size: int = 4
    sample_steps: int = 25
    group_size: int = 12
    global_std: bool = False
    lr: float = 1e-5
    timestep_fraction: float = 1.0


@dataclass
class DiffusionNFTConfig(FlowOnlineConfig):
    """DiffusionNFT (Zheng et al. 2025; NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py``, ``config/nft.py``):
    ODE sampling without CFG (``guidance`` 1), the forward-process negative-aware loss with ``beta`` 1 and a KL
    of weight ``kl_beta`` 1e-4 to the reference, 9 of the 10 sampler timesteps trained per sample with fresh
    noise, and an old (sampling) policy pulled toward the trained one after each round with the decay
    ``old_decay_type`` 1 (``min(0.001·step, 0.5)``)."""

    trainer: str = "diffusionnft"
    guidance: float = 1.0
    beta: float = 1.0
    kl_beta: float = 1e-4
    old_decay_type: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise ValueError(f"beta (DiffusionNFT's guidance strength) must be > 0, got {self.beta}")
        if self.kl_beta < 0:
            raise ValueError(f"kl_beta must be >= 0, got {self.kl_beta}")
        if self.old_decay_type not in (0, 1, 2):
            raise ValueError(f"old_decay_type must be 0, 1 or 2, got {self.old_decay_type}")


# ----------------------------------------------------------------------------------------------------------
# The shared base: rounds of grouped samples
# ----------------------------------------------------------------------------------------------------------
class FlowOnlineTrainer(OnlineTrainer):
    """Rounds of grouped samples on a flow-matching generator; subclasses say how a round's micro-batch is
    sampled (:meth:`sample_micro`) and how it becomes a loss (:meth:`loss_parts`)."""

    config_class: ClassVar[type[TrainConfig]] = FlowOnlineConfig
    # "v-diffusion" (Stable Audio) is trained as the flow it is up to a change of variables (trained_view)
    parametrisations: ClassVar[tuple[str, ...]] = ("flow", "v-diffusion")
    uses_reference: ClassVar[bool] = False
    checkpoint_blocks: ClassVar[bool] = True  # one transformer call per backward: its blocks are checkpointed

    def trained_view(self, policy: Any) -> Any:
        """A v-diffusion generator (Stable Audio) seen as a flow-matching one
        (:class:`~mmalign.models.stable_audio.StableAudioFlowView`): the same network, its states and times changed
        of variables, so the flow SDE, log-probs and losses apply unchanged."""
        if getattr(policy, "parametrisation", None) != "v-diffusion":
            return policy
        from ..models.stable_audio import StableAudioFlowView

        return StableAudioFlowView(policy)

    def __init__(self, config: FlowOnlineConfig, policy: Any = None, reward: Any = None):
        if config.checkpoint_every % config.sample_batches:
            raise ConfigError(
                f"checkpoint_every ({config.checkpoint_every}) must be a multiple of sample_batches "
                f"({config.sample_batches}) so that a resumed run starts a sampling round"
            )
        self._round: tuple[int, list[dict[str, Any]]] | None = None
        self._eval_best: float | None = None
        super().__init__(config, policy, reward)

    # -- data: prompts in groups -------------------------------------------------------------------------------
    def _setup_data(self) -> None:
        super()._setup_data()
        config = self.config
        round_samples = config.sample_batches * config.grad_accum * self.global_batch
        if round_samples % config.group_size:
            raise ConfigError(
                f"a round holds sample_batches × grad_accum × batch_size × processes = {round_samples} samples, "
                f"not a multiple of group_size {config.group_size}"
            )
        self.prompts_per_round = round_samples // config.group_size
        self.schedule = Schedule(len(self.prompts), self.prompts_per_round, config.seed)
        self.eval_prompts = read_prompts(config.eval_prompts) if config.eval_prompts else []

    def _graph_calls(self) -> float:
        config = self.config
        rows = config.batch_size * (2 if config.guidance != 1.0 else 1)
        frames = self.policy.latent_frames() if hasattr(self.policy, "latent_frames") else 1  # video latents
        return rows / 2 * (config.resolution / 512) ** 2 * frames

    def run_prompts(self) -> list[str]:
        return list(dict.fromkeys([*self.prompts, *self.eval_prompts, *self.config.validation_prompts]))

    @torch.no_grad()
    def sample_grid(self) -> Path | None:
        """Images of the validation prompts (ODE, ``sample_steps``, ``guidance``, fixed seeds) tiled into
        ``samples/step-N.png`` (videos: a row of frames each), from the cached conditions (so it works with
        ``free_text_encoders``). Under FSDP every process samples (the network's forward gathers its shards)."""
        from ..modalities.image import tensor_to_pil

        if not self.accelerator.is_main_process and not is_fsdp(self.accelerator):
            return None

        config = self.config
        prompts = list(config.validation_prompts)
        trajectory = sample_flow_trajectories(
            self.policy,
            self.sampling_model,
            self._embeds(prompts),
            self.uncond(len(prompts)),
            torch.Generator().manual_seed(config.seed),
            config.sample_steps,
            config.guidance,
            latent_shape=self.latent_shape,
            sde_window=(0, 0),
        )
        if not self.accelerator.is_main_process:
            return None
        media = self.policy.decode(trajectory.final).cpu()
        if media.ndim == 5:  # videos [B, T, 3, H, W]: one row of frames per prompt
            grid = tile_rows([[tensor_to_pil(frame) for frame in video] for video in media])
        else:
            grid = tile_rows([[tensor_to_pil(image) for image in media]])
        path = self.output_dir / "samples" / f"step-{self.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        return path

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """One latent's shape at the training resolution: ``(C, h, w)``, or ``(C, F', h, w)`` for videos."""
        return tuple(self.policy.latent_shape(self.config.resolution, self.config.resolution))

    def round_of(self, micro_index: int) -> tuple[int, int]:
        """``(round index, first micro-batch of the round)``."""
        per_round = self.config.sample_batches * self.config.grad_accum
        return micro_index // per_round, (micro_index // per_round) * per_round

    def make_batch(self, micro_index: int) -> dict[str, Any]:
        """Micro-batch ``micro_index`` of its round; the round is sampled, scored and normalised when its first
        micro-batch is asked for, with the weights of that moment."""
        round_index, first = self.round_of(micro_index)
        if self._round is None or self._round[0] != round_index:
            self._round = None  # free the previous round first
            self.start_round(round_index)
            per_round = self.config.sample_batches * self.config.grad_accum
            self._round = (round_index, self._sample_round(round_index, range(first, first + per_round)))
        return self._round[1][micro_index - first]

    def start_round(self, round_index: int) -> None:
        """Hook before a round is sampled (DiffusionNFT updates its old policy here)."""

    def micro_prompts(self, round_index: int, micro_index: int) -> list[str]:
        """The global micro-batch's prompts: round row ``k`` holds prompt ``k // group_size`` of the round."""
        _, first = self.round_of(micro_index)
        prompts = [self.prompts[index] for _, index in self.schedule.batch(round_index)]
        start = (micro_index - first) * self.global_batch
        return [prompts[k // self.config.group_size] for k in range(start, start + self.global_batch)]

    def _sample_round(self, round_index: int, micro_indices: range) -> list[dict[str, Any]]:
        acc, config = self.accelerator, self.config
        batches = []
        for micro_index in micro_indices:
            global_prompts = self.micro_prompts(round_index, micro_index)
            lo, hi = acc.process_index * config.batch_size, (acc.process_index + 1) * config.batch_size
            prompts = global_prompts[lo:hi]
            batch = {
                "prompts": prompts,
                "global_prompts": global_prompts,
                "conditions": self._embeds(prompts),
                "micro_index": micro_index,
                "round": round_index,
                "slice": (lo, hi),
                "sampled_at_step": self.step,  # the optimizer step whose weights sample it
            }
            batch["trajectory"] = self.sample_micro(batch)
            with torch.no_grad():
                images = self.policy.decode(batch["trajectory"].final)
                batch["components"] = self.reward.components(images, prompts).float()
            batches.append(batch)
        components = torch.cat([self._gather(b["components"]) for b in batches])  # [N, K], round order
        prompts = [p for b in batches for p in b["global_prompts"]]
        advantages = self.advantages(components, prompts)
        for i, batch in enumerate(batches):
            lo, hi = batch["slice"]
            own = advantages[i * self.global_batch : (i + 1) * self.global_batch][lo:hi]
            batch["advantages"] = own.to(acc.device)
            batch["rewards"] = self.weighted(batch["components"])
        return batches

    def _gather(self, values: Tensor) -> Tensor:
        acc = self.accelerator
        values = values.to(acc.device)
        return (acc.gather(values) if acc.num_processes > 1 else values).float().cpu()

    def weighted(self, components: Tensor) -> Tensor:
        weights = torch.tensor(self.reward.weights, dtype=components.dtype, device=components.device)
        return (components * weights).sum(dim=1)

    def advantages(self, components: Tensor, prompts: list[str]) -> Tensor:
        """Group-relative advantages ``[N]`` of the round's rewards ``[N, K]`` (:func:`losses.group_advantages`):
        of each reward, then weighted and summed (``advantage=per_reward``), or of the weighted sum (``sum``)."""
        config = self.config
        options = dict(global_std=config.global_std, eps=config.std_eps, ddof=config.std_ddof)
        if config.advantage == "sum":
            return losses.group_advantages(self.weighted(components), prompts, **options)
        per_reward = [
            weight * losses.group_advantages(components[:, k], prompts, **options)
            for k, weight in enumerate(self.reward.weights)
        ]
        return torch.stack(per_reward).sum(dim=0)

    def reward_names(self) -> list[str]:
        names = [getattr(r, "name", f"reward{k}") for k, r in enumerate(self.reward.rewards)]
        return [name if names.count(name) == 1 else f"{name}{k}" for k, name in enumerate(names)]

    def reward_metrics(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        metrics = {"reward": batch["rewards"].mean(), "advantage_abs": batch["advantages"].abs().mean()}
        if len(self.reward.rewards) > 1:
            for k, name in enumerate(self.reward_names()):
                metrics[f"reward/{name}"] = batch["components"][:, k].mean()
        return metrics

    def sample_micro(self, batch: dict[str, Any]) -> FlowTrajectory:
        raise NotImplementedError

    def rollout(self, batch: dict[str, Any], steps: int | None = None, **kwargs: Any) -> FlowTrajectory:
        """This process's chains of the global micro-batch ``batch`` under :attr:`sampling_model`, from the
        micro-batch's sampling stream (``kwargs``: the sampler options of
        :func:`~mmalign.models.flow_rollout.sample_flow_trajectories`)."""
        config = self.config
        with torch.no_grad(), self.accelerator.autocast():
            return sample_flow_trajectories(
                self.policy,
                self.sampling_model,
                batch["conditions"],
                self.uncond(len(batch["prompts"])),
                _generator(config.seed, batch["micro_index"], _FLOW_SAMPLE_STREAM),
                steps or config.sample_steps,
                config.guidance,
                latent_shape=self.latent_shape,
                global_batch=self.global_batch,
                offset=batch["slice"][0],
                **kwargs,
            )

    def compute_loss(self, batch: dict[str, Any]) -> losses.LossOutput:
        """The whole micro-batch loss in one graph (the loop backpropagates :meth:`loss_parts` one by one)."""
        outs = [part() for part in self.loss_parts(batch)]
        total = sum(out.loss for out in outs)
        metrics: dict[str, Tensor] = {}
        for out in outs:
            for key, value in out.metrics.items():
                metrics[key] = metrics.get(key, 0.0) + value
        return losses.LossOutput(total, metrics)

    @property
    def sampling_model(self) -> torch.nn.Module:
        """The network that samples (no gradients, no DDP hooks)."""
        return self.accelerator.unwrap_model(self.model)

    def uncond(self, count: int) -> Conditions | None:
        return None if self.config.guidance == 1.0 else self.policy.unconditional(count).to(self.accelerator.device)

    def reference_context(self):
        """Where the reference model runs: the adapters-disabled model (LoRA) or the frozen copy."""
        if self.ref_model is not None:
            return _Returning(self.ref_model)
        return adapters_disabled(self.sampling_model)

    # -- held-out evaluation ---------------------------------------------------------------------------------
    def after_step(self, metrics: dict[str, float]) -> None:
        config = self.config
        if config.eval_every and self.step % config.eval_every == 0:
            self.evaluate(metrics)

    @torch.no_grad()
    def evaluate(self, metrics: dict[str, float] | None = None) -> dict[str, float]:
        """Mean held-out reward (``eval_reward``, default the training reward) of ``eval_samples`` ODE samples per
        held-out prompt, with fixed seeds (the same initial latents at every evaluation); logged as ``eval/*``
        beside the training reward. With ``eval_stop_drop`` > 0, training stops once the held-out reward falls
        that far below its best (:attr:`stop_reason` says so); with ``eval_keep_best`` the weights of the best
        evaluation are kept and saved at the end. With an EMA (``ema_decay``) the EMA weights are evaluated (they
        are what the run saves)."""
        from .online import build_reward, for_modality

        config, acc = self.config, self.accelerator
        if not hasattr(self, "_eval_reward"):
            spec = config.eval_reward or config.reward
            self._eval_reward = (
                self.reward
                if spec == config.reward and not config.eval_reward_weights
                else for_modality(
                    build_reward(spec, config.eval_reward_weights), getattr(self.policy, "modality", "image")
                )
            ).to(acc.device)
        prompts = [p for p in self.eval_prompts for _ in range(config.eval_samples)]
        if self.ema is not None:
            self.ema.store(self.trainable)
            self.ema.copy_to(self.trainable)
        try:
            components = self._eval_components(prompts)
        finally:
            if self.ema is not None:
                self.ema.restore(self.trainable)
        weights = torch.tensor(self._eval_reward.weights, dtype=components.dtype)
        result = {"eval/reward": float((components * weights).sum(dim=1).mean())}
        for k, name in enumerate(self.reward_names() if self._eval_reward is self.reward else []):
            result[f"eval/reward/{name}"] = float(components[:, k].mean())
        if metrics:
            result.update({f"eval/train_{k}": v for k, v in metrics.items() if k in ("reward", "kl_loss", "kl_div")})
        if config.eval_keep_best and (self._eval_best is None or result["eval/reward"] > self._eval_best):
            kept = self.ema.shadow_params if self.ema is not None else self.trainable
            # whole tensors on every process (under FSDP gathered from the shards: every process evaluates), so
            # that they save as they are and load into any engine
            self._best = (self.step, [_whole(tensor) for tensor in kept])
        self._eval_best = max(result["eval/reward"], self._eval_best or float("-inf"))
        if config.eval_stop_drop and self._eval_best - result["eval/reward"] > config.eval_stop_drop:
            self.stop_reason = (
                f"held-out reward {result['eval/reward']:.4g} fell more than eval_stop_drop={config.eval_stop_drop} "
                f"below its best {self._eval_best:.4g} (reward hacking?)"
            )
            logger.warning("step %d: %s; stopping", self.step, self.stop_reason)
        self._log(result)
        return result

    def _eval_components(self, prompts: list[str]) -> Tensor:
        config = self.config
        scores = []
        for start in range(0, len(prompts), config.batch_size):
            chunk = prompts[start : start + config.batch_size]
            rng = _generator(config.seed, start, _EVAL_STREAM)
            trajectory = sample_flow_trajectories(
                self.policy,
                self.sampling_model,
                self._embeds(chunk),
                self.uncond(len(chunk)),
                rng,
                config.sample_steps,
                config.guidance,
                latent_shape=self.latent_shape,
                sde_window=(0, 0),
            )
            scores.append(self._eval_reward.components(self.policy.decode(trajectory.final), chunk).float().cpu())
        return torch.cat(scores)

    def save_final(self) -> Path:
        """With ``eval_keep_best``: the best evaluation's weights (into the EMA when there is one) before saving."""
        best = getattr(self, "_best", None)
        if best is not None:
            step, kept = best
            target = self.ema.shadow_params if self.ema is not None else self.trainable
            with torch.no_grad():
                for tensor, value in zip(target, kept):
                    tensor.copy_(_like(value, tensor))
            logger.info("eval_keep_best: saving the weights of step %d (held-out reward %.4g)", step, self._eval_best)
            self.best_step = step
        return super().save_final()

    def save_extra_state(self, folder: Path) -> None:
        from safetensors.torch import save_file

        best = getattr(self, "_best", None)
        state = {"eval_best": self._eval_best, "best_step": None if best is None else best[0]}
        (folder / "flow_state.json").write_text(json.dumps(state))
        if best is not None:
            save_file({str(i): t.contiguous().cpu() for i, t in enumerate(best[1])}, str(folder / "best.safetensors"))

    def load_extra_state(self, folder: Path) -> None:
        from safetensors.torch import load_file

        path = folder / "flow_state.json"
        if path.is_file():
            state = json.loads(path.read_text())
            self._eval_best = state.get("eval_best")
            if state.get("best_step") is not None:
                kept = load_file(str(folder / "best.safetensors"))
                self._best = (int(state["best_step"]), [kept[str(i)] for i in range(len(kept))])


class _Returning:
    """A context manager that returns ``value`` (the frozen reference copy)."""

    def __init__(self, value: Any):
        self.value = value

    def __enter__(self) -> Any:
        return self.value

    def __exit__(self, *exc) -> bool:
        return False


# ----------------------------------------------------------------------------------------------------------
# Flow-GRPO and its variants
# ----------------------------------------------------------------------------------------------------------
class FlowGRPOTrainer(FlowOnlineTrainer):
    """Flow-GRPO (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL";
    yifan123/flow_grpo): G samples per prompt from the SDE sampler
    (:func:`~mmalign.models.flow_rollout.sample_flow_trajectories`), group-relative advantages, and per trained
    step the PPO-clipped ratio of the recomputed log-probability with an optional KL to the reference
    (:func:`~mmalign.trainers.losses.flow_grpo_loss`), each step backpropagated on its own (flow_grpo accumulates
    over the timesteps). With CFG the gradient goes through the conditional branch only, as flow_grpo's
    ``compute_log_prob`` detaches the unconditional one; that branch is computed apart without a graph. The
    reference, needed only when ``beta`` > 0, is the model with adapters disabled (LoRA)
    or a frozen copy."""

    config_class: ClassVar[type[TrainConfig]] = FlowGRPOConfig

    @property
    def uses_reference(self) -> bool:  # type: ignore[override]
        return self.config.beta > 0

    def sde_window(self, batch: dict[str, Any]) -> tuple[int, int] | None:
        """The stochastic steps ``[start, end)`` of this micro-batch's chains (None: every step): fixed, drawn
        for the global micro-batch from its seeded stream (fast), or where MixGRPO's window stands at the optimizer
        step of the round's start."""
        import random

        from ..models import sde_windows

        config = self.config
        if config.window == "fast":
            seed = (config.seed * 1_000_003 + batch["micro_index"] * 7919 + _FLOW_WINDOW_STREAM) % (2**63 - 1)
            return sde_windows.fast_window(
                config.sample_steps, config.window_size, tuple(config.window_range), random.Random(seed)
            )
        if config.window == "mixgrpo":
            first_step = batch["round"] * config.sample_batches
            return sde_windows.mixgrpo_window(
                first_step,
                config.sample_steps,
                config.window_size,
                config.window_shift_interval,
                config.window_stride,
            )
        window = config.sde_window
        return None if window is None else (int(window[0]), int(window[1]))

    def sample_micro(self, batch: dict[str, Any]) -> FlowTrajectory:
        config = self.config
        shared = config.group_size if config.shared_noise else None
        if shared and self.global_batch % shared:
            raise ConfigError(
                f"shared_noise needs whole groups in a global micro-batch: batch_size × processes = "
                f"{self.global_batch} is not a multiple of group_size {shared}"
            )
        window = self.sde_window(batch)
        schedule = self.schedule_for(window)
        return self.rollout(
            batch,
            steps=None if schedule is None else len(schedule),
            schedule=schedule,
            noise_level=config.noise_level,
            sampler=config.sampler,
            sde_window=window,
            shared_noise_per=shared,
            ode_solver=config.ode_solver,
            keep_uncond=config.reuse_uncond and config.guidance != 1.0,
        )

    def schedule_for(self, window: tuple[int, int] | None):
        """The sampling schedule: None (the generator's own), DanceGRPO/MixGRPO's shifted linear one, or
        MixGRPO-Flash's with its compressed DPM tail after ``window``
        (:func:`~mmalign.models.sde_windows.mixgrpo_flash_sigmas`)."""
        from ..models import sde_windows
        from ..models.generator import Schedule

        config = self.config
        if config.schedule == "pipeline":
            return None
        if config.flash_compress_ratio:
            end = max(1, window[1] if window is not None else config.sample_steps)
            sigmas = sde_windows.mixgrpo_flash_sigmas(
                config.sample_steps, end, config.schedule_shift, config.flash_compress_ratio
            )
        else:
            sigmas = sde_windows.shifted_linear_sigmas(config.sample_steps, config.schedule_shift)
        device = self.accelerator.device
        return Schedule(sde_windows.reference_timesteps(sigmas).to(device), sigmas.to(device))

    def train_steps(self, batch: dict[str, Any]) -> Tensor:
        """``[b, n]``: the SDE steps each sample trains on, ``n = max(1, int(len(window) · timestep_fraction))``:
        the first ``n`` of the window for every sample (flow_grpo) or, with ``train_steps=random``, the first ``n``
        of an independent permutation per sample of the window without the chain's last step, drawn for the global
        micro-batch (DanceGRPO's ``train_grpo_flux.py``: 9 of the first 15 of 16 steps at fraction 0.6)."""
        config, (lo, hi) = self.config, batch["slice"]
        sde = torch.tensor(batch["trajectory"].sde_steps, dtype=torch.long)
        if len(sde) == 0:  # an empty window (MixGRPO's start at steps - 2): nothing to train on
            return torch.zeros((hi - lo, 0), dtype=torch.long)
        count = max(1, int(len(sde) * config.timestep_fraction))
        if config.train_steps == "first":
            return sde[:count].expand(hi - lo, count)
        # DanceGRPO: never the chain's last step (its Gaussian is the sharpest), int((n − 1)·fraction) of the rest
        last = batch["trajectory"].steps - 1
        if len(sde) > 1 and int(sde[-1]) == last:
            sde = sde[:-1]
            count = max(1, int(len(sde) * config.timestep_fraction))
        gen = _generator(config.seed, batch["micro_index"], _FLOW_STEPS_STREAM)
        perms = torch.stack([sde[torch.randperm(len(sde), generator=gen)] for _ in range(self.global_batch)])
        return perms[lo:hi, :count]

    def _column(
        self, model: torch.nn.Module, trajectory: FlowTrajectory, steps: Tensor, reuse_uncond: bool = False
    ) -> FlowStep:
        """The recorded step ``steps[i]`` of every row ``i`` under ``model``: one call per distinct step; with
        gradients through the conditional branch only (flow_grpo's ``noise_pred_uncond.detach()``), that branch
        taken from the rollout when ``reuse_uncond`` (``model`` has the weights that sampled)."""
        values = steps.unique()
        options = dict(detach_uncond=True, reuse_uncond=reuse_uncond)  # the reference's mean is computed alike
        if len(values) == 1:
            return flow_step_log_prob(self.policy, model, trajectory, int(values[0]), **options)
        log_prob = mean = std = None
        for value in values.tolist():
            rows = torch.nonzero(steps == value).flatten()
            part = flow_step_log_prob(self.policy, model, trajectory, value, rows=rows, **options)
            if log_prob is None:
                log_prob = part.log_prob.new_zeros(len(steps))
                mean = part.mean.new_zeros((len(steps), *part.mean.shape[1:]))
                std = part.log_prob.new_zeros(len(steps))
            log_prob = log_prob.index_put((rows.to(log_prob.device),), part.log_prob)
            mean = mean.index_put((rows.to(mean.device),), part.mean)
            std = std.index_put((rows.to(std.device),), torch.as_tensor(part.std).reshape(-1).expand(len(rows)).to(std))
        return FlowStep(prev_sample=trajectory.latents[:, 1], log_prob=log_prob, mean=mean, std=std)

    def loss_parts(self, batch: dict[str, Any]) -> list:
        steps = self.train_steps(batch)
        count = steps.shape[1]
        return [lambda k=k: self._step_loss(batch, steps[:, k], count) for k in range(count)]

    def _step_loss(self, batch: dict[str, Any], steps: Tensor, count: int) -> losses.LossOutput:
        config, trajectory = self.config, batch["trajectory"]
        rows = torch.arange(len(steps))
        reuse = trajectory.uncond_velocities is not None and batch["sampled_at_step"] == self.step
        step = self._column(self.model, trajectory, steps, reuse_uncond=reuse)
        old = trajectory.log_probs[rows, steps.to(trajectory.log_probs.device)].to(step.log_prob.device)
        kl = {}
        if config.beta > 0:
            with torch.no_grad(), self.reference_context() as reference:
                ref = self._column(reference, trajectory, steps)
            kl = {"mean": step.mean, "ref_mean": ref.mean, "std": step.std}
        out = losses.flow_grpo_loss(
            step.log_prob,
            old,
            batch["advantages"],
            clip_range=config.clip_range,
            adv_clip_max=config.adv_clip_max,
            beta=config.beta,
            **kl,
        )
        metrics = {key: value / count for key, value in out.metrics.items()}
        metrics.update({key: value / count for key, value in self.reward_metrics(batch).items()})
        return losses.LossOutput(out.loss / count, metrics)


class FlowGRPOFastTrainer(FlowGRPOTrainer):
    """Flow-GRPO-Fast: :class:`FlowGRPOTrainer` with :class:`FlowGRPOFastConfig`'s random SDE windows."""

    config_class: ClassVar[type[TrainConfig]] = FlowGRPOFastConfig


class DanceGRPOTrainer(FlowGRPOTrainer):
    """DanceGRPO (Xue et al. 2025, "DanceGRPO: Unleashing GRPO on Visual Generation"; XueZeyue/DanceGRPO):
    :class:`FlowGRPOTrainer` with :class:`DanceGRPOConfig` (its SDE step, shared group noise, step subsets)."""

    config_class: ClassVar[type[TrainConfig]] = DanceGRPOConfig


class MixGRPOTrainer(FlowGRPOTrainer):
    """MixGRPO (Li et al. 2025, "MixGRPO: Unlocking Flow-based GRPO Efficiency with Mixed ODE-SDE";
    Tencent-Hunyuan/MixGRPO): :class:`FlowGRPOTrainer` with :class:`MixGRPOConfig`'s sliding SDE window."""

    config_class: ClassVar[type[TrainConfig]] = MixGRPOConfig


# ----------------------------------------------------------------------------------------------------------
# DiffusionNFT
# ----------------------------------------------------------------------------------------------------------
class DiffusionNFTTrainer(FlowOnlineTrainer):
    """DiffusionNFT (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process";
    NVlabs/DiffusionNFT): the old policy samples clean images with the ODE (no likelihoods, no CFG needed);
    rewards become optimality probabilities r (:func:`~mmalign.trainers.losses.nft_optimality`); each sample is
    re-noised at its trained timesteps with fresh noise and the trained velocity enters implicit positive and
    negative policies around the old one (:func:`~mmalign.trainers.losses.diffusion_nft_loss`). After each round
    the old policy moves toward the trained weights with the decay :func:`~mmalign.trainers.losses.nft_old_decay`
    (its weights are part of the checkpoint)."""

    config_class: ClassVar[type[TrainConfig]] = DiffusionNFTConfig

    @property
    def uses_reference(self) -> bool:  # type: ignore[override]
        return self.config.kl_beta > 0

    def _setup_model(self) -> None:
        super()._setup_model()
        self.old_params = [p.detach().clone() for p in self.trainable]
        self._old_round = 0  # the round whose start the old policy is synchronised with

    def start_round(self, round_index: int) -> None:
        """Before sampling round ``R`` > 0: old ← d·old + (1 − d)·θ once per finished round, ``d`` from the
        optimizer steps taken (the reference updates after each epoch's training)."""
        while self._old_round < round_index:
            self._old_round += 1
            decay = losses.nft_old_decay(self.step, self.config.old_decay_type)
            self.old_params = [
                losses.nft_old_policy_update(old, p, decay) for old, p in zip(self.old_params, self.trainable)
            ]

    def old_policy(self):
        """Context in which :attr:`sampling_model` carries the old policy's weights (swapped in, then back)."""
        return _Swapped(self.trainable, self.old_params)

    def sample_micro(self, batch: dict[str, Any]) -> FlowTrajectory:
        with self.old_policy():
            return self.rollout(batch, sde_window=(0, 0), ode_solver=self.config.ode_solver)

    def advantages(self, components: Tensor, prompts: list[str]) -> Tensor:
        """The optimality probabilities r ``[N]`` from the group-relative advantages."""
        return losses.nft_optimality_from_advantages(super().advantages(components, prompts), self.config.adv_clip_max)

    def loss_parts(self, batch: dict[str, Any]) -> list:
        config, (lo, hi) = self.config, batch["slice"]
        gen = _generator(config.seed, batch["micro_index"], _FLOW_STEPS_STREAM)
        indices = losses.nft_timestep_indices(self.global_batch, config.sample_steps, config.timestep_fraction, gen)
        count = indices.shape[1]
        noise_gen = _generator(config.seed, batch["micro_index"], _NFT_NOISE_STREAM)
        noise = torch.randn((count, self.global_batch, *self.latent_shape), generator=noise_gen)[:, lo:hi]
        indices = indices[lo:hi]
        return [lambda k=k: self._step_loss(batch, indices[:, k], noise[k], count) for k in range(count)]

    def _step_loss(self, batch: dict[str, Any], index: Tensor, noise: Tensor, count: int) -> losses.LossOutput:
        config, trajectory = self.config, batch["trajectory"]
        x0 = trajectory.final
        noise = noise.to(x0.device)
        t = trajectory.timesteps.to(x0.device)[index.to(x0.device)]
        sigma = trajectory.sigmas.to(x0.device)[index.to(x0.device)]
        x_t = self.policy.add_noise(x0, noise, t)
        conditions = batch["conditions"]
        with torch.no_grad():
            with self.old_policy():
                v_old = self.policy.predict(self.sampling_model, x_t, t, conditions)
            v_ref = None
            if config.kl_beta > 0:
                with self.reference_context() as reference:
                    v_ref = self.policy.predict(reference, x_t, t, conditions)
        v_theta = self.policy.predict(self.model, x_t, t, conditions)
        out = losses.diffusion_nft_loss(
            v_theta,
            v_old,
            x0,
            x_t,
            sigma,
            batch["advantages"],
            beta=config.beta,
            v_ref=v_ref,
            kl_beta=config.kl_beta,
            adv_clip_max=config.adv_clip_max,
        )
        metrics = {key: value / count for key, value in out.metrics.items()}
        metrics.update({key: value / count for key, value in self.reward_metrics(batch).items()})
        return losses.LossOutput(out.loss.float() / count, metrics)

    def save_extra_state(self, folder: Path) -> None:
        from safetensors.torch import save_file

        super().save_extra_state(folder)
        save_file(
            {str(i): p.contiguous().cpu() for i, p in enumerate(self.old_params)},
            str(folder / "old_policy.safetensors"),
        )
        (folder / "old_policy.json").write_text(json.dumps({"round": self._old_round}))

    def load_extra_state(self, folder: Path) -> None:
        from safetensors.torch import load_file

        super().load_extra_state(folder)
        state = load_file(str(folder / "old_policy.safetensors"))
        if len(state) != len(self.old_params):
            raise ConfigError(
                f"{folder}: old_policy.safetensors has {len(state)} tensors, expected {len(self.old_params)}"
            )
        self.old_params = [state[str(i)].to(p.device, p.dtype) for i, p in enumerate(self.old_params)]
        self._old_round = int(json.loads((folder / "old_policy.json").read_text())["round"])


class _Swapped:
    """Context in which ``params`` hold ``values`` (copied in, restored on exit); for the old policy's weights."""

    def __init__(self, params: list[torch.nn.Parameter], values: list[Tensor]):
        self.params, self.values = params, values

    def __enter__(self) -> None:
        self.saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, v in zip(self.params, self.values):
                p.copy_(v)

    def __exit__(self, *exc) -> bool:
        with torch.no_grad():
            for p, v in zip(self.params, self.saved):
                p.copy_(v)
        self.saved = []
        return False


__all__ = [
    "DanceGRPOConfig",
    "DanceGRPOTrainer",
    "FlowGRPOFastTrainer",
    "MixGRPOTrainer",
    "FlowGRPOFastConfig",
    "MixGRPOConfig",
    "DiffusionNFTConfig",
    "DiffusionNFTTrainer",
    "FlowGRPOConfig",
    "FlowGRPOTrainer",
    "FlowOnlineConfig",
    "FlowOnlineTrainer",
]


def _whole(tensor: Tensor) -> Tensor:
    """A detached copy of ``tensor`` on the CPU, gathered whole when it is an FSDP shard (a collective)."""
    tensor = tensor.detach()
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.cpu().clone()


def _like(value: Tensor, target: Tensor) -> Tensor:
    """``value`` (whole) laid out as ``target``: sharded like an FSDP parameter, or on its device."""
    if hasattr(target, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements)
    return value.to(device=target.device, dtype=target.dtype)
