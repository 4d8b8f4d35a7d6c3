"""JPEG (in)compressibility, DDPO's non-differentiable rewards (Black et al. 2023, arXiv:2305.13301;
kvablack/ddpo-pytorch ``ddpo_pytorch/rewards.py``): the size in kB (bytes / 1000) of the image saved as
JPEG at quality 95; compressibility is minus that size. Tensors are rounded to uint8 first, as there."""

from __future__ import annotations

import io
from typing import Any, ClassVar

import torch
from PIL import Image

from ..errors import WeightsError
from ..modalities.image import check_image_batch, pil_to_tensor, tensor_to_pil
from .base import Reward

JPEG_QUALITY = 95


def jpeg_size_kb(image: Image.Image, quality: int = JPEG_QUALITY) -> float:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


class JpegReward(Reward):
    is_differentiable: ClassVar[bool] = False
    uses_prompt: ClassVar[bool] = False

    def __init__(self, sign: float = -1.0, quality: int = JPEG_QUALITY, weights: Any = None, **_: Any):
        super().__init__()
        if weights is not None:
            raise WeightsError("jpeg rewards have no weights; drop --weights")
        self.sign = float(sign)
        self.quality = quality
        self.name = "jpeg-compressibility" if self.sign < 0 else "jpeg-incompressibility"
        self.score_scale = ("-" if self.sign < 0 else "") + f"JPEG size in kB at quality {quality}"

    def preprocess_reference(self, image: Image.Image) -> torch.Tensor:
        return pil_to_tensor(image)

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = check_image_batch(pixels)
        sizes = [jpeg_size_kb(tensor_to_pil(image), self.quality) for image in pixels]
        return self.sign * torch.tensor(sizes, dtype=torch.float32)

    @torch.no_grad()
    def score_images(self, images, prompts=None, batch_size: int = 32) -> torch.Tensor:
        # Images of different sizes cannot be stacked: score each decoded image on its own.
        sizes = [jpeg_size_kb(self._decode(item), self.quality) for item in images]
        return self.sign * torch.tensor(sizes, dtype=torch.float32)
