"""The toy multi-view world: one object seen from four azimuths, its prompt grammar, a renderer and an exact judge.

A prompt reads ``"a <colour> <shape> with a <colour> dot on its <side>"``, e.g. ``"a red circle with a blue dot on
its left"`` (4 body colours x 3 shapes x 3 dot colours (never the body's) x 4 sides = 144 prompts, split into train
/ held-out as the image world's). A sample is :data:`VIEWS` views of the image world's :data:`~mmalign.toyworld.
world.CANVAS` (32 px), the camera circling the object: view ``v`` looks from azimuth :data:`AZIMUTHS` ``[v]`` (0°,
90°, 180°, 270°), laid out as a 2x2 grid, row-major (:data:`GRID`: the grid convention of
:class:`mmalign.models.view_grid.ViewGridGenerator` and ``mmalign score --grid 2x2``).

* rendering (:func:`render_views`): the body (the image world's shapes and palette) stands in the middle of every
  view, the same size and place in all four (a random size of :data:`BODY_SIZES` and a small random offset per
  sample); the dot, a :data:`DOT` px square of its colour, floats :data:`~mmalign.toyworld.render.GAP` px above
  it. The dot sits on the body's ``side`` (front 0°, right 90°, back 180°, left 270°): a view whose camera faces
  that side shows it centred over the body, a view 90° away shows it over the body's right or left edge, and the
  view from the opposite side does not show it (:func:`dot_place`);
* judging (:func:`judge_views`): every view is segmented as the image judge segments an image (palette,
  8-connected components, template shapes); its largest object is the body, the others are dots. ``color`` and
  ``shape`` are the fractions of views whose body has the prompted colour / shape; ``dot`` the fraction of views
  whose dots are as the prompt's side and the view's azimuth want them (none where hidden; else exactly one, of
  the prompted colour, above the body and centred / left / right of it as :func:`dot_place` says, within a quarter
  of the body's width); ``consistency`` (agreement across views, whatever the prompt) the fraction of views whose
  body has the colour and shape of the most common body of the four and an area within
  :data:`AREA_TOLERANCE` of their median. ``overall`` is the mean of the four attributes, ``exact`` 1 when all
  four are 1.

All functions are pure: randomness comes from an explicit seed or ``random.Random``; numpy only (no torch).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, replace
from itertools import product
from typing import ClassVar

import numpy as np

from .judge import AttributeScores, Detection, detect, mean_scores, to_uint8
from .render import GAP, MARGIN, Item, draw
from .world import CANVAS, COLORS, SHAPES

VIEWS = 4
GRID = "2x2"
AZIMUTHS: tuple[int, ...] = (0, 90, 180, 270)
SIDES: dict[str, int] = {"front": 0, "right": 90, "back": 180, "left": 270}
MULTIVIEW_ATTRIBUTES: tuple[str, ...] = ("color", "shape", "dot", "consistency")
#: what a prompt states (the judge's ``consistency`` is no part of it)
PROMPT_ATTRIBUTES: tuple[str, ...] = ("color", "shape", "dot", "side")
BODY_SIZES = (10, 11, 12)
DOT = 4
AREA_TOLERANCE = 0.25

__all__ = [
    "AZIMUTHS",
    "GRID",
    "MULTIVIEW_ATTRIBUTES",
    "PROMPT_ATTRIBUTES",
    "SIDES",
    "VIEWS",
    "MultiViewPrompt",
    "MultiViewVerdict",
    "all_multiview_prompts",
    "corrupt_multiview",
    "dot_mask_grid",
    "dot_place",
    "join_grid",
    "judge_views",
    "mean_scores",
    "multiview_words",
    "parse_multiview_prompt",
    "perturb_multiview",
    "random_multiview_prompt",
    "render_grid",
    "render_views",
    "split_grid_views",
    "split_multiview_prompts",
]


@dataclass(frozen=True, order=True)
class MultiViewPrompt:
    """One toy multi-view prompt: the body's colour and shape, the dot's colour and the side it is on."""

    color: str
    shape: str
    dot: str
    side: str

    def __post_init__(self) -> None:
        if self.color not in COLORS or self.dot not in COLORS:
            raise ValueError(f"unknown colour in {self.color!r} / {self.dot!r}; known: {', '.join(COLORS)}")
        if self.dot == self.color:
            raise ValueError(f"the dot needs another colour than the body ({self.color})")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {', '.join(SHAPES)}")
        if self.side not in SIDES:
            raise ValueError(f"unknown side {self.side!r}; known: {', '.join(SIDES)}")

    @property
    def text(self) -> str:
        return f"a {self.color} {self.shape} with a {self.dot} dot on its {self.side}"

    def __str__(self) -> str:
        return self.text


def parse_multiview_prompt(text: str) -> MultiViewPrompt:
    """The :class:`MultiViewPrompt` a text states; raises ``ValueError`` on text outside the grammar."""
    words = text.strip().lower().split()
    if len(words) != 10 or [words[i] for i in (0, 3, 4, 6, 7, 8)] != ["a", "with", "a", "dot", "on", "its"]:
        raise ValueError(f"not a toy multi-view prompt: {text!r} (expected e.g. 'a red circle with a blue dot on its "
                         "left')")  # fmt: skip
    return MultiViewPrompt(words[1], words[2], words[5], words[9])


def multiview_words() -> list[str]:
    """Every word of the grammar (for a tokenizer reduced to it)."""
    return sorted({"a", "with", "dot", "on", "its", *COLORS, *SHAPES, *SIDES})


def all_multiview_prompts() -> list[MultiViewPrompt]:
    """Every prompt of the grammar (4 x 3 x 3 x 4 = 144), sorted."""
    return sorted(MultiViewPrompt(c, s, d, side) for c, s, d, side in product(COLORS, SHAPES, COLORS, SIDES) if d != c)


def split_multiview_prompts(heldout: int = 32, seed: int = 0) -> tuple[list[MultiViewPrompt], list[MultiViewPrompt]]:
    """A seeded ``(train, heldout)`` split of :func:`all_multiview_prompts`; ``heldout`` prompts are never trained
    on."""
    prompts = all_multiview_prompts()
    random.Random(seed).shuffle(prompts)
    return sorted(prompts[heldout:]), sorted(prompts[:heldout])


def random_multiview_prompt(rng: random.Random) -> MultiViewPrompt:
    color = rng.choice(list(COLORS))
    dot = rng.choice([c for c in COLORS if c != color])
    return MultiViewPrompt(color, rng.choice(SHAPES), dot, rng.choice(list(SIDES)))


def perturb_multiview(
    prompt: MultiViewPrompt, rng: random.Random, attributes: tuple[str, ...] | list[str]
) -> MultiViewPrompt:
    """``prompt`` with each named attribute replaced by a different random value; the dot keeps a colour other than
    the body's (a body that takes the dot's colour moves the dot to a colour neither had)."""
    choices = dict(zip(PROMPT_ATTRIBUTES, (tuple(COLORS), SHAPES, tuple(COLORS), tuple(SIDES))))
    for name in attributes:
        taken = {prompt.color} if name == "dot" else set()
        value = rng.choice([v for v in choices[name] if v != getattr(prompt, name) and v not in taken])
        if name == "color" and value == prompt.dot:
            prompt = replace(prompt, color=value, dot=rng.choice([c for c in COLORS if c not in (value, prompt.color)]))
        else:
            prompt = replace(prompt, **{name: value})
    return prompt


def corrupt_multiview(prompt: MultiViewPrompt, rng: random.Random, rate: float) -> MultiViewPrompt:
    """``prompt`` with each attribute independently replaced by a different value with probability ``rate`` (the
    noisy captions a generator is trained on, as :func:`mmalign.toyworld.world.corrupt`); the dot keeps a colour
    other than the body's."""
    changes: dict[str, str] = {}
    for name, values in (("color", tuple(COLORS)), ("shape", SHAPES), ("side", tuple(SIDES))):
        if rng.random() < rate:
            changes[name] = rng.choice([v for v in values if v != getattr(prompt, name)])
    color = changes.get("color", prompt.color)
    dot = prompt.dot
    if rng.random() < rate or dot == color:
        dot = rng.choice([c for c in COLORS if c not in (prompt.dot, color)])
    return replace(prompt, **changes, dot=dot)


