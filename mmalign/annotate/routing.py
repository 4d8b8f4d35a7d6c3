"""Hybrid routing: a reward labels the items it is sure of, people get the rest, within a budget.

Confidence of an item: the reward's margin between its options (pairwise: ``|s_0 - s_1|``; K-wise: the smallest
gap between two options' scores). The ``budget`` least confident items stay with people (``routed = "human"``);
every other item gets the reward's answer as an AI judgement (``source = "ai"``, annotator ``reward:NAME``) and
``routed = "ai"``, so it is never handed to people. Exports keep both, each line marked with its source.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select

from .assign import record_direct
from .db import AnnotateError, Database, Item, Task
from .people import ai_annotator
from .tasks import option_root

Scorer = Callable[[Sequence[str], str], Sequence[float]]
"""``scorer(media_paths, prompt) -> one score per option`` (higher is better)."""


def margin(scores: Sequence[float]) -> float:
    ordered = sorted(float(s) for s in scores)
    return min(b - a for a, b in zip(ordered, ordered[1:]))


def answer_from_scores(kind: str, scores: Sequence[float]) -> dict[str, Any]:
    if kind == "pairwise":
        return {"choice": "tie" if scores[0] == scores[1] else (0 if scores[0] > scores[1] else 1)}
    if kind == "kwise":
        return {"ranks": [1 + sum(1 for t in scores if t > s) for s in scores]}
    raise AnnotateError("routing labels pairwise and K-wise tasks (a rating task has no reward answer)")


def route(db: Database, task_name: str, scorer: Scorer, budget: int, reward_name: str) -> dict[str, Any]:
    """Label all but the ``budget`` least confident unjudged items of a task with ``scorer``; returns counts and
    the margin at the cut."""
    if budget < 0:
        raise AnnotateError(f"budget must be 0 or more, got {budget}")
    with db.read() as s:
        task = s.scalar(select(Task).where(Task.name == task_name))
        if task is None:
            raise AnnotateError(f"no task named {task_name!r}", 404)
        items = s.scalars(
            select(Item)
            .where(Item.task_id == task.id, Item.gold.is_(None), Item.routed.is_(None))
            .order_by(Item.position)
        ).all()
        paths_of = {
            item.id: [
                str(Path(option_root(task, o)) / (o["views"][0] if "views" in o else o["path"])) for o in item.options
            ]
            for item in items
        }
        kind = task.kind
    scored = []
    for item in items:
        paths = paths_of[item.id]
        scores = [float(v) for v in scorer(paths, item.prompt)]
        if len(scores) != len(paths):
            raise AnnotateError(f"the reward gave {len(scores)} scores for {len(paths)} options")
        scored.append((margin(scores), item.position, item.id, scores))
    scored.sort()
    human, machine = scored[:budget], scored[budget:]
    robot = ai_annotator(db, f"reward:{reward_name}")
    for _, _, item_id, scores in machine:
        record_direct(db, item_id, robot, answer_from_scores(kind, scores))
    with db.session() as s:
        for routed, group in (("human", human), ("ai", machine)):
            for _, _, item_id, _ in group:
                s.get(Item, item_id).routed = routed
    cut = human[-1][0] if human else None
    return {"human": len(human), "ai": len(machine), "margin_cut": cut, "annotator": f"reward:{reward_name}"}


def reward_scorer(name: str, weights: str | None = None, device: str = "cpu") -> Scorer:
    """A :data:`Scorer` from a registered reward (``mmalign list`` names), scoring images with its reference
    preprocessing."""
    import torch
    from PIL import Image

    from ..trainers.online import build_reward

    reward = build_reward(name, weights).to(device)

    def score(paths: Sequence[str], prompt: str) -> list[float]:
        pictures = [Image.open(p).convert("RGB") for p in paths]
        with torch.no_grad():
            if hasattr(reward, "score_images"):
                values = reward.score_images(pictures, [prompt] * len(pictures))
            else:
                raise AnnotateError(f"reward {name!r} cannot score image files")
        return [float(v) for v in values]

    return score
