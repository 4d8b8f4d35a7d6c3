"""Progress and quality: judgements per task and per annotator, accuracy on gold, inter-annotator agreement.

Agreement is Krippendorff's alpha (Krippendorff 2004, *Content Analysis*, ch. 11; Hayes & Krippendorff 2007),
which allows any number of judges per unit and missing values: ``alpha = 1 - D_o / D_e`` with

- ``D_o = (1 / n) * sum_u 1 / (m_u - 1) * sum_{i != j in u} delta(v_i, v_j)`` (observed disagreement within
  units, units with ``m_u >= 2`` values only, ``n`` their values in all),
- ``D_e = 1 / (n (n - 1)) * sum_{i != j} delta(v_i, v_j)`` over all those values (expected by chance),

``delta`` the nominal metric (0 if equal else 1) or the interval one (``(v_i - v_j)^2``). Units: pairwise items
(values: the choice, nominal); K-wise items option by option (values: the rank, interval); ratings option by
option for each dimension (interval). Also the raw pairwise percent agreement (pairs of judges on one item who
gave the same answer). Only human judgements count, gold items excluded.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Hashable, Sequence
from itertools import combinations
from typing import Any

from sqlalchemy import func, select

from .db import Annotator, Assignment, Database, Item, Judgement, Task


def krippendorff_alpha(units: Sequence[Sequence[Any]], metric: str = "nominal") -> float | None:
    """Alpha over ``units`` (each the values judges gave one unit); ``None`` when undefined (no unit with two
    values, or no variation at all)."""
    pairable = [list(u) for u in units if len(u) >= 2]
    values = [v for u in pairable for v in u]
    n = len(values)
    if n < 2:
        return None
    if metric == "nominal":
        observed = sum(
            sum(1 for i, j in combinations(range(len(u)), 2) if u[i] != u[j]) * 2 / (len(u) - 1) for u in pairable
        )
        counts: dict[Hashable, int] = defaultdict(int)
        for v in values:
            counts[v] += 1
        expected = n * n - sum(c * c for c in counts.values())  # ordered pairs i != j with different values
    elif metric == "interval":
        x = [float(v) for v in values]
        observed = sum(
            sum((float(u[i]) - float(u[j])) ** 2 for i, j in combinations(range(len(u)), 2)) * 2 / (len(u) - 1)
            for u in pairable
        )
        total, squares = sum(x), sum(v * v for v in x)
        expected = 2 * n * squares - 2 * total * total
    else:
        raise ValueError(f"metric must be nominal or interval, got {metric!r}")
    d_o = observed / n
    d_e = expected / (n * (n - 1))
    if d_e <= 0:
        return None
    return 1.0 - d_o / d_e


def percent_agreement(units: Sequence[Sequence[Any]]) -> float | None:
    agree = total = 0
    for u in units:
        for a, b in combinations(u, 2):
            total += 1
            agree += a == b
    return agree / total if total else None


def agreement_units(kind: str, answers_by_item: dict[int, list[dict]], k_of: dict[int, int]) -> dict[str, Any]:
    """Alpha (and percent agreement) for one task from its human answers per item."""
    if kind == "pairwise":
        units = [[str(a["choice"]) for a in lst] for lst in answers_by_item.values()]
        return {
            "alpha": krippendorff_alpha(units, "nominal"),
            "metric": "nominal",
            "percent_agreement": percent_agreement(units),
        }
    if kind == "kwise":
        units = [[a["ranks"][o] for a in lst] for item, lst in answers_by_item.items() for o in range(k_of[item])]
        whole = [[tuple(a["ranks"]) for a in lst] for lst in answers_by_item.values()]
        return {
            "alpha": krippendorff_alpha(units, "interval"),
            "metric": "interval (ranks)",
            "percent_agreement": percent_agreement(whole),
        }
    out: dict[str, Any] = {"metric": "interval (scores)", "dimensions": {}, "percent_agreement": None}
    dims = sorted({d for lst in answers_by_item.values() for a in lst for d in a["scores"]})
    for dim in dims:
        units = [
            [a["scores"][dim][o] for a in lst if dim in a["scores"]]
            for item, lst in answers_by_item.items()
            for o in range(k_of[item])
        ]
        out["dimensions"][dim] = krippendorff_alpha(units, "interval")
    values = [v for v in out["dimensions"].values() if v is not None]
    out["alpha"] = sum(values) / len(values) if values else None
    return out


def task_stats(db: Database, task_id: int) -> dict[str, Any]:
    """Progress, per-annotator counts and gold accuracy, and agreement of one task."""
    with db.read() as s:
        task = s.get(Task, task_id)
        items = s.scalars(select(Item).where(Item.task_id == task_id)).all()
        rows = s.execute(
            select(Judgement, Annotator.name)
            .join(Annotator, Annotator.id == Judgement.annotator_id)
            .where(Judgement.task_id == task_id)
        ).all()
        open_assignments = s.scalar(
            select(func.count(Assignment.id)).where(Assignment.task_id == task_id, Assignment.done.is_(False))
        )
        k_of = {item.id: len(item.options) for item in items}
        regular = [item for item in items if item.gold is None]
        human_counts: dict[int, int] = defaultdict(int)
        by_item: dict[int, list[dict]] = defaultdict(list)
        people: dict[str, dict[str, Any]] = {}
        for judgement, name in rows:
            person = people.setdefault(
                name,
                {
                    "annotator": name,
                    "source": judgement.source,
                    "judgements": 0,
                    "gold": 0,
                    "gold_correct": 0,
                    "seconds": [],
                },
            )
            person["judgements"] += 1
            if judgement.seconds is not None:
                person["seconds"].append(judgement.seconds)
            if judgement.is_gold:
                person["gold"] += 1
                person["gold_correct"] += bool(judgement.correct)
            elif judgement.source == "human":
                human_counts[judgement.item_id] += 1
                by_item[judgement.item_id].append(judgement.answer)
            else:
                human_counts.setdefault(judgement.item_id, 0)
        for person in people.values():
            person["gold_accuracy"] = person["gold_correct"] / person["gold"] if person["gold"] else None
            seconds = person.pop("seconds")
            person["median_seconds"] = statistics.median(seconds) if seconds else None
        complete = sum(1 for item in regular if human_counts.get(item.id, 0) >= task.judgements)
        ai_items = {j.item_id for j, _ in rows if j.source == "ai" and not j.is_gold}
        required = task.judgements * len(regular)
        done = sum(min(human_counts.get(item.id, 0), task.judgements) for item in regular)
        agreement = agreement_units(task.kind, dict(by_item), k_of)
        return {
            "task": task.name,
            "id": task.id,
            "kind": task.kind,
            "media": task.media,
            "items": len(regular),
            "gold_items": len(items) - len(regular),
            "judgements_per_item": task.judgements,
            "complete_items": complete,
            "human_judgements": sum(human_counts.values()),
            "ai_labelled_items": len(ai_items),
            "progress": done / required if required else 1.0,
            "open_assignments": open_assignments,
            "annotators": sorted(people.values(), key=lambda p: (-p["judgements"], p["annotator"])),
            "agreement": agreement,
        }


def all_stats(db: Database) -> list[dict[str, Any]]:
    with db.read() as s:
        ids = list(s.scalars(select(Task.id).order_by(Task.id)))
    return [task_stats(db, i) for i in ids]


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"
