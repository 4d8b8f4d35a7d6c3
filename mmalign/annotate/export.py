"""Exports that the rest of mmalign reads as they are; every label says where it came from (``"source"``:
``human`` or ``ai``, and ``"annotator"``: the person or the AI labeller's name).

- ``pairs``: mmalign's JSONL pairs (``mmalign train data=FILE``, :func:`mmalign.data.load_preferences`), one
  line per judged pair, ``{"prompt", "chosen", "rejected", "label", "source", "annotator", "task", "item"}``
  (absolute media paths; ties with ``label`` 0.5, which the readers drop unless ``tie_policy="keep"``). K-wise
  and rating answers expand into every pair of options (ratings: mean over dimensions, or ``dimension``).
- ``d3po``: for a task made from a ``mmalign label --trajectories`` folder, human scores in both formats of
  :func:`mmalign.data.feedback.read_human_scores`: ``OUT/scores.jsonl`` (one line per judgement,
  ``{"index", "scores", "annotator", "source"}``; lines of one prompt are averaged) and ``OUT/annotators/
  NAME.json`` (the reference's per-annotator lists, for the annotators who scored every prompt from the first
  on, up to the longest such run). Pairwise answers of a K-image group are combined into per-image win counts.
- ``votes``: ``mmalign bench generators --votes FILE`` arena votes, for items whose options name their
  generators (``models`` in a manifest, or the model folders): K-wise ``{"models", "ranks"}`` or pairwise
  ``{"model_a", "model_b", "winner"}``, with ``"judge"`` (``human`` or ``ai:NAME``), ``"prompt"``, ``"source"``.

Gold questions are left out of every export (their answers are known; they measure the annotators).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from itertools import combinations
from pathlib import Path
from typing import Any

from sqlalchemy import select

from . import answers
from .db import AnnotateError, Annotator, Database, Item, Judgement, Task
from .tasks import option_root

FORMATS = ("pairs", "d3po", "votes")
SOURCES = ("human", "ai", "all")


def _rows(db: Database, task_name: str, source: str) -> tuple[Task, list[tuple[Judgement, Item, str]]]:
    if source not in SOURCES:
        raise AnnotateError(f"source must be one of {SOURCES}, got {source!r}")
    with db.read() as s:
        task = s.scalar(select(Task).where(Task.name == task_name))
        if task is None:
            raise AnnotateError(f"no task named {task_name!r}", 404)
        query = (
            select(Judgement, Item, Annotator.name)
            .join(Item, Item.id == Judgement.item_id)
            .join(Annotator, Annotator.id == Judgement.annotator_id)
            .where(Judgement.task_id == task.id, Judgement.is_gold.is_(False))
            .order_by(Judgement.id)
        )
        if source != "all":
            query = query.where(Judgement.source == source)
        rows = [(j, i, n) for j, i, n in s.execute(query).all()]
        return task, rows


def _path(task: Task, option: dict) -> str:
    root = Path(option_root(task, option))
    if "views" in option:
        return str(root / option["views"][0])
    return str(root / option["path"])


def _write_jsonl(out: str | Path, rows: Iterable[dict]) -> int:
    """Write ``rows`` as JSON lines to ``out`` through a temporary file renamed at the end (a reader never sees a
    half-written export); returns the count."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
            n += 1
    tmp.replace(out)
    return n


def export_pairs(
    db: Database, task_name: str, out: str | Path, source: str = "all", dimension: str | None = None
) -> int:
    task, rows = _rows(db, task_name, source)

    def pairs() -> Iterator[dict]:
        for judgement, item, name in rows:
            k = len(item.options)
            scores = answers.option_scores(task.kind, judgement.answer, k, dimension)
            for a, b in combinations(range(k), 2):
                if scores[a] == scores[b]:
                    win, lose, label = a, b, 0.5
                else:
                    win, lose = (a, b) if scores[a] > scores[b] else (b, a)
                    label = 1.0
                yield {
                    "prompt": item.prompt,
                    "chosen": _path(task, item.options[win]),
                    "rejected": _path(task, item.options[lose]),
                    "label": label,
                    "source": judgement.source,
                    "annotator": name,
                    "task": task.name,
                    "item": item.position,
                }

    return _write_jsonl(out, pairs())


