"""Ground-truth renderer: exact palette colours, no anti-aliasing, objects separated by a gap.

``layout`` places the objects a prompt asks for (each wholly inside the prompted half, at least ``GAP``
pixels apart); ``draw`` rasterises any list of objects. Both are pure functions of their arguments.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from .world import BACKGROUND, CANVAS, COLORS, Prompt

GAP = 3
MARGIN = 1
SIZES = (7, 8, 9, 10)


@dataclass(frozen=True)
class Item:
    """One object: ``shape`` of ``color`` in the ``size`` x ``size`` box whose top-left pixel is ``(x, y)``."""

    shape: str
    color: str
    x: int
    y: int
    size: int


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean ``[size, size]`` mask: a filled square, a disc, or an upward isosceles triangle (the judge's
    templates, :func:`mmalign.toyworld.judge.templates`)."""
    from .judge import templates

    if shape not in ("circle", "square", "triangle"):
        raise ValueError(f"unknown shape {shape!r}")
    return templates(size, size)[shape]


def region(position: str, canvas: int = CANVAS) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` (exclusive ends) of the half a position names, less ``MARGIN`` on every side."""
    half = canvas // 2
    boxes = {
        "left": (0, 0, half, canvas),
        "right": (half, 0, canvas, canvas),
        "top": (0, 0, canvas, half),
        "bottom": (0, half, canvas, canvas),
    }
    x0, y0, x1, y1 = boxes[position]
    return x0 + MARGIN, y0 + MARGIN, x1 - MARGIN, y1 - MARGIN


def _apart(a: Item, b: Item, gap: int) -> bool:
    return (
        a.x + a.size + gap <= b.x or b.x + b.size + gap <= a.x or a.y + a.size + gap <= b.y or b.y + b.size + gap <= a.y
    )


def layout(prompt: Prompt, rng: random.Random, canvas: int = CANVAS, tries: int = 200) -> list[Item]:
    """Objects that satisfy ``prompt``: random sizes and places inside the prompted half, ``GAP`` apart."""
    x0, y0, x1, y1 = region(prompt.position, canvas)
    for _ in range(tries):
        items: list[Item] = []
        for _ in range(prompt.count):
            size = rng.choice(SIZES if prompt.count < 3 else SIZES[:3])
            for _ in range(50):
                item = Item(prompt.shape, prompt.color, rng.randint(x0, x1 - size), rng.randint(y0, y1 - size), size)
                if all(_apart(item, other, GAP) for other in items):
                    items.append(item)
                    break
        if len(items) == prompt.count:
            return items
    raise RuntimeError(f"could not lay out {prompt.text!r} on a {canvas} px canvas")


def draw(items: list[Item], canvas: int = CANVAS) -> np.ndarray:
    """``uint8 [canvas, canvas, 3]``: the items in their palette colours on the background."""
    image = np.empty((canvas, canvas, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for item in items:
        mask = shape_mask(item.shape, item.size)
        ys, xs = np.nonzero(mask)
        ys, xs = ys + item.y, xs + item.x
        keep = (ys >= 0) & (ys < canvas) & (xs >= 0) & (xs < canvas)
        image[ys[keep], xs[keep]] = COLORS[item.color]
    return image


def render(prompt: Prompt, seed: int | random.Random = 0, canvas: int = CANVAS) -> np.ndarray:
    """A ground-truth image of ``prompt`` (``uint8 [canvas, canvas, 3]``), the same for the same seed."""
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    return draw(layout(prompt, rng, canvas), canvas)
