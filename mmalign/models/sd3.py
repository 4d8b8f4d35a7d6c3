"""Stable Diffusion 3 / 3.5 as a :class:`mmalign.models.generator.Generator` (flow matching).

Components, as diffusers' ``StableDiffusion3Pipeline`` holds them: ``SD3Transformer2DModel`` (trainable), two CLIP
text towers with projection (CLIP-L ``text_encoder``, CLIP-G ``text_encoder_2``), T5 (``text_encoder_3``,
``T5EncoderModel``), ``AutoencoderKL`` with 16 latent channels (``scaling_factor`` and ``shift_factor`` from its
config) and ``FlowMatchEulerDiscreteScheduler`` (its ``shift``, or dynamic shifting when configured).

Prompt encoding re-implements ``StableDiffusion3Pipeline.encode_prompt`` (diffusers 0.42.1): each CLIP's
penultimate hidden state (prompt padded to the CLIP tokenizer's ``model_max_length``, 77) and projected pooled
output; the two sequences concatenated on the feature axis and zero-padded to T5's width; T5's last hidden state
(padded to ``max_sequence_length``, default 256) appended on the sequence axis; pooled = [CLIP-L, CLIP-G].

Without T5 (``text_encoder_3`` and ``tokenizer_3`` null in ``model_index.json``, as the pipeline allows), the T5
part is what the pipeline puts in its place: zeros ``[B, max_sequence_length, joint_attention_dim]``. Those zero
tokens still enter the joint attention (as ``context_embedder``'s bias), so a model trained with one
``max_sequence_length`` must be sampled with the same one; the pipeline's own default (256) is a different model
input. A folder records its length in :data:`GENERATOR_CONFIG` (``{"max_sequence_length": 16}``) beside
``model_index.json``, which :meth:`SD3Generator.from_pretrained` reads (an explicit argument wins; neither: 256).
diffusers ignores the file: plain diffusers loads such a folder with ``StableDiffusion3Pipeline.from_pretrained(folder,
text_encoder_3=None, tokenizer_3=None)`` and must be called with that ``max_sequence_length``.
Flow matching as in the scheduler: ``x_t = (1 − σ)·x0 + σ·ε``, target velocity ``v = ε − x0``, model timestep
``t = σ·num_train_timesteps`` (1000).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import WeightsError
from .flow_generator import JOINT_ATTENTION_TARGETS, FlowMatchingGenerator, calculate_shift
from .generator import Conditions

__all__ = ["GENERATOR_CONFIG", "SD3Generator", "read_generator_config", "write_generator_config"]

#: settings of a pipeline folder that diffusers does not store and the generator needs (``max_sequence_length``)
GENERATOR_CONFIG = "mmalign_generator.json"
DEFAULT_MAX_SEQUENCE_LENGTH = 256


def read_generator_config(folder: str | Path) -> dict[str, Any]:
    """``folder``'s :data:`GENERATOR_CONFIG` (``{}`` when it has none)."""
    import json

    path = Path(folder) / GENERATOR_CONFIG
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise WeightsError(f"{path}: not valid JSON ({error})") from error


def write_generator_config(folder: str | Path, **settings: Any) -> Path:
    """Write ``settings`` (e.g. ``max_sequence_length=16``) as ``folder``'s :data:`GENERATOR_CONFIG`."""
    import json

    path = Path(folder) / GENERATOR_CONFIG
    path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return path


