"""The batch scoring job behind ``mmalign score``: incremental, resumable JSONL output.

Each scored image is one JSON line (``path``, ``prompt``, ``reward``, ``score``, ``dtype``) written and
flushed batch by batch, so an interrupted run loses at most one batch; re-running with the same output file
skips every (path, prompt) already there. Unusable images either stop the job with an error naming the file
(what was scored stays on disk) or, with ``skip_bad``, are reported and skipped.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch

from .errors import MediaError, MMAlignError
from .modalities.image import DEFAULT_MAX_PIXELS, list_images, open_image
from .rewards.base import DTYPE_NAMES, Reward


@dataclass(frozen=True)
class ScoreItem:
    path: str
    prompt: str


@dataclass
class ScoreSummary:
    scored: int = 0
    already_done: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def items_from_paths(paths: Iterable[str | os.PathLike], prompt: str) -> list[ScoreItem]:
    return [ScoreItem(str(p), prompt) for p in list_images(paths)]


def items_from_pairs(pairs_file: str | os.PathLike) -> list[ScoreItem]:
    """Read ``{"prompt": ..., "image": ...}`` lines; relative image paths are relative to the file."""
    pairs_file = Path(pairs_file)
    if not pairs_file.is_file():
        raise MMAlignError(f"{pairs_file}: no such file")
    items = []
    with pairs_file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{pairs_file}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise MMAlignError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                raise MMAlignError(f'{where}: expected an object with a string "image" key')
            if not isinstance(row.get("prompt", ""), str):
                raise MMAlignError(f'{where}: "prompt" must be a string')
            image = Path(row["image"])
            if not image.is_absolute():
                image = pairs_file.parent / image
            items.append(ScoreItem(str(image), row.get("prompt", "")))
    return items


def read_done(out: Path, reward: str) -> set[ScoreItem]:
    """(path, prompt) pairs already scored by ``reward`` in ``out``; a torn last line (a crash mid-write) is
    cut off. Several rewards may share one output file."""
    if not out.exists():
        return set()
    done: set[ScoreItem] = set()
    data = out.read_bytes()
    good_end = 0
    for line in data.splitlines(keepends=True):
        try:
            row = json.loads(line)
            if row["reward"] == reward:
                done.add(ScoreItem(row["path"], row["prompt"]))
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            if line.endswith(b"\n"):
                number = data[:good_end].count(b"\n") + 1
                raise MMAlignError(f"{out}: line {number} is not a score record") from None
            break  # torn final line
        good_end += len(line)
    if good_end < len(data):
        with out.open("r+b") as handle:
            handle.truncate(good_end)
    return done


def _batches(items: list[ScoreItem], size: int) -> Iterator[list[ScoreItem]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_scoring(
    reward: Reward,
    items: list[ScoreItem],
    *,
    out: str | os.PathLike | None = None,
    batch_size: int = 32,
    skip_bad: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    stdout: IO[str] | None = None,
) -> ScoreSummary:
    """Score ``items`` with ``reward``, appending JSON lines to ``out`` (or writing to stdout)."""
    from tqdm.auto import tqdm

    summary = ScoreSummary()
    out_path = Path(out) if out is not None else None
    done = read_done(out_path, reward.name) if out_path is not None else set()
    todo = [item for item in dict.fromkeys(items) if item not in done]
    summary.already_done = len(items) - len(todo)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    handle = out_path.open("a", encoding="utf-8") if out_path is not None else (stdout or sys.stdout)
    dtype = DTYPE_NAMES.get(reward.dtype, str(reward.dtype))
    bar = tqdm(total=len(todo), unit="img", desc=f"scoring ({reward.name})", disable=not progress, file=sys.stderr)
    try:
        for batch in _batches(todo, batch_size):
            decoded, kept = [], []
            for item in batch:
                try:
                    decoded.append(open_image(item.path, max_pixels=max_pixels))
                    kept.append(item)
                except MediaError as error:
                    if not skip_bad:
                        raise
                    summary.skipped.append((item.path, error.reason))
            if kept:
                scores = reward.score_images(decoded, [item.prompt for item in kept], batch_size=len(kept))
                for item, value in zip(kept, scores.tolist()):
                    record = {
                        "path": item.path,
                        "prompt": item.prompt,
                        "reward": reward.name,
                        "score": value,
                        "dtype": dtype,
                    }
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                handle.flush()
                summary.scored += len(kept)
            bar.update(len(batch))
    finally:
        bar.close()
        if out_path is not None:
            handle.close()
    return summary


def device_and_threads(device: str) -> torch.device:
    """Validate ``--device`` early with a clear message."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MMAlignError("--device cuda was asked for but no CUDA device is available")
    return torch.device(device)
