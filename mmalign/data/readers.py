"""Readers that turn published preference datasets into :class:`~mmalign.data.records.PreferencePair`.

Formats (what each reader assumes; anything else is a bad row, reported with its file and row):

- JSONL (mmalign's own): one object per line, ``{"prompt", "chosen", "rejected"}`` with image paths
  relative to the JSONL's folder (or absolute), optional ``"label"`` (P(chosen preferred), default 1.0),
  ``"score_chosen"``, ``"score_rejected"``; other keys go to ``meta``. A ``.json`` list of such objects
  is read the same way. ``chosen``/``rejected`` may be video files (VideoDPO / VideoAlign Flow-DPO pairs for
  a video generator): each is probed when read (its container index, no decoding), so a missing, unreadable
  or frameless video is a bad row named by its line.
- Pick-a-Pic v2 (Kirstain et al. 2023, ``yuvalkirstain/pickapic_v2``): parquet with ``caption``, ``jpg_0``,
  ``jpg_1`` (encoded image bytes), ``label_0``, ``label_1`` (1/0, 0/1, 0.5/0.5 for a tie) and ``has_label``;
  rows without a label are ignored (counted, not errors); the winner is put first.
- HPDv2 (Wu et al. 2023, ``tgxs002/HPSv2``, ``ymhao/HPDv2``): a JSON list; ``test.json`` rows are
  ``{prompt, image_path[], rank[]}`` (lower rank = better; equal ranks are ties), ``train.json`` rows are
  ``{prompt, file_path[], human_preference[]}`` (1 marks the preferred image, as HPSv2's training code reads
  it; ``image_path`` is accepted there too). Images are relative to ``image_root`` (default: the JSON's
  folder; the published archives unpack to ``train/`` and ``test/``, so pass that folder).
- ImageRewardDB (Xu et al. 2023, ``THUDM/ImageReward``): a JSON list of ``{id, prompt, generations[],
  ranking[]}`` (1 = best; equal ranks are ties), images relative to ``image_root``.
- Pairs parquet (Audio-Alpaca, Majumder et al. 2024 "Tango 2", ``declare-lab/audio-alpaca``): parquet with
  ``prompt``, ``chosen``, ``rejected`` (the winner first; ``datasets`` Audio / Image columns, stored as
  ``{"bytes", "path"}`` structs, or plain bytes or paths) and other columns kept in ``meta`` (Audio-Alpaca's
  ``strategy``). A folder or file of parquet is this format when its first file has those three columns, else
  Pick-a-Pic. Audio bytes (WAV, FLAC, Ogg, AIFF, MP3) decode at training time like audio files.
- Hugging Face ``datasets``: a ``save_to_disk`` folder, a local data folder, or a Hub name (online only),
  with a column mapping (Pick-a-Pic names by default).

Rankings expand into all C(n, 2) pairs. Ties (label 0.5) are dropped by default (``tie_policy="drop"``,
as the official Diffusion-DPO recipe) or kept with ``"keep"``. Bad rows (missing keys, wrong types, a label
outside [0, 1], a missing image file, or an undecodable image when ``decode=True``) are skipped and listed in
the result's ``skipped`` as ``(where, reason)``; ``strict=True`` raises :class:`~mmalign.errors.DataError`
at the first one instead. A pass ends with a one-line log summary ("skipped 3 of 120 rows: ..."), and a
source whose every row is bad raises (its format is wrong). Row numbers: ``line N`` (1-based) for JSONL,
``row N`` (0-based) for JSON lists, parquet files and datasets.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import DataError, MediaError
from .records import (
    ImageInput,
    PreferenceList,
    PreferencePair,
    PreferenceStream,
    Ranking,
    ReadReport,
    check_tie_policy,
    decode_image,
)

PICKAPIC_COLUMNS: dict[str, str] = {
    "prompt": "caption",
    "image_0": "jpg_0",
    "image_1": "jpg_1",
    "label_0": "label_0",
    "label_1": "label_1",
    "has_label": "has_label",
}
"""Field -> column of a two-sided (Pick-a-Pic) source: the winner by ``label_0``/``label_1`` goes first."""

PICKAPIC_META_COLUMNS = (
    "ranking_id",
    "user_id",
    "model_0",
    "model_1",
    "image_0_uid",
    "image_1_uid",
    "best_image_uid",
    "are_different",
)

PAIR_FIELDS = ("prompt", "chosen", "rejected", "label", "score_chosen", "score_rejected")
#: field -> column of an ordered (one-sided) source whose columns are named as the fields
ORDERED_COLUMNS: dict[str, str] = {field: field for field in PAIR_FIELDS}
FORMATS = ("jsonl", "pairs-json", "pickapic", "pairs-parquet", "hpdv2", "imagereward", "hf")

Result = PreferenceList | PreferenceStream


class _BadRow(Exception):
    """A row that cannot become pairs; the message is the reason (the caller adds file and row)."""


_UNLABELED = object()


# ---------------------------------------------------------------- field checks


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise _BadRow(f"{key!r} must be a string, got {_kind(value)}")
    return value


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _BadRow(f"{key!r} must be a finite number, got {_kind(value)}")
    return float(value)


def _label(value: Any, key: str) -> float:
    label = _number(value, key)
    if not 0.0 <= label <= 1.0:
        raise _BadRow(f"{key!r} = {label} is outside [0, 1]")
    return label


def _optional_number(row: Mapping[str, Any], key: str | None) -> float | None:
    if key is None or row.get(key) is None:
        return None
    return _number(row[key], key)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def _image(value: Any, key: str, root: Path) -> ImageInput:
    """A path (resolved against ``root``), bytes, a ``{"bytes", "path"}`` dict (HF Image) or a PIL image."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        if not value:
            raise _BadRow(f"{key!r} is an empty path")
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else root / path)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if type(value).__module__.startswith("PIL."):
        return value
    raise _BadRow(f"{key!r} must be an image path, bytes or an image, got {_kind(value)}")


