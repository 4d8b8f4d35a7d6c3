"""Preference records: a pair (winner first) and a ranking that expands into pairs.

A pair's ``label`` is the probability that ``chosen`` is preferred: 1.0 strict preference, 0.5 a tie.
Readers orient every pair so that ``label >= 0.5`` (the winner first, as the official Diffusion-DPO
recipe does for Pick-a-Pic), and by default drop ties (``tie_policy="drop"``, also as that recipe does);
``tie_policy="keep"`` keeps them with label 0.5.

No torch here: importing this module is cheap.
"""

from __future__ import annotations

import io
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import combinations
from typing import TYPE_CHECKING, Any, Literal, Union

from ..errors import DataError, MediaError

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger("mmalign.data")

ImageInput = Union[str, "os.PathLike[str]", bytes, "Image.Image"]
"""An image as a pair holds it: a file path, the encoded file bytes, or a decoded Pillow image."""

TiePolicy = Literal["drop", "keep"]
TIE_POLICIES: tuple[str, ...] = ("drop", "keep")


def check_tie_policy(tie_policy: str) -> TiePolicy:
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"tie_policy must be one of {TIE_POLICIES}, got {tie_policy!r}")
    return tie_policy  # type: ignore[return-value]


@dataclass
class PreferencePair:
    """One human (or AI) judgement between two images for one prompt.

    ``source`` says where the pair came from (``file row N``) so that later errors can name it.
    """

    prompt: str
    chosen: ImageInput
    rejected: ImageInput
    label: float = 1.0
    score_chosen: float | None = None
    score_rejected: float | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.label, bool) or not isinstance(self.label, (int, float)):
            raise ValueError(f"{self.source or 'pair'}: label must be a number in [0, 1], got {self.label!r}")
        self.label = float(self.label)
        if not (0.0 <= self.label <= 1.0):
            raise ValueError(f"{self.source or 'pair'}: label {self.label} is outside [0, 1]")

    @property
    def is_tie(self) -> bool:
        return self.label == 0.5

    def swapped(self) -> PreferencePair:
        """The same judgement with the two images exchanged (label ``1 - label``)."""
        return replace(
            self,
            chosen=self.rejected,
            rejected=self.chosen,
            label=1.0 - self.label,
            score_chosen=self.score_rejected,
            score_rejected=self.score_chosen,
            meta=dict(self.meta),
        )

    def oriented(self) -> PreferencePair:
        """Winner first: the pair itself when ``label >= 0.5``, else :meth:`swapped`."""
        return self if self.label >= 0.5 else self.swapped()


@dataclass
class Ranking:
    """K images of one prompt with their ranks (lower = better; equal ranks are ties)."""

    prompt: str
    items: list[ImageInput]
    ranks: list[float]
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = self.source or "ranking"
        if len(self.items) != len(self.ranks):
            raise ValueError(f"{where}: {len(self.items)} items but {len(self.ranks)} ranks")
        if len(self.items) < 2:
            raise ValueError(f"{where}: a ranking needs at least 2 items, got {len(self.items)}")
        for rank in self.ranks:
            if isinstance(rank, bool) or not isinstance(rank, (int, float)) or not math.isfinite(rank):
                raise ValueError(f"{where}: ranks must be finite numbers, got {rank!r}")

    def to_pairs(self, tie_policy: TiePolicy = "keep") -> list[PreferencePair]:
        """All C(n, 2) pairs, the better-ranked image first; equal ranks give label 0.5 (dropped by "drop")."""
        check_tie_policy(tie_policy)
        pairs = []
        for i, j in combinations(range(len(self.items)), 2):
            if self.ranks[i] == self.ranks[j]:
                if tie_policy == "drop":
                    continue
                win, lose, label = i, j, 0.5
            elif self.ranks[i] < self.ranks[j]:
                win, lose, label = i, j, 1.0
            else:
                win, lose, label = j, i, 1.0
            meta = {**self.meta, "items": (win, lose), "ranks": (self.ranks[win], self.ranks[lose])}
            pairs.append(
                PreferencePair(self.prompt, self.items[win], self.items[lose], label, source=self.source, meta=meta)
            )
        return pairs


