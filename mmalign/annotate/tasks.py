"""Tasks from media on disk: a ``mmalign label`` folder, a manifest, or a folder of generator outputs.

Sources (``add_task(db, name, kind, source)``; every media file must lie inside the source folder, which
becomes the task's only media root):

- a ``mmalign label`` output folder (it has ``rankings.jsonl``): one item per prompt with its K images (K-wise,
  rating), or one per pair of them (pairwise); ``meta.index`` is the prompt's line, so exports map back to it;
- a manifest, ``DIR/manifest.jsonl`` (or the ``.jsonl`` itself): one item per line,
  ``{"prompt", "media": [path, ...], "models": [name, ...], "gold": answer}`` (``models``, ``gold`` optional;
  a multi-view option is a list of view paths);
- generator outputs, ``DIR/<model>/<id>.<ext>`` (or ``DIR/<model>/<id>/`` holding the views of a multi-view
  item): the outputs sharing an ``<id>`` across models form an item (every pair of them for pairwise); prompts
  from ``DIR/prompts.jsonl`` (``{"id", "prompt"}``), else the id.

``gold``: a JSONL of ``{"item": position, "answer": {...}}`` (position = 0-based order of the items created)
marks gold questions; a manifest can carry them inline.

Arena tasks (``add_arena_task``): generator outputs from one folder per generator, each ``DIR/<id>.<ext>`` (or
``DIR/<id>/`` views; prompts from ``DIR/prompts.jsonl`` or a shared ``prompts`` file, else the id) or a
``mmalign label`` folder (``rankings.jsonl``: its ``j``-th image of a prompt is sample ``(prompt, j)``); the
outputs of one sample across generators are matched by id (or prompt and ``j``). One item per sample and pair
of generators (pairwise) or K-subset (K-wise), its options in a random order; every generator folder is one of
the task's media roots (an option's ``"root"``).
"""

from __future__ import annotations

import itertools
import json
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from . import answers
from .db import AnnotateError, Database, Item, Task

IMAGE = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}
VIDEO = {".mp4", ".webm", ".ogv", ".mov", ".m4v"}
AUDIO = {".wav", ".mp3", ".ogg", ".oga", ".flac", ".m4a", ".opus"}
MEDIA_TYPES = ("image", "video", "audio", "multiview")
MIME = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
    ".mp4": "video/mp4",
    ".m4v": "video/mp4",
    ".webm": "video/webm",
    ".ogv": "video/ogg",
    ".mov": "video/quicktime",
    ".wav": "audio/wav",
    ".mp3": "audio/mpeg",
    ".ogg": "audio/ogg",
    ".oga": "audio/ogg",
    ".flac": "audio/flac",
    ".m4a": "audio/mp4",
    ".opus": "audio/ogg",
}


def media_type_of(path: str) -> str:
    ext = Path(path).suffix.lower()
    if ext in IMAGE:
        return "image"
    if ext in VIDEO:
        return "video"
    if ext in AUDIO:
        return "audio"
    raise AnnotateError(
        f"{path}: not a media file this app serves (images {sorted(IMAGE)}, videos "
        f"{sorted(VIDEO)}, audio {sorted(AUDIO)})"
    )


def _relative(root: Path, path: str | Path, where: str) -> str:
    """``path`` (relative to ``root`` or absolute) as a POSIX path relative to ``root``; refuses anything outside
    it (``..``, absolute paths elsewhere, symlinks pointing out) and missing files."""
    candidate = Path(path)
    full = candidate if candidate.is_absolute() else root / candidate
    real = Path(os.path.realpath(full))
    if os.path.commonpath([str(real), str(root)]) != str(root):
        raise AnnotateError(f"{where}: {path} lies outside the task folder {root}")
    if not real.is_file():
        raise AnnotateError(f"{where}: {path} is not a file")
    return real.relative_to(root).as_posix()


def option_root(task: Task, option: Mapping[str, Any]) -> str:
    """The task folder an option's media lie in (``option["root"]`` indexes ``task.roots``; 0 by default)."""
    index = option.get("root", 0)
    if not isinstance(index, int) or not 0 <= index < len(task.roots):
        raise AnnotateError(f"task {task.name!r}: an option names media root {index!r} it does not have", 500)
    return task.roots[index]


def _option(root: Path, media: Any, where: str, model: str | None = None) -> tuple[dict, str]:
    if isinstance(media, (list, tuple)):
        if not media:
            raise AnnotateError(f"{where}: a multi-view option needs at least one view")
        views = [_relative(root, v, where) for v in media]
        for v in views:
            if media_type_of(v) != "image":
                raise AnnotateError(f"{where}: multi-view views must be images, got {v}")
        option, kind = {"views": views}, "multiview"
    elif isinstance(media, (str, os.PathLike)):
        rel = _relative(root, media, where)
        option, kind = {"path": rel}, media_type_of(rel)
    else:
        raise AnnotateError(f"{where}: a media entry must be a path or a list of view paths, got {media!r}")
    if model is not None:
        option["model"] = str(model)
    return option, kind