def _list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise _BadRow(f"{key!r} must be a list, got {_kind(value)}")
    return value


# ---------------------------------------------------------------- row parsers


def _one_sided(row: Any, cols: Mapping[str, str], root: Path, extra_meta: bool) -> list[PreferencePair]:
    """``{prompt, chosen, rejected[, label, scores]}``; a label below 0.5 swaps the images (winner first)."""
    if not isinstance(row, dict):
        raise _BadRow(f"expected an object, got {_kind(row)}")
    required = [cols[k] for k in ("prompt", "chosen", "rejected")]
    missing = [key for key in required if key not in row]
    if missing:
        raise _BadRow(f"missing key(s) {', '.join(map(repr, missing))}")
    label_key = cols.get("label")
    label = 1.0 if label_key is None or row.get(label_key) is None else _label(row[label_key], label_key)
    used = {v for v in cols.values()}
    meta = {k: v for k, v in row.items() if k not in used} if extra_meta else {}
    pair = PreferencePair(
        prompt=_text(row[cols["prompt"]], cols["prompt"]),
        chosen=_image(row[cols["chosen"]], cols["chosen"], root),
        rejected=_image(row[cols["rejected"]], cols["rejected"], root),
        label=label,
        score_chosen=_optional_number(row, cols.get("score_chosen")),
        score_rejected=_optional_number(row, cols.get("score_rejected")),
        meta=meta,
    )
    return [pair.oriented()]


