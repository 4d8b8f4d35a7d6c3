"""Handing items out and recording answers: each item gets its requested number of independent judgements.

- An annotator gets at most one assignment per item (a unique constraint), so the judgements of an item come
  from distinct people; an item is handed out while its done + unexpired open assignments are fewer than the
  task's ``judgements``; among those, the one closest to complete first (then the task's order).
- Gold items (known answers) are handed to every annotator, one every ``gold_every`` answers, and do not count
  towards the items' judgements.
- An assignment not answered within the task's lease expires; its slot goes back to the pool. Asking again
  returns the same open assignment (reloading the page does not take a second item).
- Recording is idempotent: a judgement is unique per assignment and per (item, annotator), so a retried or
  replayed submission is answered "duplicate" and never counted twice.
- Arena tasks (``Task.mode == "arena"``): the next battle is drawn at random among the items still open to the
  annotator (so the generators and the prompt are random); the page shows the options by display position
  only, a form's answer is mapped back to the item's order through the assignment's recorded ``order``
  (:func:`from_display`), and :func:`reveal` names the generators of an assignment only once it is answered.
- Both run in one write transaction each, serialised per task: ``BEGIN IMMEDIATE`` on SQLite (one writer at a
  time), ``SELECT ... FOR UPDATE`` of the task row on PostgreSQL (its READ COMMITTED transactions would otherwise
  count the open assignments of an item side by side and both hand out its last slot); each statement after the
  lock sees every hand-out and answer committed before it. The unique constraints stay the last word on
  duplicates (a unique violation is answered "duplicate").
"""

from __future__ import annotations

import random
import time
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import answers
from .db import AnnotateError, Annotator, Assignment, Database, Item, Judgement, Task


def _lock_task(s: Session, task_id: int) -> Task:
    task = s.scalar(select(Task).where(Task.id == task_id).with_for_update())
    if task is None:
        raise AnnotateError(f"no task {task_id}", 404)
    return task


def _active_count(s: Session, item_id: int, now: float, exclude: int | None = None) -> int:
    query = select(func.count(Assignment.id)).where(
        Assignment.item_id == item_id, or_(Assignment.done.is_(True), Assignment.expires_at > now)
    )
    if exclude is not None:
        query = query.where(Assignment.id != exclude)
    return s.scalar(query) or 0


def _pick(s: Session, task: Task, annotator_id: int, now: float) -> Item | None:
    mine = select(Assignment.item_id).where(Assignment.task_id == task.id, Assignment.annotator_id == annotator_id)
    n_done = s.scalar(
        select(func.count(Judgement.id)).where(Judgement.task_id == task.id, Judgement.annotator_id == annotator_id)
    )
    if (n_done + 1) % task.gold_every == 0:
        gold = s.scalar(
            select(Item)
            .where(Item.task_id == task.id, Item.gold.is_not(None), Item.id.not_in(mine))
            .order_by(Item.position)
            .limit(1)
        )
        if gold is not None:
            return gold
    active = func.count(Assignment.id)
    row = s.execute(
        select(Item.id, active)
        .outerjoin(
            Assignment,
            and_(Assignment.item_id == Item.id, or_(Assignment.done.is_(True), Assignment.expires_at > now)),
        )
        .where(
            Item.task_id == task.id,
            Item.gold.is_(None),
            or_(Item.routed.is_(None), Item.routed != "ai"),
            Item.id.not_in(mine),
        )
        .group_by(Item.id, Item.position)
        .having(active < task.judgements)
        .order_by(*((func.random(),) if task.mode == "arena" else (active.desc(), Item.position)))
        .limit(1)
    ).first()
    return None if row is None else s.get(Item, row[0])


def next_assignment(db: Database, task_id: int, annotator_id: int, now: float | None = None) -> dict[str, Any] | None:
    """The annotator's open assignment in the task, or a new one; ``None`` when nothing is left for them."""
    now = time.time() if now is None else now
    with db.session() as s:
        task = _lock_task(s, task_id)
        open_ = s.scalars(
            select(Assignment)
            .where(Assignment.task_id == task_id, Assignment.annotator_id == annotator_id, Assignment.done.is_(False))
            .order_by(Assignment.id)
        ).all()
        for assignment in open_:
            item = s.get(Item, assignment.item_id)
            if assignment.expires_at > now:
                return _describe(task, item, assignment)
            if item.gold is not None or _active_count(s, item.id, now, exclude=assignment.id) < task.judgements:
                assignment.expires_at = now + task.lease_seconds
                return _describe(task, item, assignment)
            s.delete(assignment)  # its slot went to someone else meanwhile
        s.flush()
        item = _pick(s, task, annotator_id, now)
        if item is None:
            return None
        order = list(range(len(item.options)))
        random.SystemRandom().shuffle(order)
        assignment = Assignment(
            task_id=task_id,
            item_id=item.id,
            annotator_id=annotator_id,
            order=order,
            created_at=now,
            expires_at=now + task.lease_seconds,
        )
        s.add(assignment)
        s.flush()
        return _describe(task, item, assignment)


