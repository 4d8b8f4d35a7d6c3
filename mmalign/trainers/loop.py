"""The one training loop, on accelerate, that every diffusion trainer shares.

A trainer family (``dpo.py`` and later the online trainers) only says how a batch becomes a loss
(:meth:`Trainer.compute_loss`); this module owns everything else: the policy (a diffusers pipeline), LoRA
through peft (the reference is the same UNet with adapters disabled) or full fine-tuning (a frozen reference
copy), mixed precision and DDP through accelerate (``accelerate launch`` or ``torchrun``), gradient
accumulation and checkpointing, EMA, atomic checkpoints with exact resume, a NaN/inf guard, tensorboard logs
and validation sample grids.

Determinism and exact resume: every random draw of step ``s`` (data order, crops, VAE latent samples, prompt
dropout, timesteps, noise) comes from generators seeded by ``(seed, s)`` and drawn for the *global* batch, each
process then taking its slice. Resuming therefore needs only the weights, optimizer, LR schedule, EMA and the
step, and the result does not depend on the number of processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from ..errors import ConfigError, MMAlignError
from ..memory import free_device_memory
from ..modalities.writers import write_wav
from .distributed import (
    build_accelerator,
    configure_deepspeed,
    deepspeed_stage,
    full_state_dict,
    is_fsdp,
    load_sharded,
    loading_context,
    save_sharded,
    set_wrap_blocks,
    shard_frozen,
)
from .losses import LossOutput

logger = logging.getLogger("mmalign.train")

CHECKPOINT_PREFIX = "step-"
#: the folder of a checkpoint holding FSDP's sharded weights and optimizer state (torch.distributed.checkpoint)
SHARDED_DIR = "sharded"
#: the folder of a checkpoint holding DeepSpeed's engine state (accelerate's save_state)
DEEPSPEED_DIR = "deepspeed"


@dataclass
class TrainConfig:
    """Options shared by every diffusion trainer. Defaults follow the diffusers Diffusion-DPO LoRA script
    (``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py``): e.g. a centre crop with random
    horizontal flips (``random_crop=False``, ``hflip=True``, as its and the official script's defaults)."""

    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    data: str = ""
    output_dir: str = "runs/train"
    trainer: str = "dpo"
    max_steps: int = 2000
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-5
    scale_lr: bool = False
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = 0
    # adamw (the papers' optimizer); sgd: plain SGD (no momentum, no weight decay), whose update is linear in
    # the gradient, for checks that compare updates and for ablations
    optimizer: Literal["adamw", "sgd"] = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 0
    lora_rank: int = 8
    lora_alpha: float | None = None
    # peft target_modules; empty: the generator family's defaults (UNet: to_k/q/v/out.0; SD3: both attention
    # streams; see each family's ``lora_targets``)
    lora_targets: list[str] = field(default_factory=list)
    reference: Literal["auto", "adapters", "copy", "precomputed"] = "auto"
    beta: float = 5000.0
    resolution: int = 512
    # video generators: frames per sampled video (Wan: (frames - 1) % 4 == 0; AnimateDiff: 1..32); 0: the
    # generator's own (its folder's mmalign_generator.json, else the pipeline's: Wan 81, AnimateDiff 16)
    frames: int = 0
    # audio generators (Stable Audio): seconds of audio sampled (the seconds_end conditioning and the decoded length);
    # 0: the generator's own (its folder's mmalign_generator.json, else the model's maximum)
    duration: float = 0.0
    # multi-view generation as one image grid ("RxC", e.g. "3x2" as Zero123++, "2x2" as Instant3D): an image
    # generator whose images are read as views (:mod:`mmalign.models.view_grid`); image rewards are lifted to
    # multi-view (per view, with cross-view consistency); empty: images
    views_grid: str = ""
    # Wan 2.2 A14B (two experts, :mod:`mmalign.models.wan`): which experts train ("both", "high": the high-noise
    # transformer, "low": transformer_2; empty: both) and the low-noise stage's guidance scale (the pipeline's
    # guidance_scale_2; null: the same as guidance) wherever the trainer guides (sampling, rollouts, training steps)
    experts: Literal["", "both", "high", "low"] = ""
    guidance_2: float | None = None
    # the scripts' --random_crop (off: a centre crop after resizing the shorter side) and --no_hflip (off: flips)
    random_crop: bool = False
    hflip: bool = True
    prompt_dropout: float = 0.0
    # [low, high): fractions of the training timesteps the losses draw from (like diffusers' timestep_bias_*
    # options); [0.5, 1.0] trains where layout and attributes are decided
    timestep_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    # flow families: "uniform" (an index into the scheduler's timestep table, within timestep_range) or
    # "logit_normal" (SD3's training density, with logit_mean / logit_std); v-diffusion (Stable Audio): t uniform in
    # timestep_range (stable-audio-tools' default) or sigmoid(N(logit_mean, logit_std)) (its "logit_normal")
    timestep_density: Literal["uniform", "logit_normal"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    tie_policy: Literal["drop", "keep"] = "drop"
    max_train_samples: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    # the distributed engine (:mod:`mmalign.trainers.distributed`): auto (what `accelerate launch` was configured
    # for, else DDP), ddp, fsdp2, fsdp2-hybrid, deepspeed-zero2, deepspeed-zero3
    distributed: Literal["auto", "ddp", "fsdp2", "fsdp2-hybrid", "deepspeed-zero2", "deepspeed-zero3"] = "auto"
    # true / false / "auto": on when the device's free memory looks short (:func:`resolve_gradient_checkpointing`)
    gradient_checkpointing: bool | Literal["auto"] = False
    cache_latents: bool = True
    # flow families: a folder of encoded prompts (one safetensors file per prompt, reused by later runs), and
    # whether to encode every prompt of the run first and then free the text encoders (a 4.7B T5 need not stay)
    conditions_cache: str | None = None
    free_text_encoders: bool = False
    ema_decay: float = 0.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: str | None = None
    log_every: int = 10
    sample_every: int = 0
    validation_prompts: list[str] = field(default_factory=list)
    sample_steps: int = 25
    guidance: float = 7.5
    attention: Literal["sdpa", "xformers"] = "sdpa"
    tracker: Literal["tensorboard", "none"] = "tensorboard"
    progress: bool = True
    # bit-exact reruns and resumes on GPUs: deterministic CUDA kernels (torch.use_deterministic_algorithms and a
    # fixed cuBLAS workspace) in full fp32 (no TF32), slower; CPUs are deterministic without it
    deterministic: bool = False

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "grad_accum", "resolution", "checkpoint_every", "log_every")
        if self.frames < 0:
            raise ValueError(f"frames must be >= 0 (0: the generator's own), got {self.frames}")
        if self.duration < 0:
            raise ValueError(f"duration must be >= 0 seconds (0: the generator's own), got {self.duration}")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 = full fine-tuning), got {self.lora_rank}")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}")
        bounds = list(self.timestep_range)
        if len(bounds) != 2 or not 0.0 <= bounds[0] < bounds[1] <= 1.0:
            raise ValueError(
                f"timestep_range must be [low, high] with 0 <= low < high <= 1 (fractions of the training timesteps),"
                f" got {self.timestep_range}"
            )
        if self.timestep_density == "logit_normal" and list(self.timestep_range) != [0.0, 1.0]:
            raise ValueError("timestep_density=logit_normal draws over all timesteps; leave timestep_range at [0, 1]")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.reference == "adapters" and self.lora_rank == 0:
            raise ValueError(
                "reference=adapters needs LoRA (lora_rank > 0); full fine-tuning uses reference=copy or precomputed"
            )

    @property
    def reference_mode(self) -> str:
        if self.reference != "auto":
            return self.reference
        return "adapters" if self.lora_rank > 0 else "copy"


