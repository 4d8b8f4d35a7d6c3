"""The reward protocol shared by every modality.

A reward is an ``nn.Module`` with two faces:

* ``reward(images, prompts)`` / ``reward.score_tensor`` on a canonical batch ``[B, 3, H, W]`` in [0, 1]:
  differentiable preprocessing and model, for trainers that backpropagate through the reward;
* ``reward.score(paths_or_pil_images, prompts)``: each reference repo's own preprocessing on decoded images,
  batched, under ``no_grad``; equal to the reference scores on the same weights.

Two-tower rewards (CLIP-like) split ``encode_text`` and ``encode_image`` and cache normalised text features
per prompt string, so K images of one prompt cost one text encoding.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import ClassVar

import torch
from PIL import Image
from torch import nn

from ..modalities.image import broadcast_prompts, check_image_batch, open_image

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {value: key for key, value in DTYPES.items()}

ImageLike = Image.Image | str | os.PathLike


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None


class Reward(nn.Module):
    """Base class: subclasses define the two preprocessing paths and :meth:`score_pixels`."""

    name: str = "reward"
    modality: ClassVar[str] = "image"
    higher_is_better: ClassVar[bool] = True
    is_differentiable: ClassVar[bool] = True
    uses_prompt: ClassVar[bool] = True
    score_scale: ClassVar[str] = ""
    #: the device map of a model spread over devices at load (``device_map=``, :func:`mmalign.memory.place_module`):
    #: inputs go to its :func:`~mmalign.memory.execution_device`, and ``.to()`` keeps the placement
    placement: dict | None = None

    # -- to implement -------------------------------------------------------------------------------------
    def preprocess_reference(self, image: Image.Image) -> torch.Tensor:
        """The reference repo's preprocessing of one decoded RGB image -> model input ``[3, h, w]``."""
        raise NotImplementedError

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable preprocessing of ``[B, 3, H, W]`` in [0, 1] -> model input."""
        raise NotImplementedError

    def score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Model input (already preprocessed) -> float32 scores ``[B]``."""
        raise NotImplementedError

    def preprocess_reference_batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """:meth:`preprocess_reference` of several decoded images, stacked ``[B, 3, h, w]``; a reward whose
        reference preprocessor takes a list in one call (transformers' image processors) overrides it."""
        return torch.stack([self.preprocess_reference(image) for image in images])

    # -- shared -----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        if self.placement is not None:
            from ..memory import execution_device

            return execution_device(self.placement)
        for tensor in self.parameters():
            return tensor.device
        return torch.device("cpu")

    def to(self, *args, **kwargs):
        """``nn.Module.to``, except for a model placed across devices at load, which stays where it was placed."""
        if self.placement is not None:
            return self
        return super().to(*args, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        for tensor in self.parameters():
            return tensor.dtype
        return torch.float32

    def info(self) -> dict[str, object]:
        """What a score means: used in JSONL output and leaderboards."""
        return {
            "reward": self.name,
            "modality": self.modality,
            "higher_is_better": self.higher_is_better,
            "is_differentiable": self.is_differentiable,
            "scale": self.score_scale,
            "dtype": DTYPE_NAMES.get(self.dtype, str(self.dtype)),
        }

    def _to_model(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.to(device=self.device, dtype=self.dtype)

    def score_tensor(self, images: torch.Tensor, prompts: str | Sequence[str] | None = None) -> torch.Tensor:
        """Differentiable scores of a canonical batch ``[B, 3, H, W]`` in [0, 1]."""
        images = check_image_batch(images)
        prompts = broadcast_prompts(prompts, images.shape[0])
        return self.score_pixels(self.preprocess_tensor(images.to(self.device)), prompts)

    def forward(self, images: torch.Tensor, prompts: str | Sequence[str] | None = None) -> torch.Tensor:
        return self.score_tensor(images, prompts)

    @torch.no_grad()
    def score_images(
        self,
        images: Sequence[ImageLike],
        prompts: str | Sequence[str] | None = None,
        batch_size: int = 32,
    ) -> torch.Tensor:
        """Scores of files or Pillow images, preprocessed exactly as the reference, ``batch_size`` at a time."""
        prompts = broadcast_prompts(prompts, len(images))
        scores = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixels = self.preprocess_reference_batch([self._decode(item) for item in chunk])
            scores.append(self.score_pixels(pixels, prompts[start : start + batch_size]).float().cpu())
        return torch.cat(scores) if scores else torch.empty(0)

    def score(
        self,
        images: torch.Tensor | Sequence[ImageLike] | ImageLike,
        prompts: str | Sequence[str] | None = None,
        batch_size: int = 32,
    ) -> torch.Tensor:
        """Scores ``[B]``: differentiable on tensors, reference preprocessing on paths / Pillow images."""
        if isinstance(images, torch.Tensor):
            return self.score_tensor(images, prompts)
        if isinstance(images, (Image.Image, str, os.PathLike)):
            images = [images]
        return self.score_images(list(images), prompts, batch_size)

    @staticmethod
    def _decode(item: ImageLike) -> Image.Image:
        return item if isinstance(item, Image.Image) else open_image(item)


class TwoTowerReward(Reward):
    """A reward from the similarity of separately encoded text and image features (CLIP family)."""

    text_cache_size: int = 4096

    def __init__(self) -> None:
        super().__init__()
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Raw (unnormalised) text features ``[N, D]`` of distinct prompts."""
        raise NotImplementedError

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) image features ``[B, D]`` of preprocessed pixels."""
        raise NotImplementedError

    def similarity_to_score(self, cosine: torch.Tensor) -> torch.Tensor:
        return cosine

    def _apply(self, fn, recurse=True):  # .to()/.half() change features: drop the cache
        self._text_cache.clear()
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised float32 text features ``[N, D]``, computed once per distinct prompt string, each prompt
        alone: BLAS kernels round differently for different batch sizes, and features must not depend on which
        prompts shared a batch when the cache was filled (exact resume, equal scores in any order)."""
        for prompt in dict.fromkeys(prompts):
            if prompt in self._text_cache:
                continue
            feature = self._encode_text([prompt]).float()[0]
            self._text_cache[prompt] = feature / feature.norm()
            if len(self._text_cache) > self.text_cache_size:
                self._text_cache.popitem(last=False)
        return torch.stack([self._text_cache[p] for p in prompts])

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 image features ``[B, D]`` (differentiable)."""
        features = self._encode_image(self._to_model(pixels)).float()
        return features / features.norm(dim=-1, keepdim=True)

    def score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image_features = self.encode_image(pixels)
        text_features = self.encode_text(prompts).to(image_features.device)
        return self.similarity_to_score((image_features * text_features).sum(dim=-1))
