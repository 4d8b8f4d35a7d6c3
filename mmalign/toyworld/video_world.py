"""The toy video world: short clips of moving shapes, their prompt grammar, a ground-truth renderer and an exact judge.

A prompt reads ``"<count> <colour> <shape>[s] moving <direction>"``, e.g. ``"two red circles moving right"``
(4 colours x 3 shapes x 3 counts x 4 directions = 144 prompts, split into train / held-out as the image world's).
A clip is :data:`FRAMES` frames (5: Wan's ``(frames − 1) % 4 == 0``, two latent frames of its 4x temporal VAE) of
the image world's :data:`~mmalign.toyworld.world.CANVAS` (32 px). Colours, shapes, counts, the palette, the shape
masks, the rasteriser and the per-image detection are the image world's (:mod:`~mmalign.toyworld.world`,
:mod:`~mmalign.toyworld.render`, :mod:`~mmalign.toyworld.judge`); what is new is motion:

* rendering (:func:`render_clip`): the objects are placed (random sizes in :data:`SIZES`, :data:`~mmalign.toyworld.
  render.GAP` pixels apart, anywhere the whole motion keeps them on the canvas) and all move together at one
  speed of :data:`SPEEDS` pixels per frame in the prompted direction (so they never touch); the clip is a pure
  function of the prompt and the seed;
* judging (:func:`judge_clip`): every frame is judged as the image judge judges an image (palette segmentation,
  8-connected components, template shapes): ``color``, ``shape`` and ``count`` are the fractions of frames whose
  objects all have the prompted colour / shape and whose object count is the prompted one. ``direction`` is 1 when
  the centroid of the objects moves from the first frame to the last by at least :data:`MIN_MOTION` pixels along
  the prompted axis, in the prompted sense, and by more along it than across it. ``overall`` is the mean of the
  four attributes, ``exact`` 1 when all four are 1.

All functions are pure: randomness comes from an explicit seed or ``random.Random``; numpy only (no torch).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from itertools import product
from typing import ClassVar

import numpy as np

from .judge import AttributeScores, Detection, detect, mean_scores, score_objects, to_uint8
from .render import GAP, MARGIN, Item, _apart, draw
from .world import CANVAS, COLORS, COUNT_WORDS, COUNTS, SHAPES, Prompt

FRAMES = 5
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
VIDEO_ATTRIBUTES: tuple[str, ...] = ("color", "shape", "count", "direction")
#: (dx, dy) per frame of a unit speed, image coordinates (y grows downwards)
VELOCITY = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SIZES = (7, 8, 9)
SPEEDS = (2, 3)
MIN_MOTION = 3.0

__all__ = [
    "DIRECTIONS",
    "FRAMES",
    "MIN_MOTION",
    "VIDEO_ATTRIBUTES",
    "VideoPrompt",
    "VideoVerdict",
    "all_video_prompts",
    "clip_layout",
    "corrupt_video",
    "judge_clip",
    "judge_clips",
    "mean_scores",
    "motion_direction",
    "parse_video_prompt",
    "perturb_video",
    "random_video_prompt",
    "render_clip",
    "split_video_prompts",
    "to_frames",
]


@dataclass(frozen=True, order=True)
class VideoPrompt:
    """One toy video prompt: what to draw, how many, and which way they move."""

    color: str
    shape: str
    count: int
    direction: str

    def __post_init__(self) -> None:
        # colour, shape and count are checked by the image world's Prompt
        Prompt(self.color, self.shape, self.count, "left")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {self.direction!r}; known: {', '.join(DIRECTIONS)}")

    @property
    def text(self) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        return f"{COUNT_WORDS[self.count]} {self.color} {noun} moving {self.direction}"

    @property
    def still(self) -> Prompt:
        """The image-world prompt of one frame (colour, shape, count; its position is unused here)."""
        return Prompt(self.color, self.shape, self.count, "left")

    def __str__(self) -> str:
        return self.text


def parse_video_prompt(text: str) -> VideoPrompt:
    """The :class:`VideoPrompt` a text states; raises ``ValueError`` on text outside the grammar."""
    words = text.strip().lower().split()
    counts = {word: n for n, word in COUNT_WORDS.items()}
    if len(words) != 5 or words[0] not in counts or words[3] != "moving" or words[4] not in DIRECTIONS:
        raise ValueError(f"not a toy video prompt: {text!r} (expected e.g. 'two red circles moving right')")
    count, shape = counts[words[0]], words[2]
    if count > 1:
        if not shape.endswith("s"):
            raise ValueError(f"not a toy video prompt: {text!r} (plural noun expected)")
        shape = shape[:-1]
    return VideoPrompt(words[1], shape, count, words[4])


def all_video_prompts() -> list[VideoPrompt]:
    """Every prompt of the grammar (4 colours x 3 shapes x 3 counts x 4 directions = 144), sorted."""
    return sorted(VideoPrompt(c, s, n, d) for c, s, n, d in product(COLORS, SHAPES, COUNTS, DIRECTIONS))


def split_video_prompts(heldout: int = 32, seed: int = 0) -> tuple[list[VideoPrompt], list[VideoPrompt]]:
    """A seeded ``(train, heldout)`` split of :func:`all_video_prompts`; ``heldout`` prompts are never trained on."""
    prompts = all_video_prompts()
    random.Random(seed).shuffle(prompts)
    return sorted(prompts[heldout:]), sorted(prompts[:heldout])


def random_video_prompt(rng: random.Random) -> VideoPrompt:
    return VideoPrompt(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(COUNTS), rng.choice(DIRECTIONS))


def perturb_video(prompt: VideoPrompt, rng: random.Random, attributes: tuple[str, ...] | list[str]) -> VideoPrompt:
    """``prompt`` with each named attribute replaced by a different random value."""
    choices = {"color": tuple(COLORS), "shape": SHAPES, "count": COUNTS, "direction": DIRECTIONS}
    changes = {}
    for name in attributes:
        current = getattr(prompt, name)
        changes[name] = rng.choice([value for value in choices[name] if value != current])
    return replace(prompt, **changes)


def corrupt_video(prompt: VideoPrompt, rng: random.Random, rate: float) -> VideoPrompt:
    """``prompt`` with each attribute independently replaced by a different value with probability ``rate`` (the
    noisy captions a generator is trained on, as :func:`mmalign.toyworld.world.corrupt`)."""
    return perturb_video(prompt, rng, [name for name in VIDEO_ATTRIBUTES if rng.random() < rate])


# ------------------------------------------------------------------------------------------------ rendering


def clip_layout(
    prompt: VideoPrompt, rng: random.Random, frames: int = FRAMES, canvas: int = CANVAS, tries: int = 200
) -> tuple[list[Item], tuple[int, int]]:
    """``(items of the first frame, (dx, dy) per frame)``: objects that satisfy ``prompt``, ``GAP`` apart, placed so
    that moving ``frames − 1`` times by ``(dx, dy)`` keeps every one ``MARGIN`` inside the canvas."""
    speed = rng.choice(SPEEDS)
    ux, uy = VELOCITY[prompt.direction]
    dx, dy = ux * speed, uy * speed
    travel_x, travel_y = dx * (frames - 1), dy * (frames - 1)
    for _ in range(tries):
        items: list[Item] = []
        for _ in range(prompt.count):
            size = rng.choice(SIZES)
            # the first frame's box range such that the last frame's box stays inside too
            x0, x1 = MARGIN + max(0, -travel_x), canvas - MARGIN - size - max(0, travel_x)
            y0, y1 = MARGIN + max(0, -travel_y), canvas - MARGIN - size - max(0, travel_y)
            for _ in range(50):
                item = Item(prompt.shape, prompt.color, rng.randint(x0, x1), rng.randint(y0, y1), size)
                if all(_apart(item, other, GAP) for other in items):
                    items.append(item)
                    break
        if len(items) == prompt.count:
            return items, (dx, dy)
    raise RuntimeError(f"could not lay out {prompt.text!r} on a {canvas} px canvas")


def draw_clip(items: list[Item], velocity: tuple[int, int], frames: int = FRAMES, canvas: int = CANVAS) -> np.ndarray:
    """``uint8 [frames, canvas, canvas, 3]``: the items moved by ``velocity`` per frame, drawn as the image world
    draws them."""
    dx, dy = velocity
    return np.stack(
        [draw([replace(item, x=item.x + k * dx, y=item.y + k * dy) for item in items], canvas) for k in range(frames)]
    )


def render_clip(
    prompt: VideoPrompt | str, seed: int | random.Random = 0, frames: int = FRAMES, canvas: int = CANVAS
) -> np.ndarray:
    """A ground-truth clip of ``prompt`` (``uint8 [frames, canvas, canvas, 3]``), the same for the same seed."""
    prompt = parse_video_prompt(prompt) if isinstance(prompt, str) else prompt
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    items, velocity = clip_layout(prompt, rng, frames, canvas)
    return draw_clip(items, velocity, frames, canvas)


# ------------------------------------------------------------------------------------------------ judging


@dataclass(frozen=True)
class VideoVerdict(AttributeScores):
    """The judge's scores of one clip for one prompt (``color``, ``shape``, ``count``: fractions of frames)."""

    attributes: ClassVar[tuple[str, ...]] = VIDEO_ATTRIBUTES

    color: float
    shape: float
    count: float
    direction: float
    objects: tuple[tuple[Detection, ...], ...]  # per frame


