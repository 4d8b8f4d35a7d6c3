"""Run an accuracy protocol over a preference dataset with reward models or a file of precomputed scores.

A dataset becomes a list of :class:`Group` (one prompt, two or more images, human ranks): a Pick-a-Pic pair,
an HPDv2 / ImageRewardDB ranking, or a JSONL pair. Scoring collects the distinct (image, prompt) items of all
groups, so each image is scored once per prompt, in batches sorted by prompt (two-tower rewards encode each
prompt once, :class:`~mmalign.rewards.base.TwoTowerReward`). A scores file (the JSONL that ``mmalign score``
writes: ``{path, prompt, reward, score}``) replaces the model: items are matched by path + prompt (Pick-a-Pic
images, which are bytes, by their ``image_0_uid``/``image_1_uid``, else ``sha1:<hex of the bytes>``).

Every figure comes with a percentile bootstrap CI over the protocol's unit (pairs for Pick-a-Pic and JSONL
pairs, prompts for HPDv2 and ImageRewardDB), seeded. Bradley-Terry probabilities use
``sigmoid(logit_scale * (s_a - s_b))`` with each reward's own logit scale (:data:`DEFAULT_LOGIT_SCALES`);
where a validation split exists the temperature is also fitted there and the test ECE reported at it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MMAlignError
from . import protocols as P

PROTOCOLS = ("pickapic", "hpdv2", "imagereward", "pairs", "videogen", "hpdv3")

MAIN_METRIC = {
    "pickapic": "Pick-a-Pic 3-way accuracy (ties 0.5), threshold chosen on validation",
    "hpdv2": "HPDv2 accuracy: mean over prompts of 1 - discordant/C(n,2), human ties correct",
    "imagereward": "ImageRewardDB accuracy: pooled pairs, human ties skipped, predicted ties wrong",
    "pairs": "pairwise accuracy (predicted ties 0.5, human ties skipped)",
    "videogen": "VideoGen-RewardBench Overall accuracy w/o ties (human ties skipped, predicted ties wrong)",
    "hpdv3": "HPDv3 pair accuracy: preferred scores strictly higher (ties wrong)",
}

DEFAULT_LOGIT_SCALES: dict[str, float] = {
    "pickscore": 1.0,  # already logit_scale.exp() * cos
    "hpsv2": 100.0,  # cos; CLIP's logit scale, as HPSv2's training logits
    "hpsv2.1": 100.0,
    "clipscore": 40.0,  # 2.5 * cos -> 100 * cos
    "clipscore-tm": 1.0,  # 100 * cos
    "imagereward": 1.0,  # standardised; trained with BT on raw differences
    "aesthetic": 1.0,
    "mps": 1.0,  # already logit_scale.exp() * cos, as PickScore
    "mps-aesthetics": 1.0,
    "mps-detail": 1.0,
    "mps-semantic": 1.0,
}
"""``a`` in the Bradley-Terry probability ``sigmoid(a * (s_a - s_b))`` (and Pick-a-Pic's softmax) per reward;
1.0 for any other name. Override with ``logit_scale=`` / ``--logit-scale``."""

PUBLISHED: dict[str, dict[str, float]] = {
    "hpsv2": {"imagereward": 0.657, "hpdv2": 0.833},
    "hpsv2.1": {"imagereward": 0.668, "hpdv2": 0.841},
    "pickscore": {"imagereward": 0.629, "hpdv2": 0.798},
    "imagereward": {"imagereward": 0.651, "hpdv2": 0.740},
    "aesthetic": {"imagereward": 0.574, "hpdv2": 0.768},
    "mps": {"imagereward": 0.675, "hpdv2": 0.835},
}
"""Published accuracies (HPSv2 README table: ImageReward test / HPDv2 test; MPS: its README table, measured by its
``eval_overall_mps_on_*.py`` with the same two protocols), by reward and protocol."""

PICKAPIC_SPLITS = ("validation_unique", "test_unique")


@dataclass
class Group:
    """One prompt with two or more images and their human ranks (lower = better, equal = tie).

    ``label`` is P(image 0 preferred) for two-image groups with a soft label (Pick-a-Pic, JSONL pairs).
    """

    prompt: str
    images: list[Any]
    keys: list[str]
    ranks: list[float]
    label: float | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Benchmark:
    """A protocol's test groups, and its validation groups when there are any."""

    protocol: str
    name: str
    data: str
    test: list[Group]
    validation: list[Group] = field(default_factory=list)
    validation_source: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    modality: str = "image"


# ---------------------------------------------------------------- keys


def image_key(image: Any, uid: Any = None) -> str:
    """The identity of an image: its uid when given, the normalised absolute path, or a hash of the bytes."""
    if uid not in (None, ""):
        return str(uid)
    if isinstance(image, (str, os.PathLike)):
        return os.path.normpath(os.path.abspath(os.fspath(image)))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return "sha1:" + hashlib.sha1(bytes(image)).hexdigest()
    if hasattr(image, "tobytes"):  # a Pillow image
        return "sha1:" + hashlib.sha1(image.tobytes() + repr((image.mode, image.size)).encode()).hexdigest()
    raise TypeError(f"cannot identify an image of type {type(image).__name__}")


# ---------------------------------------------------------------- loading


def _pair_group(pair: Any, pickapic: bool) -> Group:
    if pickapic:  # restore the parquet column order: image_0, image_1
        winner = int(pair.meta.get("winner_index", 0))
        images = [pair.chosen, pair.rejected] if winner == 0 else [pair.rejected, pair.chosen]
        label = pair.label if winner == 0 else 1.0 - pair.label
        uids = [pair.meta.get("image_0_uid"), pair.meta.get("image_1_uid")]
    else:
        images, label, uids = [pair.chosen, pair.rejected], pair.label, [None, None]
    ranks = [1.0, 1.0] if label == 0.5 else ([1.0, 2.0] if label > 0.5 else [2.0, 1.0])
    keys = [image_key(image, uid) for image, uid in zip(images, uids)]
    return Group(pair.prompt, images, keys, ranks, label=float(label), source=pair.source)


def _ranking_groups(pairs: Iterable[Any]) -> list[Group]:
    """Rebuild the rankings that the HPDv2 / ImageRewardDB readers expanded into pairs (kept ties included)."""
    by_source: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        entry = by_source.setdefault(pair.source, {"prompt": pair.prompt, "items": {}})
        (win, lose), (r_win, r_lose) = pair.meta["items"], pair.meta["ranks"]
        entry["items"][win] = (pair.chosen, r_win)
        entry["items"][lose] = (pair.rejected, r_lose)
    groups = []
    for source, entry in by_source.items():
        items = [entry["items"][i] for i in sorted(entry["items"])]
        images = [image for image, _ in items]
        groups.append(
            Group(entry["prompt"], images, [image_key(i) for i in images], [float(r) for _, r in items], source=source)
        )
    return groups


def _read_groups(
    protocol: str, spec: str | os.PathLike, image_root: str | None, split: str | None, check_files: bool = True
) -> tuple:
    from ..data import detect_format, load_preferences

    kind = detect_format(spec)
    options: dict[str, Any] = {"tie_policy": "keep", "stream": False}
    if kind != "pickapic":  # parquet rows hold the image bytes
        options["check_files"] = check_files
        if image_root is not None:
            options["image_root"] = image_root
    if split is not None:
        options["split"] = split
    pairs = load_preferences(spec, **options)
    if kind in ("hpdv2", "imagereward"):
        groups = _ranking_groups(pairs)
    elif protocol in ("hpdv2", "imagereward"):
        raise MMAlignError(f"{spec}: the {protocol} protocol needs rankings (HPDv2 / ImageRewardDB JSON), got {kind}")
    else:
        groups = [_pair_group(pair, pickapic=kind in ("pickapic", "hf")) for pair in pairs]
    return groups, list(pairs.skipped)


def _split_names(spec: str | os.PathLike) -> set[str]:
    path = Path(spec)
    if not path.is_dir():
        return set()
    manifest = path / "dataset_dict.json"
    if manifest.is_file():
        return set(json.loads(manifest.read_text()).get("splits", []))
    return {split for split in PICKAPIC_SPLITS for p in path.rglob(f"{split}-*.parquet")}


def _resolve(path: Any, root: Path) -> str:
    item = Path(str(path)).expanduser()
    return str(item if item.is_absolute() else root / item)


def _absent(paths: Sequence[str], check_files: bool) -> str | None:
    return next((p for p in paths if check_files and not os.path.exists(p)), None)


def read_videogen(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None, check_files: bool = True
) -> tuple[list[Group], list[tuple[str, str]]]:
    """VideoGen-RewardBench's released ``videogen-rewardbench.csv`` (HF dataset ``KlingTeam/VideoGen-RewardBench``,
    read as ``eval_videogen_rewardbench.py`` does): one row per pair with ``path_A``, ``path_B`` (relative to the
    folder ``videos.zip`` was unpacked in: ``image_root``, default the CSV's folder), ``prompt``, ``A_model``,
    ``B_model``, ``fps_*``, ``num_frames_*`` and the labels ``VQ``, ``MQ``, ``TA``, ``Overall`` in A / B / same.
    Ranks follow ``Overall``; every dimension's label is kept in ``meta["labels"]`` (1, -1, 0). Rows with an
    unknown label, or (``check_files``) a missing video, are skipped and reported."""
    import csv

    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    groups: list[Group] = []
    skipped: list[tuple[str, str]] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"path_A", "path_B", "prompt", *P.VIDEOGEN_DIMENSIONS} - set(reader.fieldnames or ())
        if missing:
            raise MMAlignError(f"{path}: not a VideoGen-RewardBench CSV (no column {', '.join(sorted(missing))})")
        for number, row in enumerate(reader, 2):
            where = f"{path}:{number}"
            texts = {d: str(row.get(d) or "").strip() for d in P.VIDEOGEN_DIMENSIONS}
            bad = [f"{d}={t!r}" for d, t in texts.items() if t not in P.VIDEOGEN_LABELS]
            if bad:
                skipped.append((where, f"label {bad[0]} is not A, B or same"))
                continue
            videos = [_resolve(row["path_A"], root), _resolve(row["path_B"], root)]
            absent = _absent(videos, check_files)
            if absent:
                skipped.append((where, f"no such file {absent}"))
                continue
            labels = {d: P.VIDEOGEN_LABELS[t] for d, t in texts.items()}
            overall = labels["Overall"]
            ranks = [1.0, 1.0] if overall == 0 else ([1.0, 2.0] if overall > 0 else [2.0, 1.0])
            label = {1: 1.0, 0: 0.5, -1: 0.0}[overall]
            meta = {"labels": labels, "models": [row.get("A_model", ""), row.get("B_model", "")]}
            groups.append(Group(str(row["prompt"]), videos, [image_key(v) for v in videos], ranks, label, where, meta))
    return groups, skipped


