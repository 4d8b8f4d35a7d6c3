"""The exact, deterministic judge: does an image show what its prompt says?

Steps (all pure numpy/scipy, no learned parts):

1. colour segmentation: every pixel takes the nearest palette colour (background included, Euclidean RGB);
2. connected components (8-connectivity) per colour; components under ``MIN_AREA`` pixels are noise;
3. per object: colour, centre of mass, and a shape test on its pixels: an upward triangle has most of its mass
   below its box centre (``asymmetry >= 0.2``; 0.4 when exact); otherwise a square fills its bounding box
   (``fill >= 0.9``; 1.0 exact) and a disc fills about π/4 of it (``fill >= 0.65``); anything else, or a box
   with aspect ratio beyond 1.5, is a ``"blob"`` (two merged objects, smears);
4. per attribute (each 0 or 1; all four need at least one object): ``color`` - every object has the prompted
   colour; ``shape`` - every object has the prompted shape; ``count`` - the number of objects equals the
   prompted count; ``position`` - every object's centre lies strictly inside the prompted half.

``overall`` is the mean of the four attribute scores (in [0, 1]); ``exact`` is 1 when all four hold.
Attributes are judged on all objects whatever their colour, so "two blue circles on the left" for the prompt
"two red circles on the left" scores colour 0 and the other three 1 (overall 0.75).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .world import ATTRIBUTES, BACKGROUND, COLORS, Prompt, parse_prompt

MIN_AREA = 10
SQUARE_FILL = 0.9
CIRCLE_FILL = 0.65
TRIANGLE_ASYMMETRY = 0.2
MAX_ASPECT = 1.5

_PALETTE = np.array([BACKGROUND, *COLORS.values()], dtype=np.float64)
_NAMES = ["background", *COLORS]


@dataclass(frozen=True)
class Detection:
    """One object found in an image."""

    color: str
    shape: str
    area: int
    cx: float
    cy: float
    fill: float
    asymmetry: float


@dataclass(frozen=True)
class Verdict:
    """The judge's scores of one image for one prompt."""

    color: float
    shape: float
    count: float
    position: float
    objects: tuple[Detection, ...]

    @property
    def overall(self) -> float:
        return (self.color + self.shape + self.count + self.position) / 4

    @property
    def exact(self) -> float:
        return float(self.color == self.shape == self.count == self.position == 1.0)

    def scores(self) -> dict[str, float]:
        """Per-attribute, ``overall`` and ``exact`` scores."""
        return {**{name: getattr(self, name) for name in ATTRIBUTES}, "overall": self.overall, "exact": self.exact}


def to_uint8(image) -> np.ndarray:
    """``uint8 [H, W, 3]`` from a PIL image, a uint8 array, or a float array/tensor in [0, 1] (HWC or CHW)."""
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB image, got shape {array.shape}")
    return array


def segment(image: np.ndarray) -> np.ndarray:
    """Per-pixel palette index ``[H, W]`` (0 = background, then :data:`COLORS` in order)."""
    pixels = image.astype(np.float64)[..., None, :]
    return np.argmin(((pixels - _PALETTE) ** 2).sum(-1), axis=-1)


def classify_shape(mask: np.ndarray) -> tuple[str, float, float]:
    """``(shape, fill, asymmetry)`` of one component's boolean mask."""
    ys, xs = np.nonzero(mask)
    height, width = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
    fill = len(ys) / (height * width)
    middle = (ys.min() + ys.max()) / 2
    asymmetry = float((ys > middle).sum() - (ys < middle).sum()) / len(ys)
    if max(height, width) > MAX_ASPECT * min(height, width):
        return "blob", fill, asymmetry
    if asymmetry >= TRIANGLE_ASYMMETRY:
        return "triangle", fill, asymmetry
    if abs(asymmetry) < TRIANGLE_ASYMMETRY and fill >= SQUARE_FILL:
        return "square", fill, asymmetry
    if abs(asymmetry) < TRIANGLE_ASYMMETRY and fill >= CIRCLE_FILL:
        return "circle", fill, asymmetry
    return "blob", fill, asymmetry


def detect(image) -> tuple[Detection, ...]:
    """The objects of an image, ordered by colour, then top-to-bottom, left-to-right."""
    from scipy import ndimage

    labels = segment(to_uint8(image))
    found = []
    for index, color in enumerate(_NAMES[1:], start=1):
        components, count = ndimage.label(labels == index, structure=np.ones((3, 3), dtype=bool))
        for k in range(1, count + 1):
            mask = components == k
            area = int(mask.sum())
            if area < MIN_AREA:
                continue
            ys, xs = np.nonzero(mask)
            shape, fill, asymmetry = classify_shape(mask)
            found.append(Detection(color, shape, area, float(xs.mean()), float(ys.mean()), fill, asymmetry))
    return tuple(found)


def in_half(position: str, cx: float, cy: float, width: int, height: int) -> bool:
    """Whether a pixel-centre coordinate lies strictly inside the half of the canvas ``position`` names."""
    centre_x, centre_y = (width - 1) / 2, (height - 1) / 2
    return {"left": cx < centre_x, "right": cx > centre_x, "top": cy < centre_y, "bottom": cy > centre_y}[position]


def score_objects(objects: tuple[Detection, ...], prompt: Prompt, width: int, height: int) -> Verdict:
    """The verdict for ``prompt`` given the objects detected in a ``width`` x ``height`` image."""
    some = bool(objects)
    return Verdict(
        color=float(some and all(o.color == prompt.color for o in objects)),
        shape=float(some and all(o.shape == prompt.shape for o in objects)),
        count=float(len(objects) == prompt.count),
        position=float(some and all(in_half(prompt.position, o.cx, o.cy, width, height) for o in objects)),
        objects=objects,
    )


def judge(image, prompt: Prompt | str) -> Verdict:
    """Score one image (PIL, uint8 HWC, or float in [0, 1]) against a prompt (a :class:`Prompt` or its text)."""
    prompt = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    array = to_uint8(image)
    return score_objects(detect(array), prompt, array.shape[1], array.shape[0])


def judge_batch(images, prompts) -> list[Verdict]:
    """:func:`judge` over parallel sequences (a ``[B, 3, H, W]`` tensor in [0, 1] also works)."""
    return [judge(image, prompt) for image, prompt in zip(images, prompts)]


def mean_scores(verdicts: list[Verdict]) -> dict[str, float]:
    """Mean of each score over verdicts (``overall`` in [0, 1])."""
    if not verdicts:
        return {}
    rows = [v.scores() for v in verdicts]
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}
