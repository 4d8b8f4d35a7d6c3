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

from .flow_generator import FlowMatchingGenerator
from .generator import Conditions

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


class Flux2KleinGenerator(FlowMatchingGenerator):
    """FLUX.2-klein components behind the generator protocol (see :mod:`mmalign.models.generator`,
    :class:`~mmalign.models.flow_generator.FlowMatchingGenerator` and this module). The unconditional branch is
    the encoded ``""``, the pipeline's negative branch of classifier-free guidance (base klein; distilled klein
    samples without it)."""

    family: ClassVar[str] = "flux2"
    block_class: ClassVar[str] = "Flux2TransformerBlock"
    pipeline_name: ClassVar[str] = "Flux2KleinPipeline"
    display_name: ClassVar[str] = "FLUX.2-klein"
    transformer_class: ClassVar[str] = "Flux2Transformer2DModel"
    vae_class: ClassVar[str] = "AutoencoderKLFlux2"
    text_encoder_classes: ClassVar[dict[str, str]] = {"text_encoder": "Qwen3ForCausalLM"}
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
        super().__init__(components, folder)
        self.max_sequence_length = max_sequence_length
        self.text_encoder_out_layers = tuple(int(layer) for layer in text_encoder_out_layers)
        self.is_distilled = bool(is_distilled)
        """Step-distilled klein: samples without classifier-free guidance (the pipeline ignores guidance_scale)."""

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """Default peft ``target_modules`` (diffusers' klein LoRA script's default, its per-block single-stream
        output projections listed for this transformer's depth)."""
        singles = len(self.transformer.single_transformer_blocks)
        return self._lora_base + tuple(f"single_transformer_blocks.{i}.attn.to_out" for i in range(singles))

    @classmethod
    def index_options(cls, folder: Path, index: dict[str, Any]) -> dict[str, Any]:
        return {"is_distilled": bool(index.get("is_distilled", False))}

    def pipeline_options(self) -> dict[str, Any]:
        return {"is_distilled": self.is_distilled}

    # -- conditioning ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_conditions(self, prompts: Sequence[str]) -> Conditions:
        """``prompt_embeds [B, max_sequence_length, len(text_encoder_out_layers)·D]``, equal to
        ``Flux2KleinPipeline.encode_prompt(prompts)[0]`` (its text ids are rebuilt by :meth:`predict`)."""
        prompts = self._prompt_list(prompts)
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

    # -- latents -------------------------------------------------------------------------------------------
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(4·C, h/2, w/2)`` of the patchified latent of an ``height×width`` image (``(128, 64, 64)`` at
        1024²), with the pipeline's ``h = 2·(height // (2·vae_scale_factor))``."""
        patch = 2 * self.vae_scale_factor
        return 4 * self.latent_channels, int(height) // patch, int(width) // patch

    def image_seq_len(self, latent_shape: Sequence[int]) -> int:
        """Image tokens of (patchified) latents ``(..., h, w)``: one per position, ``h·w`` (4096 at 1024²)."""
        return int(latent_shape[-2]) * int(latent_shape[-1])

    def _bn_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    @torch.no_grad()
    def latent_distribution(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """The VAE posterior *mode* and a zero std (float32) of images in [-1, 1]: FLUX.2-klein's training
        script and the pipeline's reference-image encoding take the mode, so :meth:`sample_latents` of this is
        the mode whatever its noise (it still draws it, so that offline trainers' random streams do not depend on
        the family)."""
        mean, _ = super().latent_distribution(pixels)
        return mean, torch.zeros_like(mean)

    def normalise_latents(self, z: Tensor) -> Tensor:
        """VAE latents ``[B, 32, h, w]`` → patchified, batch-norm-normalised ``[B, 128, h/2, w/2]``."""
        latents = patchify_latents(z)
        mean, std = self._bn_stats(latents)
        return (latents - mean) / std

    def to_latents(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images in [0, 1] → patchified, batch-norm-normalised latents ``[B, 128, h/2, w/2]``, float32, from the
        posterior *mode* as diffusers' ``train_dreambooth_lora_flux2_klein.py`` and the pipeline's reference-image
        encoding take it: equal to ``sample_latents(*latent_distribution(2·images − 1), generator)``, without
        drawing (``generator`` is accepted for the protocol and unused)."""
        return self.normalise_latents(self.latent_distribution(images * 2 - 1)[0]).float()

    def denormalise_latents(self, latents: Tensor) -> Tensor:
        """Our latents → the VAE's ``[B, 32, h, w]`` (de-normalised, unpatchified): what the VAE decodes and what
        ``Flux2KleinPipeline(output_type="latent")`` returns."""
        mean, std = self._bn_stats(latents)
        return unpatchify_latents(latents * std + mean)

    vae_latents = denormalise_latents

    # -- flow matching -----------------------------------------------------------------------------------
    def predict(self, model: torch.nn.Module, x_t: Tensor, t: Tensor | float, conditions: Conditions) -> Tensor:
        """The velocity at ``x_t [B, 128, h, w]``: ``model(hidden_states=tokens, timestep=t/1000, guidance=None,
        encoder_hidden_states=prompt_embeds, txt_ids, img_ids)`` as ``Flux2KleinPipeline.__call__`` calls it,
        in the model's dtype; returned as ``[B, 128, h, w]`` float32."""
        dtype = next(model.parameters()).dtype
        batch, channels, height, width = x_t.shape
        timestep = self.batch_timesteps(t, x_t)
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

    def shift_mu(self, image_seq_len: int, steps: int) -> float:
        """``Flux2KleinPipeline.__call__``'s μ: :func:`compute_empirical_mu` of the image tokens and the steps."""
        return compute_empirical_mu(int(image_seq_len), steps)

    def schedule_sigmas(self, steps: int) -> Any:
        """``linspace(1, 1/steps, steps)``, or the scheduler's own σ with ``use_flow_sigmas`` (as the pipeline)."""
        return None if self.scheduler.config.get("use_flow_sigmas", False) else super().schedule_sigmas(steps)
