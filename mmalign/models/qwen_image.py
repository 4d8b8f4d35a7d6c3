"""Qwen-Image as a :class:`mmalign.models.generator.Generator` (flow matching).

Components, as diffusers' ``QwenImagePipeline`` holds them: ``QwenImageTransformer2DModel`` (trainable, a
double-stream MMDiT on 2x2-packed latents), ``Qwen2_5_VLForConditionalGeneration`` (``text_encoder``, its text
tower only) with a ``Qwen2Tokenizer``, the 3D causal ``AutoencoderKLQwenImage`` (16 latent channels, per-channel
``latents_mean`` / ``latents_std``) and ``FlowMatchEulerDiscreteScheduler`` with dynamic shifting.

Re-implemented from ``diffusers/pipelines/qwenimage/pipeline_qwenimage.py`` (diffusers 0.42.1; no code copied):

* Prompts: each prompt is put into the pipeline's chat template (a system turn asking to describe the image, then
  the prompt as the user turn, then the assistant header), tokenised padded to the batch's longest, encoded, and
  the last hidden state kept at the attended positions minus the first ``prompt_template_encode_start_idx`` (34)
  tokens (the system turn and the user header), truncated to ``max_sequence_length``.
  :class:`~mmalign.models.generator.Conditions`: ``prompt_embeds [B, max_sequence_length, D]`` right-padded with
  zeros and ``prompt_embeds_mask [B, max_sequence_length]`` (int64, 1 on real tokens). The fixed length (the
  pipeline pads only to the batch's longest) lets any two Conditions of the family concatenate (a cache written
  prompt by prompt, the unconditional branch next to the conditional one); :meth:`QwenImageGenerator.predict`
  cuts the batch's common padding off again and passes no mask when none is left, which is exactly what the
  pipeline hands the transformer for the same batch.
* Latents: the protocol's latents are ``[B, 16, H/8, W/8]``: the VAE's single-frame latent with its frame axis
  dropped, normalised per channel as ``train_dreambooth_lora_qwen_image.py`` does, ``(z − mean)·(1/std)``.
  ``H`` and ``W`` must be multiples of 16 (the transformer takes 2x2 patches). Packing into the transformer's
  ``[B, (h/2)·(w/2), 64]`` tokens (the pipeline's ``_pack_latents``, with the frame axis of size 1) and back
  happens inside :meth:`QwenImageGenerator.predict`, so samplers stay family free.
* Time: the transformer is conditioned on σ = t / 1000 (the pipeline divides its scheduler timesteps by 1000).
* Guidance: the pipeline's "true CFG" (``true_cfg_scale > 1`` with a ``negative_prompt``; no negative prompt, no
  guidance) combines ``v_u + s·(v_c − v_u)`` and then rescales every packed token of the result to the norm of
  the conditional prediction's token. :meth:`QwenImageGenerator.guided_velocity` does both (one batched predict),
  and rollouts (:func:`mmalign.models.flow_rollout.guided_velocity`) use it; ``rescale=False`` gives the plain
  combination.
  :meth:`QwenImageGenerator.unconditional` is the encoded ``" "``, the negative prompt the pipeline's
  documentation and flow_grpo's Qwen-Image scripts pass.
* Schedule: σ = linspace(1, 1/steps, steps), shifted by the scheduler with μ from the packed sequence length
  (``calculate_shift`` with the scheduler config's base/max lengths and shifts).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import WeightsError
from .flow_generator import FlowMatchingGenerator, PerChannelLatentStats, check_guidance, pack_latents, unpack_latents
from .generator import Conditions

__all__ = ["QwenImageGenerator", "pack_latents", "unpack_latents"]

# QwenImagePipeline.__init__ (diffusers 0.42.1): the prompt template, the number of leading tokens dropped from
# its encoding, and the tokenizer's length limit on the prompt part
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
PROMPT_TEMPLATE_START_IDX = 34
TOKENIZER_MAX_LENGTH = 1024


class QwenImageGenerator(PerChannelLatentStats, FlowMatchingGenerator):
    """Qwen-Image components behind the generator protocol (see :mod:`mmalign.models.generator`,
    :class:`~mmalign.models.flow_generator.FlowMatchingGenerator` and this module). The unconditional branch is
    the encoded ``" "`` (the pipeline has no default negative prompt: without one it does not guide; ``" "`` is
    what its documentation and flow_grpo pass)."""

    family: ClassVar[str] = "qwen_image"
    # diffusers' examples/dreambooth/train_dreambooth_lora_qwen_image.py default (the image stream's attention
    # projections; flow_grpo's Qwen-Image scripts are not in the project's mirror of it). The text stream's
    # add_{q,k,v}_proj / to_add_out and the img_mlp / txt_mlp layers are further choices a recipe can add.
    lora_targets: ClassVar[tuple[str, ...]] = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0")
    block_class: ClassVar[str] = "QwenImageTransformerBlock"
    pipeline_name: ClassVar[str] = "QwenImagePipeline"
    display_name: ClassVar[str] = "Qwen-Image"
    transformer_class: ClassVar[str] = "QwenImageTransformer2DModel"
    vae_class: ClassVar[str] = "AutoencoderKLQwenImage"
    text_encoder_classes: ClassVar[dict[str, str]] = {"text_encoder": "Qwen2_5_VLForConditionalGeneration"}
    negative_prompt: ClassVar[str] = " "

    def __init__(self, components: dict[str, Any], folder: Path | None = None, max_sequence_length: int = 512):
        if not 0 < max_sequence_length <= TOKENIZER_MAX_LENGTH:
            raise ValueError(f"max_sequence_length must be in 1..{TOKENIZER_MAX_LENGTH}, got {max_sequence_length}")
        if components["transformer"].config.get("guidance_embeds", False):
            raise WeightsError(f"{folder}: guidance-distilled Qwen-Image transformers are not supported")
        super().__init__(components, folder)
        self.max_sequence_length = max_sequence_length

    # -- conditioning ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_conditions(self, prompts: Sequence[str]) -> Conditions:
        """``prompt_embeds [B, max_sequence_length, D]`` (zero padded) and ``prompt_embeds_mask [B,
        max_sequence_length]``: row ``i``'s first ``n_i`` embeddings (and the mask's ones) equal
        ``QwenImagePipeline.encode_prompt(prompts, max_sequence_length=...)``'s row ``i``, ``n_i`` being its
        prompt's length after the template prefix is dropped."""
        prompts = self._prompt_list(prompts)
        encoder = self.text_encoder
        tokens = self.tokenizer(
            [PROMPT_TEMPLATE.format(prompt) for prompt in prompts],
            max_length=TOKENIZER_MAX_LENGTH + PROMPT_TEMPLATE_START_IDX,
            padding=True,
            truncation=True,
            return_tensors="pt",
        ).to(encoder.device)
        hidden = encoder(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True
        ).hidden_states[-1]
        embeds = hidden.new_zeros(len(prompts), self.max_sequence_length, hidden.shape[-1])
        mask = torch.zeros(len(prompts), self.max_sequence_length, dtype=torch.long, device=hidden.device)
        for row, (states, attended) in enumerate(zip(hidden, tokens.attention_mask.bool(), strict=True)):
            kept = states[attended][PROMPT_TEMPLATE_START_IDX:][: self.max_sequence_length]
            embeds[row, : kept.shape[0]] = kept
            mask[row, : kept.shape[0]] = 1
        return Conditions(
            {"prompt_embeds": embeds.to(encoder.dtype), "prompt_embeds_mask": mask}, {"family": self.family}
        )

    # -- latents -------------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent (8: ``2 ** len(vae.temperal_downsample)``, as the pipeline)."""
        return 2 ** len(self.vae.temperal_downsample)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    @torch.no_grad()
    def latent_distribution(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """The VAE posterior ``(mean, std)`` (float32) of images ``[B, 3, H, W]`` in [-1, 1] (``H``, ``W``
        multiples of 16) encoded as single-frame videos, frame axis dropped: ``[B, 16, H/8, W/8]`` each."""
        mean, std = super().latent_distribution(pixels.unsqueeze(2))
        return mean[:, :, 0], std[:, :, 0]

    def _vae_decode(self, z: Tensor) -> Tensor:
        """Decode ``[B, 16, h, w]`` as one-frame videos, first frame: ``[B, 3, 8h, 8w]``."""
        return self.vae.decode(z.unsqueeze(2)).sample[:, :, 0]

    # -- flow matching -----------------------------------------------------------------------------------
    @staticmethod
    def _text(conditions: Conditions, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """The batch's embeddings and mask without the padding every row has; ``None`` for a mask of ones (the
        pipeline's ``encode_prompt`` drops such a mask too)."""
        mask = conditions["prompt_embeds_mask"].to(device)
        length = max(int(mask.sum(dim=1).max()), 1)
        embeds = conditions["prompt_embeds"][:, :length].to(device, dtype)
        mask = mask[:, :length]
        return embeds, None if bool(mask.all()) else mask

    def predict(self, model: torch.nn.Module, x_t: Tensor, t: Tensor | float, conditions: Conditions) -> Tensor:
        """The transformer's velocity at latents ``x_t [B, 16, h, w]`` and model timesteps ``t``: packs ``x_t``,
        calls ``model(hidden_states=..., timestep=t / 1000, encoder_hidden_states=..., encoder_hidden_states_mask=...,
        img_shapes=[[(1, h/2, w/2)]] * B)`` in the model's dtype (``t`` cast to it before the division, as the
        pipeline does) and unpacks; float32."""
        dtype = next(model.parameters()).dtype
        batch, _, height, width = x_t.shape
        timestep = self.batch_timesteps(t, x_t)
        embeds, mask = self._text(conditions, x_t.device, dtype)
        out = model(
            hidden_states=pack_latents(x_t.to(dtype)),
            timestep=timestep.to(dtype) / 1000,
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, height // 2, width // 2)]] * batch,
            return_dict=False,
        )[0]
        return unpack_latents(out, height, width).float()

    def guided_velocity(
        self,
        model: torch.nn.Module,
        x: Tensor,
        t: Tensor | float,
        conditions: Conditions,
        uncond: Conditions | None,
        guidance: float,
        rescale: bool = True,
    ) -> Tensor:
        """The pipeline's true CFG at scale ``guidance`` from one batched :meth:`predict` on
        ``cat([uncond, conditions])``: ``v = v_u + g·(v_c − v_u)``, then (``rescale``) every packed token of ``v``
        (its 64 features) scaled to the norm of ``v_c``'s token; ``guidance == 1`` is the conditional prediction
        alone (the pipeline does not guide at ``true_cfg_scale <= 1``). The batched call pads the
        unconditional rows to the conditional length under their mask, where the pipeline runs them alone: equal
        up to float rounding. ``t``: a scalar or per sample ``[B]``. What rollouts
        (:func:`mmalign.models.flow_rollout.guided_velocity`) use on this family."""
        if guidance == 1.0:
            return self.predict(model, x, t, conditions)
        check_guidance(conditions, uncond, guidance)
        return self.combine_guidance(*self.guidance_branches(model, x, t, conditions, uncond), guidance, t, rescale)

    def combine_guidance(
        self, v_uncond: Tensor, v_cond: Tensor, guidance: float, t: Tensor | float, rescale: bool = True
    ) -> Tensor:
        """``v_u + g·(v_c − v_u)``, then (``rescale``) every packed token scaled to the norm of ``v_c``'s."""
        combined = v_uncond + guidance * (v_cond - v_uncond)
        if not rescale:
            return combined
        height, width = v_cond.shape[-2:]
        cond_tokens, combined_tokens = pack_latents(v_cond), pack_latents(combined)
        scale = torch.norm(cond_tokens, dim=-1, keepdim=True) / torch.norm(combined_tokens, dim=-1, keepdim=True)
        return unpack_latents(combined_tokens * scale, height, width)
