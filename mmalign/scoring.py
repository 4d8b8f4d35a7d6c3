"""The batch scoring job behind ``mmalign score``: incremental, resumable JSONL output.

Each scored image is one JSON line (``path``, ``prompt``, ``reward``, ``score``, ``dtype``) written and
flushed batch by batch, so an interrupted run loses at most one batch; re-running with the same output file
skips every (path, prompt) already there. Unusable images either stop the job with an error naming the file
(what was scored stays on disk) or, with ``skip_bad``, are reported and skipped.

Videos, multi-view sets and audio get the same keys plus ``modality``, ``aggregate``, ``variant`` (the settings
that change the score; part of the resume identity), ``units`` (per-frame / per-view / per-window scores),
``unit``, ``unit_positions`` and, where they apply, ``unit_weights``, ``consistency``, ``num_frames``, ``fps``,
``views``, ``duration``. Image rewards are lifted to videos and view sets (:mod:`mmalign.rewards.lifted`);
audio and music need an audio reward (CLAP).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import torch

from .errors import MediaError, MMAlignError
from .modalities import MODALITIES, files_with_suffix, natural_key
from .modalities.audio import AUDIO_EXTENSIONS
from .modalities.image import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, list_images, open_image
from .modalities.multiview import CAMERAS_FILE
from .modalities.video import VIDEO_EXTENSIONS
from .rewards.base import DTYPE_NAMES, Reward
from .sharding import (
    Shard,
    close_part,
    current_shard,
    fingerprint,
    open_part,
    part_rows,
    parts_dir,
    process_group,
    remove_parts,
    write_atomic,
)

AUTO = "auto"
PAIR_KEYS = {
    "image": "image",
    "video": "video",
    "views": "multiview",
    "audio": "audio",
    "music": "music",
    "media": AUTO,
}
DEFAULT_AGGREGATE = {"video": "mean", "multiview": "mean", "audio": "mean", "music": "mean"}


@dataclass(frozen=True)
class ScoreItem:
    """One thing to score. Identity (for resume) is ``(path, prompt, variant)``; ``variant`` is set by the job
    from the scorer's settings for non-image items."""

    path: str
    prompt: str
    modality: str = field(default="image", compare=False)
    variant: str | None = None


@dataclass(frozen=True)
class MediaOptions:
    """How non-image items are scored (the ``mmalign score`` flags of the same names)."""

    frames: int = 8
    aggregate: str | None = None
    grid: str | None = None
    window_seconds: float | None = None
    sample_fps: float | None = None
    consistency: float = 0.0
    normalize: str | None = None
    backend: str = "pyav"
    max_pixels: int | None = DEFAULT_MAX_PIXELS


@dataclass
class ScoreSummary:
    scored: int = 0
    already_done: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def detect_modality(path: str | os.PathLike, grid: str | None = None) -> str:
    """The modality of one file by its extension (a GIF is an image unless asked for as a video; with a
    ``grid`` an image is a multi-view grid); a folder with a ``cameras.json`` is a multi-view set."""
    path = Path(path)
    if path.is_dir():
        return "multiview" if (path / CAMERAS_FILE).is_file() else "image"
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTENSIONS and suffix != ".gif":
        return "video"
    if suffix in AUDIO_EXTENSIONS:
        return "audio"
    return "multiview" if grid is not None else "image"


def _subfolders_with(folder: Path, suffixes: frozenset[str]) -> list[Path]:
    return sorted((d for d in folder.iterdir() if d.is_dir() and files_with_suffix(d, suffixes)), key=natural_key)


