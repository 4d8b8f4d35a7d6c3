"""FLUX.2-klein as a :class:`mmalign.models.generator.Generator` (flow matching, text-to-image only).

Components, as diffusers' ``Flux2KleinPipeline`` holds them: ``Flux2Transformer2DModel`` (trainable), a Qwen3
language model (``text_encoder``, ``Qwen3ForCausalLM``) with its ``Qwen2Tokenizer``, ``AutoencoderKLFlux2`` (32
latent channels and a batch norm whose running statistics normalise the patchified latents) and
``FlowMatchEulerDiscreteScheduler``. The pipeline's ``is_distilled`` flag (``model_index.json``) marks the
step-distilled klein variants, which sample without classifier-free guidance; the base variants use CFG (the
pipeline's ``guidance_scale``, default 4) against the encoded empty prompt (:meth:`Flux2KleinGenerator.unconditional`).
The transformer gets no guidance embedding (the pipeline passes ``guidance=None``).

Prompt encoding re-implements ``Flux2KleinPipeline.encode_prompt`` (diffusers 0.42.1): each prompt rendered as one
user turn with the tokenizer's chat template (generation prompt, ``enable_thinking=False``), padded to
``max_sequence_length`` (512), run through Qwen3 with its attention mask; the hidden states of layers
``text_encoder_out_layers`` (9, 18, 27) are stacked per token → "prompt_embeds" ``[B, L, 3·D]``. The text position
ids (``(0, 0, 0, l)``) are rebuilt by :meth:`Flux2KleinGenerator.predict`.

Latents. FLUX.2 diffuses in a normalised, patchified space: the VAE latent ``z [B, 32, h, w]`` is cut into 2×2
patches stacked on the channels (``_patchify_latents`` → ``[B, 128, h/2, w/2]``) and normalised per channel by the
VAE's batch-norm running mean and std (``sqrt(var + eps)``). The protocol's latents are these ``[B, 128, h/2, w/2]``
tensors (image-shaped, so samplers and log-probs stay family-free); :meth:`~Flux2KleinGenerator.predict` flattens
them into tokens (``_pack_latents``, row-major) with position ids ``(0, row, column, 0)`` and reshapes the output
back. ``Flux2KleinPipeline(..., output_type="latent")`` returns de-normalised, unpatchified VAE latents:
:meth:`~Flux2KleinGenerator.vae_latents` converts ours to that.

Flow matching as in the scheduler (``x_t = (1 − σ)·x0 + σ·ε``, ``v = ε − x0``, ``t = 1000·σ``); the pipeline's
schedule shifts σ = linspace(1, 1/N, N) by an empirical μ that depends on the number of tokens *and* of steps
(:func:`compute_empirical_mu`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import WeightsError
from .generator import Conditions, Schedule, read_model_index

__all__ = ["Flux2KleinGenerator", "compute_empirical_mu", "patchify_latents", "unpatchify_latents"]


def patchify_latents(latents: Tensor) -> Tensor:
    """``[B, C, h, w]`` → ``[B, 4·C, h/2, w/2]``: each 2×2 patch's values on the channels, ordered ``(c, dy, dx)``
    (``Flux2KleinPipeline._patchify_latents``)."""
    batch, channels, height, width = latents.shape
    if height % 2 or width % 2:
        raise ValueError(f"FLUX.2 patchifies 2x2: latent height and width must be even, got {height}x{width}")
    patches = latents.reshape(batch, channels, height // 2, 2, width // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return patches.reshape(batch, channels * 4, height // 2, width // 2)


def unpatchify_latents(latents: Tensor) -> Tensor:
    """The inverse of :func:`patchify_latents` (``Flux2KleinPipeline._unpatchify_latents``)."""
    batch, channels, height, width = latents.shape
    patches = latents.reshape(batch, channels // 4, 2, 2, height, width).permute(0, 1, 4, 2, 5, 3)
    return patches.reshape(batch, channels // 4, height * 2, width * 2)


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's schedule shift μ (``diffusers.pipelines.flux2.pipeline_flux2_klein.compute_empirical_mu``): above
    4300 tokens linear in the tokens (0.00016927·n + 0.45666666); below, interpolated linearly in the number of
    steps between that line (at 200 steps) and 8.73809524e-05·n + 1.89833333 (at 10 steps)."""
    at_200 = 0.00016927 * image_seq_len + 0.45666666
    if image_seq_len > 4300:
        return float(at_200)
    at_10 = 8.73809524e-05 * image_seq_len + 1.89833333
    slope = (at_200 - at_10) / 190.0
    return float(slope * num_steps + at_200 - 200.0 * slope)