class SD3Generator(FlowMatchingGenerator):
    """SD3/SD3.5 components behind the generator protocol (see :mod:`mmalign.models.generator` and
    :class:`~mmalign.models.flow_generator.FlowMatchingGenerator`). The unconditional branch is the encoded
    ``""`` (SD3 has no ``force_zeros_for_empty_prompt``: the pipeline encodes ``""`` as its default negative
    prompt). Latents: ``(z − shift_factor)·scaling_factor`` of a VAE posterior sample (diffusers'
    ``train_dreambooth_sd3.py``); pixel sizes must be multiples of ``vae_scale_factor · patch_size``, as
    ``StableDiffusion3Pipeline.check_inputs`` demands."""

    family: ClassVar[str] = "sd3"
    # flow_grpo's SD3 LoRA targets (scripts/train_sd3.py): both streams of every joint attention
    lora_targets: ClassVar[tuple[str, ...]] = JOINT_ATTENTION_TARGETS
    block_class: ClassVar[str] = "JointTransformerBlock"
    pipeline_name: ClassVar[str] = "StableDiffusion3Pipeline"
    display_name: ClassVar[str] = "SD3"
    transformer_class: ClassVar[str] = "SD3Transformer2DModel"
    text_encoder_classes: ClassVar[dict[str, str]] = {
        "text_encoder": "CLIPTextModelWithProjection",
        "text_encoder_2": "CLIPTextModelWithProjection",
        "text_encoder_3": "T5EncoderModel",
    }
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2", "tokenizer_3")
    exact_sizes: ClassVar[bool] = True

    optional_components: ClassVar[tuple[str, ...]] = ("text_encoder_3", "tokenizer_3")  # SD3 without T5

    def __init__(
        self,
        components: dict[str, Any],
        folder: Path | None = None,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    ):
        """``components`` as the pipeline names them; ``text_encoder_3`` / ``tokenizer_3`` may be missing or
        ``None`` (no T5: zeros in its place, as the pipeline does)."""
        if not 0 <= int(max_sequence_length) <= 512:  # the pipeline's bound
            raise ValueError(f"max_sequence_length must be in 0..512, got {max_sequence_length}")
        if (components.get("text_encoder_3") is None) != (components.get("tokenizer_3") is None):
            raise ValueError("text_encoder_3 and tokenizer_3 must be given together (or both left out)")
        super().__init__(components, folder)
        self.max_sequence_length = int(max_sequence_length)

    @property
    def has_t5(self) -> bool:
        """Whether the pipeline has its T5 text encoder (``text_encoder_3``)."""
        return self.tokenizers[2] is not None

    @classmethod
    def check_index(cls, folder: Path, index: dict[str, Any]) -> None:
        present = [bool(index.get(name)) and index[name][0] is not None for name in cls.optional_components]
        if present[0] != present[1]:
            raise WeightsError(f"{folder}: SD3 pipeline with only one of text_encoder_3 and tokenizer_3")
        super().check_index(folder, index)

    def save_pipeline(self, folder: str | Path, transformer: torch.nn.Module | None = None) -> Path:
        """The pipeline folder, and :data:`GENERATOR_CONFIG` when ``max_sequence_length`` is not diffusers' 256."""
        folder = super().save_pipeline(folder, transformer)
        if self.max_sequence_length != DEFAULT_MAX_SEQUENCE_LENGTH:
            write_generator_config(folder, max_sequence_length=self.max_sequence_length)
        return folder

    @classmethod
    def index_options(cls, folder: Path, index: dict[str, Any]) -> dict[str, Any]:
        """``max_sequence_length`` from the folder's :data:`GENERATOR_CONFIG` (else the pipeline's 256)."""
        config = read_generator_config(folder)
        return {"max_sequence_length": int(config.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH))}

    # -- conditioning ----------------------------------------------------------------------------------
    def _clip(self, index: int, prompts: list[str]) -> tuple[Tensor, Tensor]:
        tokenizer, encoder = self.tokenizers[index], self.text_encoders[index]
        # the pipeline pads both CLIPs to the first tokenizer's model_max_length
        ids = tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizers[0].model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        return out.hidden_states[-2].to(self.text_encoders[0].dtype), out[0]

    def _t5(self, prompts: list[str]) -> Tensor:
        tokenizer, encoder = self.tokenizers[2], self.text_encoders[2]
        if encoder is None:  # the pipeline's stand-in for a missing T5, in the first CLIP's dtype and device
            first = self.text_encoders[0]
            width = int(self.transformer.config.joint_attention_dim)
            return torch.zeros(len(prompts), self.max_sequence_length, width, device=first.device, dtype=first.dtype)
        ids = tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        return encoder(ids.to(encoder.device))[0].to(encoder.dtype)

    @torch.no_grad()
    def encode_conditions(self, prompts: Sequence[str]) -> Conditions:
        """``prompt_embeds [B, 77 + max_sequence_length, T5 width]`` and ``pooled_prompt_embeds [B, L + G]``,
        equal to ``StableDiffusion3Pipeline.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
        max_sequence_length=self.max_sequence_length)`` (77: the first CLIP tokenizer's ``model_max_length``;
        without T5 its width is the transformer's ``joint_attention_dim`` and its part zeros)."""
        prompts = self._prompt_list(prompts)
        hidden_l, pooled_l = self._clip(0, prompts)
        hidden_g, pooled_g = self._clip(1, prompts)
        clip = torch.cat([hidden_l, hidden_g], dim=-1)
        t5 = self._t5(prompts)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditions(
            {
                "prompt_embeds": torch.cat([clip, t5], dim=-2),
                "pooled_prompt_embeds": torch.cat([pooled_l, pooled_g], dim=-1),
            },
            {"family": self.family},
        )

    # -- flow matching -----------------------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return int(self.transformer.config.patch_size)

    def predict(self, model: torch.nn.Module, x_t: Tensor, t: Tensor | float, conditions: Conditions) -> Tensor:
        """``model(hidden_states=x_t, timestep=t, encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled_prompt_embeds)`` in the model's dtype, returned in float32."""
        dtype = next(model.parameters()).dtype
        out = model(
            hidden_states=x_t.to(dtype),
            timestep=self.batch_timesteps(t, x_t),
            encoder_hidden_states=conditions["prompt_embeds"].to(x_t.device, dtype),
            pooled_projections=conditions["pooled_prompt_embeds"].to(x_t.device, dtype),
            return_dict=False,
        )[0]
        return out.float()

    def shift_mu(self, image_seq_len: int, steps: int) -> float:
        """``StableDiffusion3Pipeline.__call__``'s μ (its default ``max_shift`` is 1.16)."""
        return calculate_shift(image_seq_len, self.scheduler.config, max_shift=1.16)

    def schedule_sigmas(self, steps: int) -> None:
        """The scheduler's own σ (the pipeline passes none)."""
        return None
