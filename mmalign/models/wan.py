"""Wan 2.1 (and Wan 2.2 TI2V-5B as text-to-video) as a :class:`mmalign.models.generator.Generator` (flow
matching, video).

Components, as diffusers' ``WanPipeline`` holds them: ``WanTransformer3DModel`` (trainable: 3D patches of
``patch_size`` (1, 2, 2), self-attention ``attn1``, cross-attention ``attn2`` on the text, a GELU ``ffn`` in every
``WanTransformerBlock``), ``UMT5EncoderModel`` (``text_encoder``) with its T5 tokenizer, the causal 3D
``AutoencoderKLWan`` (per-channel ``latents_mean`` / ``latents_std``; ``scale_factor_temporal`` 4,
``scale_factor_spatial`` 8 in Wan 2.1) and a flow-matching scheduler.

Re-implemented from ``diffusers/pipelines/wan/pipeline_wan.py`` (diffusers 0.42.1; no code copied):

* Prompts: each prompt cleaned as the pipeline's ``prompt_clean`` does (``ftfy.fix_text`` when ftfy is installed,
  HTML entities unescaped twice, runs of white space collapsed, stripped), tokenised padded to
  ``max_sequence_length`` (the pipeline's ``__call__`` default, 512) with truncation, encoded by UMT5 under the
  attention mask, and the last hidden state kept at the real tokens with zeros after them:
  :class:`~mmalign.models.generator.Conditions` ``prompt_embeds [B, max_sequence_length, D]``. The transformer
  gets the zero rows as they are (no mask), as in the pipeline. :meth:`WanGenerator.unconditional` is the encoded
  ``""`` (the pipeline's negative prompt when none is given).
* Video latents: ``[B, 16, F', H/8, W/8]`` with ``F' = (frames − 1) // 4 + 1``; ``frames − 1`` must be a multiple
  of 4 (the pipeline rounds other counts with a warning; here they are refused) and ``H``, ``W`` multiples of
  ``8 · 2`` (the pipeline's ``check_inputs``). The frame count of the protocol's :meth:`WanGenerator.latent_shape`
  (which takes a height and width) is :attr:`WanGenerator.num_frames` (default 81, the pipeline's; a folder's
  ``mmalign_generator.json`` or the trainers' ``frames`` option set it). Normalised per channel as the pipeline
  inverts it: ``(z − mean)·(1/std)``. :meth:`WanGenerator.decode` returns the canonical video
  ``[B, T, 3, H, W]`` in [0, 1] (:mod:`mmalign.modalities.video`), what ``postprocess_video(output_type="pt")``
  returns. Images ``[B, 3, H, W]`` given to :meth:`WanGenerator.latent_distribution` / ``to_latents`` are one-frame
  clips (``F' = 1``), as Wan trains on images: offline preference pairs of images (Flow-DPO) train it so.
* Time: the transformer is conditioned on the scheduler's timestep ``t = σ·1000`` (per sample; Wan 2.2 TI2V-5B's
  ``expand_timesteps``: the same ``t`` for every latent token, as its pipeline passes it without an image).
* Guidance: ``v_u + g·(v_c − v_u)`` (the pipeline runs the two branches apart; here one batched call: equal up to
  rounding).
* Schedule: WanPipeline calls ``scheduler.set_timesteps(steps)``; the Euler case is ``FlowMatchEulerDiscreteScheduler``
  with the checkpoint's shift. The published checkpoints ship ``UniPCMultistepScheduler`` with
  ``use_flow_sigmas=True`` and ``flow_shift`` (3.0 for Wan2.1-T2V at 480p): the generator then samples with
  ``FlowMatchEulerDiscreteScheduler(shift=flow_shift)``, the flow-matching Euler schedule of the same shift (what
  ``WanPipeline`` with that scheduler swapped in samples), since the GRPO family needs single-step Euler/SDE
  transitions; UniPC's multistep corrector itself is not reproduced. :meth:`WanGenerator.save_pipeline` keeps the
  shipped scheduler.

Not supported (refused with a :class:`~mmalign.errors.WeightsError` naming it): Wan 2.2 A14B's two experts
(``transformer_2`` with ``boundary_ratio``: a high-noise transformer for ``t ≥ boundary_ratio·1000`` and a low-noise
one below, each with its own guidance scale) — the protocol trains one network; image-conditioned transformers
(``image_dim``: Wan 2.1 I2V, which is ``WanImageToVideoPipeline`` anyway).
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import WeightsError
from .flow_generator import FlowMatchingGenerator, PerChannelLatentStats
from .generator import Conditions, attention_projections

__all__ = ["DEFAULT_NUM_FRAMES", "WAN_LORA_TARGETS", "WanGenerator", "check_num_frames", "prompt_clean"]

DEFAULT_NUM_FRAMES = 81  # WanPipeline.__call__'s num_frames
DEFAULT_MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s max_sequence_length

#: every WanTransformerBlock's self-attention (attn1) and text cross-attention (attn2) q/k/v/out projections and
#: its feed-forward layers: DiffSynth-Studio's Wan LoRA default ``q,k,v,o,ffn.0,ffn.2`` in diffusers' names
WAN_LORA_TARGETS: tuple[str, ...] = (*attention_projections("attn1", "attn2"), "ffn.net.0.proj", "ffn.net.2")

#: flow-matching schedulers a Wan folder may ship (their flow shift key), replaced by the Euler schedule of that shift
_FLOW_SIGMA_SCHEDULERS = ("UniPCMultistepScheduler", "DPMSolverMultistepScheduler")


def prompt_clean(text: str) -> str:
    """The pipeline's prompt cleaning: ``ftfy.fix_text`` (when installed), HTML entities unescaped twice,
    stripped, white space runs collapsed to one space."""
    try:
        import ftfy
    except ImportError:
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def check_num_frames(frames: int, temporal: int = 4) -> int:
    """``frames`` when ``(frames − 1) % temporal == 0`` (Wan's causal VAE: one first frame, then groups of 4), else a
    :class:`ValueError` naming the nearest valid counts."""
    frames = int(frames)
    if frames < 1 or (frames - 1) % temporal:
        below = max(1, (frames - 1) // temporal * temporal + 1)
        raise ValueError(
            f"Wan needs a frame count with (frames - 1) % {temporal} == 0 (1, 5, 9, ..., 81); got {frames} "
            f"(nearest: {below} or {below + temporal})"
        )
    return frames


class WanGenerator(PerChannelLatentStats, FlowMatchingGenerator):
    """Wan text-to-video components behind the generator protocol (see :mod:`mmalign.models.generator`,
    :class:`~mmalign.models.flow_generator.FlowMatchingGenerator` and this module). Latents are 5-D
    ``[B, C, F', h, w]``; :meth:`decode` gives videos ``[B, T, 3, H, W]`` in [0, 1]."""

    latent_rank: ClassVar[int] = 4  # [C, F', h, w]
    family: ClassVar[str] = "wan"
    modality: ClassVar[str] = "video"
    lora_targets: ClassVar[tuple[str, ...]] = WAN_LORA_TARGETS
    block_class: ClassVar[str] = "WanTransformerBlock"
    pipeline_name: ClassVar[str] = "WanPipeline"
    display_name: ClassVar[str] = "Wan"
    transformer_class: ClassVar[str] = "WanTransformer3DModel"
    vae_class: ClassVar[str] = "AutoencoderKLWan"
    text_encoder_classes: ClassVar[dict[str, str]] = {"text_encoder": "UMT5EncoderModel"}
    exact_sizes: ClassVar[bool] = True

    def __init__(
        self,
        components: dict[str, Any],
        folder: Path | None = None,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        num_frames: int = DEFAULT_NUM_FRAMES,
        expand_timesteps: bool = False,
    ):
        if components.get("transformer_2") is not None:
            raise WeightsError(
                f"{folder}: Wan 2.2 two-expert pipelines (transformer_2 with boundary_ratio) are not supported: "
                "the generator trains one transformer"
            )
        if components["transformer"].config.get("image_dim") is not None:
            raise WeightsError(f"{folder}: an image-conditioned Wan transformer (image_dim): not text-to-video")
        if not 0 < int(max_sequence_length) <= 4096:
            raise ValueError(f"max_sequence_length must be in 1..4096, got {max_sequence_length}")
        super().__init__(components, folder)
        self.shipped_scheduler = components.get("shipped_scheduler", self.scheduler)
        self.max_sequence_length = int(max_sequence_length)
        self.expand_timesteps = bool(expand_timesteps)
        self.num_frames = num_frames

    @property
    def num_frames(self) -> int:
        """Frames per video of :meth:`latent_shape` (``(frames − 1) % 4 == 0``)."""
        return self._num_frames

    @num_frames.setter
    def num_frames(self, frames: int) -> None:
        self._num_frames = check_num_frames(frames, self.vae_scale_factor_temporal)

    # -- loading -------------------------------------------------------------------------------------------
    @classmethod
    def check_index(cls, folder: Path, index: dict[str, Any]) -> None:
        """Refuse Wan 2.2's two experts (``transformer_2``, ``boundary_ratio``) before any weight loads."""
        second = index.get("transformer_2")
        if (second and second[0] is not None) or index.get("boundary_ratio") is not None:
            raise WeightsError(
                f"{folder}: Wan 2.2 two-expert pipelines (transformer_2, boundary_ratio="
                f"{index.get('boundary_ratio')}) are not supported: the generator trains one transformer (Wan 2.1 "
                "and Wan 2.2 TI2V-5B are)"
            )
        super().check_index(folder, index)

    @classmethod
    def load_scheduler(cls, folder: Path, index: dict[str, Any]) -> Any:
        """The Euler scheduler of the shipped one (:meth:`euler_scheduler`)."""
        return cls.euler_scheduler(cls._shipped_scheduler(folder, index).config, folder)

    @classmethod
    def load_components(cls, folder: Path, index: dict[str, Any], dtype: torch.dtype | None) -> dict[str, Any]:
        """The pipeline's components, the scheduler as :meth:`load_scheduler` converts it and the shipped one as
        ``shipped_scheduler`` (what :meth:`save_pipeline` writes back)."""
        components = super().load_components(folder, index, dtype)
        components["shipped_scheduler"] = cls._shipped_scheduler(folder, index)
        return components

    @staticmethod
    def _shipped_scheduler(folder: Path, index: dict[str, Any]) -> Any:
        import diffusers

        name = (index.get("scheduler") or [None, None])[1]
        scheduler_class = getattr(diffusers, name, None) if name else None
        if scheduler_class is None:
            raise WeightsError(f"{folder}: Wan pipeline without a known scheduler (model_index.json: {name!r})")
        return scheduler_class.from_pretrained(folder, subfolder="scheduler")

    @staticmethod
    def euler_scheduler(config: Any, folder: Any = None):
        """The ``FlowMatchEulerDiscreteScheduler`` of a scheduler config: itself, or for a flow-sigma multistep
        scheduler (UniPC / DPM-Solver with ``use_flow_sigmas``, as Wan ships) the Euler scheduler with its
        ``flow_shift``; other schedulers are refused."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        name = config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        if name == "FlowMatchEulerDiscreteScheduler":
            return FlowMatchEulerDiscreteScheduler.from_config(config)
        if name in _FLOW_SIGMA_SCHEDULERS and config.get("use_flow_sigmas", False):
            return FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                shift=float(config.get("flow_shift", 1.0)),
            )
        raise WeightsError(
            f"{folder}: Wan scheduler {name} is not a flow-matching one (FlowMatchEulerDiscreteScheduler, or "
            f"{' / '.join(_FLOW_SIGMA_SCHEDULERS)} with use_flow_sigmas)"
        )

    @classmethod
    def index_options(cls, folder: Path, index: dict[str, Any]) -> dict[str, Any]:
        """``expand_timesteps`` from ``model_index.json``; ``max_sequence_length`` and ``num_frames`` from the
        folder's ``mmalign_generator.json`` when it has them."""
        from .sd3 import read_generator_config

        config = read_generator_config(folder)
        options: dict[str, Any] = {"expand_timesteps": bool(index.get("expand_timesteps", False))}
        for key in ("max_sequence_length", "num_frames"):
            if key in config:
                options[key] = int(config[key])
        return options

    # -- conditioning ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_conditions(self, prompts: Sequence[str]) -> Conditions:
        """``prompt_embeds [B, max_sequence_length, D]``: UMT5's last hidden state at the real tokens, zeros after
        them; equal to ``WanPipeline.encode_prompt(prompts, do_classifier_free_guidance=False,
        max_sequence_length=...)[0]``."""
        prompts = [prompt_clean(prompt) for prompt in self._prompt_list(prompts)]
        encoder = self.text_encoder
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(encoder.device)
        hidden = encoder(tokens.input_ids.to(encoder.device), mask).last_hidden_state
        keep = torch.arange(hidden.shape[1], device=hidden.device)[None] < mask.gt(0).sum(dim=1)[:, None]
        embeds = torch.where(keep[..., None], hidden, torch.zeros_like(hidden))
        return Conditions({"prompt_embeds": embeds.to(encoder.dtype)}, {"family": self.family})

    # -- latents -------------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along height and width (``scale_factor_spatial``: 8 in Wan 2.1, 16 in Wan 2.2)."""
        return int(self.vae.config.get("scale_factor_spatial") or 8)

    @property
    def vae_scale_factor_temporal(self) -> int:
        """Frames per latent frame after the first (``scale_factor_temporal``, 4)."""
        return int(self.vae.config.get("scale_factor_temporal") or 4)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    @property
    def patch_size(self) -> int:
        """Latents per side of one transformer token (``patch_size[1]``, 2)."""
        return int(self.transformer.config.patch_size[1])

    def latent_frames(self, frames: int | None = None) -> int:
        """``F' = (frames − 1) // 4 + 1`` latent frames of ``frames`` (default :attr:`num_frames`) frames."""
        frames = self.num_frames if frames is None else check_num_frames(frames, self.vae_scale_factor_temporal)
        return (frames - 1) // self.vae_scale_factor_temporal + 1

    def latent_shape(self, height: int, width: int, frames: int | None = None) -> tuple[int, int, int, int]:
        """``(C, F', h, w)`` of the latent of a ``frames``-frame (default :attr:`num_frames`) ``height×width``
        video: ``F' = (frames − 1) // 4 + 1``, ``h = height // 8``; heights and widths must be multiples of 16
        and ``(frames − 1) % 4 == 0``."""
        channels, h, w = super().latent_shape(height, width)
        return channels, self.latent_frames(frames), h, w

    def _as_clips(self, pixels: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` or videos ``[B, T, 3, H, W]`` → the VAE's ``[B, 3, T, H, W]`` (images: ``T = 1``)."""
        if pixels.ndim == 4:
            return pixels.unsqueeze(2)
        if pixels.ndim == 5:
            check_num_frames(pixels.shape[1], self.vae_scale_factor_temporal)
            return pixels.transpose(1, 2)
        raise ValueError(f"expected images [B, 3, H, W] or videos [B, T, 3, H, W], got {tuple(pixels.shape)}")

    @torch.no_grad()
    def latent_distribution(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """The VAE posterior ``(mean, std)`` (float32, ``[B, C, F', h, w]`` each) of images ``[B, 3, H, W]`` (one-frame
        clips) or videos ``[B, T, 3, H, W]`` in [-1, 1]."""
        return super().latent_distribution(self._as_clips(pixels))

    def decode(self, latents: Tensor, grad: bool = False) -> Tensor:
        """Latents ``[B, C, F', h, w]`` → videos ``[B, T, 3, H, W]`` in [0, 1] (``T = 4·(F' − 1) + 1``): the
        pipeline's denormalisation, VAE decode and ``postprocess_video`` (``x/2 + 0.5`` clamped, frames first);
        ``grad=True`` keeps the graph."""
        if latents.ndim != 5:
            raise ValueError(f"Wan latents are [B, C, F', h, w], got {tuple(latents.shape)}")
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            video = self.vae.decode(self.denormalise_latents(latents.to(self.vae.dtype))).sample
            return (video.float() / 2 + 0.5).clamp(0, 1).transpose(1, 2)

    # -- flow matching -----------------------------------------------------------------------------------
    def predict(self, model: torch.nn.Module, x_t: Tensor, t: Tensor | float, conditions: Conditions) -> Tensor:
        """``model(hidden_states=x_t, timestep=t, encoder_hidden_states=prompt_embeds)`` in the model's dtype
        (``expand_timesteps``: ``t`` repeated over the ``F'·(h/2)·(w/2)`` latent tokens), returned in float32."""
        if x_t.ndim != 5:
            raise ValueError(f"Wan latents are [B, C, F', h, w], got {tuple(x_t.shape)}")
        dtype = next(model.parameters()).dtype
        timestep = self.batch_timesteps(t, x_t)
        if self.expand_timesteps:
            _, _, frames, height, width = x_t.shape
            patch = model.config.patch_size if hasattr(model, "config") else (1, 2, 2)
            tokens = (frames // patch[0]) * (height // patch[1]) * (width // patch[2])
            timestep = timestep[:, None].expand(-1, tokens)
        out = model(
            hidden_states=x_t.to(dtype),
            timestep=timestep,
            encoder_hidden_states=conditions["prompt_embeds"].to(x_t.device, dtype),
            return_dict=False,
        )[0]
        return out.float()

    def schedule_sigmas(self, steps: int) -> None:
        """The scheduler's own σ (``WanPipeline`` calls ``set_timesteps(steps)``)."""
        return None

    # -- pipelines ------------------------------------------------------------------------------------------
    def pipeline_call_options(self) -> dict[str, Any]:
        """Keyword arguments of ``WanPipeline.__call__`` that make it sample what this generator samples."""
        return {"num_frames": self.num_frames, "max_sequence_length": self.max_sequence_length}

    def pipeline_options(self) -> dict[str, Any]:
        return {"expand_timesteps": True} if self.expand_timesteps else {}

    def save_pipeline(self, folder: str | Path, transformer: torch.nn.Module | None = None) -> Path:
        """The pipeline folder with the scheduler it shipped with (UniPC for the published checkpoints), and
        ``mmalign_generator.json`` when ``max_sequence_length`` or ``num_frames`` are not the pipeline's."""
        from .sd3 import write_generator_config

        pipe = self.pipeline(transformer)
        pipe.register_modules(scheduler=self.shipped_scheduler)
        pipe.save_pretrained(str(folder))
        settings = {}
        if self.max_sequence_length != DEFAULT_MAX_SEQUENCE_LENGTH:
            settings["max_sequence_length"] = self.max_sequence_length
        if self.num_frames != DEFAULT_NUM_FRAMES:
            settings["num_frames"] = self.num_frames
        if settings:
            write_generator_config(folder, **settings)
        return Path(folder)