def _two_sided(row: Mapping[str, Any], cols: Mapping[str, str], root: Path, meta_keys: Iterable[str]) -> Any:
    """Pick-a-Pic style: two images with ``label_0``/``label_1``; P(image 0) = label_0 / (label_0 + label_1)."""
    has_label = cols.get("has_label")
    if has_label and row.get(has_label) is not None and not row[has_label]:
        return _UNLABELED
    k0, k1 = cols["label_0"], cols["label_1"]
    label_0, label_1 = _label(row.get(k0), k0), _label(row.get(k1), k1)
    if label_0 + label_1 == 0:
        raise _BadRow(f"{k0!r} and {k1!r} are both 0 (no preference)")
    p0 = label_0 / (label_0 + label_1)
    images = [_image(row.get(cols[key]), cols[key], root) for key in ("image_0", "image_1")]
    winner = 0 if p0 >= 0.5 else 1
    meta = {key: row[key] for key in meta_keys if key in row}
    meta["winner_index"] = winner
    meta["image_columns"] = (cols[f"image_{winner}"], cols[f"image_{1 - winner}"])
    pair = PreferencePair(
        prompt=_text(row.get(cols["prompt"]), cols["prompt"]),
        chosen=images[winner],
        rejected=images[1 - winner],
        label=max(p0, 1.0 - p0),
        meta=meta,
    )
    return [pair]


def _hpdv2(row: Any, root: Path) -> list[PreferencePair]:
    if not isinstance(row, dict):
        raise _BadRow(f"expected an object, got {_kind(row)}")
    path_key = "image_path" if "image_path" in row else "file_path" if "file_path" in row else None
    order_key = "rank" if "rank" in row else "human_preference" if "human_preference" in row else None
    if "prompt" not in row or path_key is None or order_key is None:
        raise _BadRow(
            "expected HPDv2 keys 'prompt', 'image_path' (or 'file_path') and 'rank' (test.json) or "
            f"'human_preference' (train.json); found {sorted(row)}"
        )
    paths = [_image(p, path_key, root) for p in _list(row[path_key], path_key)]
    values = [_number(v, order_key) for v in _list(row[order_key], order_key)]
    # human_preference: 1 marks the preferred image, so a higher value is a better (lower) rank.
    ranks = values if order_key == "rank" else [-v for v in values]
    return _ranking_pairs(_text(row["prompt"], "prompt"), paths, ranks, {"format": "hpdv2"})


def _imagereward(row: Any, root: Path) -> list[PreferencePair]:
    if not isinstance(row, dict):
        raise _BadRow(f"expected an object, got {_kind(row)}")
    missing = [k for k in ("prompt", "generations", "ranking") if k not in row]
    if missing:
        raise _BadRow(f"missing ImageRewardDB key(s) {', '.join(map(repr, missing))}")
    paths = [_image(p, "generations", root) for p in _list(row["generations"], "generations")]
    ranks = [_number(v, "ranking") for v in _list(row["ranking"], "ranking")]
    return _ranking_pairs(_text(row["prompt"], "prompt"), paths, ranks, {"id": row.get("id")})


def _ranking_pairs(prompt: str, items: list[ImageInput], ranks: list[float], meta: dict) -> list[PreferencePair]:
    try:
        ranking = Ranking(prompt, items, ranks, meta=meta)
    except ValueError as error:
        raise _BadRow(str(error).removeprefix("ranking: ")) from None
    return ranking.to_pairs("keep")


# ---------------------------------------------------------------- the driver


def _drive(
    report: ReadReport,
    rows: Iterable[tuple[str, Any]],
    parse: Callable[[Any], Any],
    *,
    tie_policy: str,
    strict: bool,
    decode: bool,
    check_files: bool,
) -> Iterator[PreferencePair]:
    """Parse each ``(where, row)``, check its images, apply the tie policy, and keep the report."""
    for where, raw in rows:
        report.rows += 1
        try:
            pairs = parse(raw)
            if pairs is _UNLABELED:
                report.unlabeled += 1
                continue
            _check_images(pairs, where, decode, check_files)
        except (_BadRow, MediaError) as error:
            report.skip(where, str(error), strict)
            continue
        for pair in pairs:
            pair.source = where
            if pair.is_tie and tie_policy == "drop":
                report.ties_dropped += 1
                continue
            report.pairs += 1
            yield pair
    report.finish()


