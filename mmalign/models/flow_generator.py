"""The shared base of the flow-matching generator families (SD3, FLUX.1, FLUX.2-klein, Qwen-Image, Z-Image).

:class:`FlowMatchingGenerator` holds what they have in common, so that a family module only says what is its own
(prompt encoding, the network's call signature, its latent normalisation and schedule shift):

* loading (:meth:`~FlowMatchingGenerator.from_pretrained` from the class attributes naming the components and
  their classes), moving (:meth:`~FlowMatchingGenerator.to`), the frozen VAE and text encoders,
  :meth:`~FlowMatchingGenerator.free_text_encoders` after caching the unconditional branch
  (:meth:`~FlowMatchingGenerator.unconditional`, the encoded :attr:`~FlowMatchingGenerator.negative_prompt`), the
  diffusers pipeline over the same components (:meth:`~FlowMatchingGenerator.pipeline`,
  :attr:`~FlowMatchingGenerator.pipeline_class`);
* flow matching as ``FlowMatchEulerDiscreteScheduler`` defines it: model timestep ``t = σ·num_train_timesteps``,
  ``x_t = (1 − σ)·x0 + σ·ε``, target velocity ``ε − x0``;
* latents: ``to_latents(images) == sample_latents(*latent_distribution(2·images − 1))``, the VAE posterior
  ``(mean, std)`` (float32) drawn from on the CPU and then :meth:`~FlowMatchingGenerator.normalise_latents`
  (the family's scaling/shift, per-channel statistics or patchify); :meth:`~FlowMatchingGenerator.decode` inverts
  that (:meth:`~FlowMatchingGenerator.denormalise_latents`) and decodes;
* the sampling schedule (:meth:`~FlowMatchingGenerator.sampling_schedule`): a fresh scheduler from the config,
  σ from :meth:`~FlowMatchingGenerator.schedule_sigmas` and, under dynamic shifting, μ from
  :meth:`~FlowMatchingGenerator.shift_mu` of the image tokens of ``latent_shape``
  (:meth:`~FlowMatchingGenerator.image_seq_len`);
* classifier-free guidance (:meth:`~FlowMatchingGenerator.guided_velocity`): ``v_u + g·(v_c − v_u)`` from one
  batched :meth:`predict` on ``cat([uncond, conditions])``; families whose pipelines guide otherwise override it
  (Qwen-Image's norm rescaling, Z-Image's conventions).

Numerics are the families' own: every hook defaults to what several pipelines share and is overridden where a
pipeline differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import WeightsError
from .generator import Conditions, Schedule, read_model_index

__all__ = [
    "FlowMatchingGenerator",
    "PerChannelLatentStats",
    "calculate_shift",
    "cfg_branches",
    "cfg_velocity",
    "check_guidance",
    "doubled_timesteps",
    "pack_latents",
    "unpack_latents",
]


def pack_latents(latents: Tensor) -> Tensor:
    """``[B, C, h, w]`` → ``[B, (h/2)·(w/2), 4·C]``: 2×2 patches as tokens, row-major, channels ``(c, dy, dx)``
    (``FluxPipeline._pack_latents``; ``QwenImagePipeline._pack_latents`` is the same permutation with a frame
    axis of 1)."""
    batch, channels, height, width = latents.shape
    if height % 2 or width % 2:
        raise ValueError(f"2x2 patches: latent height and width must be even, got {height}x{width}")
    patches = latents.reshape(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of :func:`pack_latents`: ``[B, (h/2)·(w/2), 4·C]`` → ``[B, C, h, w]`` for latent size ``h×w``
    (``FluxPipeline._unpack_latents``, which takes the pixel size instead)."""
    batch, count, features = tokens.shape
    if count != (height // 2) * (width // 2):
        raise ValueError(f"{count} tokens are not the 2x2 patches of a {height}x{width} latent")
    patches = tokens.reshape(batch, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, features // 4, height, width)


def calculate_shift(image_seq_len: int, config: Any, max_shift: float = 1.15) -> float:
    """μ of dynamic shifting: linear in the image tokens between the scheduler config's (``base_image_seq_len``,
    ``base_shift``) and (``max_image_seq_len``, ``max_shift``), with the pipelines' defaults (256, 0.5) and
    (4096, ``max_shift``: 1.15 for FLUX/Qwen-Image/Z-Image, 1.16 for SD3) for missing entries
    (``diffusers.pipelines.flux.pipeline_flux.calculate_shift``)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", max_shift)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len


def check_guidance(conditions: Conditions, uncond: Conditions | None, guidance: float) -> None:
    """Raise when classifier-free guidance at ``guidance`` (≠ 1) lacks a matching unconditional branch."""
    if uncond is None:
        raise ValueError(f"guidance {guidance} needs the unconditional branch (uncond)")
    if len(uncond) != len(conditions):
        raise ValueError(f"uncond has {len(uncond)} rows, conditions {len(conditions)}")


def doubled_timesteps(t: Tensor | float) -> Tensor | float:
    """The model timesteps of a batch doubled for guidance: per-sample ``t [B]`` → ``[t, t]``; a scalar as is."""
    if isinstance(t, Tensor) and t.ndim == 1:
        return torch.cat([t, t])
    return t


def cfg_branches(
    generator: Any,
    model: torch.nn.Module,
    x: Tensor,
    t: Tensor | float,
    conditions: Conditions,
    uncond: Conditions,
    cond_first: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(v_uncond, v_cond)``: both branches of classifier-free guidance from ONE batched ``generator.predict``
    on ``cat([uncond, conditions])`` (as the diffusers pipelines batch it; ``cond_first``: ``cat([conditions,
    uncond])``, Z-Image's order); ``t`` a scalar or per sample ``[B]``."""
    pair = [conditions, uncond] if cond_first else [uncond, conditions]
    both = generator.predict(model, torch.cat([x, x]), doubled_timesteps(t), Conditions.cat(pair))
    first, second = both.chunk(2)
    return (second, first) if cond_first else (first, second)


def cfg_velocity(
    generator: Any,
    model: torch.nn.Module,
    x: Tensor,
    t: Tensor | float,
    conditions: Conditions,
    uncond: Conditions | None,
    guidance: float,
) -> Tensor:
    """Standard classifier-free guidance on any generator with a ``predict``: ``generator.predict`` on
    ``conditions`` when ``guidance == 1``, else ``v_u + g·(v_c − v_u)`` from one batched call
    (:func:`cfg_branches`); ``t`` a scalar or per sample ``[B]``."""
    if guidance == 1.0:
        return generator.predict(model, x, t, conditions)
    check_guidance(conditions, uncond, guidance)
    v_uncond, v_cond = cfg_branches(generator, model, x, t, conditions, uncond)
    return v_uncond + guidance * (v_cond - v_uncond)


class PerChannelLatentStats:
    """Latent normalisation of the Wan-style VAEs (``AutoencoderKLWan``, ``AutoencoderKLQwenImage``): per-channel
    ``latents_mean`` / ``latents_std`` from the VAE config, ``(z − mean)/std`` (the training scripts'
    ``(z − mean)·(1/std)``) and back. One latent is ``[C, ...]`` of ``latent_rank`` dimensions (images ``[C, h, w]``:
    3; Wan's videos ``[C, F, h, w]``: 4), with any leading batch dimensions."""

    vae: Any
    latent_rank: ClassVar[int] = 3

    def _latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (-1,) + (1,) * (self.latent_rank - 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(like.device, like.dtype)
        inverse_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, inverse_std

    def normalise_latents(self, z: Tensor) -> Tensor:
        """VAE latents → ``(z − mean)·(1/std)`` per channel (the inverse of the pipeline's decoding)."""
        mean, inverse_std = self._latent_stats(z)
        return (z - mean) * inverse_std

    def denormalise_latents(self, latents: Tensor) -> Tensor:
        """The pipeline's ``z / (1/std) + mean``."""
        mean, inverse_std = self._latent_stats(latents)
        return latents / inverse_std + mean


#: both streams of an MMDiT joint attention (SD3, FLUX double-stream blocks): image q/k/v/out and context
#: q/k/v/out, the projections flow_grpo's SD3 and FLUX scripts train
JOINT_ATTENTION_TARGETS: tuple[str, ...] = (
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
)


class FlowMatchingGenerator:
    """A flow-matching transformer family behind the generator protocol (:mod:`mmalign.models.generator`).

    Subclasses set the class attributes below, implement ``encode_conditions`` and ``predict``, and override the
    hooks where their pipeline differs."""

    family: ClassVar[str]
    parametrisation: ClassVar[str] = "flow"
    modality: ClassVar[str] = "image"
    """What :meth:`decode` returns: "image" (``[B, 3, H, W]``) or "video" (``[B, T, 3, H, W]``, Wan); online
    trainers lift image rewards to it."""
    lora_layers_key: ClassVar[str] = "transformer_lora_layers"
    lora_targets: ClassVar[tuple[str, ...]]
    block_class: ClassVar[str]

    pipeline_name: ClassVar[str]
    """The diffusers pipeline class (``model_index.json``'s ``_class_name``)."""
    display_name: ClassVar[str]
    """The family in messages ("SD3", "FLUX", ...)."""
    transformer_class: ClassVar[str]
    """The diffusers class of ``transformer``."""
    vae_class: ClassVar[str] = "AutoencoderKL"
    text_encoder_classes: ClassVar[dict[str, str]]
    """Text encoder component name → its transformers class, in the pipeline's order."""
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer",)
    negative_prompt: ClassVar[str] = ""
    """The prompt :meth:`unconditional` encodes (the pipeline's default negative branch)."""
    optional_components: ClassVar[tuple[str, ...]] = ()
    """Text encoders / tokenizers a pipeline folder may leave out (``None`` then; SD3 without T5)."""
    exact_sizes: ClassVar[bool] = False
    """Whether :meth:`latent_shape` rejects pixel sizes that are not whole patches (else rounds them down, as
    the FLUX and Qwen-Image pipelines do)."""

    def __init__(self, components: dict[str, Any], folder: Path | None = None):
        self.folder = folder
        self.transformer = components["transformer"]
        self.vae = components["vae"]
        self.scheduler = components["scheduler"]
        self.tokenizers = [components.get(name) for name in self.tokenizer_names]
        self.text_encoders: list[torch.nn.Module | None] | None = [
            components.get(name) for name in self.text_encoder_classes
        ]
        missing = [
            name
            for name in (*self.text_encoder_classes, *self.tokenizer_names)
            if components.get(name) is None and name not in self.optional_components
        ]
        if missing:
            raise ValueError(f"{self.display_name} components without {', '.join(missing)}")
        self._unconditional: Conditions | None = None
        for module in [self.vae, *self.text_encoders]:
            if module is not None:
                module.requires_grad_(False)
                module.eval()

    # -- loading -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **options: Any
    ) -> FlowMatchingGenerator:
        """Load every component of a pipeline folder (``save_pretrained`` layout); ``options`` (e.g.
        ``max_sequence_length``) go to the family's constructor."""
        folder = Path(folder)
        index = read_model_index(folder)
        cls.check_index(folder, index)
        components = cls.load_components(folder, index, dtype)
        return cls(components, folder, **{**cls.index_options(folder, index), **options}).to(device)

    @classmethod
    def check_index(cls, folder: Path, index: dict[str, Any]) -> None:
        """Raise :class:`WeightsError` when ``model_index.json`` lacks a component this family needs."""
        names = ("transformer", "vae", *cls.text_encoder_classes, *cls.tokenizer_names)
        missing = [
            name
            for name in names
            if (not index.get(name) or index[name][0] is None) and name not in cls.optional_components
        ]
        if missing:
            raise WeightsError(f"{folder}: {cls.display_name} pipeline without {', '.join(missing)}")

    @classmethod
    def text_encoder_class(cls, name: str, index: dict[str, Any]) -> type:
        """The transformers class of text encoder ``name``."""
        import transformers

        return getattr(transformers, cls.text_encoder_classes[name])

    @classmethod
    def load_components(cls, folder: Path, index: dict[str, Any], dtype: torch.dtype | None) -> dict[str, Any]:
        import diffusers
        from transformers import AutoTokenizer

        typed = {} if dtype is None else {"torch_dtype": dtype}
        components: dict[str, Any] = {
            "transformer": getattr(diffusers, cls.transformer_class).from_pretrained(
                folder, subfolder="transformer", **typed
            ),
            "vae": getattr(diffusers, cls.vae_class).from_pretrained(folder, subfolder="vae", **typed),
            "scheduler": cls.load_scheduler(folder, index),
        }

        def present(name: str) -> bool:
            return bool(index.get(name)) and index[name][0] is not None

        for name in cls.text_encoder_classes:
            if name in cls.optional_components and not present(name):
                continue
            components[name] = cls.text_encoder_class(name, index).from_pretrained(
                folder, subfolder=name, **({} if dtype is None else {"dtype": dtype})
            )
        for name in cls.tokenizer_names:
            if name in cls.optional_components and not present(name):
                continue
            components[name] = AutoTokenizer.from_pretrained(str(folder), subfolder=name)
        return components

    @classmethod
    def load_scheduler(cls, folder: Path, index: dict[str, Any]) -> Any:
        """The ``FlowMatchEulerDiscreteScheduler`` of the folder (Wan converts the multistep one it ships)."""
        import diffusers

        return diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")

    @classmethod
    def index_options(cls, folder: Path, index: dict[str, Any]) -> dict[str, Any]:
        """Constructor options read from the folder (FLUX.2-klein: ``model_index.json``'s ``is_distilled``; SD3:
        ``max_sequence_length``)."""
        return {}

    def to(self, device: str | torch.device) -> FlowMatchingGenerator:
        for module in [self.transformer, self.vae, *(self.text_encoders or [])]:
            if module is not None:
                module.to(device)
        return self

    @property
    def trainable(self) -> torch.nn.Module:
        return self.transformer

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def text_encoder(self) -> torch.nn.Module | None:
        """The first text encoder (the only one of single-encoder families), ``None`` once freed."""
        return None if self.text_encoders is None else self.text_encoders[0]

    @property
    def tokenizer(self) -> Any:
        return self.tokenizers[0]

    # -- conditioning ----------------------------------------------------------------------------------
    def _prompt_list(self, prompts: Sequence[str]) -> list[str]:
        """``prompts`` as a list (a lone string is one prompt); raises once the text encoders are freed."""
        if self.text_encoders is None:
            raise RuntimeError("the text encoders were freed (free_text_encoders); load cached Conditions instead")
        return [prompts] if isinstance(prompts, str) else list(prompts)

    def encode_conditions(self, prompts: Sequence[str]) -> Conditions:
        raise NotImplementedError

    def unconditional(self, count: int) -> Conditions:
        """The encoded :attr:`negative_prompt` repeated ``count`` times: the pipeline's negative branch of
        classifier-free guidance. Encoded once (at batch 1) and kept, so it survives :meth:`free_text_encoders`."""
        if self._unconditional is None:
            self._unconditional = self.encode_conditions([self.negative_prompt])
        return self._unconditional.repeat(count)

    def free_text_encoders(self) -> None:
        """Drop the text encoders (after caching the unconditional embedding): training then runs on cached
        :class:`Conditions`."""
        if self.text_encoders is not None:
            self.unconditional(1)
            self.text_encoders = None

    # -- latents -------------------------------------------------------------------------------------------
    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(self.vae.config.shift_factor or 0.0)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per VAE latent (8 at full size: ``2 ** (len(block_out_channels) − 1)``, as the pipelines)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def patch_size(self) -> int:
        """Latents per side of one transformer token (2)."""
        return 2

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latent of an ``height×width`` image: ``h = patch·(height // (vae_scale_factor·
        patch))`` as the pipelines compute it (sizes that are not whole patches are rounded down, or rejected
        with :attr:`exact_sizes`, as the family's pipeline does)."""
        patch = self.vae_scale_factor * self.patch_size
        if self.exact_sizes and (int(height) % patch or int(width) % patch):
            raise ValueError(f"height and width must be multiples of {patch}, got {height}x{width}")
        size = self.patch_size
        return self.latent_channels, size * (int(height) // patch), size * (int(width) // patch)

    def image_seq_len(self, latent_shape: Sequence[int]) -> int:
        """The transformer's image tokens for latents of shape ``(..., h, w)`` (``(h/p)·(w/p)`` patches): what
        dynamic shifting shifts the schedule by."""
        patch = self.patch_size
        return (int(latent_shape[-2]) // patch) * (int(latent_shape[-1]) // patch)

    @torch.no_grad()
    def latent_distribution(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """The VAE posterior ``(mean, std)`` (float32) of images in [-1, 1]: cached by offline trainers, which
        then draw a fresh latent per step with :meth:`sample_latents`."""
        dist = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def normalise_latents(self, z: Tensor) -> Tensor:
        """VAE latents → the latents the transformer denoises: ``(z − shift_factor)·scaling_factor``."""
        return (z - self.shift_factor) * self.scaling_factor

    def denormalise_latents(self, latents: Tensor) -> Tensor:
        """The inverse of :meth:`normalise_latents`: what the VAE decodes."""
        return latents / self.scaling_factor + self.shift_factor

    def sample_latents(self, mean: Tensor, std: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """:meth:`normalise_latents` of ``z = mean + std·n``, the noise ``n`` drawn on the CPU from
        ``generator``."""
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return self.normalise_latents(mean + std * noise)

    def to_latents(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images in [0, 1] → latents: :meth:`sample_latents` of :meth:`latent_distribution`, float32."""
        return self.sample_latents(*self.latent_distribution(images * 2 - 1), generator).float()

    def _vae_decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z).sample

    def decode(self, latents: Tensor, grad: bool = False) -> Tensor:
        """Latents → images ``[B, 3, H, W]`` in [0, 1] (:meth:`denormalise_latents` then VAE decode, as the
        pipeline); ``grad=True`` keeps the graph."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            images = self._vae_decode(self.denormalise_latents(latents.to(self.vae.dtype)))
            return (images.float() / 2 + 0.5).clamp(0, 1)

    # -- flow matching -----------------------------------------------------------------------------------
    def sigma(self, t: Tensor | float, like: Tensor) -> Tensor:
        """Model timesteps ``t`` (scalar or ``[B]``) → σ = t / num_train_timesteps, broadcastable to ``like``."""
        sigma = torch.as_tensor(t, device=like.device, dtype=torch.float32) / self.num_train_timesteps
        if sigma.ndim == 1:
            sigma = sigma.reshape(-1, *([1] * (like.ndim - 1)))
        return sigma

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``x_t = (1 − σ)·x0 + σ·ε`` with σ = t / 1000 (``FlowMatchEulerDiscreteScheduler.scale_noise``)."""
        sigma = self.sigma(t, x0)
        return (1.0 - sigma) * x0 + sigma * noise

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The flow velocity ``ε − x0`` (independent of ``t``)."""
        return noise - x0

    @staticmethod
    def batch_timesteps(t: Tensor | float, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """``t`` as a ``[B]`` tensor on ``like``'s device (a scalar expanded to ``like``'s batch)."""
        timestep = torch.as_tensor(t, device=like.device, dtype=dtype)
        return timestep.expand(like.shape[0]) if timestep.ndim == 0 else timestep

    def predict(self, model: torch.nn.Module, x_t: Tensor, t: Tensor | float, conditions: Conditions) -> Tensor:
        raise NotImplementedError

    def guided_velocity(
        self,
        model: torch.nn.Module,
        x: Tensor,
        t: Tensor | float,
        conditions: Conditions,
        uncond: Conditions | None,
        guidance: float,
    ) -> Tensor:
        """The velocity the pipeline samples with at classifier-free guidance scale ``guidance`` (the
        conditional :meth:`predict` at 1): the two branches of :meth:`guidance_branches` combined by
        :meth:`combine_guidance` (by default ``v_u + g·(v_c − v_u)``); ``t`` a scalar or per sample ``[B]``."""
        if guidance == 1.0:
            return self.predict(model, x, t, conditions)
        check_guidance(conditions, uncond, guidance)
        return self.combine_guidance(*self.guidance_branches(model, x, t, conditions, uncond), guidance, t)

    def guidance_branches(
        self, model: torch.nn.Module, x: Tensor, t: Tensor | float, conditions: Conditions, uncond: Conditions
    ) -> tuple[Tensor, Tensor]:
        """``(v_uncond, v_cond)`` from one batched :meth:`predict` in the pipeline's order (:func:`cfg_branches`):
        what :meth:`guided_velocity` combines, and what a rollout records of the unconditional branch so that
        training with it detached need not recompute it while the weights are those that sampled."""
        return cfg_branches(self, model, x, t, conditions, uncond)

    def combine_guidance(self, v_uncond: Tensor, v_cond: Tensor, guidance: float, t: Tensor | float) -> Tensor:
        """How the pipeline combines its two branches at scale ``guidance``: ``v_u + g·(v_c − v_u)``. Training
        that detaches the unconditional branch (Flow-GRPO) computes the branches apart and combines them here."""
        return v_uncond + guidance * (v_cond - v_uncond)

    # -- sampling schedule -----------------------------------------------------------------------------
    def shift_mu(self, image_seq_len: int, steps: int) -> float:
        """μ of dynamic shifting for ``image_seq_len`` image tokens (:func:`calculate_shift`)."""
        return calculate_shift(image_seq_len, self.scheduler.config)

    def schedule_sigmas(self, steps: int) -> Any:
        """The unshifted σ the pipeline hands ``set_timesteps`` (``linspace(1, 1/steps, steps)``), or ``None`` for
        the scheduler's own."""
        import numpy as np

        return np.linspace(1.0, 1 / steps, steps)

    def sampling_schedule(self, steps: int, latent_shape: Sequence[int] | None = None, device: Any = None) -> Schedule:
        """The pipeline's schedule: a fresh ``FlowMatchEulerDiscreteScheduler`` from this config,
        ``set_timesteps`` with :meth:`schedule_sigmas` and, under dynamic shifting, μ = :meth:`shift_mu` of the
        image tokens of ``latent_shape`` (``(C, h, w)`` or a latents' shape ``(..., h, w)``; required then).
        ``sigmas`` ends with the terminal 0."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        mu = None
        if scheduler.config.get("use_dynamic_shifting", False):
            if latent_shape is None:
                raise ValueError(
                    f"{self.display_name}'s scheduler uses dynamic shifting: pass latent_shape (the latents' "
                    "(C, h, w), from which the image tokens that shift the schedule are counted)"
                )
            mu = self.shift_mu(self.image_seq_len(latent_shape), steps)
        sigmas = self.schedule_sigmas(steps)
        device = device or self.device
        if sigmas is None:
            scheduler.set_timesteps(steps, device=device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
        return Schedule(scheduler.timesteps, scheduler.sigmas)

    # -- pipelines ------------------------------------------------------------------------------------------
    @property
    def pipeline_class(self) -> type:
        """The diffusers pipeline class of this family (:attr:`pipeline_name`)."""
        import diffusers

        return getattr(diffusers, self.pipeline_name)

    def pipeline_options(self) -> dict[str, Any]:
        """Further keyword arguments of the pipeline's constructor (FLUX.2-klein: ``is_distilled``)."""
        return {}

    def save_pipeline(self, folder: str | Path, transformer: torch.nn.Module | None = None) -> Path:
        """:meth:`pipeline` saved with ``save_pretrained`` (plus what the family keeps beside it), loadable by
        :func:`~mmalign.models.generator.load_generator` and by diffusers."""
        self.pipeline(transformer).save_pretrained(str(folder))
        return Path(folder)

    def pipeline(self, transformer: torch.nn.Module | None = None):
        """A diffusers pipeline of :attr:`pipeline_class` over these components (validation images, saving, LoRA
        loading), with a fresh scheduler and ``transformer`` in place of :attr:`trainable` when given."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if self.text_encoders is None:
            raise RuntimeError("the text encoders were freed (free_text_encoders)")
        text = dict(zip(self.text_encoder_classes, self.text_encoders, strict=True))
        text.update(zip(self.tokenizer_names, self.tokenizers, strict=True))
        return self.pipeline_class(
            transformer=transformer if transformer is not None else self.transformer,
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config),
            vae=self.vae,
            **text,
            **self.pipeline_options(),
        )