def timestep_bounds(fractions: list[float], num_train_timesteps: int) -> tuple[int, int]:
    """``[low, high)`` integer timesteps for ``timestep_range`` fractions (at least one timestep)."""
    low = min(int(round(fractions[0] * num_train_timesteps)), num_train_timesteps - 1)
    return low, max(low + 1, int(round(fractions[1] * num_train_timesteps)))


#: ``gradient_checkpointing=auto``: activation bytes of one UNet call with gradients on two rows at 512 px, in
#: units of the UNet's parameter bytes (an SD1.5-size estimate: REFERENCES.md measured under 1 GiB saved at 256 px
#: for a pair; ×4 at 512 px is about the 3.4 GB of fp32 weights). Weights, gradients and two Adam moments of a full
#: fine-tuning add 4 units.
AUTO_ACTIVATION_FACTOR = 1.0


def resolve_gradient_checkpointing(
    setting: bool | str, model: torch.nn.Module, device: torch.device, graph_calls: float = 1.0
) -> bool:
    """``gradient_checkpointing`` as a bool: true/false as given; ``auto`` is true when the free memory of
    ``device`` (:func:`free_device_memory`) is under ``(4 + AUTO_ACTIVATION_FACTOR · graph_calls)`` times
    ``model``'s parameter bytes, ``graph_calls`` being the UNet calls (two rows at 512 px each) whose activations
    one backward keeps; false when the free memory is unknown. A rule of thumb, logged; set true or false to
    decide."""
    if setting != "auto":
        return bool(setting)
    free = free_device_memory(device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    need = (4.0 + AUTO_ACTIVATION_FACTOR * graph_calls) * weights
    chosen = free is not None and free < need
    logger.info(
        "gradient_checkpointing=auto -> %s (free %s GiB, estimated need without it %.1f GiB)",
        chosen,
        "unknown" if free is None else f"{free / 2**30:.1f}",
        need / 2**30,
    )
    return chosen


def _generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A CPU generator for (seed, step, stream): stateless randomness, hence exact resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + stream * 104_729) % (2**63 - 1))


class Schedule:
    """Which pair indices make up global micro-batch ``g``: epochs are seeded permutations of the data."""

    def __init__(self, size: int, global_batch: int, seed: int):
        self.size, self.global_batch, self.seed = size, global_batch, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 31 + epoch)
            self._perms = {epoch: torch.randperm(self.size, generator=g).tolist()}
        return self._perms[epoch]

    def batch(self, micro_index: int) -> list[tuple[int, int]]:
        """``(epoch, index)`` for each sample of the global micro-batch."""
        start = micro_index * self.global_batch
        out = []
        for flat in range(start, start + self.global_batch):
            epoch, position = divmod(flat, self.size)
            out.append((epoch, self._perm(epoch)[position]))
        return out


