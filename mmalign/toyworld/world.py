"""The toyworld's prompt grammar: colour, shape, count and position on a small square canvas.

A prompt reads ``"<count> <colour> <shape>[s] <position>"``, e.g. ``"two red circles on the left"``. Positions
name a half of the canvas; every object of a satisfied prompt has its centre in that half. All functions are
pure (randomness comes from an explicit ``random.Random``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from itertools import product

CANVAS = 32
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 195, 20),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COUNTS: tuple[int, ...] = (1, 2, 3)
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
ATTRIBUTES: tuple[str, ...] = ("color", "shape", "count", "position")

COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}


@dataclass(frozen=True, order=True)
class Prompt:
    """One toyworld prompt: what to draw, how many, and where."""

    color: str
    shape: str
    count: int
    position: str

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; known: {', '.join(COLORS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {', '.join(SHAPES)}")
        if self.count not in COUNTS:
            raise ValueError(f"count must be one of {COUNTS}, got {self.count!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; known: {', '.join(POSITIONS)}")

    @property
    def text(self) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        return f"{COUNT_WORDS[self.count]} {self.color} {noun} {POSITION_PHRASES[self.position]}"

    def __str__(self) -> str:
        return self.text


def parse_prompt(text: str) -> Prompt:
    """The :class:`Prompt` a text states; raises ``ValueError`` on text outside the grammar."""
    words = text.strip().lower().split()
    counts = {word: n for n, word in COUNT_WORDS.items()}
    phrases = {phrase: name for name, phrase in POSITION_PHRASES.items()}
    if len(words) != 6 or words[0] not in counts or " ".join(words[3:]) not in phrases:
        raise ValueError(f"not a toyworld prompt: {text!r} (expected e.g. 'two red circles on the left')")
    count, shape = counts[words[0]], words[2]
    if count > 1:
        if not shape.endswith("s"):
            raise ValueError(f"not a toyworld prompt: {text!r} (plural noun expected)")
        shape = shape[:-1]
    return Prompt(words[1], shape, count, phrases[" ".join(words[3:])])


def all_prompts() -> list[Prompt]:
    """Every prompt of the grammar (4 colours x 3 shapes x 3 counts x 4 positions = 144), sorted."""
    return sorted(Prompt(c, s, n, p) for c, s, n, p in product(COLORS, SHAPES, COUNTS, POSITIONS))


def split_prompts(heldout: int = 32, seed: int = 0) -> tuple[list[Prompt], list[Prompt]]:
    """A seeded ``(train, heldout)`` split of :func:`all_prompts`; ``heldout`` prompts are never trained on."""
    prompts = all_prompts()
    random.Random(seed).shuffle(prompts)
    return sorted(prompts[heldout:]), sorted(prompts[:heldout])


def random_prompt(rng: random.Random) -> Prompt:
    return Prompt(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(COUNTS), rng.choice(POSITIONS))


def perturb(prompt: Prompt, rng: random.Random, attributes: tuple[str, ...] | list[str]) -> Prompt:
    """``prompt`` with each named attribute replaced by a different random value."""
    choices = {"color": tuple(COLORS), "shape": SHAPES, "count": COUNTS, "position": POSITIONS}
    changes = {}
    for name in attributes:
        current = getattr(prompt, name)
        changes[name] = rng.choice([value for value in choices[name] if value != current])
    return replace(prompt, **changes)


def corrupt(prompt: Prompt, rng: random.Random, rate: float) -> Prompt:
    """``prompt`` with each attribute independently replaced by a different value with probability ``rate``
    (noisy captions, as web alt-text: a model trained on them follows prompts only partly)."""
    return perturb(prompt, rng, [name for name in ATTRIBUTES if rng.random() < rate])