def _from_label(root: Path, kind: str) -> list[dict]:
    rows = []
    path = root / "rankings.jsonl"
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
            prompt, images = str(row["prompt"]), list(row["images"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise AnnotateError(f"{where}: bad row ({error})") from None
        index = len(rows) if not rows else rows[-1]["meta"]["index"] + 1
        options = [_option(root, image, where)[0] for image in images]
        if kind == "pairwise":
            for a, b in itertools.combinations(range(len(options)), 2):
                rows.append(
                    dict(prompt=prompt, options=[options[a], options[b]], meta={"index": index, "pair": [a, b]})
                )
        else:
            rows.append(dict(prompt=prompt, options=options, meta={"index": index}))
    return rows


def _from_manifest(root: Path, manifest: Path) -> list[dict]:
    rows = []
    for line_no, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{manifest}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise AnnotateError(f"{where}: not JSON ({error.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("media"), list) or "prompt" not in row:
            raise AnnotateError(f'{where}: want {{"prompt", "media": [...], "models"?, "gold"?}}')
        models = row.get("models")
        if models is not None and (not isinstance(models, list) or len(models) != len(row["media"])):
            raise AnnotateError(f'{where}: "models" must list one name per media entry')
        options = [
            _option(root, media, where, None if models is None else models[i])[0]
            for i, media in enumerate(row["media"])
        ]
        rows.append(dict(prompt=str(row["prompt"]), options=options, gold=row.get("gold"), meta={"line": line_no}))
    return rows


def _from_generators(root: Path, kind: str) -> list[dict]:
    prompts: dict[str, str] = {}
    prompt_file = root / "prompts.jsonl"
    if prompt_file.is_file():
        for line in prompt_file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                prompts[str(row["id"])] = str(row["prompt"])
    models = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(models) < 2:
        raise AnnotateError(f"{root}: want a manifest.jsonl, a rankings.jsonl, or two or more model folders")
    outputs: dict[str, dict[str, Any]] = {}
    for model in models:
        for entry in sorted((root / model).iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                views = sorted(str(v) for v in entry.iterdir() if v.suffix.lower() in IMAGE)
                if views:
                    outputs.setdefault(entry.name, {})[model] = views
            elif entry.suffix.lower() in IMAGE | VIDEO | AUDIO:
                outputs.setdefault(entry.stem, {})[model] = str(entry)
    rows = []
    for ident in sorted(outputs):
        have = outputs[ident]
        names = [m for m in models if m in have]
        if len(names) < 2:
            continue
        groups = itertools.combinations(names, 2) if kind == "pairwise" else [tuple(names)]
        for group in groups:
            options = [_option(root, have[m], f"{root}/{m}/{ident}", m)[0] for m in group]
            rows.append(dict(prompt=prompts.get(ident, ident), options=options, meta={"id": ident}))
    return rows


def read_source(source: str | Path, kind: str) -> tuple[Path, list[dict]]:
    """The media root and the item rows of a source (module docstring)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise AnnotateError(f"{path}: no such folder or manifest")
    root = Path(os.path.realpath(path if path.is_dir() else path.parent))
    if path.is_file():
        rows = _from_manifest(root, path)
    elif (path / "manifest.jsonl").is_file():
        rows = _from_manifest(root, path / "manifest.jsonl")
    elif (path / "rankings.jsonl").is_file():
        rows = _from_label(root, kind)
    else:
        rows = _from_generators(root, kind)
    if not rows:
        raise AnnotateError(f"{path}: no items found")
    return root, rows


def _media_of(options: Sequence[dict]) -> str:
    kinds = set()
    for option in options:
        kinds.add("multiview" if "views" in option else media_type_of(option["path"]))
    if len(kinds) != 1:
        raise AnnotateError(f"an item mixes media types {sorted(kinds)}")
    return kinds.pop()


def add_task(
    db: Database,
    name: str,
    kind: str,
    source: str | Path,
    *,
    judgements: int = 3,
    dimensions: Sequence[str] = (),
    instructions: str = "",
    gold: str | Path | None = None,
    gold_every: int = 5,
    lease_seconds: float = 1800.0,
) -> dict[str, Any]:
    """Create a task and its items; returns ``{"task", "items", "gold", "media", "root"}``."""
    if kind not in answers.KINDS:
        raise AnnotateError(f"task kind must be one of {answers.KINDS}, got {kind!r}")
    if not name or len(name) > 128:
        raise AnnotateError("a task needs a name of 1-128 characters")
    if judgements < 1:
        raise AnnotateError(f"judgements per item must be at least 1, got {judgements}")
    dimensions = [d.strip() for d in dimensions if d.strip()]
    if kind == "rating" and not dimensions:
        dimensions = ["overall"]
    if kind != "rating" and dimensions:
        raise AnnotateError("dimensions are for rating tasks")
    root, rows = read_source(source, kind)
    if gold is not None:
        for line_no, line in enumerate(Path(gold).read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                position = row.get("item")
                if not isinstance(position, int) or not 0 <= position < len(rows):
                    raise AnnotateError(f"{gold}:{line_no}: item {position!r} is not 0..{len(rows) - 1}")
                rows[position]["gold"] = row.get("answer")
    media = None
    for i, row in enumerate(rows):
        k = len(row["options"])
        if kind == "pairwise" and k != 2:
            raise AnnotateError(f"item {i}: a pairwise item needs 2 options, got {k}")
        if k < 2 and kind != "rating":
            raise AnnotateError(f"item {i}: needs at least 2 options, got {k}")
        item_media = _media_of(row["options"])
        if media not in (None, item_media):
            raise AnnotateError(f"item {i} is {item_media} but earlier items are {media}: one media type per task")
        media = item_media
        if row.get("gold") is not None:
            try:
                row["gold"] = answers.validate(kind, row["gold"], k, dimensions)
            except AnnotateError as error:
                raise AnnotateError(f"item {i}: bad gold answer: {error}") from None
    with db.session() as s:
        if s.scalar(select(func.count()).select_from(Task).where(Task.name == name)):
            raise AnnotateError(f"a task named {name!r} exists already")
        task = Task(
            name=name,
            kind=kind,
            media=media,
            judgements=judgements,
            dimensions=list(dimensions),
            instructions=instructions,
            roots=[str(root)],
            source={"path": str(Path(source).expanduser().resolve())},
            gold_every=max(1, gold_every),
            lease_seconds=lease_seconds,
        )
        s.add(task)
        s.flush()
        for position, row in enumerate(rows):
            s.add(
                Item(
                    task_id=task.id,
                    position=position,
                    prompt=row["prompt"],
                    options=row["options"],
                    gold=row.get("gold"),
                    meta=row.get("meta", {}),
                )
            )
        task_id = task.id
    n_gold = sum(1 for r in rows if r.get("gold") is not None)
    return {"task": task_id, "name": name, "items": len(rows), "gold": n_gold, "media": media, "root": str(root)}


def media_paths(task: Task, items: Sequence[Item]) -> set[str]:
    """Every relative media path of a task's items (the only paths its media route serves)."""
    paths = set()
    for item in items:
        for option in item.options:
            paths.update(option.get("views", [option.get("path")]))
    paths.discard(None)
    return paths


# ---------------------------------------------------------------- arena tasks

MAX_ARENA_ITEMS = 1_000_000


def _read_prompts(path: Path) -> dict[str, str]:
    prompts: dict[str, str] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                prompts[str(row["id"])] = str(row["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise AnnotateError(f'{path}:{line_no}: want {{"id", "prompt"}} ({error})') from None
    return prompts


def _generator_outputs(
    name: str, folder: Path, shared_prompts: Mapping[str, str]
) -> dict[tuple[str, ...], tuple[str, Any]]:
    """``{sample key: (prompt, media relative to the folder)}`` of one generator's folder."""
    root = Path(os.path.realpath(folder))
    out: dict[tuple[str, ...], tuple[str, Any]] = {}
    if (root / "rankings.jsonl").is_file():
        for row in _from_label(root, "kwise"):
            for j, option in enumerate(row["options"]):
                out[("label", row["prompt"], str(j))] = (row["prompt"], option.get("views", option.get("path")))
        return out
    prompts = dict(shared_prompts)
    if (root / "prompts.jsonl").is_file():
        prompts.update(_read_prompts(root / "prompts.jsonl"))
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or entry.name == "prompts.jsonl":
            continue
        if entry.is_dir():
            views = sorted(v for v in entry.iterdir() if v.suffix.lower() in IMAGE)
            if views:
                where = f"{root}/{entry.name}"
                out[("id", entry.name)] = (
                    prompts.get(entry.name, entry.name),
                    [_relative(root, v, where) for v in views],
                )
        elif entry.suffix.lower() in IMAGE | VIDEO | AUDIO:
            rel = _relative(root, entry, f"generator {name}")
            out[("id", entry.stem)] = (prompts.get(entry.stem, entry.stem), rel)
    if not out:
        raise AnnotateError(f"generator {name}: no media files or rankings.jsonl in {root}")
    return out


def parse_generators(specs: Sequence[str]) -> dict[str, str]:
    """``["NAME=DIR", ...]`` as ``{name: dir}`` (names unique, no ``=`` in a name)."""
    generators: dict[str, str] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        name = name.strip()
        if not sep or not name or not folder:
            raise AnnotateError(f"--arena wants NAME=DIR, got {spec!r}")
        if name in generators:
            raise AnnotateError(f"generator {name!r} given twice")
        generators[name] = folder
    return generators


def add_arena_task(
    db: Database,
    name: str,
    generators: Mapping[str, str | Path] | None = None,
    *,
    source: str | Path | None = None,
    kind: str = "pairwise",
    k: int | None = None,
    prompts: str | Path | None = None,
    judgements: int = 3,
    instructions: str = "",
    lease_seconds: float = 1800.0,
    seed: int | None = None,
) -> dict[str, Any]:
    """An arena task: anonymous battles between generators (module docstring). ``generators``: ``{name:
    folder}``; or ``source``: a folder with one sub-folder per generator (and ``prompts.jsonl``). ``kind``:
    pairwise (2 generators per vote) or kwise (``k`` per vote, default all of them). ``seed`` fixes the option
    orders (tests); by default they come from the system's random source."""
    if kind not in ("pairwise", "kwise"):
        raise AnnotateError(f"an arena task is pairwise or kwise, got {kind!r}")
    if not name or len(name) > 128:
        raise AnnotateError("a task needs a name of 1-128 characters")
    if judgements < 1:
        raise AnnotateError(f"judgements per item must be at least 1, got {judgements}")
    generators = dict(generators or {})
    shared: dict[str, str] = {}
    if source is not None:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise AnnotateError(f"{folder}: not a folder of generator folders")
        for sub in sorted(folder.iterdir()):
            if sub.is_dir() and not sub.name.startswith(".") and sub.name not in generators:
                generators[sub.name] = sub
        if (folder / "prompts.jsonl").is_file():
            shared = _read_prompts(folder / "prompts.jsonl")
    if prompts is not None:
        shared.update(_read_prompts(Path(prompts)))
    for gen, folder in generators.items():
        if not Path(folder).expanduser().is_dir():
            raise AnnotateError(f"generator {gen}: {folder} is not a folder")
    names = sorted(generators)
    if len(names) < 2:
        raise AnnotateError("an arena needs two or more generators (NAME=DIR each, or a folder of model folders)")
    k = 2 if kind == "pairwise" else (len(names) if k is None else k)
    if not 2 <= k <= len(names) or (kind == "pairwise" and k != 2):
        raise AnnotateError(f"K must be 2..{len(names)} (2 for pairwise), got {k}")
    roots = [os.path.realpath(Path(generators[g]).expanduser()) for g in names]
    outputs = {g: _generator_outputs(g, Path(r), shared) for g, r in zip(names, roots)}
    keys = sorted({key for table in outputs.values() for key in table})
    rng = random.Random(seed) if seed is not None else random.SystemRandom()
    rows = []
    media = None
    for key in keys:
        have = [g for g in names if key in outputs[g]]
        prompt = outputs[have[0]][key][0] if have else ""
        for group in itertools.combinations(have, k):
            options = []
            for g in group:
                rel = outputs[g][key][1]
                option = {"views": rel} if isinstance(rel, list) else {"path": rel}
                options.append({**option, "model": g, "root": names.index(g)})
            rng.shuffle(options)
            item_media = _media_of(options)
            if media not in (None, item_media):
                raise AnnotateError(f"sample {key[-1]!r} is {item_media} but others are {media}: one media type")
            media = item_media
            rows.append(dict(prompt=prompt, options=options, meta={"sample": list(key[1:])}))
            if len(rows) > MAX_ARENA_ITEMS:
                raise AnnotateError(f"over {MAX_ARENA_ITEMS} battles: use fewer generators or a smaller K")
    if not rows:
        raise AnnotateError(f"no sample has outputs from {k} generators (outputs are matched by file name or prompt)")
    with db.session() as s:
        if s.scalar(select(func.count()).select_from(Task).where(Task.name == name)):
            raise AnnotateError(f"a task named {name!r} exists already")
        task = Task(
            name=name,
            kind=kind,
            media=media,
            judgements=judgements,
            dimensions=[],
            instructions=instructions,
            roots=roots,
            source={"generators": dict(zip(names, roots)), "k": k},
            gold_every=1_000_000,
            lease_seconds=lease_seconds,
            mode="arena",
        )
        s.add(task)
        s.flush()
        for position, row in enumerate(rows):
            s.add(
                Item(task_id=task.id, position=position, prompt=row["prompt"], options=row["options"], meta=row["meta"])
            )
        task_id = task.id
    return {
        "task": task_id,
        "name": name,
        "mode": "arena",
        "generators": names,
        "k": k,
        "items": len(rows),
        "media": media,
        "roots": roots,
    }
