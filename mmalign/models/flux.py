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

from .flow_generator import JOINT_ATTENTION_TARGETS, FlowMatchingGenerator, pack_latents, unpack_latents
from .generator import Conditions

__all__ = ["FluxGenerator", "latent_image_ids", "pack_latents", "unpack_latents"]


def latent_image_ids(height: int, width: int, device: Any = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Position ids ``[(h/2)·(w/2), 3]`` of the packed tokens of an ``h×w`` latent: ``(0, row, column)``
    (``FluxPipeline._prepare_latent_image_ids``)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxGenerator(FlowMatchingGenerator):
    """FLUX.1 components behind the generator protocol (see :mod:`mmalign.models.generator`,
    :class:`~mmalign.models.flow_generator.FlowMatchingGenerator` and this module). The unconditional branch is
    the encoded ``""``: the negative branch of FluxPipeline's "true CFG" (``true_cfg_scale`` > 1 with
    ``negative_prompt=""``); FLUX.1-dev itself is guidance-distilled and samples without it
    (:attr:`embedded_guidance`, CFG guidance 1). Latents: ``(z − shift_factor)·scaling_factor`` of a VAE
    posterior sample (diffusers' ``train_dreambooth_lora_flux.py``), unpacked ``[B, 16, h, w]``."""

    family: ClassVar[str] = "flux"
    # flow_grpo's FLUX LoRA targets (yifan123/flow_grpo scripts/train_flux.py, commit 74db691): both streams of the
    # joint attention and both feed-forwards of every double-stream block (the single-stream blocks' attention
    # projections match "attn.to_q/k/v" as well)
    lora_targets: ClassVar[tuple[str, ...]] = (
        *JOINT_ATTENTION_TARGETS,
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    )
    block_class: ClassVar[str] = "FluxTransformerBlock"
    pipeline_name: ClassVar[str] = "FluxPipeline"
    display_name: ClassVar[str] = "FLUX"
    transformer_class: ClassVar[str] = "FluxTransformer2DModel"
    text_encoder_classes: ClassVar[dict[str, str]] = {
        "text_encoder": "CLIPTextModel",
        "text_encoder_2": "T5EncoderModel",
    }
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")

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
        super().__init__(components, folder)
        self.max_sequence_length = max_sequence_length
        self.embedded_guidance = float(embedded_guidance)
        """The guidance scale the guidance-distilled transformer embeds (FluxPipeline's ``guidance_scale``)."""

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
        prompts = self._prompt_list(prompts)
        return Conditions(
            {"prompt_embeds": self._t5(prompts), "pooled_prompt_embeds": self._clip(prompts)},
            {"family": self.family},
        )

    # -- flow matching -----------------------------------------------------------------------------------
    def predict(self, model: torch.nn.Module, x_t: Tensor, t: Tensor | float, conditions: Conditions) -> Tensor:
        """The velocity at unpacked ``x_t [B, C, h, w]``: ``model(hidden_states=pack(x_t), timestep=t/1000,
        guidance=embedded_guidance (when the config embeds it), pooled_projections, encoder_hidden_states,
        txt_ids=zeros, img_ids=latent ids)`` as ``FluxPipeline.__call__`` calls it, in the model's dtype;
        returned unpacked, in float32."""
        dtype = next(model.parameters()).dtype
        batch, _, height, width = x_t.shape
        timestep = self.batch_timesteps(t, x_t)
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

    def schedule_sigmas(self, steps: int) -> Any:
        """``linspace(1, 1/steps, steps)``, or the scheduler's own σ with ``use_flow_sigmas`` (as the pipeline)."""
        return None if self.scheduler.config.get("use_flow_sigmas", False) else super().schedule_sigmas(steps)