def _expand(path: Path, modality: str, grid: str | None) -> list[tuple[Path, str]]:
    """One command-line path -> (path, modality) items."""
    if not path.exists():
        raise MediaError(path, "no such file or folder")
    if not path.is_dir():
        return [(path, detect_modality(path, grid) if modality == AUTO else modality)]
    if modality == AUTO:
        if (path / CAMERAS_FILE).is_file() and grid is None:
            return [(path, "multiview")]
        media = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS | AUDIO_EXTENSIONS
        return [
            (p, detect_modality(p, grid))
            for p in sorted(q for q in path.iterdir() if q.suffix.lower() in media and q.is_file())
        ]
    if modality == "image":
        return [(p, "image") for p in list_images([path])]
    if modality in ("audio", "music"):
        return [(p, modality) for p in files_with_suffix(path, AUDIO_EXTENSIONS)]
    if modality == "video":
        videos = files_with_suffix(path, VIDEO_EXTENSIONS)
        if videos:
            return [(p, "video") for p in videos]
        folders = _subfolders_with(path, IMAGE_EXTENSIONS)
        return [(p, "video") for p in folders] if folders else [(path, "video")]  # a folder of frames
    if grid is not None:  # multiview: every image of the folder is a grid
        return [(p, "multiview") for p in files_with_suffix(path, IMAGE_EXTENSIONS)]
    if files_with_suffix(path, IMAGE_EXTENSIONS):
        return [(path, "multiview")]  # a folder of views
    return [(p, "multiview") for p in _subfolders_with(path, IMAGE_EXTENSIONS)]  # a folder of view folders


def items_from_paths(
    paths: Iterable[str | os.PathLike], prompt: str, modality: str = "image", grid: str | None = None
) -> list[ScoreItem]:
    """Files and folders -> items. ``modality="image"`` (the default) lists images as it always did; ``auto``
    picks each file's modality by extension and treats a folder with ``cameras.json`` as one view set; an explicit
    modality reads folders as that modality's containers (a folder of frames, of views, of view folders...)."""
    if modality not in (AUTO, *MODALITIES):
        raise MMAlignError(f"unknown modality {modality!r}; use auto or one of {', '.join(MODALITIES)}")
    if modality == "image" and grid is None:
        return [ScoreItem(str(p), prompt) for p in list_images(paths)]
    items = []
    for item in paths:
        items.extend(ScoreItem(str(p), prompt, m) for p, m in _expand(Path(item), modality, grid))
    return items


def items_from_pairs(pairs_file: str | os.PathLike, modality: str = AUTO, grid: str | None = None) -> list[ScoreItem]:
    """Read ``{"prompt": ..., "image": ...}`` lines (or ``"video"``, ``"views"``, ``"audio"``, ``"music"``;
    ``"media"`` is detected by extension); relative paths are relative to the file. An explicit ``modality``
    (not ``auto``) applies to every line."""
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
            key = next((k for k in PAIR_KEYS if isinstance(row, dict) and isinstance(row.get(k), str)), None)
            if key is None:
                raise MMAlignError(
                    f'{where}: expected an object with a string "image" key (or "video", "views", "audio", "music", '
                    '"media")'
                )
            if not isinstance(row.get("prompt", ""), str):
                raise MMAlignError(f'{where}: "prompt" must be a string')
            media = Path(row[key])
            if not media.is_absolute():
                media = pairs_file.parent / media
            kind = modality if modality != AUTO else PAIR_KEYS[key]
            if kind == AUTO:
                kind = detect_modality(media, grid)
            items.append(ScoreItem(str(media), row.get("prompt", ""), kind))
    return items


def _record_key(row: Any) -> tuple[Any, ...]:
    """What makes a score record unique in a file: ``(reward, path, prompt, variant)``."""
    return (row["reward"], row.get("path"), row.get("prompt"), row.get("variant"))


def _scan_scores(out: Path, reward: str) -> tuple[set[ScoreItem], list[tuple[Any, ...]], bytes, int]:
    """Read a score file without changing it: the items ``reward`` scored there, every record's key, the file's
    bytes and the length of its valid part (a torn last line left out). A complete line that is not a record
    raises, naming the file and line."""
    done: set[ScoreItem] = set()
    keys: list[tuple[Any, ...]] = []
    data = out.read_bytes() if out.exists() else b""
    good_end = 0
    for line in data.splitlines(keepends=True):
        try:
            row = json.loads(line)
            if row["reward"] == reward:
                done.add(ScoreItem(row["path"], row["prompt"], variant=row.get("variant")))
            keys.append(_record_key(row))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            if line.endswith(b"\n"):
                number = data[:good_end].count(b"\n") + 1
                raise MMAlignError(f"{out}: line {number} is not a score record") from None
            break  # torn final line
        good_end += len(line)
    return done, keys, data, good_end