def _check_images(pairs: list[PreferencePair], where: str, decode: bool, check_files: bool) -> None:
    from ..modalities.audio import is_audio_bytes, is_audio_file
    from ..modalities.video import is_video_file

    seen: set[Any] = set()
    for pair in pairs:
        names = pair.meta.get("image_columns", ("chosen", "rejected"))
        for name, image in zip(names, (pair.chosen, pair.rejected)):
            key = image if isinstance(image, str) else id(image)
            if key in seen:
                continue
            seen.add(key)
            if isinstance(image, str) and is_video_file(image, include_gif=False):
                _check_video(image, name, check_files or decode)
            elif isinstance(image, str) and is_audio_file(image):
                _check_audio(image, name, check_files, decode)
            elif isinstance(image, bytes) and is_audio_bytes(image):
                if decode:
                    _decode_audio_bytes(image, name)
            elif decode:
                decode_image(image, f"{where} {name}")
            elif check_files and isinstance(image, str) and not os.path.isfile(image):
                raise _BadRow(f"image not found: {image}")
            elif isinstance(image, bytes) and not image:
                raise _BadRow(f"{name!r} holds empty image bytes")


def _check_video(path: str, name: str, check: bool) -> None:
    """A video side of a pair (VideoDPO / VideoAlign pairs): its container index is read (nothing decoded), so
    that a missing, unreadable or empty file is a bad row named by its file and line."""
    if not check:
        return
    if not os.path.isfile(path):
        raise _BadRow(f"{name!r} video not found: {path}")
    from ..modalities.video import probe_video

    info = probe_video(path)
    if info.num_frames < 1:
        raise _BadRow(f"{name!r} video has no frames: {path}")


def _check_audio(path: str, name: str, check_files: bool, decode: bool) -> None:
    """An audio side of a pair (Tango 2 / BATON pairs for an audio generator): missing (``check_files``) or, with
    ``decode``, unreadable, empty or non-finite audio is a bad row named by its file and line."""
    if decode:
        from ..modalities.audio import read_audio

        read_audio(path)
    elif check_files and not os.path.isfile(path):
        raise _BadRow(f"{name!r} audio not found: {path}")


def _decode_audio_bytes(data: bytes, name: str) -> None:
    """Encoded audio in a pair (Audio-Alpaca's columns), decoded with ``decode``: unreadable, empty or non-finite
    audio is a bad row named by its file and row."""
    from ..modalities.audio import read_audio

    try:
        read_audio(data, f"{name!r} audio bytes")
    except MediaError as error:
        raise _BadRow(str(error)) from error


def _result(name: str, make_rows: Callable[[], Iterable], parse: Callable, stream: bool, **options) -> Result:
    check_tie_policy(options["tie_policy"])

    def make_iterator(report: ReadReport) -> Iterator[PreferencePair]:
        return _drive(report, make_rows(), parse, **options)

    pairs = PreferenceStream(name, make_iterator)
    return pairs if stream else pairs.to_list()


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(str(path), "no such file or folder")
    return path


