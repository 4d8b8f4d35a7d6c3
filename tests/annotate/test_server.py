"""A real uvicorn server (`mmalign annotate serve` in a subprocess on a free loopback port): simulated annotators
voting concurrently, retries, a crash mid-way; every acknowledged vote is in the database exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests
from sqlalchemy import func, select

from mmalign.annotate.db import Judgement, init_database
from mmalign.annotate.people import add_user
from mmalign.annotate.tasks import add_task
from tests.annotate import media
from tests.annotate.server import ROOT, Server


@pytest.fixture
def arena(tmp_path, new_db):
    """A pairwise task of 200 items (every item the same two files) and 20 annotators."""

    def make(items: int, annotators: int, judgements: int):
        db = init_database(new_db("a"))[0]
        folder = tmp_path / "m"
        media.png(folder / "a.png", 0)
        media.png(folder / "b.png", 1)
        rows = [{"prompt": f"p{i}", "media": ["a.png", "b.png"], "models": ["a", "b"]} for i in range(items)]
        (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        add_task(db, "load", "pairwise", folder, judgements=judgements)
        tokens = [add_user(db, f"u{i:02d}") for i in range(annotators)]
        return db, tokens

    servers = []

    def start(db):
        server = Server(db.url, tmp_path / "server.log")
        servers.append(server)
        return server

    yield make, start
    for server in servers:
        server.stop()


def vote(url: str, token: str, votes: int, acknowledged: list, errors: list, retry_every: int = 10) -> None:
    """One annotator: ask for an item, answer it (the next item comes back with the answer); every
    ``retry_every``-th answer is sent twice (a client retry), which must come back "duplicate"."""
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    try:
        current = session.post(f"{url}/api/tasks/1/next", timeout=30).json()["assignment"]
        done = 0
        while current is not None and done < votes:
            body = {"assignment": current["assignment"], "answer": {"choice": done % 2}, "next": True}
            response = session.post(f"{url}/api/judgements", json=body, timeout=30)
            if response.status_code != 201:
                errors.append(response.text)
                return
            acknowledged.append(current["assignment"])
            done += 1
            if done % retry_every == 0:
                again = session.post(f"{url}/api/judgements", json={**body, "next": False}, timeout=30)
                if again.status_code != 200 or again.json()["status"] != "duplicate":
                    errors.append(f"retry: {again.status_code} {again.text}")
            current = response.json()["next"]
    except requests.RequestException as error:
        errors.append(repr(error))


def run_load(url: str, tokens: list[str], votes: int) -> tuple[list, list, float]:
    acknowledged, errors = [], []
    start = time.monotonic()
    threads = [threading.Thread(target=vote, args=(url, t, votes, acknowledged, errors)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return acknowledged, errors, time.monotonic() - start


def db_counts(db):
    with db.session() as s:
        total = s.scalar(select(func.count(Judgement.id)))
        per_item = s.execute(select(Judgement.item_id, func.count()).group_by(Judgement.item_id)).all()
        pairs = s.scalar(select(func.count(func.distinct(Judgement.item_id * 1000 + Judgement.annotator_id))))
    return total, dict(per_item), pairs


def check_load(arena, annotators: int, votes: int) -> float:
    make, start = arena
    db, tokens = make(items=votes, annotators=annotators, judgements=annotators)
    server = start(db)
    acknowledged, errors, seconds = run_load(server.url, tokens, votes)
    assert not errors, errors[:3]
    assert len(acknowledged) == len(set(acknowledged)) == annotators * votes
    total, per_item, distinct = db_counts(db)
    assert total == distinct == annotators * votes  # nothing lost, nothing counted twice
    assert set(per_item.values()) == {annotators}  # every item judged by every annotator exactly once
    return seconds


def test_concurrent_annotators_small(arena):
    """5 simulated annotators x 40 votes against a real server (the default suite's version)."""
    check_load(arena, annotators=5, votes=40)


@pytest.mark.slow
def test_concurrent_annotators_20_by_200(arena):
    """20 simulated annotators x 200 votes (4000 votes, 400 client retries)."""
    seconds = check_load(arena, annotators=20, votes=200)
    print(f"4000 votes in {seconds:.1f} s")


def test_crash_mid_way_loses_nothing(arena):
    """Votes until half-way, the server killed with SIGKILL (no shutdown), a new server on the same file: every
    vote acknowledged before the crash is there, the open assignments come back, the rest completes."""
    make, start = arena
    db, tokens = make(items=20, annotators=4, judgements=4)
    first = start(db)
    acknowledged, errors, _ = run_load(first.url, tokens, votes=10)
    assert not errors
    first.stop(signal.SIGKILL)
    assert db_counts(db)[0] == len(acknowledged) == 40
    second = start(db)
    more, errors, _ = run_load(second.url, tokens, votes=10)
    assert not errors and not set(more) & set(acknowledged)
    total, per_item, distinct = db_counts(db)
    assert total == distinct == 80 and set(per_item.values()) == {4}


def test_serve_refuses_a_public_address(tmp_path):
    init_database(tmp_path / "a.db")
    result = subprocess.run(
        [sys.executable, "-m", "mmalign.cli", "annotate", "serve", "--db", str(tmp_path / "a.db"), "--host", "0.0.0.0"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "loopback only" in result.stderr