def read_done(out: Path, reward: str) -> set[ScoreItem]:
    """(path, prompt, variant) already scored by ``reward`` in ``out``; a torn last line (a crash mid-write) is
    cut off. Several rewards (and variants) may share one output file."""
    if not out.exists():
        return set()
    done, _, data, good_end = _scan_scores(out, reward)
    if good_end < len(data):
        with out.open("r+b") as handle:
            handle.truncate(good_end)
    elif data and not data.endswith(b"\n"):  # a whole record whose newline was lost: the next append would join it
        with out.open("ab") as handle:
            handle.write(b"\n")
    return done


def merge_parts(out: Path, reward: str, order: Mapping[ScoreItem, int] | None = None) -> int:
    """Move the records of the part files of a multi-process run (:mod:`mmalign.sharding`) into ``out`` at once;
    returns how many were new. ``out`` keeps its lines (a torn last one dropped); then come part records it does
    not hold yet, ``reward``'s in the job's item ``order`` (so that the file reads as one process's run would
    write it), any others after them as found. Idempotent: a merge killed after replacing ``out`` leaves parts
    whose records ``out`` already holds, and they are skipped."""
    if not parts_dir(out).exists():
        return 0
    rows = part_rows(out)
    _, keys, data, good_end = _scan_scores(out, reward)
    present = set(keys)
    new: list[tuple[tuple[int, int], bytes]] = []
    unknown = len(order) if order else 0  # after every item of the job
    for position, part in enumerate(rows):
        try:
            key = _record_key(part.row)
        except (KeyError, TypeError, AttributeError):
            raise MMAlignError(f"{part.path}: line {part.line} is not a score record") from None
        if key in present:
            continue
        present.add(key)
        rank = None
        if order is not None and key[0] == reward:
            rank = order.get(ScoreItem(key[1], key[2], variant=key[3]))
        new.append(((rank if rank is not None else unknown, position), part.raw))
    kept = data[:good_end]
    if new or good_end < len(data) or not out.exists() or (kept and not kept.endswith(b"\n")):
        if kept and not kept.endswith(b"\n"):
            kept += b"\n"
        write_atomic(out, [kept, *(raw for _, raw in sorted(new, key=lambda pair: pair[0]))])
    remove_parts(out)
    return len(new)