def _json_rows(path: Path) -> list[Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            rows = json.load(handle)
    except json.JSONDecodeError as error:
        raise DataError(str(path), f"invalid JSON ({error.msg} at line {error.lineno})") from error
    except UnicodeDecodeError as error:
        raise DataError(str(path), f"not UTF-8 text ({error})") from error
    if not isinstance(rows, list):
        raise DataError(str(path), f"expected a JSON list of objects, got a {type(rows).__name__}")
    return rows


def _indexed(path: Path, rows: list[Any]) -> Callable[[], Iterator[tuple[str, Any]]]:
    return lambda: ((f"{path} row {i}", row) for i, row in enumerate(rows))


# ---------------------------------------------------------------- public readers


def read_jsonl(
    path: str | os.PathLike,
    *,
    tie_policy: str = "drop",
    strict: bool = False,
    decode: bool = False,
    check_files: bool = True,
    image_root: str | os.PathLike | None = None,
    stream: bool = False,
) -> Result:
    """Read mmalign's JSONL pairs (see the module docstring); paths are relative to ``image_root``.

    ``image_root`` defaults to the file's folder. ``check_files`` skips rows whose image file is missing;
    ``decode`` fully decodes every image (slow) so that unreadable ones are skipped here.
    """
    path = _existing(path)
    root = Path(image_root) if image_root is not None else path.parent
    cols = ORDERED_COLUMNS

    def rows() -> Iterator[tuple[str, Any]]:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    yield f"{path} line {number}", line

    def parse(line: str) -> list[PreferencePair]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise _BadRow(f"invalid JSON ({error.msg} at column {error.colno})") from None
        return _one_sided(row, cols, root, extra_meta=True)

    return _result(
        str(path), rows, parse, stream, tie_policy=tie_policy, strict=strict, decode=decode, check_files=check_files
    )


def _json_parser(kind: str, root: Path) -> Callable[[Any], list[PreferencePair]]:
    if kind == "hpdv2":
        return lambda row: _hpdv2(row, root)
    if kind == "imagereward":
        return lambda row: _imagereward(row, root)
    return lambda row: _one_sided(row, ORDERED_COLUMNS, root, extra_meta=True)


def _read_json(
    kind: str,
    path: Path,
    rows: list[Any] | None,
    image_root: str | os.PathLike | None,
    tie_policy: str,
    strict: bool,
    decode: bool,
    check_files: bool,
) -> PreferenceList:
    rows = _json_rows(path) if rows is None else rows
    root = Path(image_root) if image_root is not None else path.parent
    return _result(  # type: ignore[return-value]
        str(path),
        _indexed(path, rows),
        _json_parser(kind, root),
        False,
        tie_policy=tie_policy,
        strict=strict,
        decode=decode,
        check_files=check_files,
    )


def read_pairs_json(
    path: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    tie_policy: str = "drop",
    strict: bool = False,
    decode: bool = False,
    check_files: bool = True,
) -> PreferenceList:
    """A ``.json`` list of the JSONL objects (same keys, same path rules)."""
    return _read_json("pairs-json", _existing(path), None, image_root, tie_policy, strict, decode, check_files)


def read_hpdv2(
    path: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    tie_policy: str = "drop",
    strict: bool = False,
    decode: bool = False,
    check_files: bool = True,
) -> PreferenceList:
    """HPDv2 ``train.json`` / ``test.json`` (Wu et al. 2023): each row's images ranked -> C(n, 2) pairs."""
    return _read_json("hpdv2", _existing(path), None, image_root, tie_policy, strict, decode, check_files)


def read_imagereward_db(
    path: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    tie_policy: str = "drop",
    strict: bool = False,
    decode: bool = False,
    check_files: bool = True,
) -> PreferenceList:
    """ImageRewardDB JSON (Xu et al. 2023): ``{id, prompt, generations[], ranking[]}`` (1 = best) -> pairs."""
    return _read_json("imagereward", _existing(path), None, image_root, tie_policy, strict, decode, check_files)


def _parquet_files(path: Path, split: str | None) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    if split is not None:
        files = [p for p in files if p.name == f"{split}.parquet" or p.name.startswith(f"{split}-")]
    if not files:
        suffix = f" for split {split!r} (files named '{split}-*.parquet')" if split else ""
        raise DataError(str(path), f"no parquet files{suffix}")
    return files


def read_pickapic(
    path: str | os.PathLike,
    *,
    split: str | None = None,
    tie_policy: str = "drop",
    strict: bool = False,
    decode: bool = False,
    stream: bool = True,
    batch_size: int = 64,
) -> Result:
    """Pick-a-Pic v2 parquet (Kirstain et al. 2023): a file, or a folder of them (``split`` picks ``train-*``...).

    Read with pyarrow ``batch_size`` rows at a time, only the columns needed. By default the result is a
    :class:`PreferenceStream` (the files hold the image bytes: hundreds of GB for all of v2); pass
    ``stream=False`` for a list. Pairs hold the encoded bytes, winner first; ``meta`` keeps ``ranking_id``,
    ``user_id``, ``model_0``/``model_1``... and ``winner_index`` (0 or 1, the winner's original column).
    """
    files = _parquet_files(_existing(path), split)
    cols = PICKAPIC_COLUMNS

    needed = [cols[k] for k in ("prompt", "image_0", "image_1", "label_0", "label_1")]
    optional = (cols["has_label"], *PICKAPIC_META_COLUMNS)

    def rows() -> Iterator[tuple[str, Any]]:
        for where, row, _ in _parquet_rows(files, needed, "Pick-a-Pic", batch_size, optional):
            yield where, row

    name = str(files[0]) if len(files) == 1 else f"{path} ({len(files)} parquet files)"
    return _result(
        name,
        rows,
        lambda row: _two_sided(row, cols, Path("."), PICKAPIC_META_COLUMNS),
        stream,
        tie_policy=tie_policy,
        strict=strict,
        decode=decode,
        check_files=False,
    )


def read_pairs_parquet(
    path: str | os.PathLike,
    *,
    split: str | None = None,
    tie_policy: str = "drop",
    strict: bool = False,
    decode: bool = False,
    stream: bool = True,
    batch_size: int = 16,
) -> Result:
    """Ordered pairs in parquet, as Audio-Alpaca (Tango 2, ``declare-lab/audio-alpaca``) ships them: a file, or a
    folder of them (``split`` picks ``train-*``...), with ``prompt``, ``chosen`` and ``rejected`` (the winner first)
    and any other columns kept in ``meta`` (``strategy``). The media columns hold ``datasets`` Audio or Image
    structs ``{"bytes", "path"}`` (the bytes are kept, encoded; without bytes the path, relative to the file's
    folder), bytes or paths. Read with pyarrow ``batch_size`` rows at a time; a :class:`PreferenceStream` by default
    (Audio-Alpaca's 15k pairs are 9.7 GB of WAV), ``stream=False`` for a list. With ``decode`` each side is decoded
    once, so that unreadable audio is a bad row named by its file and row."""
    files = _parquet_files(_existing(path), split)

    def rows() -> Iterator[tuple[str, Any]]:
        for where, row, file in _parquet_rows(files, ("prompt", "chosen", "rejected"), "pair", batch_size, None):
            yield where, (row, file.parent)

    def parse(item: tuple[dict, Path]) -> list[PreferencePair]:
        row, root = item
        return _one_sided(row, ORDERED_COLUMNS, root, extra_meta=True)

    name = str(files[0]) if len(files) == 1 else f"{path} ({len(files)} parquet files)"
    return _result(name, rows, parse, stream, tie_policy=tie_policy, strict=strict, decode=decode, check_files=True)


def _parquet_rows(
    files: list[Path], needed: Iterable[str], what: str, batch_size: int, optional: Iterable[str] | None
) -> Iterator[tuple[str, dict[str, Any], Path]]:
    """``(where, row, file)`` for every row of ``files``, read with pyarrow ``batch_size`` rows at a time: the
    ``needed`` columns (a file without one raises, naming the ``what`` columns it misses) and those of ``optional``
    it has (None: every column)."""
    needed = list(needed)
    for file in files:
        parquet = _open_parquet(file)
        names = set(parquet.schema_arrow.names)
        missing = [name for name in needed if name not in names]
        if missing:
            raise DataError(str(file), f"missing {what} column(s) {missing}; it has {sorted(names)}")
        columns = None if optional is None else needed + [c for c in optional if c in names]
        offset = 0
        for batch in parquet.iter_batches(batch_size=batch_size, columns=columns):
            for i, row in enumerate(batch.to_pylist()):
                yield f"{file} row {offset + i}", row, file
            offset += batch.num_rows


def _open_parquet(file: Path) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(file)
    except Exception as error:  # pyarrow raises several types for a file that is not parquet
        raise DataError(str(file), f"not a readable parquet file ({error})") from error


def _parquet_kind(path: Path) -> str:
    """``pairs-parquet`` when the first parquet file under ``path`` has ``prompt``, ``chosen`` and ``rejected``,
    else ``pickapic`` (whose reader names the columns it misses)."""
    first = path if path.is_file() else next(iter(sorted(p for p in path.rglob("*.parquet") if p.is_file())))
    names = set(_open_parquet(first).schema_arrow.names)
    return "pairs-parquet" if {"prompt", "chosen", "rejected"} <= names else "pickapic"


def _load_hf(name_or_path: str | os.PathLike, split: str, stream: bool, load_kwargs: dict) -> tuple[Any, Path]:
    import datasets

    path = Path(name_or_path).expanduser()
    if path.exists():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(str(path), f"no split {split!r}; it has {sorted(loaded)}")
                loaded = loaded[split]
        else:
            loaded = datasets.load_dataset(str(path), split=split, streaming=stream, **load_kwargs)
        return loaded, path if path.is_dir() else path.parent
    try:
        loaded = datasets.load_dataset(str(name_or_path), split=split, streaming=stream, **load_kwargs)
    except Exception as error:  # offline, unknown name, gated repo...: one message that says what to do
        raise DataError(
            str(name_or_path),
            f"not a local path, and loading it from the Hugging Face Hub failed ({type(error).__name__}: "
            f"{error}); offline, pass a folder written by save_to_disk or a folder of data files",
        ) from error
    return loaded, Path.cwd()


def read_hf_dataset(
    name_or_path: str | os.PathLike,
    split: str = "train",
    columns: Mapping[str, str] | None = None,
    *,
    tie_policy: str = "drop",
    strict: bool = False,
    decode: bool = False,
    check_files: bool = True,
    image_root: str | os.PathLike | None = None,
    stream: bool = False,
    **load_kwargs: Any,
) -> Result:
    """A Hugging Face dataset: a ``save_to_disk`` folder, a local data folder, or a Hub name (online).

    ``columns`` maps fields to column names. With ``chosen``/``rejected`` in it, rows are already ordered
    (fields ``prompt``, ``chosen``, ``rejected``, optional ``label``, ``score_chosen``, ``score_rejected``).
    Otherwise the mapping is merged over :data:`PICKAPIC_COLUMNS` (two images, ``label_0``/``label_1``,
    winner put first). Image columns may hold bytes, paths (relative to ``image_root``, default the dataset
    folder) or ``datasets.Image`` features, which are read undecoded. ``stream=True`` streams from the Hub.
    """
    loaded, folder = _load_hf(name_or_path, split, stream, load_kwargs)
    root = Path(image_root) if image_root is not None else folder
    one_sided = columns is not None and ("chosen" in columns or "rejected" in columns)
    if one_sided:
        cols = {"prompt": "prompt", **dict(columns or {})}
        required = ("prompt", "chosen", "rejected")
        image_fields = ("chosen", "rejected")
    else:
        cols = {**PICKAPIC_COLUMNS, **dict(columns or {})}
        required = ("prompt", "image_0", "image_1", "label_0", "label_1")
        image_fields = ("image_0", "image_1")
    name = f"{name_or_path} [{split}]"
    available = list(loaded.column_names or [])
    missing = [cols[f] for f in required if f not in cols or cols[f] not in available]
    if missing:
        raise DataError(name, f"missing column(s) {missing}; it has {available}. Map them with columns={{...}}")
    meta_keys = [c for c in PICKAPIC_META_COLUMNS if c in available] if not one_sided else []
    wanted = list(dict.fromkeys([c for c in cols.values() if c in available] + meta_keys))
    loaded = loaded.select_columns(wanted)
    features = getattr(loaded, "features", None) or {}
    import datasets

    for field in image_fields:  # media read undecoded: encoded bytes (or paths), decoded when trained on
        if isinstance(features.get(cols[field]), datasets.Image):
            loaded = loaded.cast_column(cols[field], datasets.Image(decode=False))
        elif isinstance(features.get(cols[field]), datasets.Audio):
            loaded = loaded.cast_column(cols[field], datasets.Audio(decode=False))

    def rows() -> Iterator[tuple[str, Any]]:
        return ((f"{name} row {i}", row) for i, row in enumerate(loaded))

    if one_sided:
        parse = lambda row: _one_sided(row, cols, root, extra_meta=False)  # noqa: E731
    else:
        parse = lambda row: _two_sided(row, cols, root, meta_keys)  # noqa: E731
    return _result(
        name, rows, parse, stream, tie_policy=tie_policy, strict=strict, decode=decode, check_files=check_files
    )


# ---------------------------------------------------------------- dispatch


def _json_kind(path: Path, rows: list[Any]) -> str:
    first = next((row for row in rows if isinstance(row, dict)), None)
    keys = set(first or ())
    if {"generations", "ranking"} <= keys:
        return "imagereward"
    if keys & {"rank", "human_preference"} and keys & {"image_path", "file_path"}:
        return "hpdv2"
    if {"chosen", "rejected"} <= keys:
        return "pairs-json"
    raise DataError(
        str(path),
        f"cannot tell the format from its first row's keys {sorted(keys)}; pass format= one of {FORMATS}",
    )


def detect_format(spec: str | os.PathLike) -> str:
    """The reader :func:`load_preferences` would pick for ``spec`` (one of :data:`FORMATS`)."""
    return _detect(spec)[0]


def _detect(spec: str | os.PathLike) -> tuple[str, list[Any] | None]:
    path = Path(spec).expanduser()
    if not path.exists():
        text = str(spec)
        if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith("/"):
            return "hf", None  # a Hub name such as yuvalkirstain/pickapic_v2
        raise DataError(text, "no such file or folder (and not a Hub dataset name like owner/name)")
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "hf", None
        if any(path.rglob("*.parquet")):
            return _parquet_kind(path), None
        raise DataError(str(path), f"cannot tell the format of this folder; pass format= one of {FORMATS}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl", None
    if suffix == ".parquet":
        return _parquet_kind(path), None
    if suffix == ".json":
        rows = _json_rows(path)
        return _json_kind(path, rows), rows
    raise DataError(str(path), f"unknown extension {suffix!r}; pass format= one of {FORMATS}")


def load_preferences(
    spec: str | os.PathLike,
    *,
    format: str | None = None,
    tie_policy: str = "drop",
    strict: bool = False,
    decode: bool = False,
    stream: bool | None = None,
    **kwargs: Any,
) -> Result:
    """Read preference pairs from ``spec`` with the reader chosen by ``format`` or :func:`detect_format`.

    ``.jsonl`` -> JSONL; ``.parquet`` or a folder of them -> pairs parquet (Audio-Alpaca) when it has ``prompt``,
    ``chosen`` and ``rejected`` columns, else Pick-a-Pic; ``.json`` -> HPDv2, ImageRewardDB
    or a pairs list by its first row's keys; a ``save_to_disk`` folder or ``owner/name`` -> Hugging Face.
    Other keyword arguments go to the reader (``image_root``, ``split``, ``columns``, ``check_files``...).
    The result is a :class:`PreferenceList` (JSON formats always; JSONL and Hugging Face unless
    ``stream=True``) or a :class:`PreferenceStream` (the parquet formats unless ``stream=False``); both carry
    ``skipped`` and ``report``.
    """
    check_tie_policy(tie_policy)
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    kind, rows = (format, None) if format is not None else _detect(spec)
    options = {"tie_policy": tie_policy, "strict": strict, "decode": decode, **kwargs}
    if kind == "pickapic":
        return read_pickapic(spec, stream=True if stream is None else stream, **options)
    if kind == "pairs-parquet":
        return read_pairs_parquet(spec, stream=True if stream is None else stream, **options)
    if kind == "hf":
        return read_hf_dataset(spec, stream=bool(stream), **options)
    if kind == "jsonl":
        return read_jsonl(spec, stream=bool(stream), **options)
    unknown = set(kwargs) - {"image_root", "check_files"}
    if unknown:
        raise TypeError(f"the {kind} reader takes no option(s) {sorted(unknown)}")
    return _read_json(
        kind,
        _existing(spec),
        rows,
        kwargs.get("image_root"),
        tie_policy,
        strict,
        decode,
        kwargs.get("check_files", True),
    )
