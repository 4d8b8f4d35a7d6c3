"""The learned rewards of the toy video, audio and multi-view worlds: tiny CLIPs over each modality's canonical tensor.

``toyworld-video``, ``toyworld-audio`` and ``toyworld-multiview`` (``assets/toyworld/{video,audio,multiview}_reward``,
trained by :mod:`mmalign.toyworld.train_media_reward` to rank media of one prompt as the world's exact judge does) are
plain ``transformers`` ``CLIPModel`` folders with a tokenizer reduced to the world's words and an
``mmalign_reward.json`` that says how the modality's canonical tensor becomes the vision tower's 32 px input
(:func:`media_pixels`):

* ``"stack"`` (videos ``[B, T, 3, H, W]``, view sets ``[B, V, 3, H, W]`` in [0, 1]): frames / views resized to 32 px
  (bilinear) and stacked on the channel axis, ``[B, 3·T, 32, 32]`` scaled to [-1, 1]: the first layer sees every
  frame (motion) or every view (what goes round) at once;
* ``"spectrogram"`` (audio ``[B, C, S]`` in [-1, 1]): channels averaged, resampled to the world's 4 kHz (linear),
  padded or cut to 4096 samples, the log-magnitude of a 128-sample STFT (Hann window, hop 128: 32 ms frames),
  frequency bins 2-33 (62-1031 Hz, the world's pitches) by the first 32 frames: ``[B, 1, 32, 32]``.

The score is the cosine of the two towers' projections, differentiable in the media (every transform is torch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..rewards.base import Reward
from .world import CANVAS

CONFIG_NAME = "mmalign_reward.json"
#: the spectrogram input: STFT size = hop (samples), the first frequency bin kept, the clip length (samples)
N_FFT, FIRST_BIN, SAMPLES = 128, 2, 4096
LOG_FLOOR, LOG_SHIFT, LOG_SCALE = 1e-3, 2.0, 3.0


def stack_pixels(media: torch.Tensor, count: int) -> torch.Tensor:
    """``[B, N, 3, H, W]`` in [0, 1] -> ``[B, 3·N, 32, 32]`` in [-1, 1] (frames or views side by side on the channel
    axis)."""
    if media.ndim != 5 or media.shape[1] != count or media.shape[2] != 3:
        raise ValueError(f"expected [B, {count}, 3, H, W], got {tuple(media.shape)}")
    flat = media.flatten(0, 1).float()
    if flat.shape[-2:] != (CANVAS, CANVAS):
        flat = F.interpolate(flat, size=(CANVAS, CANVAS), mode="bilinear", align_corners=False, antialias=True)
    return flat.reshape(media.shape[0], 3 * count, CANVAS, CANVAS) * 2 - 1


def spectrogram_pixels(audio: torch.Tensor, sample_rate: int, world_rate: int) -> torch.Tensor:
    """``[B, C, S]`` (or ``[B, S]``) at ``sample_rate`` -> the normalised log-magnitude spectrogram ``[B, 1, 32, 32]``
    (see the module docstring)."""
    if audio.ndim == 2:
        audio = audio[:, None]
    if audio.ndim != 3:
        raise ValueError(f"expected audio [B, C, S], got {tuple(audio.shape)}")
    mono = audio.float().mean(dim=1, keepdim=True)
    if sample_rate != world_rate:
        size = max(1, round(mono.shape[-1] * world_rate / sample_rate))
        mono = F.interpolate(mono, size=size, mode="linear", align_corners=False)
    mono = F.pad(mono[..., :SAMPLES], (0, max(0, SAMPLES - mono.shape[-1])))[:, 0]
    window = torch.hann_window(N_FFT, device=mono.device)
    spectrum = torch.stft(mono, N_FFT, hop_length=N_FFT, window=window, center=True, return_complex=True)
    logmag = (torch.log(spectrum.abs() + LOG_FLOOR) + LOG_SHIFT) / LOG_SCALE
    return logmag[:, FIRST_BIN : FIRST_BIN + CANVAS, :CANVAS][:, None]


def media_pixels(media: torch.Tensor, config: dict[str, Any], sample_rate: int | None = None) -> torch.Tensor:
    """The vision tower's input of ``media`` under a reward folder's ``config`` (``mmalign_reward.json``)."""
    if config["input"] == "stack":
        return stack_pixels(media, int(config["count"]))
    if config["input"] == "spectrogram":
        return spectrogram_pixels(media, int(sample_rate or config["sample_rate"]), int(config["sample_rate"]))
    raise ValueError(f"unknown input {config['input']!r} in {CONFIG_NAME}")


class ToyMediaReward(Reward):
    """A toy world's learned reward (see the module docstring): cosine of a tiny ``CLIPModel`` over the media's
    stacked frames / views or spectrogram; differentiable."""

    name = "toyworld-media"
    world: ClassVar[str] = ""
    score_scale: ClassVar[str] = "cosine in [-1, 1]; only differences between media of one prompt are meaningful"

    def __init__(self, model: Any, tokenizer: Any, config: dict[str, Any]):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.config = config

    @classmethod
    def from_pretrained(
        cls, weights: str | None = None, device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32", **_: Any
    ) -> ToyMediaReward:
        """``weights``: a reward folder (default: the shipped ``assets/toyworld/<world>_reward``)."""
        from transformers import CLIPModel, CLIPTokenizer

        from ..errors import ConfigError
        from ..rewards.base import resolve_dtype
        from .sampling import asset_dir

        folder = Path(weights) if weights else asset_dir(f"{cls.world}_reward")
        config_file = folder / CONFIG_NAME
        if not config_file.is_file():
            raise ConfigError(f"{folder} is not a toy world reward folder: no {CONFIG_NAME}")
        config = json.loads(config_file.read_text())
        if cls.world and config.get("world") != cls.world:
            raise ConfigError(f"{folder} holds the {config.get('world')} world's reward, not the {cls.world} world's")
        model = CLIPModel.from_pretrained(str(folder), dtype=torch.float32)
        reward = cls(model, CLIPTokenizer.from_pretrained(str(folder)), config)
        return reward.to(device=device, dtype=resolve_dtype(dtype))

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        from ..rewards.clip import _features

        tokens = self.tokenizer(prompts, padding=True, return_tensors="pt").to(self.device)
        out = self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        return F.normalize(_features(out).float(), dim=-1)

    def media_features(self, pixels: torch.Tensor) -> torch.Tensor:
        from ..rewards.clip import _features

        out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        return F.normalize(_features(out).float(), dim=-1)

    def score_tensor(self, media: torch.Tensor, prompts=None, sample_rate: int | None = None) -> torch.Tensor:
        """Scores ``[B]`` of the modality's canonical tensors (``sample_rate``: of audio; default the world's)."""
        from ..rewards.base import broadcast_prompts

        pixels = media_pixels(media, self.config, sample_rate)
        prompts = broadcast_prompts(prompts, pixels.shape[0])
        return (self.media_features(pixels) * self.text_features(list(prompts))).sum(-1)

    def forward(self, media: torch.Tensor, prompts=None, sample_rate: int | None = None) -> torch.Tensor:
        return self.score_tensor(media, prompts, sample_rate)

    def score(self, media, prompts=None, batch_size: int = 32, sample_rate: int | None = None) -> torch.Tensor:
        if not isinstance(media, torch.Tensor):
            raise TypeError(f"{self.name} scores {self.modality} tensors (the modality's canonical layout)")
        with torch.no_grad():
            return torch.cat(
                [
                    self.score_tensor(media[i : i + batch_size], _rows(prompts, i, batch_size), sample_rate)
                    for i in range(0, media.shape[0], batch_size)
                ]
            )


def _rows(prompts, start: int, size: int):
    return prompts if prompts is None or isinstance(prompts, str) else list(prompts)[start : start + size]


class VideoMediaReward(ToyMediaReward):
    """``toyworld-video``: the toy video world's learned reward on videos ``[B, 5, 3, H, W]`` in [0, 1]."""

    name = "toyworld-video"
    world = "video"
    modality: ClassVar[str] = "video"


class AudioMediaReward(ToyMediaReward):
    """``toyworld-audio``: the toy audio world's learned reward on audio ``[B, C, S]`` in [-1, 1]."""

    name = "toyworld-audio"
    world = "audio"
    modality: ClassVar[str] = "audio"


class MultiViewMediaReward(ToyMediaReward):
    """``toyworld-multiview``: the toy multi-view world's learned reward on view sets ``[B, 4, 3, H, W]`` in [0, 1]."""

    name = "toyworld-multiview"
    world = "multiview"
    modality: ClassVar[str] = "multiview"