def _batches(items: list[ScoreItem], size: int) -> Iterator[list[ScoreItem]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def media_scorers(reward: Reward, modalities: Iterable[str], options: MediaOptions | None = None) -> dict[str, Any]:
    """The scorer of each non-image modality: image rewards lifted to video / multiview, an audio reward
    configured for audio or music. Incompatible pairs raise an error saying which reward would do."""
    options = options or MediaOptions()
    scorers: dict[str, Any] = {}
    for modality in dict.fromkeys(modalities):
        if modality == "image":
            if reward.modality != "image":
                raise MMAlignError(f"{reward.name} scores {reward.modality}, not images; use an image reward")
            continue
        if hasattr(reward, "with_members") and reward.modality != modality:  # an ensemble (rewards/ensemble.py)
            raise MMAlignError(
                f"{reward.name} is an ensemble of {reward.modality} rewards: it scores {reward.modality} files and, "
                f"in the trainers, {modality} tensors (lifted member by member); score {modality} files with each "
                "member and combine them"
            )
        if reward.modality == modality and modality in ("video", "multiview"):  # a native video / multi-view
            # reward (VideoReward, Reward3D) decodes and scores files itself
            scorers[modality] = reward.with_grid(options.grid) if modality == "multiview" and options.grid else reward
            continue
        aggregate = options.aggregate or DEFAULT_AGGREGATE[modality]
        try:
            if modality in ("video", "multiview"):
                if reward.modality != "image":
                    raise MMAlignError(
                        f"{reward.name} scores {reward.modality}; {modality} needs an image reward to lift "
                        "(e.g. hpsv2.1, pickscore, imagereward)"
                    )
                from .rewards.lifted import MultiviewReward, VideoReward

                if modality == "video":
                    scorers[modality] = VideoReward(
                        reward,
                        aggregate,
                        options.frames,
                        consistency_weight=options.consistency,
                        sample_fps=options.sample_fps,
                        backend=options.backend,
                        max_pixels=options.max_pixels,
                    )
                else:
                    scorers[modality] = MultiviewReward(
                        reward,
                        aggregate,
                        consistency_weight=options.consistency,
                        grid=options.grid,
                        max_pixels=options.max_pixels,
                    )
            else:
                if reward.modality != "audio":
                    raise MMAlignError(
                        f"{reward.name} scores {reward.modality}; {modality} needs an audio reward "
                        "(clap, clap-music, audiobox-aesthetics)"
                    )
                scorers[modality] = reward.with_windows(
                    windows="cover" if modality == "music" else None,
                    window_seconds=options.window_seconds,
                    aggregate=aggregate,
                    normalize=options.normalize,
                )
        except ValueError as error:
            raise MMAlignError(f"{modality}: {error}") from error
    return scorers


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
    media: MediaOptions | None = None,
    shard: Shard | None = None,
) -> ScoreSummary:
    """Score ``items`` with ``reward``, appending JSON lines to ``out`` (or writing to stdout). Videos, view sets
    and audio are scored by :func:`media_scorers` with ``media`` options; records keep the batch's order.

    Under a launcher (``shard``, default from the environment: :func:`mmalign.sharding.current_shard`) each
    process scores its batches into a part file and process 0 merges them into ``out`` at the end, in the order
    one process writes; every process returns the summary of the whole job."""
    shard = shard or current_shard()
    scorers = media_scorers(reward, [item.modality for item in items], media)
    items = [
        item if item.modality == "image" else replace(item, variant=scorers[item.modality].variant) for item in items
    ]
    out_path = Path(out) if out is not None else None
    unique = list(dict.fromkeys(items))
    job = _ScoreJob(reward, scorers, batch_size, skip_bad, max_pixels)
    if shard.distributed:
        if out_path is None:
            raise MMAlignError(
                f"{shard.world} processes write part files beside the output; give --out FILE.jsonl (not stdout)"
            )
        return _run_sharded(job, items, unique, out_path, shard, progress)
    summary = ScoreSummary()
    if out_path is not None and parts_dir(out_path).exists():  # what a killed multi-process run left
        merge_parts(out_path, reward.name, {item: index for index, item in enumerate(unique)})
    done = read_done(out_path, reward.name) if out_path is not None else set()
    todo = [item for item in unique if item not in done]
    summary.already_done = len(items) - len(todo)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    handle = out_path.open("a", encoding="utf-8") if out_path is not None else (stdout or sys.stdout)
    try:
        job.score(todo, handle, summary, progress)
    finally:
        if out_path is not None:
            handle.close()
    return summary


