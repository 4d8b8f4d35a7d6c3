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
from .generator import Conditions, Schedule, read_model_index

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


class SD3Generator:
    """SD3/SD3.5 components behind the generator protocol (see :mod:`mmalign.models.generator`)."""

    family: ClassVar[str] = "sd3"
    parametrisation: ClassVar[str] = "flow"
    lora_layers_key: ClassVar[str] = "transformer_lora_layers"
    # flow_grpo's SD3 LoRA targets (scripts/train_sd3.py): both streams of every joint attention
    lora_targets: ClassVar[tuple[str, ...]] = (
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
    )
    block_class: ClassVar[str] = "JointTransformerBlock"

    def __init__(
        self,
        components: dict[str, Any],
        folder: Path | None = None,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    ):
        """``components`` as the pipeline names them; ``text_encoder_3`` / ``tokenizer_3`` may be missing or
        ``None`` (no T5: zeros in its place)."""
        if not 0 <= int(max_sequence_length) <= 512:  # the pipeline's bound
            raise ValueError(f"max_sequence_length must be in 0..512, got {max_sequence_length}")
        self.folder = folder
        self.transformer = components["transformer"]
        self.vae = components["vae"]
        self.scheduler = components["scheduler"]
        self.tokenizers = [components["tokenizer"], components["tokenizer_2"], components.get("tokenizer_3")]
        self.text_encoders: list[torch.nn.Module | None] | None = [
            components["text_encoder"],
            components["text_encoder_2"],
            components.get("text_encoder_3"),
        ]
        if (self.text_encoders[2] is None) != (self.tokenizers[2] is None):
            raise ValueError("text_encoder_3 and tokenizer_3 must be given together (or both left out)")
        self.max_sequence_length = int(max_sequence_length)
        self._unconditional: Conditions | None = None
        for module in [self.vae, *self.text_encoders]:
            if module is not None:
                module.requires_grad_(False)
                module.eval()

    @property
    def has_t5(self) -> bool:
        """Whether the pipeline has its T5 text encoder (``text_encoder_3``)."""
        return self.tokenizers[2] is not None

    @property
    def trainable(self) -> torch.nn.Module:
        return self.transformer

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        max_sequence_length: int | None = None,
    ) -> SD3Generator:
        """Load every component of a ``StableDiffusion3Pipeline`` folder (``save_pretrained`` layout), T5 included
        when the folder has one. ``max_sequence_length``: the T5 part's length; by default the folder's
        :data:`GENERATOR_CONFIG` value, else the pipeline's 256."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        folder = Path(folder)
        index = read_model_index(folder)
        missing = [name for name in ("transformer", "vae", "text_encoder", "text_encoder_2") if not index.get(name)]
        if missing:
            raise WeightsError(f"{folder}: SD3 pipeline without {', '.join(missing)}")
        has_t5 = bool(index.get("text_encoder_3")) and index["text_encoder_3"][0] is not None
        if has_t5 != (bool(index.get("tokenizer_3")) and index["tokenizer_3"][0] is not None):
            raise WeightsError(f"{folder}: SD3 pipeline with only one of text_encoder_3 and tokenizer_3")
        if max_sequence_length is None:
            max_sequence_length = int(
                read_generator_config(folder).get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH)
            )
        typed = {} if dtype is None else {"torch_dtype": dtype}
        components = {
            "transformer": SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", **typed),
            "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", **typed),
            "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler"),
            "text_encoder": CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder", **typed),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", **typed),
            "tokenizer": AutoTokenizer.from_pretrained(str(folder), subfolder="tokenizer"),
            "tokenizer_2": AutoTokenizer.from_pretrained(str(folder), subfolder="tokenizer_2"),
        }
        if has_t5:
            components["text_encoder_3"] = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_3", **typed)
            components["tokenizer_3"] = AutoTokenizer.from_pretrained(str(folder), subfolder="tokenizer_3")
        generator = cls(components, folder, max_sequence_length)
        return generator.to(device)

    def to(self, device: str | torch.device) -> SD3Generator:
        for module in [self.transformer, self.vae, *(self.text_encoders or [])]:
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
        if self.text_encoders is None:
            raise RuntimeError("the text encoders were freed (free_text_encoders); load cached Conditions instead")
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
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

    def unconditional(self, count: int) -> Conditions:
        """The encoded empty prompt ``""`` repeated ``count`` times (SD3 has no ``force_zeros_for_empty_prompt``:
        the pipeline encodes ``""`` as its default negative prompt). Encoded once and kept, so it survives
        :meth:`free_text_encoders`."""
        if self._unconditional is None:
            self._unconditional = self.encode_conditions([""])
        return self._unconditional.repeat(count)

    def free_text_encoders(self) -> None:
        """Drop the text encoders (after caching the unconditional embedding): training then runs on
        cached :class:`Conditions`."""
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
        """Pixels per latent (8 for SD3's VAE: ``2 ** (len(block_out_channels) − 1)``, as the pipeline)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latent of an ``height×width`` image (``(16, 64, 64)`` at 512²); sizes must be
        multiples of ``vae_scale_factor · patch_size``, as ``StableDiffusion3Pipeline.check_inputs`` demands."""
        multiple = self.vae_scale_factor * int(self.transformer.config.patch_size)
        if int(height) % multiple or int(width) % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
        factor = self.vae_scale_factor
        return int(self.vae.config.latent_channels), int(height) // factor, int(width) // factor

    @torch.no_grad()
    def latent_distribution(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """The VAE posterior ``(mean, std)`` (float32) of images in [-1, 1]: cached by offline trainers, which
        then draw a fresh latent per step with :meth:`sample_latents`."""
        dist = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def sample_latents(self, mean: Tensor, std: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``(z − shift_factor)·scaling_factor`` with ``z = mean + std·n`` (diffusers' ``train_dreambooth_sd3.py``);
        the noise ``n`` is drawn on the CPU from ``generator``."""
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return (mean + std * noise - self.shift_factor) * self.scaling_factor

    def to_latents(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images in [0, 1] → latents: :meth:`sample_latents` of :meth:`latent_distribution`, float32."""
        return self.sample_latents(*self.latent_distribution(images * 2 - 1), generator).float()

    def decode(self, latents: Tensor, grad: bool = False) -> Tensor:
        """Latents → images ``[B, 3, H, W]`` in [0, 1] (the pipeline's ``z/scaling + shift`` then VAE decode)."""
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
        """``model(hidden_states=x_t, timestep=t, encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled_prompt_embeds)`` in the model's dtype, returned in float32."""
        dtype = next(model.parameters()).dtype
        timestep = torch.as_tensor(t, device=x_t.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(x_t.shape[0])
        out = model(
            hidden_states=x_t.to(dtype),
            timestep=timestep,
            encoder_hidden_states=conditions["prompt_embeds"].to(x_t.device, dtype),
            pooled_projections=conditions["pooled_prompt_embeds"].to(x_t.device, dtype),
            return_dict=False,
        )[0]
        return out.float()

    def sampling_schedule(self, steps: int, image_seq_len: int | None = None, device: Any = None) -> Schedule:
        """The pipeline's schedule: a fresh ``FlowMatchEulerDiscreteScheduler`` from this config, ``set_timesteps``
        with its shift (or, with ``use_dynamic_shifting``, μ from ``image_seq_len`` = latent tokens, as
        ``StableDiffusion3Pipeline.__call__`` computes it). ``sigmas`` ends with the terminal 0."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        kwargs: dict[str, Any] = {}
        config = scheduler.config
        if config.get("use_dynamic_shifting", False):
            if image_seq_len is None:
                raise ValueError("this scheduler uses dynamic shifting: pass image_seq_len (latent tokens)")
            slope = (config.get("max_shift", 1.16) - config.get("base_shift", 0.5)) / (
                config.get("max_image_seq_len", 4096) - config.get("base_image_seq_len", 256)
            )
            kwargs["mu"] = (
                image_seq_len * slope + config.get("base_shift", 0.5) - slope * config.get("base_image_seq_len", 256)
            )
        scheduler.set_timesteps(steps, device=device or self.device, **kwargs)
        return Schedule(scheduler.timesteps, scheduler.sigmas)

    # -- pipelines ------------------------------------------------------------------------------------------
    def pipeline(self, transformer: torch.nn.Module | None = None):
        """A diffusers ``StableDiffusion3Pipeline`` over these components (validation images, saving). Without T5,
        call it with ``max_sequence_length=self.max_sequence_length`` (the pipeline's default is 256), and save
        it with :func:`write_generator_config` beside."""
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        if self.text_encoders is None:
            raise RuntimeError("the text encoders were freed (free_text_encoders)")
        return StableDiffusion3Pipeline(
            transformer=transformer if transformer is not None else self.transformer,
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config),
            vae=self.vae,
            text_encoder=self.text_encoders[0],
            tokenizer=self.tokenizers[0],
            text_encoder_2=self.text_encoders[1],
            tokenizer_2=self.tokenizers[1],
            text_encoder_3=self.text_encoders[2],
            tokenizer_3=self.tokenizers[2],
        )
