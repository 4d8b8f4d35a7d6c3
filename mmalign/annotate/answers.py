"""Answers of the three task kinds: validation (clear errors), gold checks, and per-option scores.

Stored forms (options in the item's order, whatever order the page showed them in):

- ``pairwise``: ``{"choice": 0}`` or ``{"choice": 1}`` (the preferred option) or ``{"choice": "tie"}``;
- ``kwise``: ``{"ranks": [r_0, ..., r_{K-1}]}``, integers 1..K, lower is better, equal ranks are ties;
- ``rating``: ``{"scores": {dimension: [s_0, ..., s_{K-1}]}}``, integers 1..5 for every named dimension.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .db import AnnotateError

KINDS = ("pairwise", "kwise", "rating")
RATING_MIN, RATING_MAX = 1, 5


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise AnnotateError(f"{what} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise AnnotateError(f"{what} must be an integer, got {value!r}")


def validate(kind: str, answer: Any, k: int, dimensions: Sequence[str] = ()) -> dict[str, Any]:
    """The stored form of ``answer`` for an item with ``k`` options, or :class:`AnnotateError` saying why not."""
    if not isinstance(answer, Mapping):
        raise AnnotateError(f"an answer must be a JSON object, got {type(answer).__name__}")
    if kind == "pairwise":
        if "choice" not in answer:
            raise AnnotateError('a pairwise answer needs "choice": 0, 1 or "tie"')
        choice = answer["choice"]
        if choice == "tie":
            return {"choice": "tie"}
        value = _int(choice, '"choice"')
        if value not in (0, 1):
            raise AnnotateError(f'"choice" must be 0, 1 or "tie", got {choice!r}')
        return {"choice": value}
    if kind == "kwise":
        ranks = answer.get("ranks")
        if not isinstance(ranks, Sequence) or isinstance(ranks, str) or len(ranks) != k:
            raise AnnotateError(f'a K-wise answer needs "ranks": a list of {k} integers (1 = best)')
        values = [_int(r, f"rank {i}") for i, r in enumerate(ranks)]
        bad = [r for r in values if not 1 <= r <= k]
        if bad:
            raise AnnotateError(f"ranks must be between 1 and {k}, got {bad[0]}")
        return {"ranks": values}
    if kind == "rating":
        scores = answer.get("scores")
        if not isinstance(scores, Mapping):
            raise AnnotateError(f'a rating answer needs "scores": {{dimension: [{k} integers 1-5]}}')
        unknown = sorted(set(scores) - set(dimensions))
        if unknown:
            raise AnnotateError(f"unknown dimension {unknown[0]!r}; this task rates {list(dimensions)}")
        out = {}
        for dim in dimensions:
            values = scores.get(dim)
            if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != k:
                raise AnnotateError(f"dimension {dim!r} needs {k} scores (one per option), got {values!r}")
            ints = [_int(v, f"{dim!r} score") for v in values]
            bad = [v for v in ints if not RATING_MIN <= v <= RATING_MAX]
            if bad:
                raise AnnotateError(f"{dim!r} scores must be {RATING_MIN}-{RATING_MAX}, got {bad[0]}")
            out[dim] = ints
        return {"scores": out}
    raise AnnotateError(f"unknown task kind {kind!r}; one of {KINDS}")


def is_correct(kind: str, answer: Mapping[str, Any], gold: Mapping[str, Any]) -> bool:
    """Whether an answer agrees with a gold answer: the same pairwise choice; for K-wise, every pair that gold
    orders strictly is ordered the same way (pairs gold ties are free); for ratings, every score within 1."""
    if kind == "pairwise":
        return answer["choice"] == gold["choice"]
    if kind == "kwise":
        a, g = answer["ranks"], gold["ranks"]
        k = len(g)
        return all((a[i] < a[j]) == (g[i] < g[j]) for i in range(k) for j in range(k) if g[i] != g[j])
    if kind == "rating":
        return all(
            abs(x - y) <= 1 for dim, values in gold["scores"].items() for x, y in zip(answer["scores"][dim], values)
        )
    raise AnnotateError(f"unknown task kind {kind!r}")


def option_scores(kind: str, answer: Mapping[str, Any], k: int, dimension: str | None = None) -> list[float]:
    """Per-option scores, higher is better: pairwise 1 / 0 (0.5 each for a tie), K-wise ``K - rank``, ratings the
    mean over dimensions (or the one ``dimension``)."""
    if kind == "pairwise":
        choice = answer["choice"]
        return [0.5, 0.5] if choice == "tie" else [1.0 if i == choice else 0.0 for i in range(2)]
    if kind == "kwise":
        return [float(k - r) for r in answer["ranks"]]
    if kind == "rating":
        scores = answer["scores"]
        if dimension is not None:
            if dimension not in scores:
                raise AnnotateError(f"no dimension {dimension!r}; the task rates {sorted(scores)}")
            return [float(v) for v in scores[dimension]]
        dims = list(scores)
        return [sum(scores[d][i] for d in dims) / len(dims) for i in range(k)]
    raise AnnotateError(f"unknown task kind {kind!r}")


def ranks_of(kind: str, answer: Mapping[str, Any], k: int, dimension: str | None = None) -> list[float]:
    """Ranks (1 = best, ties equal) from any answer, via :func:`option_scores`."""
    scores = option_scores(kind, answer, k, dimension)
    return [float(1 + sum(1 for t in scores if t > s)) for s in scores]