def vote_rows(db: Database, task_name: str, source: str = "all", dimension: str | None = None) -> list[dict]:
    """The ``votes`` export's rows in judgement order (what ``mmalign bench generators --votes`` reads; the arena
    leaderboard ranks the same rows)."""
    task, rows = _rows(db, task_name, source)
    votes = []
    for judgement, item, name in rows:
        models = [option.get("model") for option in item.options]
        if any(m is None for m in models):
            raise AnnotateError(
                f"task {task.name!r} item {item.position}: options do not name their generators (give "
                '"models" in the manifest, or one folder per model)'
            )
        judge = "human" if judgement.source == "human" else f"ai:{name}"
        common = {"judge": judge, "prompt": item.prompt, "source": judgement.source, "annotator": name}
        if task.kind == "pairwise":
            choice = judgement.answer["choice"]
            winner = "tie" if choice == "tie" else ("model_a" if choice == 0 else "model_b")
            votes.append({"model_a": models[0], "model_b": models[1], "winner": winner, **common})
        else:
            ranks = answers.ranks_of(task.kind, judgement.answer, len(models), dimension)
            votes.append({"models": models, "ranks": ranks, **common})
    return votes


def export_votes(
    db: Database, task_name: str, out: str | Path, source: str = "all", dimension: str | None = None
) -> int:
    return _write_jsonl(out, vote_rows(db, task_name, source, dimension))


def export_d3po(
    db: Database, task_name: str, out: str | Path, source: str = "human", dimension: str | None = None
) -> dict:
    task, rows = _rows(db, task_name, source)
    out = Path(out)
    (out / "annotators").mkdir(parents=True, exist_ok=True)
    with db.read() as s:
        k_of_group: dict[int, int] = {}
        for item in s.scalars(select(Item).where(Item.task_id == task.id, Item.gold.is_(None))):
            if "index" not in item.meta:
                raise AnnotateError(
                    f"task {task.name!r} was not made from a `mmalign label` folder: D3PO scores need its groups"
                )
            index = item.meta["index"]
            k = len(item.options) if "pair" not in item.meta else None
            if k is not None:
                k_of_group[index] = k
    source_dir = Path(task.source.get("path", task.roots[0]))
    if task.kind == "pairwise":  # K of each group from the label folder itself
        lines = (source_dir / "rankings.jsonl").read_text(encoding="utf-8").splitlines()
        for index, line in enumerate([ln for ln in lines if ln.strip()]):
            k_of_group[index] = len(json.loads(line)["images"])
    # per (annotator, group): scores of the K images
    per: dict[tuple[str, int], list[float]] = {}
    sources: dict[str, str] = {}
    seen_pairs: dict[tuple[str, int], set] = defaultdict(set)
    for judgement, item, name in rows:
        index = item.meta["index"]
        k = k_of_group[index]
        sources[name] = judgement.source
        if task.kind == "pairwise":
            a, b = item.meta["pair"]
            wins = answers.option_scores("pairwise", judgement.answer, 2)
            scores = per.setdefault((name, index), [0.0] * k)
            scores[a] += wins[0]
            scores[b] += wins[1]
            seen_pairs[(name, index)].add((a, b))
        else:
            per[(name, index)] = answers.option_scores(task.kind, judgement.answer, k, dimension)
    if task.kind == "pairwise":  # only groups where the annotator judged every pair give comparable win counts
        per = {
            key: v
            for key, v in per.items()
            if len(seen_pairs[key]) == k_of_group[key[1]] * (k_of_group[key[1]] - 1) // 2
        }
    n_lines = 0
    with (out / "scores.jsonl").open("w", encoding="utf-8") as handle:
        for (name, index), scores in sorted(per.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            row = {"index": index, "scores": scores, "annotator": name, "source": sources[name]}
            handle.write(json.dumps(row) + "\n")
            n_lines += 1
    files = {}
    for name in sorted(sources):
        run = []
        while (name, len(run)) in per:
            run.append(per[(name, len(run))])
        if run:
            path = out / "annotators" / f"{name}.json"
            path.write_text(json.dumps(run) + "\n", encoding="utf-8")
            files[name] = len(run)
    return {"scores_lines": n_lines, "annotator_files": files}


def export(
    db: Database, task_name: str, fmt: str, out: str | Path, source: str = "all", dimension: str | None = None
) -> Any:
    if fmt == "pairs":
        return export_pairs(db, task_name, out, source, dimension)
    if fmt == "votes":
        return export_votes(db, task_name, out, source, dimension)
    if fmt == "d3po":
        return export_d3po(db, task_name, out, source, dimension)
    raise AnnotateError(f"export format must be one of {FORMATS}, got {fmt!r}")
