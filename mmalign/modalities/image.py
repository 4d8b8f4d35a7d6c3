"""Images: decode files into RGB, with an error naming the file for anything unusable.

Canonical tensor: float ``[B, 3, H, W]`` in [0, 1], RGB. Mode conversion follows what the reference reward
code does (``PIL.Image.convert("RGB")``, so alpha is dropped, not composited), with two fixes the references
lack: 16-bit images are scaled to 8 bits instead of clipped, and oversized images are refused before any
pixel is decoded.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import MediaError
from . import DEFAULT_MAX_PIXELS

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        scaled = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if image.mode == "F":
        values = np.clip(np.round(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(values, mode="L").convert("RGB")
    return image.convert("RGB")


def open_image(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode one image file as RGB; raise :class:`MediaError` naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(path, "no such file" if not path.exists() else "not a regular file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, by our limit
            image = Image.open(path)
            width, height = image.size
            if width < 1 or height < 1:
                raise MediaError(path, f"empty image ({width}x{height})")
            if max_pixels is not None and width * height > max_pixels:
                raise MediaError(
                    path,
                    f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} "
                    "(a possible decompression bomb; raise max_pixels / --max-pixels to allow it)",
                )
            image.load()
    except MediaError:
        raise
    except Image.DecompressionBombError as error:
        raise MediaError(path, f"refused as a decompression bomb ({error})") from error
    except UnidentifiedImageError as error:
        raise MediaError(path, "not an image Pillow can identify (corrupt or unsupported format)") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise MediaError(path, f"cannot decode image ({error}); the file may be truncated or corrupt") from error
    return to_rgb(image)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB Pillow image -> float ``[3, H, W]`` in [0, 1] (the same values as torchvision's ``ToTensor``)."""
    array = np.asarray(to_rgb(image), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255.0)


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """float ``[3, H, W]`` in [0, 1] -> RGB Pillow image (rounded, clamped), as diffusers' ``numpy_to_pil``."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def list_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (non-recursive, sorted) into image paths; a missing path is an error."""
    found: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()))
        elif path.exists():
            found.append(path)
        else:
            raise MediaError(path, "no such file or folder")
    return found


def check_image_batch(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """Validate a canonical image batch ``[B, 3, H, W]`` (a single ``[3, H, W]`` gains a batch axis)."""
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name}: expected a float tensor [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor in [0, 1], got dtype {images.dtype}")
    return images


def broadcast_prompts(prompts: str | Sequence[str] | None, batch: int) -> list[str]:
    """One prompt for every image, or one per image; anything else is an error."""
    if prompts is None:
        return [""] * batch
    if isinstance(prompts, str):
        return [prompts] * batch
    prompts = list(prompts)
    if len(prompts) == 1:
        return prompts * batch
    if len(prompts) != batch:
        raise ValueError(f"got {len(prompts)} prompts for {batch} images; give one prompt or one per image")
    return prompts