def _describe(task: Task, item: Item, assignment: Assignment) -> dict[str, Any]:
    """What the page shows: options in the shuffled display order, each with its index in the item and its media
    URLs (opaque: task, item, option, view numbers). Generator names, file names and gold answers are left out
    (blind judging)."""
    options = []
    for index in assignment.order:
        option = item.options[index]
        n_views = len(option["views"]) if "views" in option else 1
        options.append({"index": index, "media": [f"/media/{task.id}/{item.id}/{index}/{v}" for v in range(n_views)]})
    return {
        "assignment": assignment.id,
        "task": task.id,
        "task_name": task.name,
        "kind": task.kind,
        "media": task.media,
        "dimensions": list(task.dimensions or []),
        "instructions": task.instructions,
        "prompt": item.prompt,
        "k": len(item.options),
        "options": options,
        "expires_at": assignment.expires_at,
        "arena": task.mode == "arena",
    }


def display_order(db: Database, assignment_id: int, annotator_id: int) -> tuple[int, list[int]]:
    """The task of one of the annotator's assignments and its item indices in the order its page showed them
    (404 when it is not theirs)."""
    with db.read() as s:
        assignment = s.get(Assignment, assignment_id)
        if assignment is None or assignment.annotator_id != annotator_id:
            raise AnnotateError(f"no assignment {assignment_id} of yours", 404)
        return assignment.task_id, list(assignment.order)


def from_display(kind: str, answer: dict[str, Any], order: list[int]) -> dict[str, Any]:
    """An answer given by display positions (``choice`` 0 = the first shown; ``ranks[p]`` of the p-th shown) in
    the item's option order, as :func:`record` stores it."""
    k = len(order)
    if kind == "pairwise":
        choice = answer.get("choice")
        if choice == "tie":
            return {"choice": "tie"}
        position = answers._int(choice, '"choice"')
        if not 0 <= position < k:
            raise AnnotateError(f'"choice" must be 0..{k - 1} or "tie", got {choice!r}')
        return {"choice": order[position]}
    if kind == "kwise":
        ranks = answer.get("ranks")
        if not isinstance(ranks, list) or len(ranks) != k:
            raise AnnotateError(f'a K-wise answer needs "ranks": a list of {k} integers (1 = best)')
        stored: list[Any] = [None] * k
        for position, rank in enumerate(ranks):
            stored[order[position]] = rank
        return {"ranks": stored}
    raise AnnotateError(f"arena tasks are pairwise or kwise, not {kind!r}")


def reveal(db: Database, assignment_id: int, annotator_id: int) -> dict[str, Any]:
    """An answered arena battle of the annotator, generators named, in the order its page showed them: ``{"task",
    "task_name", "prompt", "kind", "media", "options": [{"model", "media", "won", "rank"}], "tie"}``. Refused
    before the vote (409), for another's assignment (404) and for tasks that are not arenas (403)."""
    with db.read() as s:
        assignment = s.get(Assignment, assignment_id)
        if assignment is None or assignment.annotator_id != annotator_id:
            raise AnnotateError(f"no assignment {assignment_id} of yours", 404)
        task = s.get(Task, assignment.task_id)
        if task.mode != "arena":
            raise AnnotateError("generators are revealed in arena tasks only", 403)
        judgement = s.scalar(select(Judgement).where(Judgement.assignment_id == assignment_id))
        if judgement is None:
            raise AnnotateError("vote first: the generators are revealed after the vote", 409)
        item = s.get(Item, assignment.item_id)
        k = len(item.options)
        ranks = answers.ranks_of(task.kind, judgement.answer, k)
        shown = _describe(task, item, assignment)["options"]
        options = [
            {
                "model": item.options[o["index"]]["model"],
                "media": o["media"],
                "rank": int(ranks[o["index"]]),
                "won": ranks[o["index"]] == 1.0 and len(set(ranks)) > 1,
            }
            for o in shown
        ]
        return {
            "task": task.id,
            "task_name": task.name,
            "prompt": item.prompt,
            "kind": task.kind,
            "media": task.media,
            "options": options,
            "tie": len(set(ranks)) == 1,
        }


