"""Stored sampling trajectories and the human scores given to them: the offline path of D3PO.

D3PO's human-feedback protocol (Yang et al. 2024; yk7333/d3po ``scripts/sample.py``, ``scripts/train.py``):
K images per prompt sampled from one x_T with their whole DDIM chains kept; annotators score the images; training
uses every pair of a prompt's images whose mean scores differ, recomputing each step's log-prob on the stored
chain. The reference keeps the chains in a pickle (``sample.pkl``); here each prompt's chains are a safetensors
file written by ``mmalign label --trajectories``:

- ``DIR/label.json``: the sampler settings (``steps``, ``guidance``, ``eta``, ``resolution``, ``model``, ``k``);
- ``DIR/rankings.jsonl``: per prompt ``{"prompt", "images", "scores", "ranking", "trajectory"}``;
- ``DIR/trajectories/NNNNN.safetensors``: ``latents [K, T+1, C, h, w]`` (x_T … x_0), ``log_probs [K, T]``,
  ``timesteps [T]``.

Human scores (higher is better) come in either format:

- the reference's: a folder of JSON files, one per annotator, each a list with one entry per prompt (in
  ``rankings.jsonl`` order) of K scores; the scores are averaged over annotators, over the prompts that every
  annotator scored (the reference truncates to the shortest file the same way);
- a JSONL, one line per prompt: ``{"scores": [K numbers]}`` with ``"index"`` (the prompt's line in
  ``rankings.jsonl``, 0-based) or ``"prompt"`` (its text, when unique); several lines for one prompt (several
  annotators) are averaged.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError

LABEL_FILE = "label.json"
RANKINGS_FILE = "rankings.jsonl"
TRAJECTORY_DIR = "trajectories"

__all__ = [
    "FeedbackGroup",
    "FeedbackPair",
    "LabelledSamples",
    "feedback_pairs",
    "load_trajectories",
    "read_human_scores",
    "read_labelled_samples",
    "save_trajectories",
]


@dataclass(frozen=True)
class FeedbackGroup:
    """One prompt's K samples: image paths, the labelling reward's scores, and the stored chains' file."""

    prompt: str
    images: tuple[str, ...]
    scores: tuple[float, ...]
    trajectory: Path | None


@dataclass(frozen=True)
class FeedbackPair:
    """Images ``a`` and ``b`` of group ``group`` with their (mean) scores; ``a_wins`` iff ``score_a > score_b``."""

    group: int
    a: int
    b: int
    score_a: float
    score_b: float

    @property
    def a_wins(self) -> bool:
        return self.score_a > self.score_b


@dataclass(frozen=True)
class LabelledSamples:
    """A ``mmalign label`` folder: its sampler settings and its groups."""

    folder: Path
    settings: dict[str, Any]
    groups: list[FeedbackGroup]


def save_trajectories(path: str | Path, latents, log_probs, timesteps, metadata: dict[str, Any] | None = None) -> None:
    """Write one prompt's chains (see the module docstring) atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "latents": latents.detach().float().cpu().contiguous(),
        "log_probs": log_probs.detach().float().cpu().contiguous(),
        "timesteps": timesteps.detach().long().cpu().contiguous(),
    }
    meta = {key: json.dumps(value) for key, value in (metadata or {}).items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_trajectories(path: str | Path) -> dict[str, Any]:
    """``{"latents", "log_probs", "timesteps"}`` of a file written by :func:`save_trajectories`, checked."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "trajectory file not found")
    tensors = load_file(str(path))
    missing = {"latents", "log_probs", "timesteps"} - set(tensors)
    if missing:
        raise DataError(path, f"missing tensors {sorted(missing)}")
    latents, log_probs, timesteps = tensors["latents"], tensors["log_probs"], tensors["timesteps"]
    steps = timesteps.shape[0]
    if latents.ndim != 5 or latents.shape[1] != steps + 1 or tuple(log_probs.shape) != (latents.shape[0], steps):
        raise DataError(
            path,
            f"inconsistent shapes latents {tuple(latents.shape)}, log_probs {tuple(log_probs.shape)}, "
            f"timesteps {tuple(timesteps.shape)} (want [K, T+1, C, h, w], [K, T], [T])",
        )
    return tensors


