"""Decoding media into mmalign's canonical tensors (see DESIGN.md, "Canonical media tensors").

One module per modality (``image``, ``video``, ``multiview``, ``audio``, ``music``); each also names its units
(frames, views, windows) so image and audio rewards can be lifted to it (:mod:`mmalign.rewards.lifted`).
Nothing heavy is imported here.
"""

from __future__ import annotations

import re
from pathlib import Path

MODALITIES = ("image", "video", "multiview", "audio", "music")

# Pillow warns above 89.5 Mpx and refuses at twice that; mmalign refuses at the warning level by default,
# before decoding, so a decompression bomb never allocates its pixels.
DEFAULT_MAX_PIXELS = 89_478_485

_DIGITS = re.compile(r"(\d+)")


def natural_key(path: str | Path) -> tuple:
    """Sort key ordering names by the numbers in them: ``view_2`` before ``view_10`` (then by the name)."""
    name = Path(path).name
    numbers = tuple(int(part) for part in _DIGITS.findall(name))
    return (numbers, name)


def files_with_suffix(folder: Path, suffixes: frozenset[str]) -> list[Path]:
    """Regular files of ``folder`` (non-recursive) whose lower-cased suffix is in ``suffixes``, natural order."""
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in suffixes and p.is_file()), key=natural_key)