@dataclass
class ReadReport:
    """What one pass of a reader saw: rows read, pairs produced, ties dropped, unlabeled and bad rows."""

    name: str
    rows: int = 0
    pairs: int = 0
    ties_dropped: int = 0
    unlabeled: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def skip(self, where: str, reason: str, strict: bool) -> None:
        """Record a bad row, or raise :class:`DataError` naming it when ``strict``."""
        if strict:
            raise DataError(where, reason)
        logger.debug("skipping %s: %s", where, reason)
        self.skipped.append((where, reason))

    def summary(self, shown: int = 3) -> str:
        text = f"{self.name}: "
        if self.skipped:
            first = "; ".join(f"{where}: {reason}" for where, reason in self.skipped[:shown])
            more = f"; ... ({self.n_skipped - shown} more)" if self.n_skipped > shown else ""
            text += f"skipped {self.n_skipped} of {self.rows} rows: {first}{more}. "
        text += f"{self.rows} rows -> {self.pairs} pairs"
        if self.ties_dropped:
            text += f", {self.ties_dropped} tie{'s' if self.ties_dropped != 1 else ''} dropped"
        if self.unlabeled:
            text += f", {self.unlabeled} unlabeled rows ignored"
        return text

    def finish(self) -> None:
        """Log the one-line summary; every row bad means the format is wrong, which is an error."""
        if self.rows and self.n_skipped == self.rows:
            where, reason = self.skipped[0]
            raise DataError(self.name, f"none of its {self.rows} rows could be read (first: {where}: {reason})")
        logger.log(logging.WARNING if self.skipped else logging.INFO, "%s", self.summary())


class PreferenceList(list):
    """A list of :class:`PreferencePair` that also carries the :class:`ReadReport` of the read."""

    def __init__(self, pairs: Sequence[PreferencePair] = (), report: ReadReport | None = None):
        super().__init__(pairs)
        self.report = report if report is not None else ReadReport("pairs", rows=len(self), pairs=len(self))

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return self.report.skipped

    @property
    def n_skipped(self) -> int:
        return self.report.n_skipped


class PreferenceStream:
    """Pairs read lazily, one source batch at a time (for files too big to hold).

    Each iteration re-reads the source and replaces :attr:`report`; the summary is logged when a pass ends.
    """

    def __init__(self, name: str, make_iterator: Any):
        self.name = name
        self._make_iterator = make_iterator
        self.report = ReadReport(name)

    def __iter__(self) -> Iterator[PreferencePair]:
        self.report = ReadReport(self.name)
        return self._make_iterator(self.report)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return self.report.skipped

    @property
    def n_skipped(self) -> int:
        return self.report.n_skipped

    def to_list(self) -> PreferenceList:
        pairs = list(self)
        return PreferenceList(pairs, self.report)


def decode_image(image: ImageInput, source: str = "", *, max_pixels: int | None = -1) -> Image.Image:
    """Decode a path, encoded bytes or Pillow image to RGB; raise :class:`MediaError` naming ``source``.

    Paths go through :func:`mmalign.modalities.image.open_image`; bytes get the same checks (size limit
    before decoding, full decode, mode conversion) with ``source`` (file + row + column) as the name.
    ``max_pixels``: -1 for mmalign's default limit, ``None`` for no limit.
    """
    from PIL import Image, UnidentifiedImageError

    from ..modalities.image import DEFAULT_MAX_PIXELS, open_image, to_rgb

    limit = DEFAULT_MAX_PIXELS if max_pixels == -1 else max_pixels
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        return open_image(image, max_pixels=limit)
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise MediaError(source or "image", f"expected a path, bytes or a PIL image, got {type(image).__name__}")
    name = source or "image bytes"
    if len(image) == 0:
        raise MediaError(name, "empty image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(bytes(image)))
            width, height = opened.size
            if width < 1 or height < 1:
                raise MediaError(name, f"empty image ({width}x{height})")
            if limit is not None and width * height > limit:
                raise MediaError(name, f"{width}x{height} = {width * height} pixels exceeds the limit of {limit}")
            opened.load()
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise MediaError(name, f"refused as a decompression bomb ({error})") from error
    except UnidentifiedImageError as error:
        raise MediaError(name, "not an image Pillow can identify (corrupt or unsupported format)") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise MediaError(name, f"cannot decode image ({error}); the bytes may be truncated or corrupt") from error
    return to_rgb(opened)