def to_frames(clip) -> np.ndarray:
    """``uint8 [T, H, W, 3]`` from a clip: a uint8 array ``[T, H, W, 3]``, or a float array/tensor in [0, 1] as
    ``[T, H, W, 3]`` or the canonical video ``[T, 3, H, W]``."""
    if hasattr(clip, "detach"):
        clip = clip.detach().cpu().numpy()
    clip = np.asarray(clip)
    if clip.ndim != 4:
        raise ValueError(f"expected a clip [T, H, W, 3] or [T, 3, H, W], got shape {clip.shape}")
    return np.stack([to_uint8(frame) for frame in clip])


def centroid(objects: tuple[Detection, ...]) -> tuple[float, float] | None:
    """The mean centre of a frame's objects (``None`` without objects)."""
    if not objects:
        return None
    return float(np.mean([o.cx for o in objects])), float(np.mean([o.cy for o in objects]))


def motion_direction(first: tuple[Detection, ...], last: tuple[Detection, ...]) -> str | None:
    """The direction the objects' centroid moves from ``first`` to ``last`` (detections of two frames): the axis
    of the larger displacement, when it is at least :data:`MIN_MOTION` pixels and larger than the other; ``None``
    for no clear motion or a frame without objects."""
    start, end = centroid(first), centroid(last)
    if start is None or end is None:
        return None
    dx, dy = end[0] - start[0], end[1] - start[1]
    if max(abs(dx), abs(dy)) < MIN_MOTION or abs(dx) == abs(dy):
        return None
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def judge_clip(clip, prompt: VideoPrompt | str) -> VideoVerdict:
    """Score one clip (``[T, H, W, 3]`` uint8, or float in [0, 1] as ``[T, H, W, 3]`` / ``[T, 3, H, W]``) against a
    prompt (a :class:`VideoPrompt` or its text)."""
    prompt = parse_video_prompt(prompt) if isinstance(prompt, str) else prompt
    frames = to_frames(clip)
    height, width = frames.shape[1:3]
    objects = tuple(detect(frame) for frame in frames)
    # each frame as the image judge scores an image (its position verdict unused)
    stills = [score_objects(found, prompt.still, width, height) for found in objects]
    return VideoVerdict(
        color=float(np.mean([v.color for v in stills])),
        shape=float(np.mean([v.shape for v in stills])),
        count=float(np.mean([v.count for v in stills])),
        direction=float(motion_direction(objects[0], objects[-1]) == prompt.direction),
        objects=objects,
    )


def judge_clips(clips, prompts) -> list[VideoVerdict]:
    """:func:`judge_clip` over parallel sequences (a ``[B, T, 3, H, W]`` tensor in [0, 1] also works)."""
    return [judge_clip(clip, prompt) for clip, prompt in zip(clips, prompts)]
