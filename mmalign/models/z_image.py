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
from .generator import Conditions, Schedule, read_model_index
from .qwen_image import calculate_shift

__all__ = ["ZImageGenerator"]


class ZImageGenerator:
    """Z-Image components behind the generator protocol (see :mod:`mmalign.models.generator`)."""

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

    def __init__(self, components: dict[str, Any], folder: Path | None = None, max_sequence_length: int = 512):
        if max_sequence_length <= 0:
            raise ValueError(f"max_sequence_length must be positive, got {max_sequence_length}")
        self.folder = folder
        self.transformer = components["transformer"]
        self.vae = components["vae"]
        self.scheduler = components["scheduler"]
        self.tokenizer = components["tokenizer"]
        self.text_encoder: torch.nn.Module | None = components["text_encoder"]
        self.max_sequence_length = max_sequence_length
        self._unconditional: Conditions | None = None
        for module in (self.vae, self.text_encoder):
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
    ) -> ZImageGenerator:
        """Load every component of a ``ZImagePipeline`` folder (``save_pretrained`` layout); the text encoder's
        class is the one ``model_index.json`` names (``Qwen3Model``)."""
        import transformers
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
        from transformers import AutoTokenizer

        folder = Path(folder)
        index = read_model_index(folder)
        missing = [name for name in ("transformer", "vae", "text_encoder", "tokenizer") if not index.get(name)]
        if missing:
            raise WeightsError(f"{folder}: Z-Image pipeline without {', '.join(missing)}")
        library, encoder_class = index["text_encoder"]
        if library != "transformers" or not hasattr(transformers, encoder_class):
            raise WeightsError(f"{folder}: unsupported Z-Image text encoder {library}.{encoder_class}")
        typed = {} if dtype is None else {"torch_dtype": dtype}
        components = {
            "transformer": ZImageTransformer2DModel.from_pretrained(folder, subfolder="transformer", **typed),
            "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", **typed),
            "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler"),
            "text_encoder": getattr(transformers, encoder_class).from_pretrained(
                folder, subfolder="text_encoder", **({} if dtype is None else {"dtype": dtype})
            ),
            "tokenizer": AutoTokenizer.from_pretrained(str(folder), subfolder="tokenizer"),
        }
        generator = cls(components, folder, max_sequence_length)
        return generator.to(device)

    def to(self, device: str | torch.device) -> ZImageGenerator:
        for module in (self.transformer, self.vae, self.text_encoder):
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
        """``prompt_embeds [B, max_sequence_length, D]`` (zero padded) and ``prompt_embeds_mask [B,
        max_sequence_length]``: row ``i``'s masked embeddings ``prompt_embeds[i][mask[i] == 1]`` equal the ``i``-th
        tensor of ``ZImagePipeline.encode_prompt(prompts, do_classifier_free_guidance=False)``."""
        if self.text_encoder is None:
            raise RuntimeError("the text encoder was freed (free_text_encoders); load cached Conditions instead")
        if isinstance(prompts, str):
            prompts = [prompts]
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

    def unconditional(self, count: int) -> Conditions:
        """The encoded empty prompt ``""`` repeated ``count`` times (the pipeline's default negative prompt).
        Encoded once and kept, so it survives :meth:`free_text_encoders`."""
        if self._unconditional is None:
            self._unconditional = self.encode_conditions([""])
        return self._unconditional.repeat(count)

    def free_text_encoders(self) -> None:
        """Drop the text encoder (after caching the unconditional embedding): training then runs on cached
        :class:`Conditions`."""
        if self.text_encoder is not None:
            self.unconditional(1)
            self.text_encoder = None

    @staticmethod
    def caption_list(conditions: Conditions, device: Any = None, dtype: torch.dtype | None = None) -> list[Tensor]:
        """The transformer's caption input: one ``[n_i, D]`` tensor per row (the embeddings under the mask)."""
        mask = conditions["prompt_embeds_mask"].bool()
        embeds = conditions["prompt_embeds"]
        return [row[keep].to(device=device, dtype=dtype) for row, keep in zip(embeds, mask, strict=True)]

    # -- latents -------------------------------------------------------------------------------------------
    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(self.vae.config.shift_factor or 0.0)

    @torch.no_grad()
    def to_latents(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images in [0, 1] → ``(z − shift_factor)·scaling_factor`` with ``z`` a VAE posterior sample drawn with
        ``generator`` (``train_dreambooth_lora_z_image.py`` takes the posterior mode), float32."""
        pixels = (images * 2 - 1).to(self.vae.device, self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.sample(generator)
        return ((latents.float() - self.shift_factor) * self.scaling_factor).float()

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
        """The flow velocity ``ε − x0`` (what :meth:`predict` returns after undoing Z-Image's sign)."""
        return noise - x0

    def predict(self, model: torch.nn.Module, x_t: Tensor, t: Tensor | float, conditions: Conditions) -> Tensor:
        """The velocity at latents ``x_t [B, 16, h, w]`` and model timesteps ``t``: ``−model(list of [16, 1, h, w]
        latents in the model's dtype, (1000 − t) / 1000 in float32, list of caption features)``, float32."""
        dtype = next(model.parameters()).dtype
        timestep = torch.as_tensor(t, device=x_t.device, dtype=torch.float32)
        if timestep.ndim == 0:
            timestep = timestep.expand(x_t.shape[0])
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
        conditional branch alone)."""
        if guidance == 1.0:
            return self.predict(model, x, t, conditions)
        if uncond is None:
            raise ValueError(f"guidance {guidance} needs the unconditional branch (uncond)")
        if len(uncond) != len(conditions):
            raise ValueError(f"uncond has {len(uncond)} rows, conditions {len(conditions)}")
        timestep = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        both_t = timestep if timestep.ndim == 0 else torch.cat([timestep, timestep])
        both = self.predict(model, torch.cat([x, x]), both_t, Conditions.cat([conditions, uncond]))
        v_cond, v_uncond = both.chunk(2)
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
            truncated = ((1000 - timestep) / 1000 > cfg_truncation).expand(x.shape[0])
            pred = torch.where(truncated.view(-1, *([1] * (pred.ndim - 1))), pos, pred)
        return -pred

    @staticmethod
    def image_seq_len(latent_shape: Sequence[int]) -> int:
        """The image tokens of latents ``(..., h, w)``: ``(h/2)·(w/2)`` 2x2 patches."""
        return (int(latent_shape[-2]) // 2) * (int(latent_shape[-1]) // 2)

    def sampling_schedule(self, steps: int, image_seq_len: int | None = None, device: Any = None) -> Schedule:
        """The pipeline's schedule: a fresh ``FlowMatchEulerDiscreteScheduler`` from this config, ``set_timesteps``
        with σ = ``torch.linspace(1, 1/steps, steps)`` and μ from ``image_seq_len`` (image tokens,
        :meth:`image_seq_len`), which only a dynamic-shifting config uses (Z-Image-Turbo's shift is static).
        ``sigmas`` ends with the terminal 0."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        kwargs: dict[str, Any] = {}
        if image_seq_len is not None:
            kwargs["mu"] = calculate_shift(image_seq_len, scheduler.config)
        elif scheduler.config.get("use_dynamic_shifting", False):
            raise ValueError("this scheduler uses dynamic shifting: pass image_seq_len (image tokens)")
        sigmas = torch.linspace(1.0, 1 / steps, steps).tolist()
        scheduler.set_timesteps(sigmas=sigmas, device=device or self.device, **kwargs)
        return Schedule(scheduler.timesteps, scheduler.sigmas)

    # -- pipelines ------------------------------------------------------------------------------------------
    def pipeline(self, transformer: torch.nn.Module | None = None):
        """A diffusers ``ZImagePipeline`` over these components (validation images, saving)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

        if self.text_encoder is None:
            raise RuntimeError("the text encoder was freed (free_text_encoders)")
        return ZImagePipeline(
            transformer=transformer if transformer is not None else self.transformer,
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config),
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
        )
