"""Multi-view generation as one image grid: any image generator whose images split into V views by a grid layout.

Zero123++ (SUDO-AI-3D/zero123plus) generates 6 views as one 3x2 image, Instant3D 4 views as 2x2: the generator
itself is an ordinary image model, and what makes the output multi-view is how it is read. :class:`ViewGridGenerator`
wraps any generator of :mod:`mmalign.models.generator` (UNet or flow-matching) with a registered grid layout
(``"RxC"``, row-major, as :func:`mmalign.modalities.multiview.split_grid` reads a grid file for ``mmalign score
--grid``): it decodes to the canonical multi-view tensor ``[B, V, 3, H/R, W/C]`` and declares ``modality =
"multiview"``, so the trainers lift image rewards to per-view scores with cross-view consistency
(:class:`~mmalign.rewards.lifted.MultiviewReward`) and multi-view rewards score it unchanged. Everything else
(conditioning, prediction, sampling, LoRA targets, saving) is the wrapped generator's: the trained LoRA loads into
its diffusers pipeline as it is.
"""

from __future__ import annotations

from typing import Any

import torch

from ..modalities.multiview import parse_grid


def split_views(images: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``[B, 3, H, W]`` grid images -> ``[B, rows·cols, 3, H/rows, W/cols]`` views, row-major (differentiable)."""
    batch, channels, height, width = images.shape
    if height % rows or width % cols:
        raise ValueError(f"{height}x{width} images do not split into a {rows}x{cols} grid of equal views")
    tiles = images.reshape(batch, channels, rows, height // rows, cols, width // cols)
    return tiles.permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * cols, channels, height // rows, width // cols)


class ViewGridGenerator:
    """An image generator read as ``rows x cols`` views (see the module docstring); attributes it does not
    define are the wrapped generator's."""

    modality = "multiview"

    def __init__(self, generator: Any, grid: str | tuple[int, int]):
        if getattr(generator, "modality", "image") != "image":
            raise ValueError(f"a view grid needs an image generator; {type(generator).__name__} makes "
                             f"{generator.modality}s")  # fmt: skip
        self.generator = generator
        self.rows, self.cols = parse_grid(grid)

    @property
    def views(self) -> int:
        return self.rows * self.cols

    @property
    def grid(self) -> str:
        return f"{self.rows}x{self.cols}"

    def decode(self, latents: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The wrapped generator's images, split into views: ``[B, V, 3, h, w]`` in [0, 1]."""
        return split_views(self.generator.decode(latents, *args, **kwargs), self.rows, self.cols)

    def __getattr__(self, name: str) -> Any:
        if name == "generator":  # not set yet (e.g. during copy): no recursion
            raise AttributeError(name)
        return getattr(self.generator, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("generator", "rows", "cols") or name in type(self).__dict__:
            object.__setattr__(self, name, value)
        else:  # settings such as num_frames or scheduler changes belong to the wrapped generator
            setattr(self.generator, name, value)