def read_labelled_samples(folder: str | Path) -> LabelledSamples:
    """Read a ``mmalign label --trajectories`` folder; errors name the file and line."""
    folder = Path(folder)
    settings_file, rankings = folder / LABEL_FILE, folder / RANKINGS_FILE
    for required in (settings_file, rankings):
        if not required.is_file():
            raise DataError(required, "not found (write the folder with `mmalign label ... --trajectories`)")
    settings = json.loads(settings_file.read_text())
    groups = []
    for line_no, line in enumerate(rankings.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            group = FeedbackGroup(
                prompt=str(row["prompt"]),
                images=tuple(row["images"]),
                scores=tuple(float(s) for s in row["scores"]),
                trajectory=folder / row["trajectory"] if row.get("trajectory") else None,
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise DataError(f"{rankings}:{line_no}", f"bad row ({error})") from None
        if len(group.images) != len(group.scores):
            raise DataError(f"{rankings}:{line_no}", f"{len(group.images)} images but {len(group.scores)} scores")
        groups.append(group)
    if not groups:
        raise DataError(rankings, "no rows")
    return LabelledSamples(folder, settings, groups)


def _check_scores(scores: Any, k: int, where: str) -> list[float]:
    if not isinstance(scores, list) or len(scores) != k:
        raise DataError(where, f"want a list of {k} scores (one per image), got {scores!r}")
    try:
        values = [float(s) for s in scores]
    except (TypeError, ValueError):
        raise DataError(where, f"scores must be numbers, got {scores!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise DataError(where, f"non-finite score in {scores!r}")
    return values


def read_human_scores(path: str | Path, groups: Sequence[FeedbackGroup]) -> list[list[float] | None]:
    """Mean human scores per group (``None`` for a group nobody scored), from an annotator folder or a JSONL
    (formats in the module docstring)."""
    path = Path(path)
    sums: list[list[float] | None] = [None] * len(groups)
    counts = [0] * len(groups)

    def add(index: int, values: list[float]) -> None:
        sums[index] = values if sums[index] is None else [s + v for s, v in zip(sums[index], values)]
        counts[index] += 1

    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise DataError(path, "no annotator .json files")
        annotators = []
        for file in files:
            try:
                rows = json.loads(file.read_text())
            except json.JSONDecodeError as error:
                raise DataError(file, f"not JSON ({error})") from None
            if not isinstance(rows, list):
                raise DataError(file, "want a list with one list of scores per prompt")
            if len(rows) > len(groups):
                raise DataError(file, f"{len(rows)} prompts scored but the samples have {len(groups)}")
            annotators.append(
                [_check_scores(r, len(groups[i].images), f"{file}: prompt {i}") for i, r in enumerate(rows)]
            )
        shared = min(len(a) for a in annotators)  # prompts every annotator scored (the reference's truncation)
        for rows in annotators:
            for i, values in enumerate(rows[:shared]):
                add(i, values)
    elif path.is_file():
        by_prompt: dict[str, list[int]] = {}
        for i, group in enumerate(groups):
            by_prompt.setdefault(group.prompt, []).append(i)
        for line_no, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(where, f"not JSON ({error})") from None
            if "index" in row:
                index = row["index"]
                if not isinstance(index, int) or not 0 <= index < len(groups):
                    raise DataError(where, f"index {index!r} outside 0..{len(groups) - 1}")
            elif "prompt" in row:
                matches = by_prompt.get(row["prompt"], [])
                if len(matches) != 1:
                    what = "not among the samples" if not matches else f"on {len(matches)} lines; give 'index'"
                    raise DataError(where, f"prompt {row['prompt']!r} {what}")
                index = matches[0]
            else:
                raise DataError(where, "want 'index' or 'prompt' besides 'scores'")
            add(index, _check_scores(row.get("scores"), len(groups[index].images), where))
    else:
        raise DataError(path, "human scores not found (a folder of annotator .json files or a .jsonl)")
    return [None if s is None else [v / counts[i] for v in s] for i, s in enumerate(sums)]


def feedback_pairs(groups: Sequence[FeedbackGroup], scores: Sequence[Sequence[float] | None]) -> list[FeedbackPair]:
    """Every pair of a group's images whose scores differ (ties give D3PO no gradient, so they are left out)."""
    pairs = []
    for g, values in enumerate(scores):
        if values is None:
            continue
        for a, b in itertools.combinations(range(len(values)), 2):
            if values[a] != values[b]:
                pairs.append(FeedbackPair(g, a, b, float(values[a]), float(values[b])))
    return pairs
