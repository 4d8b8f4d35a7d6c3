"""Z-Image as a :class:`mmalign.models.generator.Generator` (flow matching).

Components, as diffusers' ``ZImagePipeline`` holds them: ``ZImageTransformer2DModel`` (trainable, a single-stream
DiT that takes lists of per-sample latents and caption features), a Qwen3 text model (``Qwen3Model``) with a
``Qwen2Tokenizer`` carrying Qwen3's chat template, ``AutoencoderKL`` with 16 latent channels (``scaling_factor``
and ``shift_factor`` from its config) and ``FlowMatchEulerDiscreteScheduler``.

Re-implemented from ``diffusers/pipelines/z_image/pipeline_z_image.py`` (diffusers 0.42.1; no code copied):

* Prompts: each prompt becomes a one-message user chat rendered by the tokenizer's chat template with the
  generation prompt (``enable_thinking=True``, as the pipeline passes), tokenised padded to
  ``max_sequence_length`` (512), encoded, and the second-to-last hidden state kept at the attended positions.
  The pipeline hands the transformer a list of ``[n_i, D]`` tensors;
  :class:`~mmalign.models.generator.Conditions` hold them padded: ``prompt_embeds [B, max_sequence_length, D]``
  (zeros after each prompt) and ``prompt_embeds_mask [B, max_sequence_length]`` (int64, 1 on real tokens), and
  :meth:`ZImageGenerator.predict` turns them back into the list.
* Latents: ``[B, 16, H/f, W/f]`` (``f`` the VAE's downsampling, 8 for the published VAE; ``H/f``, ``W/f`` even),
  ``(z − shift_factor)·scaling_factor`` as ``train_dreambooth_lora_z_image.py``. :meth:`ZImageGenerator.predict`
  adds the transformer's frame axis and splits the batch into its list.
* Parametrisation: the transformer is conditioned on ``1 − σ`` (the pipeline's ``(1000 − t) / 1000``) and
  predicts the *negative* flow velocity; :meth:`ZImageGenerator.predict` returns ``−output``, the velocity
  ``ε − x0`` of the other families (the training script's target).
* Guidance: the pipeline's ``guidance_scale`` ``g`` (CFG when ``g > 0``, with ``""`` as default negative prompt)
  computes ``v_c + g·(v_c − v_u)``, i.e. ordinary classifier-free guidance at scale ``w = 1 + g``; the protocol's
  ``guidance`` (:func:`mmalign.models.flow_rollout.guided_velocity`, :meth:`ZImageGenerator.guided_velocity`) is
  ``w``. :meth:`ZImageGenerator.guided_velocity` also has the pipeline's optional ``cfg_normalization`` (cap the
  guided norm at that multiple of the conditional one) and ``cfg_truncation`` (no guidance once
  ``1 − σ > cfg_truncation``).
* Schedule: σ = linspace(1, 1/steps, steps) in float32 (``get_default_z_image_sigmas``), shifted by the scheduler
  (a static shift for Z-Image-Turbo; μ from the packed sequence length under dynamic shifting).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import WeightsError
from .flow_generator import FlowMatchingGenerator, cfg_branches, check_guidance
from .generator import Conditions

__all__ = ["ZImageGenerator"]


class ZImageGenerator(FlowMatchingGenerator):
    """Z-Image components behind the generator protocol (see :mod:`mmalign.models.generator`,
    :class:`~mmalign.models.flow_generator.FlowMatchingGenerator` and this module). The unconditional branch is
    the encoded ``""`` (the pipeline's default negative prompt). Latents: ``(z − shift_factor)·scaling_factor``
    of a VAE posterior sample (``train_dreambooth_lora_z_image.py`` takes the posterior mode); pixel sizes must
    be multiples of ``2·vae_scale_factor``, as ``ZImagePipeline.__call__`` demands."""

    family: ClassVar[str] = "z_image"
    # diffusers' examples/dreambooth/train_dreambooth_lora_z_image.py default (to_k, to_q, to_v, to_out.0: every
    # attention of the main layers and of the noise and context refiners)
    lora_targets: ClassVar[tuple[str, ...]] = (
        "attention.to_k",
        "attention.to_q",
        "attention.to_v",
        "attention.to_out.0",
    )
    block_class: ClassVar[str] = "ZImageTransformerBlock"
    pipeline_name: ClassVar[str] = "ZImagePipeline"
    display_name: ClassVar[str] = "Z-Image"
    transformer_class: ClassVar[str] = "ZImageTransformer2DModel"
    text_encoder_classes: ClassVar[dict[str, str]] = {"text_encoder": "Qwen3Model"}
    """The published class; :meth:`text_encoder_class` loads the one ``model_index.json`` names."""
    exact_sizes: ClassVar[bool] = True

    def __init__(self, components: dict[str, Any], folder: Path | None = None, max_sequence_length: int = 512):
        if max_sequence_length <= 0:
            raise ValueError(f"max_sequence_length must be positive, got {max_sequence_length}")
        super().__init__(components, folder)
        self.max_sequence_length = max_sequence_length

    @classmethod
    def check_index(cls, folder: Path, index: dict[str, Any]) -> None:
        import transformers

        super().check_index(folder, index)
        library, encoder_class = index["text_encoder"]
        if library != "transformers" or not hasattr(transformers, encoder_class):
            raise WeightsError(f"{folder}: unsupported Z-Image text encoder {library}.{encoder_class}")

    @classmethod
    def text_encoder_class(cls, name: str, index: dict[str, Any]) -> type:
        import transformers

        return getattr(transformers, index[name][1])

    # -- conditioning ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_conditions(self, prompts: Sequence[str]) -> Conditions:
        """``prompt_embeds [B, max_sequence_length, D]`` (zero padded) and ``prompt_embeds_mask [B,
        max_sequence_length]``: row ``i``'s masked embeddings ``prompt_embeds[i][mask[i] == 1]`` equal the ``i``-th
        tensor of ``ZImagePipeline.encode_prompt(prompts, do_classifier_free_guidance=False)``."""
        prompts = self._prompt_list(prompts)
        encoder = self.text_encoder
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
            )
            for prompt in prompts
        ]
        tokens = self.tokenizer(
            texts, padding="max_length", max_length=self.max_sequence_length, truncation=True, return_tensors="pt"
        )
        input_ids = tokens.input_ids.to(encoder.device)
        attended = tokens.attention_mask.to(encoder.device).bool()
        hidden = encoder(input_ids=input_ids, attention_mask=attended, output_hidden_states=True).hidden_states[-2]
        embeds = torch.where(attended.unsqueeze(-1), hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
        return Conditions(
            {"prompt_embeds": embeds, "prompt_embeds_mask": attended.long()},
            {"family": self.family},
        )

    @staticmethod
    def caption_list(conditions: Conditions, device: Any = None, dtype: torch.dtype | None = None) -> list[Tensor]:
        """The transformer's caption input: one ``[n_i, D]`` tensor per row (the embeddings under the mask)."""
        mask = conditions["prompt_embeds_mask"].bool()
        embeds = conditions["prompt_embeds"]
        return [row[keep].to(device=device, dtype=dtype) for row, keep in zip(embeds, mask, strict=True)]

    # -- flow matching -----------------------------------------------------------------------------------
    def predict(self, model: torch.nn.Module, x_t: Tensor, t: Tensor | float, conditions: Conditions) -> Tensor:
        """The velocity at latents ``x_t [B, 16, h, w]`` and model timesteps ``t``: ``−model(list of [16, 1, h, w]
        latents in the model's dtype, (1000 − t) / 1000 in float32, list of caption features)``, float32 (the
        flow velocity ``ε − x0`` of :meth:`training_target`, after undoing Z-Image's sign)."""
        dtype = next(model.parameters()).dtype
        timestep = self.batch_timesteps(t, x_t, dtype=torch.float32)
        out = model(
            list(x_t.to(dtype).unsqueeze(2).unbind(dim=0)),
            (1000 - timestep) / 1000,
            self.caption_list(conditions, x_t.device, dtype),
            return_dict=False,
        )[0]
        return -torch.stack([sample.float() for sample in out]).squeeze(2)

    def guided_velocity(
        self,
        model: torch.nn.Module,
        x: Tensor,
        t: Tensor | float,
        conditions: Conditions,
        uncond: Conditions | None,
        guidance: float,
        cfg_normalization: float = 0.0,
        cfg_truncation: float = 1.0,
    ) -> Tensor:
        """The pipeline's classifier-free guidance at ordinary scale ``guidance`` = ``w`` (the pipeline's
        ``guidance_scale`` is ``w − 1``), from one batched :meth:`predict` on ``cat([conditions, uncond])`` (the
        pipeline's order) combined as the pipeline does, ``v_c + (w − 1)·(v_c − v_u)``. ``cfg_normalization``
        > 0 scales a sample's guided velocity down to at most that multiple of its conditional one's norm;
        ``cfg_truncation`` < 1 drops guidance where ``1 − σ > cfg_truncation`` (the pipeline then runs the
        conditional branch alone). ``t``: a scalar or per sample ``[B]``. What rollouts
        (:func:`mmalign.models.flow_rollout.guided_velocity`) use on this family."""
        if guidance == 1.0:
            return self.predict(model, x, t, conditions)
        check_guidance(conditions, uncond, guidance)
        timestep = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        v_uncond, v_cond = self.guidance_branches(model, x, timestep, conditions, uncond)
        return self.combine_guidance(v_uncond, v_cond, guidance, timestep, cfg_normalization, cfg_truncation)

    def guidance_branches(
        self, model: torch.nn.Module, x: Tensor, t: Tensor | float, conditions: Conditions, uncond: Conditions
    ) -> tuple[Tensor, Tensor]:
        """``(v_uncond, v_cond)`` from one batched :meth:`predict` on ``cat([conditions, uncond])`` (the
        pipeline's order)."""
        timestep = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        return cfg_branches(self, model, x, timestep, conditions, uncond, cond_first=True)

    def combine_guidance(
        self,
        v_uncond: Tensor,
        v_cond: Tensor,
        guidance: float,
        t: Tensor | float,
        cfg_normalization: float = 0.0,
        cfg_truncation: float = 1.0,
    ) -> Tensor:
        """The pipeline's combination of the two branches (see :meth:`guided_velocity`)."""
        timestep = torch.as_tensor(t, device=v_cond.device, dtype=torch.float32)
        # predict returns −output; the pipeline combines the outputs: negating is exact, so combine them alike
        pos, neg = -v_cond, -v_uncond
        pred = pos + (guidance - 1.0) * (pos - neg)
        if cfg_normalization > 0.0:
            pos_norm = torch.linalg.vector_norm(pos.flatten(1), dim=1)
            pred_norm = torch.linalg.vector_norm(pred.flatten(1), dim=1)
            limit = pos_norm * float(cfg_normalization)
            scale = torch.where(pred_norm > limit, limit / pred_norm, torch.ones_like(pred_norm))
            pred = pred * scale.view(-1, *([1] * (pred.ndim - 1)))
        if cfg_truncation < 1.0:
            truncated = ((1000 - timestep) / 1000 > cfg_truncation).expand(v_cond.shape[0])
            pred = torch.where(truncated.view(-1, *([1] * (pred.ndim - 1))), pos, pred)
        return -pred

    def schedule_sigmas(self, steps: int) -> list[float]:
        """σ = ``torch.linspace(1, 1/steps, steps)`` in float32 (``get_default_z_image_sigmas``); μ (under dynamic
        shifting only: Z-Image-Turbo's shift is static) from the packed sequence length."""
        return torch.linspace(1.0, 1 / steps, steps).tolist()
