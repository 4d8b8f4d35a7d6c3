"""Image preprocessing of the published reward models, in two forms.

* The **reference path** reproduces each reference repo's own pipeline on a decoded Pillow image, so file
  scores equal the reference bit for bit (torchvision ``Resize``/``CenterCrop`` on PIL for CLIP/BLIP code;
  tensor letterboxing for HPSv2; transformers' PIL image processor for PickScore).
* The **tensor path** takes a canonical batch ``[B, 3, H, W]`` in [0, 1] and is differentiable, for trainers
  that backpropagate through a reward. It resizes floats instead of rounded uint8 pixels, so it agrees with the
  reference path to within a few 1e-3 in normalised pixel units (measured in the tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ..modalities.image import pil_to_tensor, to_rgb

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(images: torch.Tensor, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """Per-channel ``(x - mean) / std`` on ``[..., 3, H, W]``."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images - mean_t) / std_t


def letterbox_size(height: int, width: int, size: int) -> tuple[int, int]:
    """HPSv2's ``ResizeMaxSize``: scale the longest side to ``size``, each side rounded (Python ``round``)."""
    scale = size / float(max(height, width))
    return round(height * scale), round(width * scale)


def letterbox(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """Bicubic resize of the longest side to ``size`` then zero padding, left/top getting ``pad // 2``.

    Matches ``ResizeMaxSize`` in HPSv2's vendored open_clip ``transform.py`` (applied to a tensor in [0, 1],
    before normalisation; padding is 0 in pixel space). Works on ``[3, H, W]`` or ``[B, 3, H, W]``.
    """
    height, width = images.shape[-2:]
    new_h, new_w = letterbox_size(height, width, size)
    resized = TF.resize(images, [new_h, new_w], interpolation=InterpolationMode.BICUBIC, antialias=True)
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(resized, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)


def hps_reference(image: Image.Image, size: int = 224) -> torch.Tensor:
    """HPSv2's eval transform on one image: ToTensor -> letterbox -> OpenAI normalisation."""
    return normalize(letterbox(pil_to_tensor(image), size))


def hps_tensor(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """Differentiable HPSv2 preprocessing of a canonical batch (identical ops to the reference)."""
    return normalize(letterbox(images, size))


def clip_reference(image: Image.Image, size: int = 224) -> torch.Tensor:
    """OpenAI CLIP's ``_transform(n_px)`` (also ImageReward's and the aesthetic predictor's):
    PIL bicubic resize of the shortest side, centre crop, RGB, ToTensor, OpenAI normalisation."""
    resized = TF.resize(image, size, interpolation=InterpolationMode.BICUBIC)
    cropped = TF.center_crop(resized, [size, size])
    return normalize(pil_to_tensor(to_rgb(cropped)))


def resize_center_crop(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """Tensor version of shortest-side bicubic resize + centre crop (torchvision's size rules)."""
    resized = TF.resize(images, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(resized, [size, size])


def clip_tensor(images: torch.Tensor, size: int = 224, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """Differentiable CLIP preprocessing of a canonical batch."""
    return normalize(resize_center_crop(images, size), mean, std)