def _token_ids(height: int, width: int, device: Any = None) -> Tensor:
    """Position ids ``[h·w, 4]`` of the image tokens, row-major: ``(0, row, column, 0)``
    (``Flux2KleinPipeline._prepare_latent_ids``)."""
    rows = torch.arange(height).repeat_interleave(width)
    columns = torch.arange(width).repeat(height)
    zeros = torch.zeros(height * width, dtype=torch.long)
    return torch.stack([zeros, rows, columns, zeros], dim=1).to(device)


def _text_ids(length: int, device: Any = None) -> Tensor:
    """Position ids ``[L, 4]`` of the text tokens: ``(0, 0, 0, l)`` (``Flux2KleinPipeline._prepare_text_ids``)."""
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids.to(device)


class Flux2KleinGenerator:
    """FLUX.2-klein components behind the generator protocol (see :mod:`mmalign.models.generator` and this
    module)."""

    family: ClassVar[str] = "flux2"
    block_class: ClassVar[str] = "Flux2TransformerBlock"
    # diffusers' train_dreambooth_lora_flux2_klein.py default targets: the image-stream attention projections of
    # the double-stream blocks, the fused QKV+MLP input of the single-stream blocks, and (by full name, as their
    # "attn.to_out" is a Linear where the double-stream one is a ModuleList) each single block's output projection
    _lora_base: ClassVar[tuple[str, ...]] = ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj")

    def __init__(
        self,
        components: dict[str, Any],
        folder: Path | None = None,
        max_sequence_length: int = 512,
        text_encoder_out_layers: Sequence[int] = (9, 18, 27),
        is_distilled: bool = False,
    ):
        self.folder = folder
        self.transformer = components["transformer"]
        self.vae = components["vae"]
        self.scheduler = components["scheduler"]
        self.tokenizer = components["tokenizer"]
        self.text_encoder: torch.nn.Module | None = components["text_encoder"]
        self.max_sequence_length = max_sequence_length
        self.text_encoder_out_layers = tuple(int(layer) for layer in text_encoder_out_layers)
        self.is_distilled = bool(is_distilled)
        """Step-distilled klein: samples without classifier-free guidance (the pipeline ignores guidance_scale)."""
        self._unconditional: Conditions | None = None
        for module in [self.vae, self.text_encoder]:
            module.requires_grad_(False)
            module.eval()

    @property
    def trainable(self) -> torch.nn.Module:
        return self.transformer

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """Default peft ``target_modules`` (diffusers' klein LoRA script's default, its per-block single-stream
        output projections listed for this transformer's depth)."""
        singles = len(self.transformer.single_transformer_blocks)
        return self._lora_base + tuple(f"single_transformer_blocks.{i}.attn.to_out" for i in range(singles))

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        max_sequence_length: int = 512,
        text_encoder_out_layers: Sequence[int] = (9, 18, 27),
    ) -> Flux2KleinGenerator:
        """Load every component of a ``Flux2KleinPipeline`` folder (``save_pretrained`` layout)."""
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
        from transformers import AutoTokenizer, Qwen3ForCausalLM

        folder = Path(folder)
        index = read_model_index(folder)
        missing = [name for name in ("transformer", "vae", "text_encoder", "tokenizer") if not index.get(name)]
        if missing:
            raise WeightsError(f"{folder}: FLUX.2-klein pipeline without {', '.join(missing)}")
        typed = {} if dtype is None else {"torch_dtype": dtype}
        components = {
            "transformer": Flux2Transformer2DModel.from_pretrained(folder, subfolder="transformer", **typed),
            "vae": AutoencoderKLFlux2.from_pretrained(folder, subfolder="vae", **typed),
            "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler"),
            "text_encoder": Qwen3ForCausalLM.from_pretrained(folder, subfolder="text_encoder", **typed),
            "tokenizer": AutoTokenizer.from_pretrained(str(folder), subfolder="tokenizer"),
        }
        generator = cls(
            components, folder, max_sequence_length, text_encoder_out_layers, bool(index.get("is_distilled", False))
        )
        return generator.to(device)

    def to(self, device: str | torch.device) -> Flux2KleinGenerator:
        for module in [self.transformer, self.vae, self.text_encoder]:
            if module is not None:
                module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    # -- conditioning ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_conditions(self, prompts: Sequence[str]) -> Conditions:
        """``prompt_embeds [B, max_sequence_length, len(text_encoder_out_layers)·D]``, equal to
        ``Flux2KleinPipeline.encode_prompt(prompts)[0]`` (its text ids are rebuilt by :meth:`predict`)."""
        if self.text_encoder is None:
            raise RuntimeError("the text encoder was freed (free_text_encoders); load cached Conditions instead")
        if isinstance(prompts, str):
            prompts = [prompts]
        encoder = self.text_encoder
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=False,
            )
            for prompt in prompts
        ]
        inputs = self.tokenizer(
            texts, return_tensors="pt", padding="max_length", truncation=True, max_length=self.max_sequence_length
        )
        output = encoder(
            input_ids=inputs["input_ids"].to(encoder.device),
            attention_mask=inputs["attention_mask"].to(encoder.device),
            output_hidden_states=True,
            use_cache=False,
        )
        # [B, layers, L, D] -> [B, L, layers·D]: per token, the chosen layers' states side by side
        stacked = torch.stack([output.hidden_states[k] for k in self.text_encoder_out_layers], dim=2)
        embeds = stacked.flatten(2).to(encoder.dtype)
        return Conditions({"prompt_embeds": embeds}, {"family": self.family})

    def unconditional(self, count: int) -> Conditions:
        """The encoded empty prompt ``""`` repeated ``count`` times: the pipeline's negative branch of
        classifier-free guidance (base klein; distilled klein samples without it). Encoded once and kept, so it
        survives :meth:`free_text_encoders`."""
        if self._unconditional is None:
            self._unconditional = self.encode_conditions([""])
        return self._unconditional.repeat(count)

    def free_text_encoders(self) -> None:
        """Drop the Qwen3 text encoder (after caching the unconditional embedding)."""
        if self.text_encoder is not None:
            self.unconditional(1)
            self.text_encoder = None

    # -- latents -------------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per VAE latent (8 at full size: ``2 ** (len(block_out_channels) − 1)``, as the pipeline)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(4·C, h/2, w/2)`` of the patchified latent of an ``height×width`` image (``(128, 64, 64)`` at
        1024²), with the pipeline's ``h = 2·(height // (2·vae_scale_factor))``."""
        patch = 2 * self.vae_scale_factor
        return 4 * int(self.vae.config.latent_channels), int(height) // patch, int(width) // patch

    def image_seq_len(self, height: int, width: int) -> int:
        """Image tokens of an ``height×width`` image: what :meth:`sampling_schedule` shifts by."""
        _, h, w = self.latent_shape(height, width)
        return h * w

    def _bn_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    @torch.no_grad()
    def to_latents(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images in [0, 1] → patchified, batch-norm-normalised latents ``[B, 128, h/2, w/2]``, float32, from the
        posterior *mode* as diffusers' ``train_dreambooth_lora_flux2_klein.py`` and the pipeline's reference-image
        encoding take it (``generator`` is accepted for the protocol and unused)."""
        pixels = (images * 2 - 1).to(self.vae.device, self.vae.dtype)
        latents = patchify_latents(self.vae.encode(pixels).latent_dist.mode().float())
        mean, std = self._bn_stats(latents)
        return (latents - mean) / std

    def vae_latents(self, latents: Tensor) -> Tensor:
        """Our latents → the VAE's ``[B, 32, h, w]`` (de-normalised, unpatchified): what the VAE decodes and what
        ``Flux2KleinPipeline(output_type="latent")`` returns."""
        mean, std = self._bn_stats(latents)
        return unpatchify_latents(latents * std + mean)

    def decode(self, latents: Tensor, grad: bool = False) -> Tensor:
        """Latents → images ``[B, 3, H, W]`` in [0, 1] (de-normalise, unpatchify, VAE decode, as the pipeline)."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            z = self.vae_latents(latents.to(self.vae.dtype))
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
        """The velocity at ``x_t [B, 128, h, w]``: ``model(hidden_states=tokens, timestep=t/1000, guidance=None,
        encoder_hidden_states=prompt_embeds, txt_ids, img_ids)`` as ``Flux2KleinPipeline.__call__`` calls it,
        in the model's dtype; returned as ``[B, 128, h, w]`` float32."""
        dtype = next(model.parameters()).dtype
        batch, channels, height, width = x_t.shape
        timestep = torch.as_tensor(t, device=x_t.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        prompt_embeds = conditions["prompt_embeds"].to(x_t.device, dtype)
        tokens = x_t.to(dtype).reshape(batch, channels, height * width).permute(0, 2, 1)
        out = model(
            hidden_states=tokens,
            timestep=timestep.to(dtype) / 1000,
            guidance=None,
            encoder_hidden_states=prompt_embeds,
            txt_ids=_text_ids(prompt_embeds.shape[1], x_t.device),
            img_ids=_token_ids(height, width, x_t.device),
            return_dict=False,
        )[0]
        return out[:, : height * width].permute(0, 2, 1).reshape(batch, -1, height, width).float()

    def sampling_schedule(self, steps: int, image_seq_len: int | None = None, device: Any = None) -> Schedule:
        """``Flux2KleinPipeline.__call__``'s schedule: ``set_timesteps(sigmas=linspace(1, 1/steps, steps),
        mu=compute_empirical_mu(image_seq_len, steps))`` on a fresh scheduler from this config (its own σ with
        ``use_flow_sigmas``). ``image_seq_len`` = image tokens (:meth:`image_seq_len`; 4096 at 1024²), required
        with dynamic shifting. ``sigmas`` ends with the terminal 0."""
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        config = scheduler.config
        mu = None
        if image_seq_len is not None:
            mu = compute_empirical_mu(int(image_seq_len), steps)
        elif config.get("use_dynamic_shifting", False):
            raise ValueError("this scheduler uses dynamic shifting: pass image_seq_len (image tokens)")
        device = device or self.device
        if config.get("use_flow_sigmas", False):
            scheduler.set_timesteps(steps, device=device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device, mu=mu)
        return Schedule(scheduler.timesteps, scheduler.sigmas)

    # -- pipelines ------------------------------------------------------------------------------------------
    def pipeline(self, transformer: torch.nn.Module | None = None):
        """A diffusers ``Flux2KleinPipeline`` over these components (validation images, saving, LoRA loading)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

        if self.text_encoder is None:
            raise RuntimeError("the text encoder was freed (free_text_encoders)")
        return Flux2KleinPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config),
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            transformer=transformer if transformer is not None else self.transformer,
            is_distilled=self.is_distilled,
        )