def options_count(db: Database, assignment_id: int, annotator_id: int) -> int:
    """K of the item behind one of the annotator's assignments (404 when it is not theirs)."""
    with db.session() as s:
        assignment = s.get(Assignment, assignment_id)
        if assignment is None or assignment.annotator_id != annotator_id:
            raise AnnotateError(f"no assignment {assignment_id} of yours", 404)
        return len(s.get(Item, assignment.item_id).options)


def record(
    db: Database,
    assignment_id: int,
    annotator_id: int,
    answer: Any,
    *,
    seconds: float | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """Record an answer to an assignment: ``{"status": "recorded" | "duplicate", "judgement": id}``; errors
    (not yours 403, unknown 404, invalid 400, expired and the item full 409) as :class:`AnnotateError`."""
    now = time.time() if now is None else now
    try:
        with db.session() as s:
            assignment = s.get(Assignment, assignment_id)
            if assignment is None or assignment.annotator_id != annotator_id:
                raise AnnotateError(f"no assignment {assignment_id} of yours", 404)
            task = _lock_task(s, assignment.task_id)
            # read again under the task's lock: on PostgreSQL (READ COMMITTED, no database-wide write lock) a
            # concurrent request may have answered it, or handed its expired slot on and deleted it, meanwhile
            assignment = s.scalar(
                select(Assignment).where(Assignment.id == assignment_id).execution_options(populate_existing=True)
            )
            if assignment is None:
                raise AnnotateError(f"assignment {assignment_id} expired and the item has its judgements now", 409)
            existing = s.scalar(select(Judgement).where(Judgement.assignment_id == assignment_id))
            item = s.get(Item, assignment.item_id)
            stored = answers.validate(task.kind, answer, len(item.options), task.dimensions or [])
            if existing is not None:
                if existing.answer != stored:
                    raise AnnotateError(f"assignment {assignment_id} was answered already, differently", 409)
                return {"status": "duplicate", "judgement": existing.id, "task": task.id}
            if (
                assignment.expires_at <= now
                and item.gold is None
                and _active_count(s, item.id, now, exclude=assignment.id) >= task.judgements
            ):
                raise AnnotateError(f"assignment {assignment_id} expired and the item has its judgements now", 409)
            annotator = s.get(Annotator, annotator_id)
            if seconds is None:
                seconds = max(0.0, now - assignment.created_at)
            judgement = Judgement(
                assignment_id=assignment_id,
                task_id=task.id,
                item_id=item.id,
                annotator_id=annotator_id,
                answer=stored,
                source=annotator.kind,
                is_gold=item.gold is not None,
                correct=None if item.gold is None else answers.is_correct(task.kind, stored, item.gold),
                seconds=seconds,
                created_at=now,
            )
            s.add(judgement)
            assignment.done = True
            s.flush()
            return {"status": "recorded", "judgement": judgement.id, "task": task.id}
    except IntegrityError:  # a concurrent duplicate of the same submission won the race: it is recorded once
        with db.session() as s:
            existing = s.scalar(select(Judgement).where(Judgement.assignment_id == assignment_id))
            if existing is None:
                raise
            return {"status": "duplicate", "judgement": existing.id, "task": existing.task_id}


def record_direct(db: Database, item_id: int, annotator_id: int, answer: Any, now: float | None = None) -> dict:
    """Record a judgement without a prior hand-out (AI labellers, imports): an assignment is created and answered
    in one go, under the same uniqueness rules."""
    now = time.time() if now is None else now
    with db.session() as s:
        item = s.get(Item, item_id)
        if item is None:
            raise AnnotateError(f"no item {item_id}", 404)
        assignment = Assignment(
            task_id=item.task_id,
            item_id=item_id,
            annotator_id=annotator_id,
            order=list(range(len(item.options))),
            created_at=now,
            expires_at=now + 60.0,
        )
        s.add(assignment)
        s.flush()
        assignment_id = assignment.id
    return record(db, assignment_id, annotator_id, answer, now=now)
