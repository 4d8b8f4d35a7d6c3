"""The live leaderboard of an arena task: its votes (the rows of the ``votes`` export, in the same order) ranked by
:func:`mmalign.bench.arena.generator_report` with the defaults of ``mmalign bench generators`` (Elo with K-factor
32, Bradley-Terry with prior 0.1 and vote-bootstrap intervals, K-wise Bayesian with ``pairing="mean"``; 1000
resamples, seed 0, 95 % intervals), so the page equals that command run on the exported file.

Reports are cached per (task, number of judgements, last judgement id, bootstrap settings): a reload recomputes
only after a new vote, and one computation per task runs at a time (concurrent loads wait for it and share its
result). The bootstrap dominates the cost: 1000 resamples take about 2.5 s per 300 pairwise votes of 4
generators on one core (``?bootstrap=N`` on the page asks for fewer).
"""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import func, select

from .db import AnnotateError, Database, Judgement, Task
from .export import vote_rows

DEFAULTS = {"n_resamples": 1000, "seed": 0, "level": 0.95}
MAX_RESAMPLES = 1000
_cache: dict[tuple, dict[str, Any]] = {}
_lock = threading.Lock()
_computing: dict[tuple, threading.Lock] = {}


def leaderboard(
    db: Database, task_id: int, *, n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """``{"task", "task_name", "n_votes", "report"}``; ``report`` is :func:`generator_report`'s (``None`` without
    votes)."""
    if not 0 <= n_resamples <= MAX_RESAMPLES:
        raise AnnotateError(f"bootstrap resamples must be 0..{MAX_RESAMPLES}, got {n_resamples}")
    with db.read() as s:
        task = s.get(Task, task_id)
        if task is None:
            raise AnnotateError(f"no task {task_id}", 404)
        name = task.name
        count, last = s.execute(
            select(func.count(Judgement.id), func.max(Judgement.id)).where(
                Judgement.task_id == task_id, Judgement.is_gold.is_(False)
            )
        ).one()
    key = (db.url, task_id, count, last, n_resamples, seed, level)
    with _lock:
        if key in _cache:
            return _cache[key]
        task_lock = _computing.setdefault((db.url, task_id), threading.Lock())
    with task_lock:
        with _lock:
            if key in _cache:  # computed while this request waited
                return _cache[key]
        return _compute(db, task_id, name, key, n_resamples, seed, level)


def _compute(
    db: Database, task_id: int, name: str, key: tuple, n_resamples: int, seed: int, level: float
) -> dict[str, Any]:
    from ..bench.arena import generator_report, parse_vote

    rows = vote_rows(db, name, "all")
    votes = [parse_vote(row) for row in rows]
    report = None
    if votes:
        report = generator_report(
            votes,
            n_resamples=n_resamples,
            seed=seed,
            level=level,
            elo_options={"k_factor": 32.0},
            bt_options={"prior": 0.1},
            kwise_options={"pairing": "mean"},
        )
    result = {"task": task_id, "task_name": name, "n_votes": len(votes), "report": report}
    with _lock:
        if len(_cache) > 256:
            _cache.clear()
        _cache[key] = result
    return result


def table(result: dict[str, Any]) -> dict[str, Any]:
    """The page's rows: generators in Bradley-Terry order with each method's rating and interval, win rates, and
    whether any vote is K-wise (K > 2, when the K-wise column is shown)."""
    report = result["report"]
    if report is None:
        return {"rows": [], "kwise": False, "matrix": [], "order": []}
    order = list(report["rankings"]["bt"])
    index = {m: i for i, m in enumerate(report["models"])}
    rows = []
    for position, model in enumerate(order, 1):
        ratings = {method: report["ratings"][method][model] for method in report["ratings"]}
        rows.append(
            {
                "rank": position,
                "model": model,
                "ratings": ratings,
                "win_rate": report["overall_win_rate"][model],
                "games": sum(report["games"][index[model]]),
            }
        )
    matrix = [[None if a == b else report["win_rate"][index[a]][index[b]] for b in order] for a in order]
    return {"rows": rows, "kwise": max(report["k"]) > 2, "matrix": matrix, "order": order}