def _run_sharded(
    job: _ScoreJob, items: list[ScoreItem], unique: list[ScoreItem], out: Path, shard: Shard, progress: bool
) -> ScoreSummary:
    """One process's share of a multi-process job: its batches of the item list (blocks of ``batch_size``, so a
    fresh run's batches are one process's), less what ``out`` and any part file hold; then the merge."""
    name = job.reward.name
    with process_group(shard) as group:
        group.check_same(fingerprint([[i.path, i.prompt, i.variant] for i in unique]), "the items to score")
        done = read_done_anywhere(out, name)
        mine = [item for _, item in shard.take(unique, block=job.batch_size)]
        todo = [item for item in mine if item not in done]
        summary = ScoreSummary(already_done=len(mine) - len(todo))
        handle = open_part(out, shard)
        try:
            job.score(todo, handle, summary, progress and shard.is_main)
        finally:
            close_part(handle)
        summaries = group.gather(summary)  # every slice is finished after this
        if shard.is_main:
            merge_parts(out, name, {item: index for index, item in enumerate(unique)})
        group.gather(None)  # when any process returns, ``out`` holds the whole job
    return ScoreSummary(
        scored=sum(s.scored for s in summaries),
        already_done=sum(s.already_done for s in summaries) + len(items) - len(unique),
        skipped=[skip for s in summaries for skip in s.skipped],
    )


def read_done_anywhere(out: Path, reward: str) -> set[ScoreItem]:
    """What ``reward`` scored in ``out`` or in a part file beside it (of any earlier process count), read
    without changing either: the other processes read them at the same time."""
    done = _scan_scores(out, reward)[0]
    for part in part_rows(out):
        row = part.row
        if isinstance(row, dict) and row.get("reward") == reward and "path" in row and "prompt" in row:
            done.add(ScoreItem(row["path"], row["prompt"], variant=row.get("variant")))
    return done


@dataclass
class _ScoreJob:
    """The scoring loop shared by one process and many: decode a batch, score it, write its records in order."""

    reward: Reward
    scorers: dict[str, Any]
    batch_size: int
    skip_bad: bool
    max_pixels: int | None

    def score(self, todo: list[ScoreItem], handle: IO[str], summary: ScoreSummary, progress: bool) -> None:
        from tqdm.auto import tqdm

        reward, scorers = self.reward, self.scorers
        dtype = DTYPE_NAMES.get(reward.dtype, str(reward.dtype))
        unit = "img" if not scorers else "item"
        bar = tqdm(total=len(todo), unit=unit, desc=f"scoring ({reward.name})", disable=not progress, file=sys.stderr)
        try:
            for batch in _batches(todo, self.batch_size):
                decoded: dict[str, list[Any]] = {}
                kept: dict[str, list[ScoreItem]] = {}
                for item in batch:
                    try:
                        if item.modality == "image":
                            value = open_image(item.path, max_pixels=self.max_pixels)
                        else:
                            value = scorers[item.modality].decode(item.path)
                        decoded.setdefault(item.modality, []).append(value)
                        kept.setdefault(item.modality, []).append(item)
                    except MediaError as error:
                        if not self.skip_bad:
                            raise
                        summary.skipped.append((item.path, error.reason))
                records: dict[ScoreItem, dict[str, Any]] = {}
                for modality, group in kept.items():
                    prompts = [item.prompt for item in group]
                    if modality == "image":
                        scores = reward.score_images(decoded[modality], prompts, batch_size=len(group))
                        for item, value in zip(group, scores.tolist()):
                            records[item] = {
                                "path": item.path,
                                "prompt": item.prompt,
                                "reward": reward.name,
                                "score": value,
                                "dtype": dtype,
                            }
                        continue
                    scorer = scorers[modality]
                    for item, result in zip(group, scorer.score_decoded(decoded[modality], prompts, self.batch_size)):
                        records[item] = {
                            "path": item.path,
                            "prompt": item.prompt,
                            "reward": reward.name,
                            "score": result.total,
                            "dtype": dtype,
                            "modality": modality,
                            "aggregate": scorer.aggregate,
                            "variant": item.variant,
                            **result.record(),
                        }
                for item in batch:
                    if item in records:
                        handle.write(json.dumps(records[item], ensure_ascii=False) + "\n")
                if records:
                    handle.flush()
                    summary.scored += len(records)
                bar.update(len(batch))
        finally:
            bar.close()


def device_and_threads(device: str) -> torch.device:
    """Validate ``--device`` early with a clear message."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MMAlignError("--device cuda was asked for but no CUDA device is available")
    return torch.device(device)
