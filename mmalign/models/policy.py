"""A diffusers text-to-image pipeline seen as a trainable policy.

Trainers need the same few operations whatever the pipeline: encode prompts (SD 1.x/2.x: one CLIP text
encoder; SDXL: two, penultimate hidden states concatenated, pooled embedding and micro-conditioning time ids),
encode images to VAE latents, add noise and build the regression target (epsilon, v-prediction, or sample),
predict with the UNet, decode. These follow diffusers' training scripts (``train_text_to_image*.py`` and
``examples/research_projects/diffusion_dpo/train_diffusion_dpo*.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightsError
from ..hub import resolve_dir


@dataclass
class PromptEmbeds:
    """Text conditioning of a batch: ``hidden [B, L, D]`` and, for SDXL, ``pooled [B, D2]``; ``extra``: further
    named batch-first tensors a family's UNet takes (AudioLDM 2: its second cross-attention's T5 states and their
    attention mask), carried through batching, tiling and guidance as they are."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def select(self, index: torch.Tensor | slice) -> PromptEmbeds:
        return PromptEmbeds(
            self.hidden[index],
            None if self.pooled is None else self.pooled[index],
            {name: tensor[index] for name, tensor in self.extra.items()},
        )

    def repeat(self, times: int) -> PromptEmbeds:
        """The batch tiled ``times`` times (``[a, b, a, b]``)."""

        def tiled(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.repeat(times, *([1] * (tensor.ndim - 1)))

        return PromptEmbeds(
            tiled(self.hidden),
            None if self.pooled is None else tiled(self.pooled),
            {name: tiled(tensor) for name, tensor in self.extra.items()},
        )

    tile = repeat  # the name :class:`mmalign.models.generator.Conditions` gives it

    def to(self, device: str | torch.device) -> PromptEmbeds:
        """Every tensor moved to ``device``."""
        return PromptEmbeds(
            self.hidden.to(device),
            None if self.pooled is None else self.pooled.to(device),
            {name: tensor.to(device) for name, tensor in self.extra.items()},
        )

    @classmethod
    def cat(cls, parts: list[PromptEmbeds]) -> PromptEmbeds:
        """Concatenated along the batch (every part with the same fields)."""
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        extra = {name: torch.cat([p.extra[name] for p in parts]) for name in parts[0].extra}
        return cls(torch.cat([p.hidden for p in parts]), pooled, extra)


class DiffusionPolicy:
    """Components of a UNet pipeline (SD 1.x/2.x or SDXL), loaded from a hub id or a pipeline folder.

    Registered in :data:`mmalign.models.generator.FAMILIES` for ``StableDiffusionPipeline`` and
    ``StableDiffusionXLPipeline``; its conditioning is :class:`PromptEmbeds` (plus SDXL time ids) rather than
    :class:`~mmalign.models.generator.Conditions`, and its samplers are the DDIM steps of
    :mod:`mmalign.models.sampling` (the mapping onto the protocol is in :mod:`mmalign.models.generator`)."""

    #: epsilon / v / sample prediction on a DDPM schedule: the DDIM-chain trainers (DDPO, D3PO, ...) apply
    parametrisation = "diffusion"
    #: diffusers' DreamBooth/DPO LoRA scripts' UNet attention projections
    lora_targets = ("to_k", "to_q", "to_v", "to_out.0")
    lora_layers_key = "unet_lora_layers"
    block_class = "BasicTransformerBlock"

    def __init__(self, components: dict[str, Any], folder: Path):
        self.folder = folder
        self.unet = components["unet"]
        self.vae = components["vae"]
        self.text_encoders = [components["text_encoder"]] + (
            [components["text_encoder_2"]] if components.get("text_encoder_2") is not None else []
        )
        self.tokenizers = [components["tokenizer"]] + (
            [components["tokenizer_2"]] if components.get("tokenizer_2") is not None else []
        )
        self.noise_scheduler = components["noise_scheduler"]
        self.is_sdxl = len(self.text_encoders) == 2
        # diffusers' StableDiffusionXLPipeline config (True by default): guidance without a negative prompt
        # uses zero embeddings for the unconditional branch instead of encoding ""
        self.force_zeros_for_empty_prompt = self.is_sdxl and bool(components.get("force_zeros_for_empty_prompt", True))
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise WeightsError(f"{folder}: unsupported prediction_type {self.prediction_type!r}")
        for module in [self.vae, *self.text_encoders]:
            module.requires_grad_(False)
            module.eval()

    @classmethod
    def from_pretrained(cls, model: str | Path, device: str | torch.device = "cpu") -> DiffusionPolicy:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        folder = resolve_dir(str(model), default_repo=str(model), what="diffusion pipeline")
        index_path = folder / "model_index.json"
        if not index_path.is_file():
            raise WeightsError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
        index = json.loads(index_path.read_text())
        sdxl = bool(index.get("text_encoder_2") and index["text_encoder_2"][0] is not None)
        components: dict[str, Any] = {
            "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
            "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae"),
            "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
            "tokenizer": AutoTokenizer.from_pretrained(str(folder), subfolder="tokenizer"),
            "noise_scheduler": DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
        }
        if sdxl:
            components["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                folder, subfolder="text_encoder_2"
            )
            components["tokenizer_2"] = AutoTokenizer.from_pretrained(str(folder), subfolder="tokenizer_2")
        if sdxl:
            components["force_zeros_for_empty_prompt"] = index.get("force_zeros_for_empty_prompt", True)
        policy = cls(components, folder)
        policy.to(device)
        return policy

    def to(self, device: str | torch.device) -> DiffusionPolicy:
        for module in [self.unet, self.vae, *self.text_encoders]:
            module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def family(self) -> str:
        return "sdxl" if self.is_sdxl else "sd"

    @property
    def trainable(self) -> torch.nn.Module:
        return self.unet

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)

    @property
    def pipeline_class(self) -> type:
        import diffusers

        return diffusers.StableDiffusionXLPipeline if self.is_sdxl else diffusers.StableDiffusionPipeline

    # -- conditioning ----------------------------------------------------------------------------------
    @torch.no_grad()
    def unconditional(self, empty: PromptEmbeds) -> PromptEmbeds:
        """The unconditional branch of classifier-free guidance from the empty prompt's embeddings ``empty``:
        as they are, or zeros of the same shapes (sequence and pooled) when the pipeline's config sets
        ``force_zeros_for_empty_prompt`` (diffusers ``StableDiffusionXLPipeline.encode_prompt`` without a
        negative prompt)."""
        if not self.force_zeros_for_empty_prompt:
            return empty
        pooled = None if empty.pooled is None else torch.zeros_like(empty.pooled)
        return PromptEmbeds(torch.zeros_like(empty.hidden), pooled)

    def encode_prompt(self, prompts: list[str]) -> PromptEmbeds:
        """SD: last hidden state of the text encoder. SDXL: penultimate hidden states of both encoders
        concatenated, pooled (projected) embedding of the second."""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            if self.is_sdxl:
                out = encoder(ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                pooled = out[0]  # the last encoder's projected pooled output (text_embeds)
            else:
                hidden.append(encoder(ids)[0])
        return PromptEmbeds(torch.cat(hidden, dim=-1), pooled)

    def time_ids(self, original_sizes: torch.Tensor, crops: torch.Tensor, resolution: int) -> torch.Tensor:
        """SDXL micro-conditioning ``(original h, w, crop top, left, target h, w)`` per sample."""
        target = torch.tensor([resolution, resolution], device=original_sizes.device).expand(len(original_sizes), 2)
        return torch.cat([original_sizes, crops, target], dim=1).to(self.device, dtype=torch.float32)

    # -- latents and targets ----------------------------------------------------------------------------
    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def latent_distribution(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior ``(mean, std)`` of images in [-1, 1]; sampling it later equals encoding again."""
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return (mean + std * noise) * self.scaling_factor

    def noisy_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = latents
        return noisy, target

    def predict(
        self,
        unet: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: PromptEmbeds,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        added = None
        if self.is_sdxl:
            added = {"text_embeds": embeds.pooled, "time_ids": time_ids}
        dtype = next(unet.parameters()).dtype
        return unet(
            noisy.to(dtype), timesteps, encoder_hidden_states=embeds.hidden.to(dtype), added_cond_kwargs=added
        ).sample.float()

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """``(C, h, w)`` of one latent of a ``height×width`` image (video subclasses: ``(C, F, h, w)``): what the
        samplers draw initial noise of."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return int(self.unet.config.in_channels), height // factor, width // factor

    def decode(self, latents: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """Latents -> canonical images ``[B, 3, H, W]`` in [0, 1]; ``grad=True`` keeps the graph (reward
        backpropagation)."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            images = self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample
            return (images.float() / 2 + 0.5).clamp(0, 1)

    # -- pipelines ----------------------------------------------------------------------------------------
    def pipeline(self, unet: torch.nn.Module | None = None):
        """A diffusers pipeline over these components (DDIM sampler) for validation images and saving."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        scheduler = DDIMScheduler.from_config(self.noise_scheduler.config)
        unet = unet if unet is not None else self.unet
        if self.is_sdxl:
            return StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=self.text_encoders[0],
                text_encoder_2=self.text_encoders[1],
                tokenizer=self.tokenizers[0],
                tokenizer_2=self.tokenizers[1],
                unet=unet,
                scheduler=scheduler,
            )
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoders[0],
            tokenizer=self.tokenizers[0],
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
