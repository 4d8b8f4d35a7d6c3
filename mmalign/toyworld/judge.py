"""The exact, deterministic judge: does an image show what its prompt says?

Steps (all pure numpy/scipy, no learned parts):

1. colour segmentation: every pixel takes the nearest palette colour (background included, Euclidean RGB);
2. connected components (8-connectivity) per colour; components under ``MIN_AREA`` pixels are noise;
3. per object: colour, centre of mass, and shape by template matching: the ideal disc, square and upward
   triangle drawn in the object's bounding box (as the renderer draws them) are compared with its pixels, and
   the best intersection-over-union wins; under ``MIN_IOU``, or with a box of aspect ratio beyond
   ``MAX_ASPECT``, the object is a ``"blob"`` (two merged objects, smears). Rendered objects match their own
   template exactly (IoU 1), and a blurred square with rounded corners is still a square;
4. per attribute (each 0 or 1; all four need at least one object): ``color`` - every object has the prompted
   colour; ``shape`` - every object has the prompted shape; ``count`` - the number of objects equals the
   prompted count; ``position`` - every object's centre lies strictly inside the prompted half.

``overall`` is the mean of the four attribute scores (in [0, 1]); ``exact`` is 1 when all four hold.
Attributes are judged on all objects whatever their colour, so "two blue circles on the left" for the prompt
"two red circles on the left" scores colour 0 and the other three 1 (overall 0.75).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .world import ATTRIBUTES, BACKGROUND, COLORS, Prompt, parse_prompt

MIN_AREA = 10
MIN_IOU = 0.6
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
    iou: float


class AttributeScores:
    """What every toy world's verdict derives from its :attr:`attributes` (each in [0, 1]): ``overall`` (their
    mean), ``exact`` (1 when all are 1) and :meth:`scores`."""

    attributes: ClassVar[tuple[str, ...]] = ()

    @property
    def overall(self) -> float:
        return sum(getattr(self, name) for name in self.attributes) / len(self.attributes)

    @property
    def exact(self) -> float:
        return float(all(getattr(self, name) == 1.0 for name in self.attributes))

    def scores(self) -> dict[str, float]:
        """Per-attribute, ``overall`` and ``exact`` scores."""
        return {**{name: getattr(self, name) for name in self.attributes}, "overall": self.overall, "exact": self.exact}


@dataclass(frozen=True)
class Verdict(AttributeScores):
    """The judge's scores of one image for one prompt."""

    attributes: ClassVar[tuple[str, ...]] = ATTRIBUTES

    color: float
    shape: float
    count: float
    position: float
    objects: tuple[Detection, ...]


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


def templates(height: int, width: int) -> dict[str, np.ndarray]:
    """Ideal masks of every shape in a ``height`` x ``width`` box (for square boxes exactly the renderer's)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    cy, cx = (height - 1) / 2, (width - 1) / 2
    ry, rx = height / 2, width / 2
    return {
        "circle": ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1 - 0.5 / (rx * ry),
        "square": np.ones((height, width), dtype=bool),
        "triangle": np.abs(xs - cx) <= (ys + 1) / height * rx,
    }


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """``(shape, iou)`` of one component's boolean mask: the best-matching template, or ``"blob"``."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    height, width = crop.shape
    scores = {
        name: float(np.logical_and(crop, t).sum() / np.logical_or(crop, t).sum())
        for name, t in templates(height, width).items()
    }
    shape = max(scores, key=scores.__getitem__)
    iou = scores[shape]
    if max(height, width) > MAX_ASPECT * min(height, width) or iou < MIN_IOU:
        return "blob", iou
    return shape, iou


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
            shape, iou = classify_shape(mask)
            found.append(Detection(color, shape, area, float(xs.mean()), float(ys.mean()), iou))
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
