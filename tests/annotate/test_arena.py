"""Arena tasks: anonymous generator battles from one folder per generator, votes mapped through the recorded
assignment (forged ones refused), the generators revealed after the vote, counted once under concurrent voters,
a live leaderboard equal to `mmalign bench generators` on the exported votes, and the schema-3 migration."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest
import requests
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from mmalign.annotate import assign
from mmalign.annotate.app import create_app
from mmalign.annotate.db import AnnotateError, Assignment, Database, Item, Judgement, Task, init_database
from mmalign.annotate.people import add_user, authenticate
from mmalign.annotate.tasks import add_arena_task, add_task
from mmalign.cli import main
from tests.annotate import media
from tests.annotate.server import Server

GENERATORS = ("zeta-secretgen", "omega-hiddenmodel", "kappa-privatenet")
SKILL = {"zeta-secretgen": 2, "omega-hiddenmodel": 1, "kappa-privatenet": 0}


def generator_folders(root: Path, prompts: int = 4, names=GENERATORS) -> dict[str, Path]:
    """One folder per generator, each ``<id>.png`` and a ``prompts.jsonl``; in separate places (separate roots)."""
    folders = {}
    for g, name in enumerate(names):
        folder = root / f"out{g}" / "samples"
        for i in range(prompts):
            media.png(folder / f"p{i}.png", 100 * g + i)
        (folder / "prompts.jsonl").write_text(
            "".join(json.dumps({"id": f"p{i}", "prompt": f"a cat {i}"}) + "\n" for i in range(prompts))
        )
        folders[name] = folder
    return folders


@pytest.fixture
def site(tmp_path, new_db):
    db = init_database(new_db("a"))[0]
    tokens = {name: add_user(db, name) for name in ("alice", "bob")}
    folders = generator_folders(tmp_path)
    add_arena_task(db, "battle", folders, judgements=2, seed=0)
    return db, tokens, tmp_path


def login(client, token):
    client.get("/login")
    response = client.post(
        "/login", data={"token": token, "csrf": client.cookies["mmalign_csrf"]}, follow_redirects=False
    )
    assert response.status_code == 303
    return client.cookies["mmalign_csrf"]


def hidden(html, name):
    return re.search(rf'name="{name}" value="([^"]+)"', html).group(1)


def count(db):
    with db.read() as s:
        return s.scalar(select(func.count(Judgement.id)))


def models_shown(db, assignment_id):
    """The generators of an assignment in display order (what the server recorded)."""
    with db.read() as s:
        a = s.get(Assignment, assignment_id)
        item = s.get(Item, a.item_id)
        return [item.options[i]["model"] for i in a.order]


def test_arena_tasks_from_the_command_line(tmp_path, capsys, new_db):
    db_path = new_db("a")
    assert main(["annotate", "init", "--db", db_path]) == 0
    capsys.readouterr()
    folders = generator_folders(tmp_path, prompts=3)
    specs = [f"{name}={folder}" for name, folder in folders.items()]
    assert main(["annotate", "add-task", "duel", "--arena", *specs, "--db", db_path]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["mode"] == "arena" and made["items"] == 3 * 3 and made["k"] == 2 and len(made["roots"]) == 3
    assert main(["annotate", "add-task", "four", "--arena", *specs, "--kind", "kwise", "--db", db_path]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == 3  # one 3-way battle per prompt
    # one folder of model folders (the generator-output layout `--from` reads), and a `mmalign label` folder
    shared = tmp_path / "shared"
    for g in ("m1", "m2"):
        for i in range(2):
            media.png(shared / g / f"{i}.png", i)
    label = media.label_folder(tmp_path / "label", prompts=2, k=2)
    assert main(["annotate", "add-task", "dir", "--arena", "--from", str(shared), "--db", db_path]) == 0
    assert json.loads(capsys.readouterr().out)["generators"] == ["m1", "m2"]
    both = tmp_path / "label2"
    media.label_folder(both, prompts=2, k=2)
    assert main(["annotate", "add-task", "lab", "--arena", f"a={label}", f"b={both}", "--db", db_path]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == 4  # 2 prompts x 2 samples, matched by prompt
    assert main(["annotate", "add-task", "bad", "--arena", "x", "--db", db_path]) == 2
    assert "NAME=DIR" in capsys.readouterr().err
    assert main(["annotate", "add-task", "bad", "--arena", *specs, "--kind", "rating", "--db", db_path]) == 2
    assert main(["annotate", "add-task", "bad", "--arena", *specs, "--kind", "kwise", "--k", "4", "--db", db_path]) == 2
    assert main(["annotate", "add-task", "plain", "--from", str(shared), "--db", db_path]) == 2  # --kind still needed
    with Database(db_path).read() as s:
        modes = {t.name: t.mode for t in s.scalars(select(Task))}
    assert modes == {"duel": "arena", "four": "arena", "dir": "arena", "lab": "arena"}


def test_anonymous_battle_vote_then_reveal(site):
    db, tokens, _ = site
    client = TestClient(create_app(db))
    csrf = login(client, tokens["alice"])
    assert "leaderboard" in client.get("/").text
    page = client.get("/tasks/1").text
    for name in GENERATORS:  # anonymous: no generator name, no file or folder name in the page
        assert name not in page and "samples" not in page and "p0.png" not in page
    assert "a cat" in page
    images = re.findall(r'<img src="(/media/[0-9/]+)"', page)
    assert len(images) == 2 and all(client.get(url).headers["content-type"] == "image/png" for url in images)
    assignment = int(hidden(page, "assignment"))
    assert set(re.findall(r'<(?:input|button|select)[^>]* name="([a-z_]+)"', page)) == {"csrf", "assignment", "choice"}
    assert re.findall(r'name="choice" value="([^"]+)"', page) == ["0", "1", "tie"]  # display positions only
    shown = models_shown(db, assignment)
    assert client.get(f"/tasks/1/reveal/{assignment}").status_code == 409  # not before the vote
    assert int(hidden(client.get("/tasks/1").text, "assignment")) == assignment  # a reload: the same battle
    response = client.post("/tasks/1/submit", data={"csrf": csrf, "assignment": assignment, "choice": "1"})
    assert response.status_code == 200 and response.url.path == f"/tasks/1/reveal/{assignment}"
    assert [re.search(rf'id="model-{i}">([^<]+)<', response.text).group(1) for i in range(2)] == shown
    assert "your pick" in response.text
    rows = []
    out = Path(site[2]) / "votes.jsonl"
    assert main(["annotate", "export", "--task", "battle", "--format", "votes", "--out", str(out), "--db", db.url]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    winner = rows[0]["model_a"] if rows[0]["winner"] == "model_a" else rows[0]["model_b"]
    assert len(rows) == 1 and winner == shown[1]  # the second shown won, whatever the item's order
    next_page = client.get("/tasks/1").text
    assert int(hidden(next_page, "assignment")) != assignment
    # the JSON API hands out arena battles blind too
    api = TestClient(create_app(db), headers={"Authorization": f"Bearer {tokens['bob']}"})
    battle = api.post("/api/tasks/1/next").json()["assignment"]
    assert battle["arena"] and not any(name in json.dumps(battle) for name in GENERATORS)


def test_forged_votes_are_refused(site):
    db, tokens, _ = site
    alice, bob = TestClient(create_app(db)), TestClient(create_app(db))
    csrf_a = login(alice, tokens["alice"])
    login(bob, tokens["bob"])
    mine = int(hidden(alice.get("/tasks/1").text, "assignment"))
    theirs = int(hidden(bob.get("/tasks/1").text, "assignment"))

    def post(client, csrf, **fields):
        return client.post("/tasks/1/submit", data={"csrf": csrf, **fields}, follow_redirects=False)

    assert post(alice, csrf_a, assignment=theirs, choice="0").status_code == 404  # another's battle
    assert post(alice, csrf_a, assignment=99999, choice="0").status_code == 404  # a made-up one
    assert post(alice, csrf_a, assignment=mine, choice="2").status_code == 400  # no third option
    assert post(alice, csrf_a, assignment=mine, choice=GENERATORS[0]).status_code == 400  # a name is no answer
    assert post(alice, "x" * 43, assignment=mine, choice="0").status_code == 403  # CSRF
    assert alice.post("/tasks/1/submit", data={"assignment": mine, "choice": "0"}).status_code == 403
    add_arena_task(db, "other", generator_folders(site[2] / "o", prompts=1), judgements=1, seed=1)
    wrong_task = alice.post("/tasks/2/submit", data={"csrf": csrf_a, "assignment": mine, "choice": "0"})
    assert wrong_task.status_code == 404
    assert alice.get(f"/tasks/1/reveal/{theirs}").status_code == 404  # nor can one peek at another's battle
    assert count(db) == 0
    # a form field naming a generator changes nothing: the server knows what it showed
    forged = post(alice, csrf_a, assignment=mine, choice="0", model="kappa-privatenet", winner="kappa-privatenet")
    assert forged.status_code == 303 and count(db) == 1
    assert post(alice, csrf_a, assignment=mine, choice="0").status_code == 303  # a resubmission: counted once
    assert post(alice, csrf_a, assignment=mine, choice="1").status_code == 409  # changing the vote: refused
    assert count(db) == 1
    with db.read() as s:
        j = s.scalar(select(Judgement))
        a = s.get(Assignment, mine)
        assert j.answer == {"choice": a.order[0]}  # display position 0 -> the item's option shown first
    # reveal is for arena tasks only
    add_task(db, "blind", "pairwise", media.manifest_folder(site[2] / "m", items=1), judgements=1)
    blind = alice.get("/tasks/3").text
    blind_id = int(hidden(blind, "assignment"))
    alice.post("/tasks/3/submit", data={"csrf": csrf_a, "assignment": blind_id, "choice": "0"})
    assert alice.get(f"/tasks/3/reveal/{blind_id}").status_code == 403
    assert alice.get("/tasks/3/leaderboard").status_code == 403  # a blind task's generators stay hidden


def test_concurrent_voters_are_counted_once(tmp_path, new_db):
    """A real server; 6 annotators vote at once, each vote sent twice at the same moment (a double click)."""
    db = init_database(new_db("a"))[0]
    add_arena_task(db, "battle", generator_folders(tmp_path, prompts=4), judgements=3, seed=0)
    tokens = [add_user(db, f"u{i}") for i in range(6)]
    server = Server(db.url, tmp_path / "server.log")
    acknowledged, errors = [], []

    def send(token, body, answers):
        headers = {"Authorization": f"Bearer {token}"}
        answers.append(requests.post(f"{server.url}/api/judgements", json=body, headers=headers, timeout=30))

    def voter(token):
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
        try:
            for _ in range(4):
                battle = session.post(f"{server.url}/api/tasks/1/next", timeout=30).json()["assignment"]
                if battle is None:
                    return
                body = {"assignment": battle["assignment"], "answer": {"choice": 0}}
                answers: list = []
                twins = [threading.Thread(target=send, args=(token, body, answers)) for _ in range(2)]
                for t in twins:
                    t.start()
                for t in twins:
                    t.join()
                assert sorted(r.json()["status"] for r in answers) == ["duplicate", "recorded"], [
                    r.text for r in answers
                ]
                assert len({r.json()["judgement"] for r in answers}) == 1
                acknowledged.append(answers[0].json()["judgement"])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(repr(error))

    try:
        threads = [threading.Thread(target=voter, args=(t,)) for t in tokens]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        with db.read() as s:
            ids = s.scalars(select(Judgement.id)).all()
            per_item = s.execute(select(Judgement.item_id, func.count()).group_by(Judgement.item_id)).all()
        assert sorted(ids) == sorted(acknowledged) and len(ids) == 24
        assert max(n for _, n in per_item) <= 3  # each battle its requested judgements, no more
        lb = requests.get(
            f"{server.url}/api/tasks/1/leaderboard?bootstrap=0", headers={"Authorization": f"Bearer {tokens[0]}"}
        ).json()
        assert lb["n_votes"] == 24
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["pairwise", "kwise"])
def test_leaderboard_equals_bench_generators_on_the_export(tmp_path, kind, new_db):
    db = init_database(new_db("a"))[0]
    add_arena_task(db, "battle", generator_folders(tmp_path, prompts=6), kind=kind, judgements=3, seed=0)
    people = [authenticate(db, add_user(db, f"u{i}")).id for i in range(3)]
    token = add_user(db, "viewer")
    n = 0
    for _ in range(8):  # voters prefer the more skilled generator, with a tie now and then (battles are random)
        for person in people:
            battle = assign.next_assignment(db, 1, person)
            if battle is None:
                continue
            models = models_shown(db, battle["assignment"])
            skills = [SKILL[m] for m in models]
            if kind == "pairwise":
                answer = {"choice": "tie" if n % 7 == 3 else skills.index(max(skills))}
            else:
                answer = {"ranks": [1 + sum(t > s for t in skills) for s in skills]}
            order = assign.display_order(db, battle["assignment"], person)[1]
            assign.record(db, battle["assignment"], person, assign.from_display(kind, answer, order))
            n += 1
    votes = tmp_path / "votes.jsonl"
    assert (
        main(["annotate", "export", "--task", "battle", "--format", "votes", "--out", str(votes), "--db", db.url]) == 0
    )
    out = tmp_path / "bench"
    assert main(["bench", "generators", "--votes", str(votes), "--bootstrap", "50", "--out", str(out)]) == 0
    expected = json.loads((out / "generators.json").read_text())
    client = TestClient(create_app(db), headers={"Authorization": f"Bearer {token}"})
    got = client.get("/api/tasks/1/leaderboard?bootstrap=50").json()
    assert got["n_votes"] == n == expected["n_votes"]
    for method, table in expected["ratings"].items():  # Elo, Bradley-Terry (bootstrap intervals) and K-wise
        for model, estimate in table.items():
            assert got["report"]["ratings"][method][model] == pytest.approx(estimate), (method, model)
    assert got["report"]["rankings"] == expected["rankings"]
    assert got["report"]["rankings"]["bt"] == list(GENERATORS)  # the voters' order
    page = client.get("/tasks/1/leaderboard?bootstrap=50")
    assert page.status_code == 200 and 'http-equiv="refresh"' in page.text
    listed = re.findall(r'<td class="model">([^<]+)</td>', page.text)
    assert listed == expected["rankings"]["bt"]
    bt = expected["ratings"]["bt"][listed[0]]
    assert f"{bt['value']:.0f} [{bt['low']:.0f}, {bt['high']:.0f}]" in page.text
    assert ("K-wise" in page.text) == (kind == "kwise")
    assert client.get("/tasks/1/leaderboard?bootstrap=5000").status_code == 400
    with db.read() as s:  # the votes are the app's own judgements
        assert s.scalar(select(func.count(Judgement.id))) == n


def test_empty_leaderboard(site):
    db, tokens, _ = site
    client = TestClient(create_app(db), headers={"Authorization": f"Bearer {tokens['alice']}"})
    assert 'id="no-votes"' in client.get("/tasks/1/leaderboard").text
    assert client.get("/api/tasks/1/leaderboard").json()["report"] is None
    assert TestClient(create_app(db)).get("/api/tasks/1/leaderboard").status_code == 401


def test_upgrade_from_schema_2(tmp_path, new_db):
    """A database as version 2 made it (no tasks.mode), with a task and a vote: refused until migrated, then its
    task and vote are as before and arena tasks can be added."""
    from sqlalchemy import inspect, text

    from mmalign.annotate.db import SCHEMA_VERSION, make_engine, migrate

    db = init_database(new_db("old"))[0]
    add_task(db, "old", "pairwise", media.manifest_folder(tmp_path / "m", items=1), judgements=1)
    person = authenticate(db, add_user(db, "alice")).id
    battle = assign.next_assignment(db, 1, person)
    assign.record(db, battle["assignment"], person, {"choice": 1})
    db.dispose()
    engine = make_engine(new_db("old"))
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE tasks DROP COLUMN mode"))
        conn.execute(text("DELETE FROM schema_version WHERE version > 2"))
    assert "mode" not in {c["name"] for c in inspect(engine).get_columns("tasks")}
    with pytest.raises(AnnotateError, match="annotate migrate"):
        Database(new_db("old"))
    assert migrate(engine) == [3] == list(range(3, SCHEMA_VERSION + 1))
    engine.dispose()
    db = Database(new_db("old"))
    with db.read() as s:
        task = s.scalar(select(Task))
        assert task.mode is None and s.scalar(select(Judgement)).answer == {"choice": 1}
    add_arena_task(db, "new", generator_folders(tmp_path, prompts=1), seed=0)
    assert assign.next_assignment(db, 2, person)["arena"] and not assign.next_assignment(db, 1, person)


def test_media_carry_no_file_time(site):
    db, tokens, _ = site
    client = TestClient(create_app(db), headers={"Authorization": f"Bearer {tokens['alice']}"})
    battle = client.post("/api/tasks/1/next").json()["assignment"]
    url = battle["options"][0]["media"][0]
    response = client.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert "last-modified" not in response.headers and "etag" not in response.headers
    assert "content-disposition" not in response.headers  # no file name either
    ranged = client.get(url, headers={"Range": "bytes=0-3", "If-Range": '"x"'})
    assert ranged.status_code == 200 and ranged.content == response.content
    assert client.get(url, headers={"Range": "bytes=0-3"}).content == response.content[:4]


def test_kwise_battle_by_form(tmp_path, new_db):
    db = init_database(new_db("a"))[0]
    token = add_user(db, "alice")
    add_arena_task(db, "three", generator_folders(tmp_path, prompts=1), kind="kwise", judgements=1, seed=0)
    client = TestClient(create_app(db))
    csrf = login(client, token)
    page = client.get("/tasks/1").text
    assert re.findall(r'<select name="(rank_[0-9])"', page) == ["rank_0", "rank_1", "rank_2"]
    assert not any(name in page for name in GENERATORS)
    assignment = int(hidden(page, "assignment"))
    shown = models_shown(db, assignment)
    form = {"csrf": csrf, "assignment": assignment, "rank_0": "2", "rank_1": "1", "rank_2": "2"}
    assert client.post("/tasks/1/submit", data={**form, "rank_1": "4"}).status_code == 400
    revealed = client.post("/tasks/1/submit", data=form)
    assert revealed.url.path == f"/tasks/1/reveal/{assignment}"
    assert re.findall(r'id="model-[0-9]">([^<]+)<', revealed.text) == shown
    assert "rank 1" in revealed.text and "rank 2" in revealed.text
    with db.read() as s:
        item = s.get(Item, s.get(Assignment, assignment).item_id)
        ranks = s.scalar(select(Judgement)).answer["ranks"]
    assert {item.options[i]["model"]: r for i, r in enumerate(ranks)} == dict(zip(shown, [2, 1, 2]))
    done = client.get("/tasks/1").text  # one battle, one judgement: nothing left but the leaderboard
    assert 'id="done"' in done and "/tasks/1/leaderboard" in done