# ------------------------------------------------------------------------------------------------ rendering


def dot_place(side: str, azimuth: int) -> str | None:
    """Where a view from ``azimuth`` shows a dot on the body's ``side``: ``"centre"`` (the camera faces that side),
    ``"right"`` / ``"left"`` (90° away), ``None`` (the opposite side: hidden)."""
    relative = (SIDES[side] - azimuth) % 360
    return {0: "centre", 90: "right", 180: None, 270: "left"}[relative]


def view_items(prompt: MultiViewPrompt, size: int, x: int, y: int, azimuth: int) -> list[Item]:
    """The body (top-left ``(x, y)``, ``size`` px) and, where visible from ``azimuth``, the dot above it."""
    items = [Item(prompt.shape, prompt.color, x, y, size)]
    place = dot_place(prompt.side, azimuth)
    if place is not None:
        centre = x + (size - 1) / 2 + {"centre": 0, "left": -1, "right": 1}[place] * (size // 2)
        items.append(Item("square", prompt.dot, round(centre - (DOT - 1) / 2), y - GAP - DOT, DOT))
    return items


def render_views(prompt: MultiViewPrompt | str, seed: int | random.Random = 0, canvas: int = CANVAS) -> np.ndarray:
    """The :data:`VIEWS` ground-truth views of ``prompt`` (``uint8 [V, canvas, canvas, 3]``), the same for the same
    seed: one body size and place for all views (the object does not change as the camera moves)."""
    prompt = parse_multiview_prompt(prompt) if isinstance(prompt, str) else prompt
    size, x, y = _placement(seed, canvas)
    return np.stack([draw(view_items(prompt, size, x, y, azimuth), canvas) for azimuth in AZIMUTHS])


def _placement(seed: int | random.Random, canvas: int) -> tuple[int, int, int]:
    """The body's size and top-left corner, drawn from ``seed`` (one draw per view set)."""
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    size = rng.choice(BODY_SIZES)
    half = size // 2
    # room for the dot over either edge (half a body width out) and above the body
    x = rng.randint(MARGIN + half, canvas - MARGIN - size - half)
    y = rng.randint(MARGIN + DOT + GAP + 4, canvas - MARGIN - size)
    return size, x, y


def dot_mask_grid(prompt: MultiViewPrompt | str, seed: int | random.Random = 0, canvas: int = CANVAS) -> np.ndarray:
    """``bool [2·canvas, 2·canvas]``: the dot's pixels in :func:`render_grid` of the same prompt and seed (the
    same draws from ``seed``) -- the small feature a pipeline's training loss can weigh up
    (:mod:`mmalign.toyworld.train_flow_pipeline`, ``feature_weight``)."""
    prompt = parse_multiview_prompt(prompt) if isinstance(prompt, str) else prompt
    size, x, y = _placement(seed, canvas)
    views = [draw(view_items(prompt, size, x, y, azimuth)[1:], canvas) for azimuth in AZIMUTHS]
    return (join_grid(np.stack(views)) != draw([], canvas)[0, 0]).any(-1)


def join_grid(views: np.ndarray, rows: int = 2, cols: int = 2) -> np.ndarray:
    """``uint8 [V, h, w, 3]`` views (row-major) -> the ``[rows·h, cols·w, 3]`` grid image."""
    count, height, width, channels = views.shape
    if count != rows * cols:
        raise ValueError(f"{count} views do not fill a {rows}x{cols} grid")
    return (
        views.reshape(rows, cols, height, width, channels)
        .transpose(0, 2, 1, 3, 4)
        .reshape(rows * height, cols * width, channels)
    )


def split_grid_views(grid: np.ndarray, rows: int = 2, cols: int = 2) -> np.ndarray:
    """The inverse of :func:`join_grid`: ``[rows·h, cols·w, 3]`` -> ``[V, h, w, 3]``."""
    height, width, channels = grid.shape[0] // rows, grid.shape[1] // cols, grid.shape[2]
    tiles = grid.reshape(rows, height, cols, width, channels).transpose(0, 2, 1, 3, 4)
    return tiles.reshape(-1, height, width, channels)


def render_grid(prompt: MultiViewPrompt | str, seed: int | random.Random = 0, canvas: int = CANVAS) -> np.ndarray:
    """:func:`render_views` as one 2x2 grid image ``uint8 [2·canvas, 2·canvas, 3]`` (what the generator draws)."""
    return join_grid(render_views(prompt, seed, canvas))


# ------------------------------------------------------------------------------------------------ judging


@dataclass(frozen=True)
class MultiViewVerdict(AttributeScores):
    """The judge's scores of one view set for one prompt (each a fraction of views)."""

    attributes: ClassVar[tuple[str, ...]] = MULTIVIEW_ATTRIBUTES

    color: float
    shape: float
    dot: float
    consistency: float
    objects: tuple[tuple[Detection, ...], ...]  # per view


def to_views(views) -> np.ndarray:
    """``uint8 [V, h, w, 3]`` from views (uint8 ``[V, h, w, 3]``, float in [0, 1] as ``[V, h, w, 3]`` or the
    canonical ``[V, 3, h, w]``) or from one 2x2 grid image (``[H, W, 3]`` / ``[3, H, W]``)."""
    if hasattr(views, "detach"):
        views = views.detach().cpu().numpy()
    views = np.asarray(views)
    if views.ndim == 3:
        return split_grid_views(to_uint8(views))
    if views.ndim != 4:
        raise ValueError(f"expected views [V, H, W, 3] / [V, 3, H, W] or a grid image, got shape {views.shape}")
    return np.stack([to_uint8(view) for view in views])


def dot_ok(body: Detection, dots: list[Detection], prompt: MultiViewPrompt, azimuth: int) -> bool:
    """Whether one view's dots are as ``prompt`` wants them from ``azimuth`` (see the module docstring)."""
    place = dot_place(prompt.side, azimuth)
    if place is None:
        return not dots
    if len(dots) != 1 or dots[0].color != prompt.dot or dots[0].cy >= body.cy:
        return False
    width = 2 * np.sqrt(body.area / np.pi) if body.shape == "circle" else np.sqrt(body.area)
    offset = dots[0].cx - body.cx
    seen = "centre" if abs(offset) <= width / 4 else ("right" if offset > 0 else "left")
    return seen == place


def judge_views(views, prompt: MultiViewPrompt | str) -> MultiViewVerdict:
    """Score one view set (``[V, h, w, 3]`` uint8, float ``[V, 3, h, w]`` in [0, 1], or a 2x2 grid image) against
    a prompt (a :class:`MultiViewPrompt` or its text)."""
    prompt = parse_multiview_prompt(prompt) if isinstance(prompt, str) else prompt
    images = to_views(views)
    if len(images) != VIEWS:
        raise ValueError(f"the toy multi-view world has {VIEWS} views, got {len(images)}")
    objects = tuple(detect(image) for image in images)
    bodies = [max(found, key=lambda o: o.area) if found else None for found in objects]
    color = shape = dot = 0.0
    for azimuth, found, body in zip(AZIMUTHS, objects, bodies):
        if body is None:
            continue
        color += body.color == prompt.color
        shape += body.shape == prompt.shape
        dot += dot_ok(body, [o for o in found if o is not body], prompt, azimuth)
    present = [b for b in bodies if b is not None]
    consistency = 0.0
    if present:
        common = Counter((b.color, b.shape) for b in present).most_common(1)[0][0]
        median = float(np.median([b.area for b in present]))
        consistency = sum(
            (b.color, b.shape) == common and abs(b.area - median) <= AREA_TOLERANCE * median for b in present
        )
    return MultiViewVerdict(
        color=color / VIEWS, shape=shape / VIEWS, dot=dot / VIEWS, consistency=consistency / VIEWS, objects=objects
    )


def judge_view_sets(view_sets, prompts) -> list[MultiViewVerdict]:
    """:func:`judge_views` over parallel sequences (a ``[B, V, 3, h, w]`` tensor in [0, 1] also works)."""
    return [judge_views(views, prompt) for views, prompt in zip(view_sets, prompts)]
