"""Toyworld rewards behind the registry names ``toyworld`` (learned) and ``toyworld-judge`` (exact).

* ``toyworld``: the shipped tiny CLIP (``assets/toyworld/reward``) scored by cosine, trained by
  :mod:`mmalign.toyworld.train_reward` to rank images of one prompt as the judge does; differentiable.
* ``toyworld-judge``: the exact judge's ``overall`` adherence in [0, 1]; not differentiable (a verifiable reward).
* ``toyworld-video-judge``: the toy video world's exact judge (:mod:`~mmalign.toyworld.video_world`) on videos.
* ``toyworld-audio-judge``: the toy audio world's exact judge (:mod:`~mmalign.toyworld.audio_world`) on audio.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from ..rewards.base import Reward
from ..rewards.clip import CLIPReward
from .judge import judge
from .world import CANVAS


class ToyReward(CLIPReward):
    """The learned toyworld reward: cosine of a tiny ``CLIPModel`` (32 px, patch 4)."""

    name = "toyworld"
    default_repo = "assets/toyworld/reward"
    score_scale: ClassVar[str] = "cosine in [-1, 1]; only differences between images of one prompt are meaningful"

    @classmethod
    def from_pretrained(
        cls,
        weights: str | None = None,
        processor: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "fp32",
        **kwargs: Any,
    ) -> ToyReward:
        """``weights``: a CLIPModel folder (default: the shipped ``assets/toyworld/reward``)."""
        from .sampling import asset_dir

        weights = weights or str(asset_dir("reward"))
        return super().from_pretrained(weights, processor, device=device, dtype=dtype, **kwargs)  # type: ignore[return-value]


class JudgeReward(Reward):
    """The exact toyworld judge as a reward: ``overall`` adherence in [0, 1] (images resized to 32 px)."""

    name = "toyworld-judge"
    is_differentiable: ClassVar[bool] = False
    score_scale: ClassVar[str] = "mean of 4 binary attribute checks (colour, shape, count, position), in [0, 1]"

    @classmethod
    def from_pretrained(cls, **_: Any) -> JudgeReward:
        return cls()

    def preprocess_reference(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if image.size != (CANVAS, CANVAS):
            image = image.resize((CANVAS, CANVAS), Image.Resampling.NEAREST)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (CANVAS, CANVAS):
            images = torch.nn.functional.interpolate(images, size=(CANVAS, CANVAS), mode="nearest")
        return images

    def score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.tensor([judge(image, prompt).overall for image, prompt in zip(pixels, prompts)])


class FramesJudgeReward(Reward):
    """An exact judge of sequences of 32 px images (video frames, views) as a reward of ``[B, N, 3, H, W]`` in
    [0, 1]: :meth:`judge_one` (a world's judge) on each item, images resized to 32 px when they are not; not
    differentiable."""

    modality: ClassVar[str] = "video"
    is_differentiable: ClassVar[bool] = False
    layout: ClassVar[str] = "videos [B, T, 3, H, W]"

    @classmethod
    def from_pretrained(cls, **_: Any) -> FramesJudgeReward:
        return cls()

    @staticmethod
    def judge_one(item: torch.Tensor, prompt: str) -> Any: ...

    def score_tensor(self, media: torch.Tensor, prompts=None) -> torch.Tensor:
        """Scores ``[B]`` of ``[B, N, 3, H, W]`` in [0, 1]."""
        from ..rewards.base import broadcast_prompts

        if media.ndim != 5:
            raise ValueError(f"expected {self.layout}, got {tuple(media.shape)}")
        prompts = broadcast_prompts(prompts, media.shape[0])
        if media.shape[-2:] != (CANVAS, CANVAS):
            flat = torch.nn.functional.interpolate(media.flatten(0, 1), size=(CANVAS, CANVAS), mode="nearest")
            media = flat.view(*media.shape[:2], 3, CANVAS, CANVAS)
        return torch.tensor([self.judge_one(item, prompt).overall for item, prompt in zip(media.detach(), prompts)])

    def score(self, media, prompts=None, batch_size: int = 32) -> torch.Tensor:
        if not isinstance(media, torch.Tensor):
            raise TypeError(f"{self.name} scores tensors: {self.layout} in [0, 1]")
        return self.score_tensor(media, prompts)


class VideoJudgeReward(FramesJudgeReward):
    """The exact judge of the toy video world (:func:`mmalign.toyworld.video_world.judge_clip`) as a reward of
    videos ``[B, T, 3, H, W]`` in [0, 1]: ``overall`` adherence in [0, 1] (colour, shape and count per frame,
    direction of motion from the first frame to the last); not differentiable."""

    name = "toyworld-video-judge"
    score_scale: ClassVar[str] = "mean of colour, shape, count (fractions of frames) and direction checks, in [0, 1]"

    @staticmethod
    def judge_one(item: torch.Tensor, prompt: str) -> Any:
        from .video_world import judge_clip

        return judge_clip(item, prompt)


class MultiViewJudgeReward(FramesJudgeReward):
    """The exact judge of the toy multi-view world (:func:`mmalign.toyworld.multiview_world.judge_views`) as a reward
    of view sets ``[B, 4, 3, H, W]`` in [0, 1] (views at azimuths 0°, 90°, 180°, 270°): ``overall`` adherence in
    [0, 1] (body colour and shape per view, the dot where the prompt's side and each view's azimuth put it, and
    agreement of the body across views); not differentiable."""

    name = "toyworld-multiview-judge"
    modality: ClassVar[str] = "multiview"
    layout: ClassVar[str] = "view sets [B, V, 3, H, W]"
    score_scale: ClassVar[str] = "mean of colour, shape, dot and cross-view consistency (fractions of views), in [0, 1]"

    @staticmethod
    def judge_one(item: torch.Tensor, prompt: str) -> Any:
        from .multiview_world import judge_views

        return judge_views(item, prompt)


class AudioJudgeReward(Reward):
    """The exact judge of the toy audio world (:func:`mmalign.toyworld.audio_world.judge_audio`) as a reward of
    audio ``[B, C, S]`` in [-1, 1]: ``overall`` adherence in [0, 1] (pitch from the spectrum, count and tempo of the
    beeps from the envelope); not differentiable. Audio at another sample rate than the world's 4 kHz is resampled
    (linear interpolation) first."""

    name = "toyworld-audio-judge"
    modality: ClassVar[str] = "audio"
    is_differentiable: ClassVar[bool] = False
    score_scale: ClassVar[str] = "mean of the pitch, count and tempo checks, in [0, 1]"

    @classmethod
    def from_pretrained(cls, **_: Any) -> AudioJudgeReward:
        return cls()

    def score_tensor(self, audio: torch.Tensor, prompts=None, sample_rate: int | None = None) -> torch.Tensor:
        """Scores ``[B]`` of audio ``[B, C, S]`` (or ``[B, S]``) at ``sample_rate`` (default: the world's)."""
        from ..rewards.base import broadcast_prompts
        from .audio_world import SAMPLE_RATE, judge_audio

        if audio.ndim == 2:
            audio = audio[:, None]
        if audio.ndim != 3:
            raise ValueError(f"expected audio [B, C, S], got {tuple(audio.shape)}")
        prompts = broadcast_prompts(prompts, audio.shape[0])
        audio = audio.detach().float().mean(dim=1, keepdim=True)
        rate = int(sample_rate or SAMPLE_RATE)
        if rate != SAMPLE_RATE:
            size = max(1, round(audio.shape[-1] * SAMPLE_RATE / rate))
            audio = torch.nn.functional.interpolate(audio, size=size, mode="linear", align_corners=False)
        return torch.tensor([judge_audio(clip[0], prompt).overall for clip, prompt in zip(audio, prompts)])

    def score(self, audio, prompts=None, batch_size: int = 32, sample_rate: int | None = None) -> torch.Tensor:
        if not isinstance(audio, torch.Tensor):
            raise TypeError("toyworld-audio-judge scores audio tensors [B, C, S] in [-1, 1]")
        return self.score_tensor(audio, prompts, sample_rate)