class Trainer:
    """The shared loop. Subclasses set ``config_class`` and implement :meth:`compute_loss` (or
    :meth:`loss_parts`, to backpropagate a loss in parts as soon as each is computed).

    The generator (``policy``) is any family of :data:`mmalign.models.generator.FAMILIES`; its trainable network
    (UNet or transformer) is :attr:`model` once prepared by accelerate (``unet`` is its former name).
    ``parametrisations`` says which families the trainer's mathematics applies to, checked before any weight is
    loaded."""

    config_class: ClassVar[type[TrainConfig]] = TrainConfig
    #: "diffusion" (DDPM-schedule UNets) and/or "flow" (flow-matching transformers); see
    #: :data:`mmalign.models.generator.PARAMETRISATIONS`
    parametrisations: ClassVar[tuple[str, ...]] = ("diffusion",)
    uses_reference: ClassVar[bool] = True
    #: with gradient checkpointing on, recompute the UNet's blocks in backward (diffusers'
    #: ``enable_gradient_checkpointing``); trainers that checkpoint whole UNet calls themselves set False
    checkpoint_blocks: ClassVar[bool] = True

    def __init__(self, config: TrainConfig, policy: Any = None):
        from accelerate.utils import set_seed

        self.config = config
        self.output_dir = Path(config.output_dir)
        trackers = None if config.tracker == "none" else config.tracker
        if config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
            # and full fp32: cuDNN convolutions run in TF32 by default, whose 10-bit mantissa makes two runs that
            # pick different kernels differ far beyond fp32 rounding
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        # Without a GPU the processes form a gloo group (accelerate's cpu=True); FSDP2 runs there too
        self.accelerator = build_accelerator(config.distributed, config.mixed_precision, trackers, str(self.output_dir))
        set_seed(config.seed)
        from ..models.generator import configure_output, load_generator, parametrisation_of

        kind = parametrisation_of(config.model) if policy is None else getattr(policy, "parametrisation", "diffusion")
        self.check_generator(kind, config.model if policy is None else type(policy).__name__)
        if policy is None:
            with loading_context(self.accelerator):
                policy = load_generator(config.model)
        self.policy = configure_output(
            self.trained_view(policy),
            config.frames,
            config.duration,
            config.views_grid,
            where=f"model={config.model}",
            experts=config.experts,
            guidance_2=config.guidance_2,
        )
        self.policy.to(self.accelerator.device)
        self._setup_model()
        self._setup_data()
        self._free_text_encoders()
        self._setup_optimizer()
        self.step = 0
        self.skipped_steps = 0
        self.stop_reason: str | None = None
        self.history: list[dict[str, float]] = []
        self._recording = False
        self._reference_table: dict[str, torch.Tensor] = {}

    # -- set-up ---------------------------------------------------------------------------------------------
    def trained_view(self, policy: Any) -> Any:
        """The generator as this trainer trains it (as it is here; the flow trainers see Stable Audio as a flow)."""
        return policy

    def check_generator(self, parametrisation: str, model: object) -> None:
        """Fail before any weight loads when this trainer (with this config) does not apply to a generator of
        ``parametrisation``; subclasses add their own conditions."""
        from ..models.generator import check_parametrisation

        check_parametrisation(self.config.trainer, self.parametrisations, parametrisation, model)
        if self.config.timestep_density != "uniform" and parametrisation not in ("flow", "v-diffusion"):
            raise ConfigError(
                f"timestep_density={self.config.timestep_density} is a flow-matching training density; model={model} "
                "is a DDPM-schedule UNet (use timestep_range)"
            )

    # the trainable network under its former, UNet-only names (kept for scripts and tests written against them)
    @property
    def unet(self) -> torch.nn.Module:
        return self.model

    @property
    def ref_unet(self) -> torch.nn.Module | None:
        return self.ref_model

    @property
    def lora_targets(self) -> list[str]:
        """``lora_targets`` of the config, or the generator family's defaults when it leaves them empty; a family
        with named groups of targets (AnimateDiff: ``motion``, ``spatial``) expands them
        (``resolve_lora_targets``)."""
        targets = list(self.config.lora_targets) or list(self.policy.lora_targets)
        resolve = getattr(self.policy, "resolve_lora_targets", None)
        return list(resolve(targets)) if resolve is not None else targets

    def _setup_model(self) -> None:
        config, unet = self.config, self.policy.trainable
        unet.requires_grad_(False)
        self.ref_model = None
        if config.lora_rank > 0:
            from peft import LoraConfig

            unet.add_adapter(
                LoraConfig(
                    r=config.lora_rank,
                    lora_alpha=config.lora_alpha or config.lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=self.lora_targets,
                )
            )
        else:
            unet.requires_grad_(True)
        if self.uses_reference and config.reference_mode == "copy":
            import copy

            self.ref_model = copy.deepcopy(unet).requires_grad_(False).eval()
            if config.lora_rank > 0:
                self.ref_model.disable_adapters()
        self.gradient_checkpointing = resolve_gradient_checkpointing(
            config.gradient_checkpointing, unet, self.accelerator.device, self._graph_calls()
        )
        if self.gradient_checkpointing and self.checkpoint_blocks:
            unet.enable_gradient_checkpointing()
        if config.attention == "xformers":
            if not torch.cuda.is_available():
                raise ConfigError("attention=xformers needs a CUDA device; use attention=sdpa on CPU")
            try:
                unet.enable_xformers_memory_efficient_attention()
            except Exception as error:
                raise ConfigError(f"attention=xformers: {error}; install the gpu extra or use sdpa") from error
        if hasattr(unet, "sync_experts"):  # Wan 2.2 A14B: every process calls both experts (FSDP, DDP)
            unet.sync_experts = self.accelerator.num_processes > 1
        unet.train()
        self.trainable = [p for p in unet.parameters() if p.requires_grad]
        self.trainable_names = [n for n, p in unet.named_parameters() if p.requires_grad]
        if not self.trainable:
            raise MMAlignError("no trainable parameters (check lora_targets)")
        self.ema = None  # made once the network is prepared (FSDP replaces its parameters by sharded ones)

    def _graph_calls(self) -> float:
        """UNet calls (two rows at 512 px each) whose activations one backward keeps: a batch of pairs here."""
        return self.config.batch_size * (self.config.resolution / 512) ** 2

    def _setup_data(self) -> None:
        from ..data import load_preferences
        from ..data.dataset import AudioPreferenceDataset, PreferenceDataset

        config = self.config
        if not config.data:
            raise ConfigError("data is empty: give a JSONL, parquet, dataset folder or dataset id")
        loaded = load_preferences(config.data, tie_policy=config.tie_policy)
        pairs = list(loaded)
        report = getattr(loaded, "report", None)
        self.data_skipped = list(getattr(report, "skipped", []) or [])
        if config.max_train_samples:
            pairs = pairs[: config.max_train_samples]
        if not pairs:
            raise MMAlignError(f"{config.data}: no usable preference pairs")
        self.pairs = pairs
        if getattr(self.policy, "modality", "image") == "audio":  # waveforms at the generator's rate and channels
            self.dataset = AudioPreferenceDataset(pairs, self.policy.sample_rate, self.policy.audio_channels)
        else:
            self.dataset = PreferenceDataset(
                pairs,
                config.resolution,
                train=True,
                random_crop=config.random_crop,
                hflip=config.hflip,
                seed=config.seed,
                frames=self._pair_frames(pairs),
            )
        processes = self.accelerator.num_processes
        self.global_batch = config.batch_size * processes
        self.schedule = Schedule(len(pairs), self.global_batch, config.seed)
        self._latent_cache: dict[int, dict[str, Any]] = {}
        self._prompt_cache: dict[str, Any] = {}

    def _pair_frames(self, pairs: list) -> int | None:
        """Frames per clip when the pairs are videos (the video generator's ``num_frames``), else None: images
        (a video generator trains on them as one-frame clips). Video pairs for an image model are refused."""
        from ..modalities.video import is_video_file

        first = pairs[0].chosen
        if not (isinstance(first, (str, os.PathLike)) and is_video_file(first, include_gif=True)):
            return None
        modality = getattr(self.policy, "modality", "image")
        if modality != "video":
            raise ConfigError(
                f"data={self.config.data} holds videos ({pairs[0].source or first}), but model={self.config.model} "
                f"generates {modality}s"
            )
        return int(self.policy.num_frames)

    def _setup_optimizer(self) -> None:
        from diffusers.optimization import get_scheduler

        config = self.config
        lr = config.lr
        if config.scale_lr:
            lr = lr * config.batch_size * config.grad_accum * self.accelerator.num_processes
        if config.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.trainable, lr=lr)
        else:
            kwargs = dict(
                lr=lr,
                betas=(config.adam_beta1, config.adam_beta2),
                weight_decay=config.adam_weight_decay,
                eps=config.adam_epsilon,
            )
            try:  # fused AdamW: no foreach temporaries (lower peak memory), same update rule
                self.optimizer = torch.optim.AdamW(self.trainable, fused=True, **kwargs)
            except (RuntimeError, TypeError):
                self.optimizer = torch.optim.AdamW(self.trainable, **kwargs)
        self.lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer=self.optimizer,
            num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=config.max_steps,
        )
        set_wrap_blocks(self.accelerator, self.policy.trainable, self.policy)
        configure_deepspeed(self.accelerator, config.batch_size, config.grad_accum, config.max_grad_norm)
        self.model, self.optimizer = self.accelerator.prepare(self.policy.trainable, self.optimizer)
        # the parameters the optimizer steps: FSDP2 swaps each for its sharded DTensor during prepare
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.ref_model is not None and is_fsdp(self.accelerator):
            self.ref_model = shard_frozen(self.accelerator, self.ref_model, self.policy)
        if config.ema_decay > 0:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.trainable, decay=config.ema_decay)

    # -- batches --------------------------------------------------------------------------------------------
    def _item(self, epoch: int, index: int) -> dict[str, Any]:
        """One pair with its VAE posteriors; with ``cache_latents`` the first draw is kept for the run. (Audio pairs:
        waveforms in [-1, 1], which the audio generators encode as they are.)"""
        if self.config.cache_latents and index in self._latent_cache:
            return self._latent_cache[index]
        self.dataset.set_epoch(0 if self.config.cache_latents else epoch)
        item = dict(self.dataset[index])
        pixels = torch.stack([item.pop("chosen_pixels"), item.pop("rejected_pixels")])
        mean, std = self.policy.latent_distribution(pixels)
        item.update(mean_w=mean[0], std_w=std[0], mean_l=mean[1], std_l=std[1])
        if self.config.cache_latents:
            self._latent_cache[index] = item
        return item

    @property
    def uses_conditions(self) -> bool:
        """True for generators of the protocol's :class:`~mmalign.models.generator.Conditions` (flow families);
        False for the UNet policy's ``PromptEmbeds``."""
        return hasattr(self.policy, "encode_conditions")

    def _embeds(self, prompts: list[str]):
        """The conditioning of ``prompts`` (``Conditions``, or ``PromptEmbeds`` for UNets), from the cache."""
        # Each prompt is encoded alone: BLAS kernels round differently for different batch sizes, and a cache
        # filled by batches would make an embedding depend on which prompts happened to come first (a resumed
        # run, or another process count, would then differ from the uninterrupted run in the last bits).
        encode = self._encode_one if self.uses_conditions else self.policy.encode_prompt
        for prompt in dict.fromkeys(prompts):
            if prompt not in self._prompt_cache:
                self._prompt_cache[prompt] = encode([prompt])
        parts = [self._prompt_cache[p] for p in prompts]
        if self.uses_conditions:
            from ..models.generator import Conditions

            return Conditions.cat(parts)
        from ..models.policy import PromptEmbeds

        return PromptEmbeds.cat(parts)

    def _encode_one(self, prompts: list[str]):
        """One prompt's :class:`~mmalign.models.generator.Conditions`, read from ``conditions_cache`` when it has
        them (bit-exact: safetensors), else encoded (and written there)."""
        import hashlib

        from ..models.generator import Conditions

        if not self.config.conditions_cache:
            return self.policy.encode_conditions(prompts)
        key = hashlib.sha256(f"{self.config.model}\0{prompts[0]}".encode()).hexdigest()[:32]
        path = Path(self.config.conditions_cache) / f"{key}.safetensors"
        if path.is_file():
            return Conditions.load(path, device=self.accelerator.device)
        conditions = self.policy.encode_conditions(prompts)
        if self.accelerator.is_local_main_process:
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            conditions.save(tmp)
            os.replace(tmp, path)
        return conditions

    def run_prompts(self) -> list[str]:
        """Every prompt the run will encode (training data, validation, the empty prompt of dropout)."""
        prompts = [getattr(p, "prompt", p) for p in self.pairs]
        prompts += list(self.config.validation_prompts) + [""]
        return list(dict.fromkeys(prompts))

    def _free_text_encoders(self) -> None:
        """``free_text_encoders``: encode every prompt of the run (one at a time, as always), then drop the text
        encoders; training runs on the cached conditions."""
        if not self.config.free_text_encoders:
            return
        if not hasattr(self.policy, "free_text_encoders"):
            raise ConfigError(f"free_text_encoders: {type(self.policy).__name__} keeps its text encoders")
        self._embeds(self.run_prompts())
        self.policy.free_text_encoders()
        logger.info("text encoders freed after encoding %d prompts", len(self._prompt_cache))

    def make_batch(self, micro_index: int) -> dict[str, Any]:
        """This process's slice of global micro-batch ``micro_index``, with latents sampled and prompts
        (dropped out with ``prompt_dropout``) encoded. Random draws cover the global batch."""
        config, acc = self.config, self.accelerator
        entries = self.schedule.batch(micro_index)
        items = [self._item(epoch, index) for epoch, index in entries]
        gen = _generator(config.seed, micro_index, 1)
        drop = torch.rand(len(items), generator=gen) < config.prompt_dropout
        mean = torch.stack([torch.stack([it["mean_w"], it["mean_l"]]) for it in items])
        std = torch.stack([torch.stack([it["std_w"], it["std_l"]]) for it in items])
        latents = self.policy.sample_latents(mean, std, gen)  # [G, 2, C, h, w]
        lo, hi = acc.process_index * config.batch_size, (acc.process_index + 1) * config.batch_size
        local = items[lo:hi]
        prompts = ["" if drop[lo + i] else it["prompt"] for i, it in enumerate(local)]
        batch = {
            "latents_w": latents[lo:hi, 0].to(acc.device),
            "latents_l": latents[lo:hi, 1].to(acc.device),
            "prompts": prompts,
            "embeds": self._embeds(prompts),
            "labels": torch.stack([it["label"] for it in local]).to(acc.device),
            "indices": [it["index"] for it in local],
            "micro_index": micro_index,
            "slice": (lo, hi),
        }
        if getattr(self.policy, "is_sdxl", False):
            original = torch.stack([it["original_size"] for it in local])
            crops = torch.stack([it["crop_top_left"] for it in local])
            batch["time_ids"] = self.policy.time_ids(original, crops, config.resolution)
        else:
            batch["time_ids"] = None
        return batch

    def draw_noise(self, batch: dict[str, Any], count: int = 1, stream: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps ``[b]`` and ``count`` noise tensors ``[count, b, ...]`` drawn for the global batch from
        random stream ``stream`` of this micro-batch; this process's slice."""
        gen = _generator(self.config.seed, batch["micro_index"], stream)
        lo, hi = batch["slice"]
        shape = (self.global_batch * count, *batch["latents_w"].shape[1:])
        timesteps = self._draw_timesteps(gen)[lo:hi]
        noise = torch.randn(shape, generator=gen).view(count, self.global_batch, *shape[1:])[:, lo:hi]
        device = self.accelerator.device
        return timesteps.to(device), noise.to(device)

    def _draw_timesteps(self, gen: torch.Generator) -> torch.Tensor:
        """Training timesteps for the global batch. UNets: integers uniform in ``timestep_range``. Flow families:
        entries of the training scheduler's table (its ``num_train_timesteps`` shifted timesteps, as diffusers'
        SD3/FLUX training scripts index them), by an index uniform in ``timestep_range`` (fractions of the table
        from the clean end) or, with ``timestep_density=logit_normal``, ``int(sigmoid(N(logit_mean, logit_std))·N)``
        into the table (diffusers' ``compute_density_for_timestep_sampling``; flow_grpo's
        ``scripts/train_sd3_dpo.py``)."""
        config, size = self.config, self.global_batch
        if getattr(self.policy, "parametrisation", "diffusion") == "v-diffusion":
            return self._continuous_timesteps(gen)
        count = self.policy.num_train_timesteps
        if not self.uses_conditions:
            low, high = timestep_bounds(config.timestep_range, count)
            return torch.randint(low, high, (size,), generator=gen)
        from diffusers import FlowMatchEulerDiscreteScheduler

        table = FlowMatchEulerDiscreteScheduler.from_config(self.policy.scheduler.config).timesteps  # descending
        if config.timestep_density == "logit_normal":
            u = torch.sigmoid(config.logit_mean + config.logit_std * torch.randn((size,), generator=gen))
            return table[(u * count).long().clamp(max=count - 1)]
        low, high = timestep_bounds(config.timestep_range, count)
        return table.flip(0)[torch.randint(low, high, (size,), generator=gen)]

    def _continuous_timesteps(self, gen: torch.Generator) -> torch.Tensor:
        """Continuous model timesteps ``t`` in [0, 1) of a "v-diffusion" generator (Stable Audio: σ = tan(πt/2)):
        uniform within ``timestep_range``, stable-audio-tools' default ``timestep_sampler="uniform"`` for its "v"
        objective (a Sobol sequence there; i.i.d. here, for a seeded per-step draw), or with
        ``timestep_density=logit_normal`` its ``"logit_normal"`` option ``sigmoid(N(logit_mean, logit_std))``."""
        config, size = self.config, self.global_batch
        if config.timestep_density == "logit_normal":
            return torch.sigmoid(config.logit_mean + config.logit_std * torch.randn((size,), generator=gen))
        low, high = (float(b) for b in config.timestep_range)
        return low + (high - low) * torch.rand((size,), generator=gen)

    def global_mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean of ``values`` (detached) over the global micro-batch: this process's sum and count summed over
        processes with accelerate's ``reduce`` (nothing to reduce on one process). For batch statistics that
        the loss uses, e.g. Diffusion-KTO's reference point, so the loss does not depend on the process count."""
        values = values.detach().float()
        acc = self.accelerator
        if acc.num_processes == 1:
            return values.mean()
        totals = torch.stack([values.sum(), torch.tensor(float(values.numel()), device=values.device)])
        totals = acc.reduce(totals.to(acc.device), reduction="sum")
        return (totals[0] / totals[1]).to(values.device)

    # -- model calls ----------------------------------------------------------------------------------------
    def _call(self, model, noisy, timesteps, embeds, time_ids) -> torch.Tensor:
        """``model``'s prediction through the generator (the UNet policy also takes SDXL's ``time_ids``)."""
        if self.uses_conditions:
            return self.policy.predict(model, noisy, timesteps, embeds)
        return self.policy.predict(model, noisy, timesteps, embeds, time_ids)

    def noisy_and_target(self, x0, noise, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        """The noisy input at ``timesteps`` and the regression target (epsilon, v or flow velocity)."""
        if self.uses_conditions:
            return self.policy.add_noise(x0, noise, timesteps), self.policy.training_target(x0, noise, timesteps)
        return self.policy.noisy_and_target(x0, noise, timesteps)

    def predict(self, noisy, timesteps, embeds, time_ids=None) -> torch.Tensor:
        if self._recording:  # precomputing the reference: the model's own output is not needed
            return torch.zeros(noisy.shape, device=noisy.device)
        return self._call(self.model, noisy, timesteps, embeds, time_ids)

    @torch.no_grad()
    def predict_reference(self, noisy, timesteps, embeds, time_ids=None) -> torch.Tensor:
        if self.ref_model is not None:
            return self._call(self.ref_model, noisy, timesteps, embeds, time_ids)
        model = self.accelerator.unwrap_model(self.model)
        if self.config.reference_mode == "precomputed":
            if not self._recording:
                raise MMAlignError("reference=precomputed: reference outputs are only available while recording")
            return self._call(model, noisy, timesteps, embeds, time_ids)  # untrained weights = reference
        with adapters_disabled(model):
            return self._call(model, noisy, timesteps, embeds, time_ids)

    def reference_mse(self, key: str, batch: dict[str, Any], noisy, timesteps, embeds, time_ids, target):
        """Per-sample MSE of the reference model ``[b]``. With ``reference=precomputed`` it is read from the
        table recorded before training (see :meth:`precompute_reference`), so no second model is held."""
        from .losses import per_sample_mse

        slot = f"{batch['micro_index']}:{key}"
        if self.config.reference_mode == "precomputed" and not self._recording:
            try:
                return self._reference_table[slot].to(noisy.device)
            except KeyError:
                raise MMAlignError(f"reference=precomputed: no recorded reference output for {slot}") from None
        mse = per_sample_mse(self.predict_reference(noisy, timesteps, embeds, time_ids), target)
        if self._recording:
            self._reference_table[slot] = mse.detach().float().cpu()
        return mse

    def _reference_table_path(self) -> Path:
        return self.output_dir / f"reference_mse.rank{self.accelerator.process_index}.safetensors"

    @torch.no_grad()
    def precompute_reference(self) -> None:
        """``reference=precomputed`` (full fine-tuning without a frozen copy): every batch of the run is known in
        advance (stateless randomness), and the model before its first update *is* the reference, so the
        reference MSEs of all steps are computed first and kept as a small table (a few floats per pair). The
        same forward passes are done as with a frozen copy, only earlier; memory drops by one model."""
        from safetensors.torch import load_file, save_file

        path = self._reference_table_path()
        if path.is_file():
            self._reference_table = load_file(str(path))
            return
        if self.step > 0:
            raise MMAlignError(f"resume with reference=precomputed needs {path}, written when the run started")
        from tqdm.auto import tqdm

        total = self.config.max_steps * self.config.grad_accum
        self._recording = True
        try:
            for micro_index in tqdm(range(total), desc="reference (precomputed)", disable=not self.config.progress):
                self.compute_loss(self.make_batch(micro_index))
        finally:
            self._recording = False
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in self._reference_table.items()}, str(tmp))
        os.replace(tmp, path)

    def compute_loss(self, batch: dict[str, Any]) -> LossOutput:
        raise NotImplementedError

    def loss_parts(self, batch: dict[str, Any]) -> list[Callable[[], LossOutput]]:
        """The micro-batch's loss as parts whose sum is the loss: functions the loop calls one at a time,
        backpropagating each result before calling the next (so that only one part's graph is alive: Flow-GRPO's
        one backward per denoising step). Metrics of the parts are summed, so a part carries its share (e.g.
        ``1/n`` of a mean over ``n`` steps). Default: one part, :meth:`compute_loss`."""
        return [lambda: self.compute_loss(batch)]

    # -- the loop -------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        config, acc = self.config, self.accelerator
        self._maybe_resume()
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._save_config()
        if config.reference_mode == "precomputed" and self.uses_reference:
            self.precompute_reference()
        if acc.log_with:
            acc.init_trackers("mmalign", config=_scalar_config(config))
        bar = tqdm(
            total=config.max_steps,
            initial=self.step,
            desc=f"train ({config.trainer})",
            disable=not (config.progress and acc.is_local_main_process),
        )
        while self.step < config.max_steps and self.stop_reason is None:
            metrics = self._train_step()
            self.step += 1
            bar.update(1)
            if "loss" in metrics:  # an empty step (e.g. MixGRPO's empty window) has no loss
                bar.set_postfix(loss=f"{metrics['loss']:.4g}")
            if self.step % config.log_every == 0 or self.step == config.max_steps:
                self._log(metrics)
            if self.step % config.checkpoint_every == 0 and self.step < config.max_steps:
                self.save_checkpoint()
            if config.sample_every and config.validation_prompts and self.step % config.sample_every == 0:
                self.sample_grid()
            self.after_step(metrics)
        bar.close()
        self.save_final()
        if config.validation_prompts:
            self.sample_grid()
        acc.end_training()
        return {
            "steps": self.step,
            "stop_reason": self.stop_reason,
            "skipped_steps": self.skipped_steps,
            "pairs": len(self.pairs),
            "skipped_rows": len(self.data_skipped),
            "history": self.history,
        }

    def after_step(self, metrics: dict[str, float]) -> None:
        """Hook after each optimizer step (held-out evaluation); setting :attr:`stop_reason` ends training
        early, after which the final weights are saved as usual."""

    def _train_step(self) -> dict[str, float]:
        config, acc = self.config, self.accelerator
        skip = False
        totals: dict[str, float] = {}
        deepspeed = bool(deepspeed_stage(acc))
        scale = 1.0 if deepspeed else 1.0 / config.grad_accum  # DeepSpeed divides each backward by its accumulation
        for micro in range(config.grad_accum):
            batch = self.make_batch(self.step * config.grad_accum + micro)
            parts = self.loss_parts(batch)
            if deepspeed and len(parts) > 1:
                raise ConfigError(
                    f"trainer={config.trainer} backpropagates each micro-batch in {len(parts)} parts, and DeepSpeed "
                    "counts every backward as a micro-batch: use distributed=fsdp2 or ddp"
                )
            for index, part in enumerate(parts):
                sync = micro == config.grad_accum - 1 and index == len(parts) - 1  # all-reduce in the last backward

                def context(sync: bool = sync):  # a fresh context manager each time: they are single-use
                    return acc.no_sync(self.model) if not sync and acc.num_processes > 1 else _nullcontext()

                with context(), acc.autocast():
                    out = part()
                finite = torch.isfinite(out.loss.detach()).float()
                if acc.num_processes > 1:
                    finite = acc.reduce(finite.to(acc.device), reduction="mean")
                if float(finite) < 1.0:
                    skip = True
                    break
                if deepspeed:  # DeepSpeed steps its optimizer on the accumulation boundary: the last backward
                    acc.gradient_state._set_sync_gradients(sync)
                with context():
                    acc.backward(out.loss * scale)
                for key, value in out.scalars().items():
                    totals[key] = totals.get(key, 0.0) + value / config.grad_accum
        grad_norm = float("nan")
        if not skip and acc.sync_gradients:
            norm = acc.clip_grad_norm_(self.trainable, config.max_grad_norm)
            if norm is None:  # DeepSpeed clips inside its step (gradient_clipping of its config) and reports it there
                norm = getattr(self.model, "get_global_grad_norm", lambda: None)()
                grad_norm = float("nan") if norm is None else float(norm)
            else:
                grad_norm = float(norm)
                skip = not math.isfinite(grad_norm)
        if skip:
            self.skipped_steps += 1
            logger.warning("step %d: non-finite loss or gradient; the step is skipped", self.step + 1)
            self.optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # the schedule follows the step count, skipped steps included
                warnings.simplefilter("ignore", UserWarning)
                self.lr_scheduler.step()
            return {}
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.trainable)
        if acc.num_processes > 1 and totals:  # log the global batch's metrics, not process 0's slice
            keys = sorted(totals)
            values = acc.reduce(torch.tensor([totals[k] for k in keys], device=acc.device), reduction="mean")
            totals = dict(zip(keys, values.tolist()))
        totals.update(grad_norm=grad_norm, lr=self.lr_scheduler.get_last_lr()[0])
        return totals

    def _log(self, metrics: dict[str, float]) -> None:
        if not metrics:
            return
        record = {"step": self.step, **metrics, "skipped_steps": self.skipped_steps}
        self.history.append(record)
        if self.accelerator.log_with:
            self.accelerator.log({f"train/{k}": v for k, v in metrics.items()}, step=self.step)
        if self.accelerator.is_main_process:
            with (self.output_dir / "log.jsonl").open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    # -- checkpoints ----------------------------------------------------------------------------------------
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        unet = self.accelerator.unwrap_model(self.model)
        params = dict(unet.named_parameters())
        return {name: params[name].detach().cpu().contiguous() for name in self.trainable_names}

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` atomically (a temporary folder renamed when complete)."""
        from safetensors.torch import save_file

        acc = self.accelerator
        root = self.output_dir / "checkpoints"
        final = root / f"{CHECKPOINT_PREFIX}{self.step:07d}"
        tmp = root / f".{final.name}.tmp"
        sharded = is_fsdp(acc)
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if sharded:  # every process writes its shards of the weights, optimizer state and EMA
            save_sharded(tmp / SHARDED_DIR, self.model, self.optimizer, self._sharded_extra())
        zero = deepspeed_stage(acc)
        if zero:  # DeepSpeed's own checkpoint of its engine (each process its partition of the optimizer)
            acc.save_state(str(tmp / DEEPSPEED_DIR))
        if acc.is_main_process:
            if not sharded and not zero:
                save_file(self._trainable_state(), str(tmp / "trainable.safetensors"))
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
            if self.ema is not None:
                state = self.ema.state_dict()
                shadow = state.pop("shadow_params")
                if not sharded:
                    save_file({str(i): t.contiguous() for i, t in enumerate(shadow)}, str(tmp / "ema.safetensors"))
                (tmp / "ema.json").write_text(json.dumps(state))
            self.save_extra_state(tmp)
            meta = {"step": self.step, "skipped_steps": self.skipped_steps, "trainer": self.config.trainer}
            (tmp / "state.json").write_text(json.dumps(meta))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in sorted(root.glob(f"{CHECKPOINT_PREFIX}*"))[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _sharded_extra(self) -> dict[str, Any]:
        """What goes into an FSDP checkpoint beside the weights and optimizer: the EMA's (sharded) shadow tensors."""
        if self.ema is None:
            return {}
        return {"ema": {str(i): t for i, t in enumerate(self.ema.shadow_params)}}

    def save_extra_state(self, folder: Path) -> None:
        """Hook for trainers with more state (e.g. EMA annotators)."""

    def load_extra_state(self, folder: Path) -> None:
        """Hook for trainers with more state."""

    def _resolve_resume(self) -> Path | None:
        resume = self.config.resume
        if not resume:
            return None
        if resume == "latest":
            found = sorted((self.output_dir / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*"))
            return found[-1] if found else None
        path = Path(resume)
        if not (path / "state.json").is_file():
            raise MMAlignError(f"resume={resume}: not a checkpoint folder (no state.json)")
        return path

    def _maybe_resume(self) -> None:
        from safetensors.torch import load_file

        from ..hub import load_into

        folder = self._resolve_resume()
        if folder is None:
            if self.config.resume == "latest":
                logger.info("resume=latest: no checkpoint yet in %s; starting from scratch", self.output_dir)
            return
        meta = json.loads((folder / "state.json").read_text())
        if self._resume_engine(folder):
            self.load_extra_state(folder)
            self.step = int(meta["step"])
            self.skipped_steps = int(meta.get("skipped_steps", 0))
            logger.info("resumed from %s (FSDP or DeepSpeed checkpoint) at step %d", folder, self.step)
            return
        unet = self.accelerator.unwrap_model(self.model)
        state = load_file(str(folder / "trainable.safetensors"))
        missing = [n for n in self.trainable_names if n not in state]
        unexpected = [n for n in state if n not in self.trainable_names]
        if missing or unexpected:
            from ..errors import StateDictMismatchError

            raise StateDictMismatchError(str(folder), missing, unexpected)
        load_into(unet, state, source=str(folder), allow_missing=["*"])
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        self._restore_schedule_and_ema(folder)
        self.load_extra_state(folder)
        self.step = int(meta["step"])
        self.skipped_steps = int(meta.get("skipped_steps", 0))
        logger.info("resumed from %s at step %d", folder, self.step)

    def _resume_engine(self, folder: Path) -> bool:
        """Resume from a checkpoint of FSDP (``folder/sharded``: on any process count and engine, DCP re-sharding
        or loading whole tensors into one process) or of DeepSpeed (``folder/deepspeed``, under DeepSpeed); False
        for a checkpoint of one process or DDP (read by :meth:`_maybe_resume`), which an FSDP run refuses."""
        if (folder / DEEPSPEED_DIR).is_dir():
            if not deepspeed_stage(self.accelerator):
                raise MMAlignError(f"resume={folder}: a DeepSpeed checkpoint; resume it under DeepSpeed")
            self.accelerator.load_state(str(folder / DEEPSPEED_DIR))
            self._restore_schedule_and_ema(folder)
            return True
        if not (folder / SHARDED_DIR).is_dir():
            if is_fsdp(self.accelerator):
                raise MMAlignError(
                    f"resume={folder}: the checkpoint was written by one process or DDP (no {SHARDED_DIR}/ folder); "
                    "resume it without FSDP"
                )
            return False
        extra = self._sharded_extra()
        load_sharded(folder / SHARDED_DIR, self.model, self.optimizer, extra)
        self._restore_schedule_and_ema(folder, [extra["ema"][str(i)] for i in range(len(extra.get("ema", {})))])
        return True

    def _restore_schedule_and_ema(self, folder: Path, shadow: list[torch.Tensor] | None = None) -> None:
        """The LR schedule and the EMA (its shadow tensors from ``ema.safetensors`` unless given) of a checkpoint."""
        from safetensors.torch import load_file

        self.lr_scheduler.load_state_dict(torch.load(folder / "lr_scheduler.pt", weights_only=True))
        if self.ema is None:
            return
        ema_state = json.loads((folder / "ema.json").read_text())
        if not shadow:
            tensors = load_file(str(folder / "ema.safetensors"))
            shadow = [tensors[str(i)] for i in range(len(tensors))]
        ema_state["shadow_params"] = shadow
        self.ema.load_state_dict(ema_state)
        self.ema.to(device=self.accelerator.device)  # read onto the CPU; the trained parameters may be on a GPU

    def _save_config(self) -> None:
        (self.output_dir / "config.json").write_text(json.dumps(asdict(self.config), indent=2))

    def save_final(self) -> Path:
        """LoRA: ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(output_dir)``); full: a
        pipeline folder (``from_pretrained(output_dir)``). EMA weights are used when EMA is on."""
        acc = self.accelerator
        acc.wait_for_everyone()
        sharded = is_fsdp(acc)
        unet = acc.unwrap_model(self.model)
        if self.ema is not None and (sharded or acc.is_main_process):
            self.ema.store(self.trainable)
            self.ema.copy_to(self.trainable)
        gathered = None
        lora = self.config.lora_rank > 0
        if sharded:  # every process takes part in gathering the shards; the main one writes
            gathered = full_state_dict(acc, unet, self.trainable_names if lora else None)
        elif deepspeed_stage(acc) == 3:  # ZeRO-3 partitions the weights: its 16-bit gather (zero3_save_16bit_model)
            state = acc.get_state_dict(self.model)
            names = set(self.trainable_names) if lora else set(dict(unet.named_parameters()))
            gathered = {k: v for k, v in (state or {}).items() if k in names}
        if gathered is not None and not lora and acc.is_main_process:
            unet = self._plain_copy(unet, gathered)
        if acc.is_main_process:
            if self.config.lora_rank > 0:
                from peft.utils import get_peft_model_state_dict

                # PEFT key names as they are: diffusers' convert_state_dict_to_diffusers renames only attention
                # projections (to_q.lora_A -> to_q.lora.down), and a file mixing both namings loads with the
                # attention LoRA silently dropped once other modules (conv1, time_emb_proj, ...) are targeted
                from ..models.generator import save_lora_weights

                metadata = unet.peft_config["default"].to_dict()
                state = get_peft_model_state_dict(unet, state_dict=gathered)
                save_lora_weights(self.policy, self.output_dir, state, metadata)
            elif getattr(self.policy, "text_encoders", True) is None:  # freed: the trained network alone
                unet.save_pretrained(str(self.output_dir / "transformer"))
                logger.info("text encoders were freed: saved the trained network to %s/transformer", self.output_dir)
            elif hasattr(self.policy, "save_pipeline"):
                self.policy.save_pipeline(self.output_dir, unet)
            else:
                self.policy.pipeline(unet).save_pretrained(str(self.output_dir))
        if self.ema is not None and (sharded or acc.is_main_process):
            self.ema.restore(self.trainable)
        acc.wait_for_everyone()
        return self.output_dir

    @staticmethod
    def _plain_copy(model: torch.nn.Module, parameters: dict[str, torch.Tensor]) -> torch.nn.Module:
        """An unsharded copy of an FSDP-wrapped diffusers network with the gathered ``parameters`` (and its own
        buffers), for ``save_pretrained`` of a full fine-tuning."""
        plain = type(model).from_config(model.config)
        state = {**parameters, **{k: v.detach().cpu() for k, v in model.named_buffers()}}
        missing, unexpected = plain.load_state_dict(state, strict=False)
        if missing or unexpected:
            from ..errors import StateDictMismatchError

            raise StateDictMismatchError("the gathered FSDP weights", list(missing), list(unexpected))
        return plain.to(next(iter(parameters.values())).dtype)

    @torch.no_grad()
    def sample_grid(self) -> Path | None:
        """Images of the validation prompts with a fixed seed, tiled into ``samples/step-N.png`` (audio generators:
        one ``samples/step-N/prompt-i.wav`` per prompt, :meth:`sample_audio`). Under FSDP every process runs the
        network (its forward gathers the shards) and the main one writes."""
        main = self.accelerator.is_main_process
        if not main and not is_fsdp(self.accelerator):
            return None
        if getattr(self.policy, "modality", "image") == "audio":
            return self.sample_audio()

        unet = self.accelerator.unwrap_model(self.model)
        was_training = unet.training
        unet.eval()
        pipe = self.policy.pipeline(unet)
        pipe.set_progress_bar_config(disable=True)
        video = getattr(self.policy, "modality", "image") == "video"
        options = self.policy.pipeline_call_options() if hasattr(self.policy, "pipeline_call_options") else {}
        rows = []
        for i, prompt in enumerate(self.config.validation_prompts):
            generator = torch.Generator().manual_seed(self.config.seed + i)
            out = pipe(
                prompt,
                num_inference_steps=self.config.sample_steps,
                guidance_scale=self.config.guidance,
                generator=generator,
                height=self.config.resolution,
                width=self.config.resolution,
                **({"output_type": "pil"} if video else {}),
                **options,
            )
            rows.append(list(out.frames[0]) if video else [out.images[0]])
        unet.train(was_training)
        if not main:
            return None
        grid = tile_rows(rows if video else [[row[0] for row in rows]])
        path = self.output_dir / "samples" / f"{CHECKPOINT_PREFIX}{self.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        return path

    @torch.no_grad()
    def sample_audio(self) -> Path:
        """The validation prompts sampled by the audio generator's own sampler (its pipeline's, with Gaussian step
        noise seeded by ``seed + i``: no torchsde needed) from the cached conditions, under the trained network,
        written as ``samples/step-N/prompt-i.wav`` at the generator's sample rate; returns the folder."""
        unet = self.accelerator.unwrap_model(self.model)
        was_training = unet.training
        unet.eval()
        folder = self.output_dir / "samples" / f"{CHECKPOINT_PREFIX}{self.step:07d}"
        for i, prompt in enumerate(self.config.validation_prompts):
            generator = torch.Generator().manual_seed(self.config.seed + i)
            conditions = self._embeds([prompt]).to(self.accelerator.device)
            latents = self.policy.sample(
                conditions,
                steps=self.config.sample_steps,
                guidance=self.config.guidance,
                generator=generator,
                noise="gaussian",
                model=unet,
            )
            if self.accelerator.is_main_process:
                write_wav(folder / f"prompt-{i}.wav", self.policy.decode(latents)[0], self.policy.sample_rate, "PCM_16")
        unet.train(was_training)
        return folder


def tile_rows(rows: list[list[Any]]) -> Any:
    """Pillow images of one size tiled row by row into one image (a video's frames make a row)."""
    from PIL import Image

    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * max(len(row) for row in rows), height * len(rows)))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image, (c * width, r * height))
    return grid


class adapters_disabled:
    """Context in which a peft-adapted diffusers model runs without its adapters (the LoRA reference)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __enter__(self) -> torch.nn.Module:
        self.model.disable_adapters()
        return self.model

    def __exit__(self, *exc) -> bool:
        self.model.enable_adapters()
        return False


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _scalar_config(config: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(config).items() if isinstance(v, (int, float, str, bool))}
