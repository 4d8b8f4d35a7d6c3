"""FLUX.1 (dev, schnell) as a :class:`mmalign.models.generator.Generator` (flow matching).

Components, as diffusers' ``FluxPipeline`` holds them: ``FluxTransformer2DModel`` (trainable), CLIP-L
(``text_encoder``, a ``CLIPTextModel`` of which only the pooled output is used), T5 (``text_encoder_2``,
``T5EncoderModel``), ``AutoencoderKL`` with 16 latent channels (``scaling_factor`` and ``shift_factor`` from its
config) and ``FlowMatchEulerDiscreteScheduler`` (FLUX.1-dev: resolution-dependent dynamic shifting; schnell: none).

Prompt encoding re-implements ``FluxPipeline.encode_prompt`` (diffusers 0.42.1): CLIP's ``pooler_output``
(prompt padded to its tokenizer's ``model_max_length``, 77) → "pooled_prompt_embeds"; T5's last hidden state
(padded to ``max_sequence_length``, default 512 as the pipeline) → "prompt_embeds". The pipeline's ``text_ids``
are zeros ``[L, 3]``: :meth:`FluxGenerator.predict` rebuilds them instead of storing them.

Latents. The protocol's latents are the *unpacked* VAE latents ``[B, 16, h, w]`` (``h = H / 8`` at full size), so
samplers, rollouts and Flow-GRPO log-probs stay family-free (the log-prob is a mean over all non-batch elements,
which packing only permutes). :meth:`FluxGenerator.predict` packs 2×2 patches into tokens ``[B, h/2·w/2, 64]``
(``FluxPipeline._pack_latents``), builds the latent image ids (row, column of each patch:
``_prepare_latent_image_ids``), calls the transformer with the model timestep divided by 1000 (as the pipeline
does; the transformer multiplies it back) and unpacks its output (``_unpack_latents``). ``FluxPipeline(...,
output_type="latent")`` returns packed latents: :func:`pack_latents` / :func:`unpack_latents` convert.

Guidance. FLUX.1-dev is guidance-distilled: the transformer embeds a guidance scale (``guidance_embeds``) instead of
running classifier-free guidance. :attr:`FluxGenerator.embedded_guidance` (default 3.5, the pipeline's
``guidance_scale``) is passed on every :meth:`~FluxGenerator.predict`; trainers run it with CFG guidance 1 (no
unconditional batch), as flow_grpo's and DanceGRPO's FLUX scripts do. :meth:`~FluxGenerator.unconditional` (the
encoded ``""``) exists for "true CFG" users (the pipeline's ``true_cfg_scale`` with a negative prompt). schnell
(no ``guidance_embeds``) ignores the attribute.

Flow matching as in the scheduler: ``x_t = (1 − σ)·x0 + σ·ε``, target velocity ``v = ε − x0``, model timestep
``t = σ·num_train_timesteps`` (1000); the sampling schedule is ``FluxPipeline.__call__``'s (σ = linspace(1, 1/N,
N) shifted by μ from the number of latent tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import WeightsError
from .generator import Conditions, Schedule, read_model_index

__all__ = ["FluxGenerator", "latent_image_ids", "pack_latents", "unpack_latents"]


def pack_latents(latents: Tensor) -> Tensor:
    """``[B, C, h, w]`` → ``[B, (h/2)·(w/2), 4·C]``: 2×2 patches as tokens, row-major, channels ``(c, dy, dx)``
    (``FluxPipeline._pack_latents``)."""
    batch, channels, height, width = latents.shape
    if height % 2 or width % 2:
        raise ValueError(f"FLUX packs 2x2 patches: latent height and width must be even, got {height}x{width}")
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


def latent_image_ids(height: int, width: int, device: Any = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Position ids ``[(h/2)·(w/2), 3]`` of the packed tokens of an ``h×w`` latent: ``(0, row, column)``
    (``FluxPipeline._prepare_latent_image_ids``)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def calculate_shift(image_seq_len: int, config: Any) -> float:
    """μ of the resolution-dependent shift: linear in the number of latent tokens, ``base_shift`` at
    ``base_image_seq_len`` and ``max_shift`` at ``max_image_seq_len`` (``diffusers.pipelines.flux.pipeline_flux.
    calculate_shift`` with the scheduler config's values and the pipeline's defaults)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len


