"""AnimateDiff (text-to-video on a Stable Diffusion 1.x UNet) as a UNet policy: the DDPM-schedule ("diffusion")
trainers — the DPO family, DDPO / D3PO on DDIM chains, ReFL / DRaFT / AlignProp — train it as they train SD.

Components, as diffusers' ``AnimateDiffPipeline`` holds them: a ``UNetMotionModel`` (the SD 1.x UNet with a
``MotionAdapter``'s temporal transformers, ``motion_modules``, after each resnet/attention pair), the SD VAE
(``AutoencoderKL``, applied to each frame apart), a CLIP text encoder and tokenizer, and a DDPM-family scheduler
(DDIM as AnimateDiff samples). Re-implemented from ``diffusers/pipelines/animatediff/pipeline_animatediff.py``
(diffusers 0.42.1; no code copied):

* Loading: a pipeline folder whose ``model_index.json`` names ``AnimateDiffPipeline`` (what
  ``AnimateDiffPipeline.save_pretrained`` writes). Its ``unet`` is a ``UNetMotionModel`` (motion modules merged),
  or an SD ``UNet2DConditionModel`` with the folder's ``motion_adapter`` merged into it on load
  (``UNetMotionModel.from_unet2d``), as the pipeline's constructor does. :meth:`AnimateDiffPolicy.from_pretrained`
  also takes ``motion_adapter=`` (a ``MotionAdapter`` folder or hub id) to build the policy from an SD 1.x
  ``StableDiffusionPipeline`` folder and an adapter (``guoyww/animatediff-motion-adapter-v1-5-2``). SDXL AnimateDiff
  (``AnimateDiffSDXLPipeline``), FreeInit / FreeNoise, IP-Adapters and sparse controls are not supported.
* Prompts: SD's: the CLIP text encoder's last hidden state (:meth:`DiffusionPolicy.encode_prompt`), equal to
  ``AnimateDiffPipeline.encode_prompt``; the unconditional branch is the encoded ``""``. The pipeline repeats the
  embeddings once per frame (``repeat_interleave(num_frames)``) because the UNet runs its spatial layers on the
  ``B·F`` frames: :meth:`AnimateDiffPolicy.predict` does the same.
* Video latents: ``[B, C, F, h, w]`` (channels first, then frames, as ``prepare_latents`` lays them out), ``F`` =
  frames (no temporal compression), ``h = H / 8``. :attr:`AnimateDiffPolicy.num_frames` is the clip length of
  :meth:`AnimateDiffPolicy.latent_shape` (default 16, the pipeline's; a folder's ``mmalign_generator.json`` or the
  trainers' ``frames`` option set it; at most the motion modules' ``motion_max_seq_length``, 32 for the published
  adapters). :meth:`AnimateDiffPolicy.latent_distribution` encodes videos ``[B, T, 3, H, W]`` frame by frame and
  images ``[B, 3, H, W]`` as one-frame clips (``F = 1``): image preference pairs train it so — note that in a
  one-frame clip the temporal attention attends to one token, so its ``to_q`` / ``to_k`` get no gradient (their
  softmax is constant); video pairs train them. :meth:`AnimateDiffPolicy.decode` gives the canonical video
  ``[B, T, 3, H, W]`` in [0, 1] (:mod:`mmalign.modalities.video`), what the pipeline's ``decode_latents`` and
  ``postprocess_video(output_type="pt")`` give, optionally for a subset of the frames only (``frames=``: the
  VAE decodes frames apart, so a reward can score some frames without decoding the others, as VADER does).
* Sampling: the DDIM chains of :mod:`mmalign.models.sampling` run on 5-D latents unchanged; with η = 0 and the
  pipeline's DDIM scheduler (``set_alpha_to_one=False``, SD's setting) they equal ``AnimateDiffPipeline`` with
  ``output_type="latent"`` up to rounding.
* LoRA (:data:`ANIMATEDIFF_LORA_SCOPES`): by default on the motion modules' attention projections
  (``motion_modules.*.to_q/to_k/to_v/to_out.0``, both temporal self-attentions of each block), as AnimateDiff's
  MotionLoRA training does; ``lora_targets=[spatial]`` puts it on the SD UNet's spatial attention instead (the
  image layers: self- and cross-attention of the ``attentions`` transformers, DreamBooth/DPO's targets),
  ``[motion, spatial]`` or ``[all]`` on both. Other entries are peft target names as usual. The written file
  (``pytorch_lora_weights.safetensors``) loads with ``AnimateDiffPipeline.load_lora_weights``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import WeightsError
from .policy import DiffusionPolicy, PromptEmbeds

__all__ = ["ANIMATEDIFF_LORA_SCOPES", "DEFAULT_NUM_FRAMES", "AnimateDiffPolicy", "lora_modules"]

DEFAULT_NUM_FRAMES = 16  # AnimateDiffPipeline.__call__'s num_frames
DECODE_CHUNK_SIZE = 16  # AnimateDiffPipeline.__call__'s decode_chunk_size: frames per VAE decode call
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")

#: named groups of LoRA targets (``lora_targets`` entries expanded into module names):
#: "motion": the temporal attention of the motion modules (default, AnimateDiff MotionLoRA);
#: "spatial": the SD UNet's spatial self-/cross-attention; "all": both
ANIMATEDIFF_LORA_SCOPES: dict[str, str] = {
    "motion": "attention projections inside motion_modules (temporal self-attention)",
    "spatial": "attention projections of the SD UNet's spatial transformers (self- and cross-attention)",
    "all": "both",
}


def lora_modules(unet: torch.nn.Module, scope: str) -> list[str]:
    """Names of the ``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0`` linear layers of ``unet`` in ``scope``
    ("motion": inside ``motion_modules``; "spatial": every other attention; "all": both)."""
    if scope not in ANIMATEDIFF_LORA_SCOPES:
        raise ValueError(f"unknown LoRA scope {scope!r}; use one of {', '.join(ANIMATEDIFF_LORA_SCOPES)}")
    names = []
    for name, module in unet.named_modules():
        if not isinstance(module, torch.nn.Linear) or not name.endswith(ATTENTION_PROJECTIONS):
            continue
        if not any(name == p or name.endswith("." + p) for p in ATTENTION_PROJECTIONS):
            continue
        motion = ".motion_modules." in f".{name}"
        if scope == "all" or (scope == "motion") == motion:
            names.append(name)
    return names


class AnimateDiffPolicy(DiffusionPolicy):
    """AnimateDiff components behind the UNet policy (see this module and :class:`DiffusionPolicy`): latents
    ``[B, C, F, h, w]``, videos ``[B, T, 3, H, W]`` in [0, 1]."""

    modality = "video"
    #: the VAE decodes each frame apart: :meth:`decode` can decode some frames only (``reward_frames``)
    decodes_frames_apart = True
    lora_layers_key = "unet_lora_layers"
    block_class = "BasicTransformerBlock"

    def __init__(self, components: dict[str, Any], folder: Path, num_frames: int = DEFAULT_NUM_FRAMES):
        from diffusers import UNetMotionModel

        if not isinstance(components["unet"], UNetMotionModel):
            got = type(components["unet"]).__name__
            raise WeightsError(f"{folder}: AnimateDiff needs a UNetMotionModel, got {got}")
        super().__init__(components, folder)
        if self.is_sdxl:
            raise WeightsError(f"{folder}: SDXL AnimateDiff (AnimateDiffSDXLPipeline) is not supported")
        self.num_frames = num_frames

    # -- frames --------------------------------------------------------------------------------------------
    @property
    def max_frames(self) -> int:
        """The motion modules' longest clip (their positional embeddings: ``motion_max_seq_length``)."""
        return int(self.unet.config.get("motion_max_seq_length") or 32)

    @property
    def num_frames(self) -> int:
        """Frames per video of :meth:`latent_shape` (1 … :attr:`max_frames`)."""
        return self._num_frames

    @num_frames.setter
    def num_frames(self, frames: int) -> None:
        self._num_frames = self.check_frames(frames)

    def check_frames(self, frames: int) -> int:
        frames = int(frames)
        if not 1 <= frames <= self.max_frames:
            raise ValueError(
                f"AnimateDiff makes 1 to {self.max_frames} frames (its motion modules' motion_max_seq_length); "
                f"got {frames}"
            )
        return frames

    # -- loading -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        device: str | torch.device = "cpu",
        num_frames: int | None = None,
        motion_adapter: str | Path | None = None,
    ) -> AnimateDiffPolicy:
        """An ``AnimateDiffPipeline`` folder or hub id (``unet`` a ``UNetMotionModel``, or an SD UNet with the
        folder's ``motion_adapter``), or with ``motion_adapter`` given an SD 1.x pipeline folder plus that
        ``MotionAdapter`` (folder or hub id). ``num_frames``: default the folder's ``mmalign_generator.json``, else
        16."""
        from diffusers import AutoencoderKL, DDPMScheduler, MotionAdapter, UNet2DConditionModel, UNetMotionModel
        from transformers import AutoTokenizer, CLIPTextModel

        from ..hub import resolve_dir
        from .generator import read_model_index
        from .sd3 import read_generator_config

        folder = resolve_dir(str(model), default_repo=str(model), what="diffusion pipeline")
        index = read_model_index(folder)
        name = index.get("_class_name")
        if name not in ("AnimateDiffPipeline", "StableDiffusionPipeline"):
            raise WeightsError(f"{folder}: AnimateDiff loads an AnimateDiffPipeline or SD 1.x folder, not {name}")
        if name == "StableDiffusionPipeline" and motion_adapter is None:
            raise WeightsError(f"{folder}: a StableDiffusionPipeline folder needs motion_adapter= for AnimateDiff")
        unet_class = (index.get("unet") or [None, None])[1]
        if unet_class == "UNetMotionModel" and motion_adapter is None:
            unet = UNetMotionModel.from_pretrained(folder, subfolder="unet")
        elif unet_class in ("UNet2DConditionModel", "UNetMotionModel"):
            if motion_adapter is not None:
                adapter_dir = resolve_dir(str(motion_adapter), default_repo=str(motion_adapter), what="motion adapter")
                adapter = MotionAdapter.from_pretrained(adapter_dir)
            elif (index.get("motion_adapter") or [None, None])[1] == "MotionAdapter":
                adapter = MotionAdapter.from_pretrained(folder, subfolder="motion_adapter")
            else:
                raise WeightsError(f"{folder}: an SD UNet without a motion_adapter is not an AnimateDiff model")
            if unet_class == "UNetMotionModel":  # another adapter's motion modules over this folder's UNet
                unet = UNetMotionModel.from_pretrained(folder, subfolder="unet")
                unet.load_motion_modules(adapter)
            else:
                unet2d = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
                unet = UNetMotionModel.from_unet2d(unet2d, adapter)
        else:
            raise WeightsError(f"{folder}: unsupported AnimateDiff unet class {unet_class!r}")
        components: dict[str, Any] = {
            "unet": unet,
            "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae"),
            "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
            "tokenizer": AutoTokenizer.from_pretrained(str(folder), subfolder="tokenizer"),
            "noise_scheduler": DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
        }
        if num_frames is None:
            num_frames = int(read_generator_config(folder).get("num_frames", DEFAULT_NUM_FRAMES))
        policy = cls(components, folder, num_frames=num_frames)
        policy.to(device)
        return policy

    @property
    def family(self) -> str:
        return "animatediff"

    @property
    def pipeline_class(self) -> type:
        import diffusers

        return diffusers.AnimateDiffPipeline

    # -- LoRA ----------------------------------------------------------------------------------------------
    @property
    def lora_targets(self) -> tuple[str, ...]:
        """The default LoRA targets: the motion modules' attention projections (module names)."""
        return tuple(lora_modules(self.unet, "motion"))

    def resolve_lora_targets(self, targets: Iterable[str]) -> list[str]:
        """``lora_targets`` entries with the scopes of :data:`ANIMATEDIFF_LORA_SCOPES` expanded into module names
        (other entries kept as peft target names)."""
        out: list[str] = []
        for target in targets:
            out.extend(lora_modules(self.unet, target) if target in ANIMATEDIFF_LORA_SCOPES else [target])
        return list(dict.fromkeys(out))

    # -- latents -------------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, height: int, width: int, frames: int | None = None) -> tuple[int, int, int, int]:
        """``(C, F, h, w)`` of a ``frames``-frame (default :attr:`num_frames`) ``height×width`` video."""
        frames = self.num_frames if frames is None else self.check_frames(frames)
        factor = self.vae_scale_factor
        return int(self.unet.config.in_channels), frames, height // factor, width // factor

    def _frames_of(self, pixels: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` (one-frame clips) or videos ``[B, T, 3, H, W]`` → frames ``[B, T, 3, H, W]``."""
        if pixels.ndim == 4:
            return pixels.unsqueeze(1)
        if pixels.ndim == 5:
            self.check_frames(pixels.shape[1])
            return pixels
        raise ValueError(f"expected images [B, 3, H, W] or videos [B, T, 3, H, W], got {tuple(pixels.shape)}")

    @torch.no_grad()
    def latent_distribution(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """The VAE posterior ``(mean, std)`` (float32, ``[B, C, T, h, w]`` each) of videos ``[B, T, 3, H, W]``
        (each frame encoded apart) or images ``[B, 3, H, W]`` (one-frame clips) in [-1, 1]."""
        frames = self._frames_of(pixels)
        batch, count = frames.shape[:2]
        mean, std = super().latent_distribution(frames.flatten(0, 1))
        unflat = lambda x: x.unflatten(0, (batch, count)).transpose(1, 2)  # noqa: E731
        return unflat(mean), unflat(std)

    def decode(self, latents: Tensor, grad: bool = False, frames: Sequence[int] | Tensor | None = None) -> Tensor:
        """Latents ``[B, C, F, h, w]`` → videos ``[B, T, 3, H, W]`` in [0, 1] (the pipeline's ``decode_latents``:
        each frame through the VAE, in chunks of 16 frames, then ``x/2 + 0.5`` clamped); ``frames``: only these
        frame indices (``T = len(frames)``); ``grad=True`` keeps the graph."""
        if latents.ndim != 5:
            raise ValueError(f"AnimateDiff latents are [B, C, F, h, w], got {tuple(latents.shape)}")
        if frames is not None:
            latents = latents[:, :, torch.as_tensor(frames, dtype=torch.long, device=latents.device)]
        batch, count = latents.shape[0], latents.shape[2]
        flat = latents.transpose(1, 2).flatten(0, 1).to(self.vae.dtype) / self.scaling_factor
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            chunks = [
                self.vae.decode(flat[i : i + DECODE_CHUNK_SIZE]).sample for i in range(0, len(flat), DECODE_CHUNK_SIZE)
            ]
            video = torch.cat(chunks).float().unflatten(0, (batch, count))
            return (video / 2 + 0.5).clamp(0, 1)

    # -- the network ---------------------------------------------------------------------------------------
    def predict(
        self,
        unet: torch.nn.Module,
        noisy: Tensor,
        timesteps: Tensor,
        embeds: PromptEmbeds,
        time_ids: Tensor | None = None,
    ) -> Tensor:
        """The ``UNetMotionModel``'s output at ``noisy [B, C, F, h, w]``: the text embeddings repeated for each of
        the ``F`` frames (``repeat_interleave``, as the pipeline), in float32."""
        if noisy.ndim != 5:
            raise ValueError(f"AnimateDiff latents are [B, C, F, h, w], got {tuple(noisy.shape)}")
        dtype = next(unet.parameters()).dtype
        hidden = embeds.hidden.to(dtype).repeat_interleave(noisy.shape[2], dim=0)
        return unet(noisy.to(dtype), timesteps, encoder_hidden_states=hidden).sample.float()

    # -- pipelines ----------------------------------------------------------------------------------------
    def pipeline(self, unet: torch.nn.Module | None = None):
        """An ``AnimateDiffPipeline`` over these components (a DDIM sampler of the folder's scheduler settings;
        ``set_alpha_to_one`` False, SD's and the DDIM chains' setting, unless the folder sets it) for validation
        videos and saving."""
        from diffusers import AnimateDiffPipeline, DDIMScheduler

        config = dict(self.noise_scheduler.config)
        config.setdefault("set_alpha_to_one", False)
        return AnimateDiffPipeline(
            vae=self.vae,
            text_encoder=self.text_encoders[0],
            tokenizer=self.tokenizers[0],
            unet=unet if unet is not None else self.unet,
            motion_adapter=None,
            scheduler=DDIMScheduler.from_config(config),
        )

    def pipeline_call_options(self) -> dict[str, Any]:
        """Keyword arguments of ``AnimateDiffPipeline.__call__`` that make it sample what this policy samples."""
        return {"num_frames": self.num_frames}