def read_hpdv3(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None, check_files: bool = True
) -> tuple[list[Group], list[tuple[str, str]]]:
    """HPDv3's test file as HPSv3's ``evaluate/evaluate.py`` (mode ``pair``) reads it: a JSON list of
    ``{"prompt", "path1", "path2", ...}`` with ``path1`` the preferred image (paths relative to ``image_root``,
    default the JSON's folder; ``confidence``, ``choice_dist``, ``model1``, ``model2`` kept in ``meta``)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MMAlignError(f"{path}: not a JSON file ({error})") from None
    if not isinstance(rows, list):
        raise MMAlignError(f"{path}: expected a JSON list of {{prompt, path1, path2}} objects")
    groups: list[Group] = []
    skipped: list[tuple[str, str]] = []
    for index, row in enumerate(rows):
        where = f"{path}[{index}]"
        if isinstance(row, dict) and {"generations", "ranking"} <= set(row):
            raise MMAlignError(
                f"{where}: a ranking row (HPSv3 evaluate.py mode 'ranking'); that mode is ImageRewardDB's pooled "
                "rule: use --protocol imagereward"
            )
        if not isinstance(row, dict) or not {"prompt", "path1", "path2"} <= set(row):
            skipped.append((where, "expected an object with prompt, path1, path2"))
            continue
        images = [_resolve(row["path1"], root), _resolve(row["path2"], root)]
        absent = _absent(images, check_files)
        if absent:
            skipped.append((where, f"no such file {absent}"))
            continue
        meta = {k: row[k] for k in ("confidence", "choice_dist", "model1", "model2") if k in row}
        keys = [image_key(i) for i in images]
        groups.append(Group(str(row["prompt"]), images, keys, [1.0, 2.0], 1.0, where, meta))
    return groups, skipped


def media_modality(groups: Iterable[Group]) -> str:
    """The one modality of the groups' files (by extension: image, video, audio; a folder of views is multiview);
    images held in memory (Pick-a-Pic bytes) are images."""
    kinds: set[str] = set()
    for group in groups:
        for item in group.images:
            if not isinstance(item, (str, os.PathLike)) or Path(item).suffix.lower() in _IMAGE_SUFFIXES:
                kinds.add("image")
                continue
            from ..scoring import detect_modality

            kinds.add(detect_modality(item))
    if len(kinds) > 1:
        raise MMAlignError(f"a benchmark holds one modality; these files mix {', '.join(sorted(kinds))}")
    return kinds.pop() if kinds else "image"


_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})


def split_by_prompt(groups: Sequence[Group], fraction: float, seed: int) -> tuple[list[Group], list[Group]]:
    """(validation, test): a seeded random ``fraction`` of the distinct prompts goes to validation."""
    prompts = sorted({g.prompt for g in groups})
    rng = np.random.default_rng(seed)
    n_val = int(round(fraction * len(prompts)))
    if not 0 < n_val < len(prompts):
        raise MMAlignError(f"cannot split {len(prompts)} prompt(s) into validation and test; pass --val-data")
    chosen = {prompts[i] for i in rng.permutation(len(prompts))[:n_val]}
    return [g for g in groups if g.prompt in chosen], [g for g in groups if g.prompt not in chosen]


def load_benchmark(
    protocol: str,
    data: str | os.PathLike,
    *,
    val_data: str | os.PathLike | None = None,
    image_root: str | None = None,
    val_fraction: float = 0.5,
    seed: int = 0,
    name: str | None = None,
    check_files: bool = True,
) -> Benchmark:
    """Read ``data`` (and ``val_data``) for ``protocol``.

    Pick-a-Pic needs a validation split for its tie threshold: ``val_data``, else the ``validation_unique`` /
    ``test_unique`` splits of a parquet folder or ``save_to_disk`` folder (as PickScore's evaluation), else a
    seeded ``val_fraction`` of the prompts of ``data`` (said in the result). Other protocols use a validation
    split only to fit the Bradley-Terry temperature, and only when ``val_data`` is given. ``check_files=False``
    keeps rows whose image files are absent (scoring from a scores file needs only the paths). ``videogen`` reads
    :func:`read_videogen`'s CSV, ``hpdv3`` :func:`read_hpdv3`'s JSON; the benchmark's ``modality`` comes from its
    files (:func:`media_modality`), so ``pairs`` takes JSONL pairs of videos or audio as well as images.
    """
    if protocol not in PROTOCOLS:
        raise MMAlignError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    stem = Path(data).stem or Path(data).name
    label = name or (stem if stem.lower().startswith(protocol) else f"{protocol}:{stem}")
    if protocol in ("videogen", "hpdv3"):
        read = read_videogen if protocol == "videogen" else read_hpdv3
        test, skipped = read(data, image_root, check_files)
        validation: list[Group] = []
        source = ""
        if val_data is not None:
            validation, skipped_val = read(val_data, image_root, check_files)
            skipped, source = skipped + skipped_val, f"file {val_data}"
        modality = media_modality([*test, *validation])
        return Benchmark(protocol, label, str(data), test, validation, source, skipped, modality)
    benchmark = _load_image_protocol(protocol, data, label, val_data, image_root, val_fraction, seed, check_files)
    benchmark.modality = media_modality([*benchmark.test, *benchmark.validation])
    return benchmark


def _load_image_protocol(
    protocol: str,
    data: str | os.PathLike,
    label: str,
    val_data: str | os.PathLike | None,
    image_root: str | None,
    val_fraction: float,
    seed: int,
    check_files: bool,
) -> Benchmark:
    if val_data is not None:
        test, skipped = _read_groups(protocol, data, image_root, None, check_files)
        validation, skipped_val = _read_groups(protocol, val_data, image_root, None, check_files)
        return Benchmark(protocol, label, str(data), test, validation, f"file {val_data}", skipped + skipped_val)
    if protocol == "pickapic" and set(PICKAPIC_SPLITS) <= _split_names(data):
        validation, skipped_val = _read_groups(protocol, data, image_root, PICKAPIC_SPLITS[0], check_files)
        test, skipped = _read_groups(protocol, data, image_root, PICKAPIC_SPLITS[1], check_files)
        return Benchmark(protocol, label, str(data), test, validation, "split validation_unique", skipped + skipped_val)
    groups, skipped = _read_groups(protocol, data, image_root, None, check_files)
    if protocol == "pickapic":
        validation, test = split_by_prompt(groups, val_fraction, seed)
        source = f"{val_fraction:g} of the prompts of the data (seed {seed}); the rest is the test split"
        return Benchmark(protocol, label, str(data), test, validation, source, skipped)
    return Benchmark(protocol, label, str(data), groups, [], "", skipped)


# ---------------------------------------------------------------- scores


class ScoreTable:
    """Scores of (image key, prompt) items, looked up by the keys :func:`image_key` makes.

    ``name`` labels the results; ``reward`` is the registry name (for its default logit scale), ``name`` if empty.
    """

    def __init__(self, name: str = "", scores: Mapping[tuple[str, str], float] | None = None, reward: str = ""):
        self.name = name
        self.reward = reward or name
        self._scores: dict[tuple[str, str], float] = dict(scores or {})
        self._by_key: dict[str, list[float]] = {}
        self._dimensions: dict[tuple[str, str], dict[str, float]] = {}

    def add(
        self,
        key: str,
        prompt: str,
        score: float,
        aliases: Iterable[str] = (),
        dimensions: Mapping[str, float] | None = None,
    ) -> None:
        """``dimensions``: per-dimension scores of a multi-dimensional reward (VideoReward's VQ, MQ, TA, Overall)."""
        for k in dict.fromkeys([key, *aliases]):
            self._scores[(k, prompt)] = float(score)
            self._by_key.setdefault(k, []).append(float(score))
            if dimensions:
                self._dimensions[(k, prompt)] = {d: float(v) for d, v in dimensions.items()}

    def dimension(self, key: str, prompt: str, name: str) -> float | None:
        """The score of one dimension when the reward gave it, else the item's score (:meth:`get`)."""
        value = self._dimensions.get((key, prompt), {}).get(name)
        return value if value is not None else self.get(key, prompt)

    @property
    def has_dimensions(self) -> bool:
        return bool(self._dimensions)

    def get(self, key: str, prompt: str) -> float | None:
        value = self._scores.get((key, prompt))
        if value is None and (key, "") in self._scores and len(set(self._by_key.get(key, []))) == 1:
            value = self._scores[(key, "")]  # a prompt-free reward (aesthetic, JPEG) scored without --prompt
        return value

    def __len__(self) -> int:
        return len(self._scores)


def read_scores(path: str | os.PathLike) -> dict[str, ScoreTable]:
    """The ``mmalign score`` JSONL as one :class:`ScoreTable` per ``reward`` (the file stem when absent).

    Paths are matched as written, normalised against the current folder, and against the file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise MMAlignError(f"{path}: no such scores file")
    tables: dict[str, ScoreTable] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                item, prompt, score = str(row["path"]), str(row.get("prompt", "")), float(row["score"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise MMAlignError(
                    f"{path}:{number}: expected a JSON object with 'path' and a numeric 'score'"
                ) from None
            if not math.isfinite(score):
                raise MMAlignError(f"{path}:{number}: score {score} is not finite")
            reward = str(row.get("reward") or path.stem)
            table = tables.setdefault(reward, ScoreTable(reward))
            aliases = [os.path.normpath(os.path.abspath(item)), os.path.normpath(str(path.parent.resolve() / item))]
            dimensions = row.get("dimensions") if isinstance(row.get("dimensions"), dict) else None
            table.add(item, prompt, score, aliases, dimensions)
    if not tables:
        raise MMAlignError(f"{path}: no score records")
    return tables


def distinct_items(groups: Iterable[Group], uses_prompt: bool = True) -> dict[tuple[str, str], Any]:
    """(key, prompt) -> image over all groups; a prompt-free reward needs each image once whatever the prompt."""
    items: dict[tuple[str, str], Any] = {}
    for group in groups:
        for key, image in zip(group.keys, group.images):
            items.setdefault((key, group.prompt if uses_prompt else ""), image)
    return items


def score_groups(
    reward: Any, groups: Iterable[Group], batch_size: int = 32, progress: bool = False, modality: str = "image"
) -> ScoreTable:
    """Score each distinct image of ``groups`` once with ``reward`` (sorted by prompt, ``batch_size`` at a time).
    Other modalities go through :func:`score_media`."""
    from tqdm.auto import tqdm

    from ..data import decode_image

    if modality != "image":
        return score_media(reward, groups, modality, batch_size=batch_size, progress=progress)
    uses_prompt = bool(getattr(reward, "uses_prompt", True))
    items = sorted(distinct_items(groups, uses_prompt).items(), key=lambda kv: (kv[0][1], kv[0][0]))
    table = ScoreTable(getattr(reward, "name", "reward"))
    bar = tqdm(total=len(items), unit="img", desc=f"scoring ({table.name})", disable=not progress, file=sys.stderr)
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            images = [decode_image(image, key) for (key, _), image in chunk]
            prompts = [prompt for (_, prompt), _ in chunk]
            scores = reward.score_images(images, prompts, batch_size=len(chunk))
            for ((key, prompt), _), value in zip(chunk, scores.tolist()):
                table.add(key, prompt, value)
            bar.update(len(chunk))
    finally:
        bar.close()
    return table


def score_media(
    reward: Any, groups: Iterable[Group], modality: str, batch_size: int = 32, progress: bool = False, media: Any = None
) -> ScoreTable:
    """Score each distinct video / audio / view-set file of ``groups`` once, as ``mmalign score`` does
    (:func:`mmalign.scoring.run_scoring`: a native video reward scores videos itself, image rewards are lifted
    frame by frame, audio needs an audio reward such as CLAP; ``media`` is a
    :class:`~mmalign.scoring.MediaOptions`). VideoReward's per-dimension scores are kept."""
    import tempfile

    from ..scoring import ScoreItem, run_scoring
    from ..sharding import Shard

    uses_prompt = bool(getattr(reward, "uses_prompt", True))
    items = sorted(distinct_items(groups, uses_prompt).items(), key=lambda kv: (kv[0][1], kv[0][0]))
    score_items = [ScoreItem(str(image), prompt, modality) for (_, prompt), image in items]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "scores.jsonl"
        run_scoring(reward, score_items, out=out, batch_size=batch_size, progress=progress, media=media, shard=Shard())
        tables = read_scores(out) if out.is_file() and out.stat().st_size else {}
    table = next(iter(tables.values()), ScoreTable())
    table.name = table.reward = getattr(reward, "name", "reward")
    return table


def group_scores(groups: Sequence[Group], table: ScoreTable) -> list[np.ndarray]:
    """Each group's scores in image order; a missing item is an error naming it."""
    out, missing = [], []
    for group in groups:
        values = [table.get(key, group.prompt) for key in group.keys]
        if any(v is None for v in values):
            missing += [(k, group.prompt) for k, v in zip(group.keys, values) if v is None]
            continue
        out.append(np.asarray(values, dtype=np.float64))
    if missing:
        key, prompt = missing[0]
        raise MMAlignError(
            f"{len(missing)} item(s) have no score in {table.name or 'the scores'}; first: path {key!r} with "
            f"prompt {prompt!r} (scores files are matched by path + prompt, Pick-a-Pic images by uid)"
        )
    return out


# ---------------------------------------------------------------- evaluation


@dataclass
class _Pairs:
    """All pairs of a list of groups, the better-ranked (or first, for ties) image as ``a``."""

    s_a: np.ndarray
    s_b: np.ndarray
    labels: np.ndarray  # P(a preferred): 1, or 0.5 for a tie, or a soft label
    group: np.ndarray  # index of the group of each pair


def _expand_pairs(groups: Sequence[Group], scores: Sequence[np.ndarray]) -> _Pairs:
    s_a, s_b, labels, index = [], [], [], []
    for g, (group, s) in enumerate(zip(groups, scores)):
        ranks = group.ranks
        for i in range(len(ranks)):
            for j in range(i + 1, len(ranks)):
                if len(ranks) == 2 and group.label is not None:
                    a, b, y = (i, j, group.label) if group.label >= 0.5 else (j, i, 1.0 - group.label)
                elif ranks[i] <= ranks[j]:
                    a, b, y = i, j, 1.0 if ranks[i] < ranks[j] else 0.5
                else:
                    a, b, y = j, i, 1.0
                s_a.append(s[a])
                s_b.append(s[b])
                labels.append(y)
                index.append(g)
    return _Pairs(np.array(s_a), np.array(s_b), np.array(labels), np.array(index, dtype=np.int64))


def _pair_statistics(pairs: _Pairs, n_groups: int, logit_scale: float, boot: dict[str, Any]) -> dict[str, P.Estimate]:
    outcomes = P.pairwise_outcomes(pairs.s_a, pairs.s_b, pairs.labels)
    kept = ~np.isnan(outcomes)
    correct = np.bincount(pairs.group[kept], weights=outcomes[kept], minlength=n_groups)
    counted = np.bincount(pairs.group[kept], minlength=n_groups).astype(np.float64)
    has = counted > 0
    metrics = {"pairwise_accuracy": P.bootstrap_ratio(correct[has], counted[has], **boot)}

    def ece(idx: np.ndarray) -> float:
        weights = np.bincount(idx, minlength=n_groups)[pairs.group]
        return P.expected_calibration_error(pairs.s_a, pairs.s_b, pairs.labels, logit_scale, weights=weights)

    metrics["ece"] = P.bootstrap_statistic(ece, n_groups, **boot)
    return metrics


def _rank_statistics(groups: Sequence[Group], scores: Sequence[np.ndarray], boot: dict) -> dict[str, P.Estimate]:
    if not any(len(g.ranks) > 2 for g in groups):
        return {}
    pairs = [P.rank_correlations(s, g.ranks) for g, s in zip(groups, scores) if len(g.ranks) > 2]
    rho = np.array([r for r, _ in pairs])
    tau = np.array([t for _, t in pairs])
    return {
        "spearman": P.bootstrap_ratio(rho[np.isfinite(rho)], **boot),
        "kendall": P.bootstrap_ratio(tau[np.isfinite(tau)], **boot),
    }


def evaluate(
    benchmark: Benchmark,
    table: ScoreTable,
    *,
    logit_scale: float | None = None,
    thresholds: Sequence[float] | str = P.PICKAPIC_THRESHOLDS,
    predicted_ties: P.PredictedTies = "index",
    videogen_thresholds: P.VideogenThresholds = "reference",
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """All figures of ``benchmark`` for the scores in ``table``, as a JSON-ready dict.

    ``thresholds``: the Pick-a-Pic tie-threshold grid (PickScore's by default) or ``"exhaustive"`` (every
    distinct validation gap). The main figure is ``metrics["accuracy"]``; ``pairwise_accuracy``, ``ece`` (and
    ``ece_fitted`` with a validation split) and, for rankings, ``spearman`` and ``kendall`` come with it.
    VideoGen-RewardBench adds ``accuracy_with_ties`` and ``{VQ,MQ,TA}_accuracy[_with_ties]``
    (``videogen_thresholds``: :func:`~mmalign.bench.protocols.videogen_tie_calibration`'s ``thresholds``).
    """
    from .. import __version__

    protocol = benchmark.protocol
    boot = {"n_resamples": n_bootstrap, "seed": seed, "level": level}
    reward = table.name
    scale = float(logit_scale if logit_scale is not None else DEFAULT_LOGIT_SCALES.get(table.reward, 1.0))
    test_scores = group_scores(benchmark.test, table)
    groups = benchmark.test
    settings: dict[str, Any] = {"logit_scale": scale, "validation": benchmark.validation_source or None}
    metrics: dict[str, P.Estimate] = {}
    if protocol == "pickapic":
        val_scores = group_scores(benchmark.validation, table)
        if not val_scores:
            raise MMAlignError("the Pick-a-Pic protocol needs a non-empty validation split for its tie threshold")
        vp0, vp1 = P.pickapic_probabilities([s[0] for s in val_scores], [s[1] for s in val_scores], scale)
        vlabels = [g.label for g in benchmark.validation]
        grid = P.candidate_thresholds(vp0, vp1) if thresholds == "exhaustive" else list(thresholds)
        threshold, val_acc = P.select_tie_threshold(vp0, vp1, vlabels, grid)
        p0, p1 = P.pickapic_probabilities([s[0] for s in test_scores], [s[1] for s in test_scores], scale)
        outcomes = P.pickapic_outcomes(p0, p1, [g.label for g in groups], threshold)
        metrics["accuracy"] = P.bootstrap_ratio(outcomes, **boot)
        settings.update(threshold=threshold, validation_accuracy=max(val_acc), threshold_grid=thresholds)
        settings["bootstrap_unit"] = "pair"
    elif protocol == "hpdv2":
        per_prompt = P.hpdv2_per_prompt(test_scores, [g.ranks for g in groups], predicted_ties)
        metrics["accuracy"] = P.bootstrap_ratio(per_prompt, **boot)
        settings.update(predicted_ties=predicted_ties, bootstrap_unit="prompt")
    elif protocol == "videogen":
        metrics.update(_videogen_metrics(groups, table, videogen_thresholds, boot))
        settings.update(
            bootstrap_unit="pair",
            tie_thresholds=videogen_thresholds,
            dimension_scores="per dimension" if table.has_dimensions else "the reward's one score for every dimension",
        )
    elif protocol == "hpdv3":
        outcomes = P.hpdv3_outcomes([s[0] for s in test_scores], [s[1] for s in test_scores])
        metrics["accuracy"] = P.bootstrap_ratio(outcomes, **boot)
        settings.update(bootstrap_unit="pair", predicted_ties="wrong")
    elif protocol == "imagereward":
        counts = np.array([P.imagereward_counts(s, g.ranks) for g, s in zip(groups, test_scores)], dtype=np.float64)
        counts = counts.reshape(-1, 2)
        has = counts[:, 1] > 0
        metrics["accuracy"] = P.bootstrap_ratio(counts[has, 0], counts[has, 1], **boot)
        settings.update(bootstrap_unit="prompt")
    else:
        settings.update(bootstrap_unit="pair" if all(len(g.ranks) == 2 for g in groups) else "prompt")
    pairs = _expand_pairs(groups, test_scores)
    metrics.update(_pair_statistics(pairs, len(groups), scale, boot))
    if protocol == "pairs":
        metrics = {"accuracy": metrics["pairwise_accuracy"], **metrics}
    metrics.update(_rank_statistics(groups, test_scores, boot))
    if benchmark.validation:
        val_pairs = _expand_pairs(benchmark.validation, group_scores(benchmark.validation, table))
        fitted = P.fit_logit_scale(val_pairs.s_a, val_pairs.s_b, val_pairs.labels)
        settings["fitted_logit_scale"] = fitted
        metrics["ece_fitted"] = _pair_statistics(pairs, len(groups), fitted, boot)["ece"]
    n_images = len({(k, g.prompt) for g in groups for k in g.keys})
    return {
        "protocol": protocol,
        "dataset": benchmark.name,
        "data": benchmark.data,
        "reward": reward,
        "modality": benchmark.modality,
        "main_metric": MAIN_METRIC[protocol],
        "metrics": {name: estimate.as_dict() for name, estimate in metrics.items()},
        "counts": {
            "groups": len(groups),
            "pairs": int(len(pairs.s_a)),
            "human_ties": int((pairs.labels == 0.5).sum()),
            "images": n_images,
            "validation_groups": len(benchmark.validation),
            "skipped_rows": len(benchmark.skipped),
        },
        "settings": {**settings, "bootstrap": boot},
        "published": PUBLISHED.get(table.reward, {}).get(protocol),
        "mmalign": __version__,
    }


def _videogen_metrics(
    groups: Sequence[Group], table: ScoreTable, thresholds: P.VideogenThresholds, boot: dict[str, Any]
) -> dict[str, P.Estimate]:
    """Per dimension, VideoAlign's accuracy w/o ties (``accuracy`` for Overall, ``VQ_accuracy``, ...) and w/ ties
    (``accuracy_with_ties``, ``VQ_accuracy_with_ties``, ...), bootstrapped over pairs. ``m = s(A) - s(B)`` with the
    reward's score of that dimension when it gives one (VideoReward), else its single score."""
    metrics: dict[str, P.Estimate] = {}
    for dim in P.VIDEOGEN_DIMENSIONS:
        h = np.array([g.meta["labels"][dim] for g in groups], dtype=np.float64)
        m = np.array(
            [table.dimension(g.keys[0], g.prompt, dim) - table.dimension(g.keys[1], g.prompt, dim) for g in groups],
            dtype=np.float64,
        )
        prefix = "" if dim == "Overall" else f"{dim}_"
        counted = h != 0
        metrics[f"{prefix}accuracy"] = P.bootstrap_ratio(((h * m > 0) & counted).astype(np.float64), counted, **boot)
        metrics[f"{prefix}accuracy_with_ties"] = P.bootstrap_statistic(
            lambda idx, h=h, m=m: P.videogen_accuracy_with_ties(h[idx], m[idx], thresholds), len(h), **boot
        )
    return metrics


@dataclass
class RewardSpec:
    """A reward to load: registry name plus where its files are; ``label`` names it in results (default name)."""

    name: str
    weights: str | None = None
    processor: str | None = None
    backbone: str | None = None
    label: str | None = None


def score_spec(
    spec: RewardSpec,
    groups: Sequence[Group],
    *,
    batch_size: int = 32,
    device: str = "cpu",
    dtype: str = "fp32",
    progress: bool = False,
    modality: str = "image",
) -> ScoreTable:
    """Load the reward of ``spec``, score each distinct image (or video, audio: ``modality``) of ``groups`` once,
    and let the model go."""
    from ..rewards import load_reward

    reward = load_reward(
        spec.name,
        weights=spec.weights,
        processor=spec.processor,
        backbone=spec.backbone,
        device=device,
        dtype=dtype,
    )
    table = score_groups(reward, groups, batch_size=batch_size, progress=progress, modality=modality)
    table.name, table.reward = spec.label or spec.name, spec.name
    del reward
    return table


def run_rewards(
    benchmark: Benchmark,
    *,
    rewards: Sequence[RewardSpec] = (),
    scores: str | os.PathLike | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    dtype: str = "fp32",
    progress: bool = False,
    **options: Any,
) -> list[dict[str, Any]]:
    """Evaluate ``benchmark`` for each reward model (loaded once, each image scored once) and/or each reward of a
    scores file; ``options`` go to :func:`evaluate`."""
    results = []
    groups = [*benchmark.validation, *benchmark.test]
    for spec in rewards:
        common = dict(batch_size=batch_size, device=device, dtype=dtype, progress=progress)
        table = score_spec(spec, groups, **common, modality=benchmark.modality)
        results.append(evaluate(benchmark, table, **options))
    if scores is not None:
        for table in read_scores(scores).values():
            results.append(evaluate(benchmark, table, **options))
    return results


# ---------------------------------------------------------------- output


def json_safe(value: Any) -> Any:
    """NaN and infinities become None (strict JSON), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def result_filename(result: Mapping[str, Any]) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{result['reward']}.{result['dataset']}")
    return f"{safe}.json"


def format_estimate(estimate: Mapping[str, float] | None, percent: bool = True) -> str:
    if not estimate or estimate.get("value") is None or math.isnan(estimate["value"]):
        return "–"
    factor = 100.0 if percent else 1.0
    value, low, high = (math.nan if estimate.get(k) is None else estimate[k] * factor for k in ("value", "low", "high"))
    digits = 1 if percent else 3
    if math.isnan(low):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def results_markdown(results: Sequence[Mapping[str, Any]]) -> str:
    """One line per result: every figure with its CI."""
    lines = [
        "| reward | dataset | accuracy % | pairwise % | Spearman | Kendall | ECE | pairs | published % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r["metrics"]
        published = f"{100 * r['published']:.1f}" if r.get("published") is not None else ""
        lines.append(
            f"| {r['reward']} | {r['dataset']} | {format_estimate(m.get('accuracy'))} | "
            f"{format_estimate(m.get('pairwise_accuracy'))} | {format_estimate(m.get('spearman'), False)} | "
            f"{format_estimate(m.get('kendall'), False)} | {format_estimate(m.get('ece'), False)} | "
            f"{r['counts']['pairs']} | {published} |"
        )
    return "\n".join(lines) + "\n" + videogen_markdown(results)


def videogen_markdown(results: Sequence[Mapping[str, Any]]) -> str:
    """VideoGen-RewardBench's table (accuracy w/o and w/ ties per dimension, %) for the results that have it;
    empty when none does."""
    rows = [r for r in results if "accuracy_with_ties" in r["metrics"]]
    if not rows:
        return ""
    names = [("" if d == "Overall" else f"{d}_", d) for d in P.VIDEOGEN_DIMENSIONS]
    header = " | ".join(f"{d} w/o ties % | {d} w/ ties %" for _, d in names)
    lines = ["", f"| reward | dataset | {header} |", "|---|---|" + "---|" * (2 * len(names))]
    for r in rows:
        m = r["metrics"]
        cells = " | ".join(
            f"{format_estimate(m.get(f'{p}accuracy'))} | {format_estimate(m.get(f'{p}accuracy_with_ties'))}"
            for p, _ in names
        )
        lines.append(f"| {r['reward']} | {r['dataset']} | {cells} |")
    return "\n".join(lines) + "\n"


def write_results(results: Sequence[Mapping[str, Any]], out: str | os.PathLike) -> list[Path]:
    """One JSON per (reward, dataset) plus ``results.md``; returns the JSON paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for result in results:
        path = out / result_filename(result)
        path.write_text(json.dumps(json_safe(result), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        paths.append(path)
    (out / "results.md").write_text(results_markdown(results), encoding="utf-8")
    return paths