class FluxGenerator:
    """FLUX.1 components behind the generator protocol (see :mod:`mmalign.models.generator` and this module)."""

    family: ClassVar[str] = "flux"
    # flow_grpo's FLUX LoRA targets (yifan123/flow_grpo scripts/train_flux.py, commit 74db691): both streams of the
    # joint attention and both feed-forwards of every double-stream block (the single-stream blocks' attention
    # projections match "attn.to_q/k/v" as well)
    lora_targets: ClassVar[tuple[str, ...]] = (
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    )
    block_class: ClassVar[str] = "FluxTransformerBlock"

    def __init__(
        self,
        components: dict[str, Any],
        folder: Path | None = None,
        max_sequence_length: int = 512,
        embedded_guidance: float = 3.5,
    ):
        if max_sequence_length > 512:
            raise ValueError(
                f"max_sequence_length cannot be greater than 512 (FluxPipeline), got {max_sequence_length}"
            )
        self.folder = folder
        self.transformer = components["transformer"]
        self.vae = components["vae"]
        self.scheduler = components["scheduler"]
        self.tokenizers = [components["tokenizer"], components["tokenizer_2"]]
        self.text_encoders: list[torch.nn.Module] | None = [components["text_encoder"], components["text_encoder_2"]]
        self.max_sequence_length = max_sequence_length
        self.embedded_guidance = float(embedded_guidance)
        """The guidance scale the guidance-distilled transformer embeds (FluxPipeline's ``guidance_scale``)."""
        self._unconditional: Conditions | None = None
        for module in [self.vae, *self.text_encoders]:
            module.requires_grad_(False)
            module.eval()

    @property
    def trainable(self) -> torch.nn.Module:
        return self.transformer

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        max_sequence_length: int = 512,
        embedded_guidance: float = 3.5,
    ) -> FluxGenerator:
        """Load every component of a ``FluxPipeline`` folder (``save_pretrained`` layout)."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        folder = Path(folder)
        index = read_model_index(folder)
        names = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
        missing = [name for name in names if not index.get(name) or index[name][0] is None]
        if missing:
            raise WeightsError(f"{folder}: FLUX pipeline without {', '.join(missing)}")
        typed = {} if dtype is None else {"torch_dtype": dtype}
        components = {
            "transformer": FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", **typed),
            "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", **typed),
            "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler"),
            "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **typed),
            "text_encoder_2": T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_2", **typed),
            "tokenizer": AutoTokenizer.from_pretrained(str(folder), subfolder="tokenizer"),
            "tokenizer_2": AutoTokenizer.from_pretrained(str(folder), subfolder="tokenizer_2"),
        }
        generator = cls(components, folder, max_sequence_length, embedded_guidance)
        return generator.to(device)

    def to(self, device: str | torch.device) -> FluxGenerator:
        for module in [self.transformer, self.vae, *(self.text_encoders or [])]:
            module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    # -- conditioning ----------------------------------------------------------------------------------
    def _clip(self, prompts: list[str]) -> Tensor:
        tokenizer, encoder = self.tokenizers[0], self.text_encoders[0]
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return encoder(ids.to(encoder.device), output_hidden_states=False).pooler_output.to(encoder.dtype)

    def _t5(self, prompts: list[str]) -> Tensor:
        tokenizer, encoder = self.tokenizers[1], self.text_encoders[1]
        ids = tokenizer(
            prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True, return_tensors="pt"
        ).input_ids
        return encoder(ids.to(encoder.device), output_hidden_states=False)[0].to(encoder.dtype)

    @torch.no_grad()
    def encode_conditions(self, prompts: Sequence[str]) -> Conditions:
        """``prompt_embeds [B, max_sequence_length, T5 width]`` and ``pooled_prompt_embeds [B, CLIP width]``,
        equal to ``FluxPipeline.encode_prompt(prompts)[:2]`` (its ``text_ids`` are zeros, rebuilt by
        :meth:`predict`)."""
        if self.text_encoders is None:
            raise RuntimeError("the text encoders were freed (free_text_encoders); load cached Conditions instead")
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        return Conditions(
            {"prompt_embeds": self._t5(prompts), "pooled_prompt_embeds": self._clip(prompts)},
            {"family": self.family},
        )

    def unconditional(self, count: int) -> Conditions:
        """The encoded empty prompt ``""`` repeated ``count`` times: the negative branch of FluxPipeline's "true
        CFG" (``true_cfg_scale`` > 1 with ``negative_prompt=""``). FLUX.1-dev itself is guidance-distilled and
        samples without it (:attr:`embedded_guidance`, CFG guidance 1). Encoded once and kept, so it survives
        :meth:`free_text_encoders`."""
        if self._unconditional is None:
            self._unconditional = self.encode_conditions([""])
        return self._unconditional.repeat(count)

    def free_text_encoders(self) -> None:
        """Drop both text encoders (after caching the unconditional embedding): training then runs on cached
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
        """Pixels per latent (8 for FLUX.1's VAE: ``2 ** (len(block_out_channels) − 1)``, as the pipeline)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of the (unpacked) latent of an ``height×width`` image: FluxPipeline's
        ``h = 2·(height // (2·vae_scale_factor))`` (pixel sizes are rounded down to whole 2×2 patches, as the
        pipeline does after warning)."""
        patch = 2 * self.vae_scale_factor
        return int(self.vae.config.latent_channels), 2 * (int(height) // patch), 2 * (int(width) // patch)

    def image_seq_len(self, height: int, width: int) -> int:
        """Packed tokens of an ``height×width`` image: what :meth:`sampling_schedule` shifts by."""
        _, h, w = self.latent_shape(height, width)
        return (h // 2) * (w // 2)

    @torch.no_grad()
    def to_latents(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images in [0, 1] → ``(z − shift_factor)·scaling_factor`` with ``z`` a VAE posterior sample (diffusers'
        ``train_dreambooth_lora_flux.py``), unpacked ``[B, 16, h, w]``, float32."""
        pixels = (images * 2 - 1).to(self.vae.device, self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.sample(generator)
        return ((latents.float() - self.shift_factor) * self.scaling_factor).float()

    def decode(self, latents: Tensor, grad: bool = False) -> Tensor:
        """Unpacked latents → images ``[B, 3, H, W]`` in [0, 1] (the pipeline's ``z/scaling + shift`` then VAE
        decode)."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            z = latents.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
            images = self.vae.decode(z).sample
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

    def predict(self, model: torch.nn.Module, x_t: Tensor, t: Tensor | float, conditions: Conditions) -> Tensor:
        """The velocity at unpacked ``x_t [B, C, h, w]``: ``model(hidden_states=pack(x_t), timestep=t/1000,
        guidance=embedded_guidance (when the config embeds it), pooled_projections, encoder_hidden_states,
        txt_ids=zeros, img_ids=latent ids)`` as ``FluxPipeline.__call__`` calls it, in the model's dtype;
        returned unpacked, in float32."""
        dtype = next(model.parameters()).dtype
        batch, _, height, width = x_t.shape
        timestep = torch.as_tensor(t, device=x_t.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        config = getattr(model, "config", None) or self.transformer.config  # DDP/FSDP wrappers have no config
        guidance = None
        if config.guidance_embeds:
            guidance = torch.full((batch,), self.embedded_guidance, device=x_t.device, dtype=torch.float32)
        prompt_embeds = conditions["prompt_embeds"].to(x_t.device, dtype)
        out = model(
            hidden_states=pack_latents(x_t.to(dtype)),
            timestep=timestep.to(dtype) / 1000,
            guidance=guidance,
            pooled_projections=conditions["pooled_prompt_embeds"].to(x_t.device, dtype),
            encoder_hidden_states=prompt_embeds,
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=x_t.device, dtype=dtype),
            img_ids=latent_image_ids(height, width, x_t.device, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, height, width).float()

    def sampling_schedule(self, steps: int, image_seq_len: int | None = None, device: Any = None) -> Schedule:
        """``FluxPipeline.__call__``'s schedule: a fresh ``FlowMatchEulerDiscreteScheduler`` from this config,
        ``set_timesteps(sigmas=linspace(1, 1/steps, steps), mu=calculate_shift(image_seq_len))`` (the scheduler's
        own σ when it has ``use_flow_sigmas``). ``image_seq_len`` = packed latent tokens (:meth:`image_seq_len`;
        4096 at 1024²), required with dynamic shifting (FLUX.1-dev). ``sigmas`` ends with the terminal 0."""
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        config = scheduler.config
        mu = None
        if image_seq_len is not None:
            mu = calculate_shift(int(image_seq_len), config)
        elif config.get("use_dynamic_shifting", False):
            raise ValueError("this scheduler uses dynamic shifting: pass image_seq_len (packed latent tokens)")
        device = device or self.device
        if config.get("use_flow_sigmas", False):
            scheduler.set_timesteps(steps, device=device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device, mu=mu)
        return Schedule(scheduler.timesteps, scheduler.sigmas)

    # -- pipelines ------------------------------------------------------------------------------------------
    def pipeline(self, transformer: torch.nn.Module | None = None):
        """A diffusers ``FluxPipeline`` over these components (validation images, saving, LoRA loading); call it
        with ``guidance_scale=embedded_guidance``."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        if self.text_encoders is None:
            raise RuntimeError("the text encoders were freed (free_text_encoders)")
        return FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config),
            vae=self.vae,
            text_encoder=self.text_encoders[0],
            tokenizer=self.tokenizers[0],
            text_encoder_2=self.text_encoders[1],
            tokenizer_2=self.tokenizers[1],
            transformer=transformer if transformer is not None else self.transformer,
        )
