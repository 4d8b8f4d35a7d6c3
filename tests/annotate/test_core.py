"""The annotation library without the web: migrations, tasks from folders, hand-out, recording, agreement."""

from __future__ import annotations

import threading
from itertools import combinations

import pytest
from sqlalchemy import func, select

from mmalign.annotate import answers, assign
from mmalign.annotate.db import SCHEMA_VERSION, AnnotateError, Database, Judgement, applied_versions, init_database
from mmalign.annotate.people import add_user, authenticate, rotate_token, set_active
from mmalign.annotate.stats import krippendorff_alpha, task_stats
from mmalign.annotate.tasks import add_task
from tests.annotate import media


@pytest.fixture
def db(new_db):
    database, applied = init_database(new_db("a"))
    assert applied == list(range(1, SCHEMA_VERSION + 1))
    return database


def test_migrations_are_idempotent_and_checked(new_db, db):
    _, again = init_database(new_db("a"))
    assert again == [] and applied_versions(db.engine) == list(range(1, SCHEMA_VERSION + 1))
    with pytest.raises(AnnotateError, match="annotate init"):
        Database(new_db("other"))


def test_tokens(db):
    token = add_user(db, "alice")
    assert authenticate(db, token).name == "alice"
    assert authenticate(db, token + "x") is None and authenticate(db, "") is None
    with pytest.raises(AnnotateError, match="exists"):
        add_user(db, "alice")
    with pytest.raises(AnnotateError, match="bad annotator name"):
        add_user(db, "../etc")
    new = rotate_token(db, "alice")
    assert authenticate(db, token) is None and authenticate(db, new).name == "alice"
    set_active(db, "alice", False)
    assert authenticate(db, new) is None


def test_tasks_from_every_source(tmp_path, db):
    label = media.label_folder(tmp_path / "label", prompts=3, k=3)
    assert add_task(db, "rank", "kwise", label)["items"] == 3
    assert add_task(db, "pairs", "pairwise", label)["items"] == 9  # C(3, 2) per prompt
    for kind in ("image", "audio", "video", "multiview"):
        info = add_task(
            db, f"m-{kind}", "rating", media.manifest_folder(tmp_path / kind, kind=kind), dimensions=["a", "b"]
        )
        assert info["media"] == kind and info["items"] == 4
    gen = tmp_path / "gen"
    for model in ("m1", "m2", "m3"):
        for i in range(2):
            media.png(gen / model / f"p{i}.png", i)
    (gen / "prompts.jsonl").write_text('{"id": "p0", "prompt": "a red cube"}\n')
    assert add_task(db, "arena", "pairwise", gen)["items"] == 6
    assert add_task(db, "arena-k", "kwise", gen)["items"] == 2


def test_task_sources_refuse_outside_and_bad_rows(tmp_path, db):
    folder = media.manifest_folder(tmp_path / "m")
    outside = media.png(tmp_path / "outside.png", 0)
    (folder / "manifest.jsonl").write_text(f'{{"prompt": "p", "media": ["sd15/0.png", "{outside}"]}}\n')
    with pytest.raises(AnnotateError, match="outside the task folder"):
        add_task(db, "t", "pairwise", folder)
    (folder / "link.png").symlink_to(outside)
    (folder / "manifest.jsonl").write_text('{"prompt": "p", "media": ["sd15/0.png", "link.png"]}\n')
    with pytest.raises(AnnotateError, match="outside the task folder"):
        add_task(db, "t", "pairwise", folder)
    (folder / "manifest.jsonl").write_text('{"prompt": "p", "media": ["sd15/0.png", "../x/../m/missing.png"]}\n')
    with pytest.raises(AnnotateError, match="not a file"):
        add_task(db, "t", "pairwise", folder)
    (folder / "manifest.jsonl").write_text('{"prompt": "p", "media": ["sd15/0.png"], "gold": {"choice": 0}}\n')
    with pytest.raises(AnnotateError, match="2 options"):
        add_task(db, "t", "pairwise", folder)
    (folder / "manifest.jsonl").write_text(
        '{"prompt": "p", "media": ["sd15/0.png", "sdxl/0.png"], "gold": {"choice": 7}}\n'
    )
    with pytest.raises(AnnotateError, match="bad gold answer"):
        add_task(db, "t", "pairwise", folder)


def test_answer_validation():
    assert answers.validate("pairwise", {"choice": "1"}, 2) == {"choice": 1}
    assert answers.validate("pairwise", {"choice": "tie"}, 2) == {"choice": "tie"}
    assert answers.validate("kwise", {"ranks": ["2", 1, 1]}, 3) == {"ranks": [2, 1, 1]}
    assert answers.validate("rating", {"scores": {"q": [5, 1]}}, 2, ["q"]) == {"scores": {"q": [5, 1]}}
    for kind, answer, message in [
        ("pairwise", {"choice": 2}, "0, 1 or"),
        ("pairwise", {}, "needs"),
        ("pairwise", {"choice": True}, "integer"),
        ("kwise", {"ranks": [1, 2]}, "list of 3"),
        ("kwise", {"ranks": [1, 2, 4]}, "between 1 and 3"),
        ("rating", {"scores": {"q": [6, 1, 1]}}, "1-5"),
        ("rating", {"scores": {"z": [1, 1, 1]}}, "unknown dimension"),
        ("rating", {"scores": {}}, "needs 3 scores"),
    ]:
        with pytest.raises(AnnotateError, match=message):
            answers.validate(kind, answer, 3, ["q"])
    assert answers.is_correct("kwise", {"ranks": [1, 3, 2]}, {"ranks": [1, 2, 2]})
    assert not answers.is_correct("kwise", {"ranks": [2, 1, 3]}, {"ranks": [1, 2, 2]})


def test_each_item_gets_its_judgements_from_distinct_people(tmp_path, db):
    add_task(db, "t", "pairwise", media.manifest_folder(tmp_path / "m", items=5), judgements=3)
    people = [add_user(db, f"u{i}") for i in range(5)]
    ids = [authenticate(db, t).id for t in people]
    for person in ids:
        while (a := assign.next_assignment(db, 1, person)) is not None:
            again = assign.next_assignment(db, 1, person)
            assert again["assignment"] == a["assignment"]  # asking again hands out the same item
            assert assign.record(db, a["assignment"], person, {"choice": 0})["status"] == "recorded"
            assert assign.record(db, a["assignment"], person, {"choice": 0})["status"] == "duplicate"
    with db.session() as s:
        rows = s.execute(select(Judgement.item_id, Judgement.annotator_id)).all()
    per_item = {}
    for item, person in rows:
        per_item.setdefault(item, []).append(person)
    assert sorted(len(v) for v in per_item.values()) == [3] * 5
    assert all(len(set(v)) == 3 for v in per_item.values())
    stats = task_stats(db, 1)
    assert stats["complete_items"] == 5 and stats["progress"] == 1.0 and stats["agreement"]["alpha"] is None


def test_recording_refuses_foreign_changed_and_expired(tmp_path, db):
    add_task(db, "t", "pairwise", media.manifest_folder(tmp_path / "m", items=1), judgements=1, lease_seconds=10)
    alice, bob = (authenticate(db, add_user(db, n)).id for n in ("alice", "bob"))
    a = assign.next_assignment(db, 1, alice, now=0.0)
    with pytest.raises(AnnotateError, match="of yours") as error:
        assign.record(db, a["assignment"], bob, {"choice": 0}, now=1.0)
    assert error.value.status == 404
    assert assign.next_assignment(db, 1, bob, now=1.0) is None  # the one slot is held by alice
    b = assign.next_assignment(db, 1, bob, now=20.0)  # alice's lease ran out: the slot is bob's
    assert b is not None
    assert assign.record(db, b["assignment"], bob, {"choice": 1}, now=21.0)["status"] == "recorded"
    with pytest.raises(AnnotateError, match="expired") as error:
        assign.record(db, a["assignment"], alice, {"choice": 0}, now=22.0)
    assert error.value.status == 409
    with pytest.raises(AnnotateError, match="differently"):
        assign.record(db, b["assignment"], bob, {"choice": 0}, now=23.0)


def test_gold_questions_and_accuracy(tmp_path, db):
    folder = media.manifest_folder(tmp_path / "m", items=6, gold={0: {"choice": 0}, 1: {"choice": 1}})
    add_task(db, "t", "pairwise", folder, judgements=1, gold_every=2)
    alice = authenticate(db, add_user(db, "alice")).id
    seen_gold = 0
    while (a := assign.next_assignment(db, 1, alice)) is not None:
        seen_gold += a["prompt"] in ("prompt <b>0</b>", "prompt <b>1</b>")
        assert "gold" not in a
        assign.record(db, a["assignment"], alice, {"choice": 0})
    assert seen_gold == 2
    person = task_stats(db, 1)["annotators"][0]
    assert person["gold"] == 2 and person["gold_accuracy"] == 0.5 and person["judgements"] == 6


def test_concurrent_hand_out_and_recording(tmp_path, db):
    """8 threads × their own annotator against one database: every item exactly `judgements` times."""
    add_task(db, "t", "pairwise", media.manifest_folder(tmp_path / "m", items=10), judgements=4)
    ids = [authenticate(db, add_user(db, f"u{i}")).id for i in range(8)]
    errors = []

    def work(person):
        try:
            while (a := assign.next_assignment(db, 1, person)) is not None:
                assign.record(db, a["assignment"], person, {"choice": person % 2})
                assign.record(db, a["assignment"], person, {"choice": person % 2})  # a retry
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(p,)) for p in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with db.session() as s:
        counts = dict(s.execute(select(Judgement.item_id, func.count()).group_by(Judgement.item_id)).all())
    assert sorted(counts.values()) == [4] * 10


def _alpha_by_coincidences(units, delta):
    """Krippendorff's alpha through the coincidence matrix (Krippendorff 2011, "Computing Krippendorff's alpha")."""
    units = [u for u in units if len(u) >= 2]
    values = sorted({v for u in units for v in u})
    o = {(c, k): 0.0 for c in values for k in values}
    for u in units:
        for i in range(len(u)):
            for j in range(len(u)):
                if i != j:
                    o[(u[i], u[j])] += 1.0 / (len(u) - 1)
    n_c = {c: sum(o[(c, k)] for k in values) for c in values}
    n = sum(n_c.values())
    d_o = sum(o[(c, k)] * delta(c, k) for c in values for k in values)
    d_e = sum(n_c[c] * n_c[k] * delta(c, k) for c in values for k in values) / (n - 1)
    return 1 - d_o / d_e


def test_krippendorff_alpha_against_the_coincidence_matrix():
    units = [[1, 1, 2], [2, 2], [3, 3, 3, 1], [1, 2], [2], [4, 4, 3]]
    nominal = _alpha_by_coincidences(units, lambda a, b: float(a != b))
    interval = _alpha_by_coincidences(units, lambda a, b: float(a - b) ** 2)
    assert krippendorff_alpha(units, "nominal") == pytest.approx(nominal, abs=1e-12)
    assert krippendorff_alpha(units, "interval") == pytest.approx(interval, abs=1e-12)
    assert krippendorff_alpha([[1, 0], [0, 1]], "nominal") == pytest.approx(-0.5)
    assert krippendorff_alpha([["a", "a"], ["b", "b"]]) == 1.0
    assert krippendorff_alpha([[1], [2]]) is None


def test_agreement_of_a_task(tmp_path, db):
    add_task(db, "t", "kwise", media.label_folder(tmp_path / "l", prompts=4, k=3), judgements=2)
    ids = [authenticate(db, add_user(db, f"u{i}")).id for i in range(2)]
    for person in ids:
        while (a := assign.next_assignment(db, 1, person)) is not None:
            assign.record(db, a["assignment"], person, {"ranks": [1, 2, 3]})
    agreement = task_stats(db, 1)["agreement"]
    assert agreement["alpha"] == pytest.approx(1.0) and agreement["percent_agreement"] == 1.0
    assert list(combinations(range(2), 2))


def test_upgrade_from_schema_1(new_db):
    """A database as version 1 made it (no items.routed): refused until migrated, then like a fresh one."""
    from sqlalchemy import inspect, text

    from mmalign.annotate.db import make_engine, migrate

    init_database(new_db("old"))
    engine = make_engine(new_db("old"))
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE items DROP COLUMN routed"))
        conn.execute(text("DELETE FROM schema_version WHERE version > 1"))
    with pytest.raises(AnnotateError, match="annotate migrate"):
        Database(new_db("old"))
    assert migrate(engine) == list(range(2, SCHEMA_VERSION + 1))
    assert "routed" in {c["name"] for c in inspect(engine).get_columns("items")}
    Database(new_db("old"))


def _at_once(n, target):
    """``target(i)`` in n threads released together; returns (results, errors)."""
    barrier, results, errors = threading.Barrier(n), [None] * n, []

    def run(i):
        barrier.wait()
        try:
            results[i] = target(i)
        except Exception as error:  # noqa: BLE001 - returned to the test
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def test_one_assignment_answered_at_once_counts_once(tmp_path, db):
    """8 submissions of one assignment at the same moment, two different answers: one recorded, the same answer
    "duplicate", the other refused (409), whichever wins."""
    add_task(db, "t", "pairwise", media.manifest_folder(tmp_path / "m", items=1), judgements=1)
    alice = authenticate(db, add_user(db, "alice")).id
    a = assign.next_assignment(db, 1, alice)["assignment"]
    results, errors = _at_once(8, lambda i: assign.record(db, a, alice, {"choice": i % 2}))
    assert [r["status"] for r in results if r is not None].count("recorded") == 1
    assert all(isinstance(e, AnnotateError) and e.status == 409 and "differently" in str(e) for e in errors)
    with db.read() as s:
        stored = s.scalars(select(Judgement)).all()
    assert len(stored) == 1 and len(errors) == 4  # the 4 submissions of the other answer
    assert all(r["judgement"] == stored[0].id for r in results if r is not None)


def test_last_slot_handed_out_once(tmp_path, db):
    """One item needing one judgement, 8 annotators asking at the same moment: one gets it, the rest nothing."""
    add_task(db, "t", "pairwise", media.manifest_folder(tmp_path / "m", items=1), judgements=1)
    ids = [authenticate(db, add_user(db, f"u{i}")).id for i in range(8)]
    results, errors = _at_once(8, lambda i: assign.next_assignment(db, 1, ids[i]))
    assert not errors and sum(r is not None for r in results) == 1


def test_concurrent_migrations_and_labellers(new_db):
    """`init` run 4 times at once on a fresh database: every migration applied exactly once; an AI labeller
    created by 4 at once: one annotator."""
    from mmalign.annotate.people import ai_annotator

    url = new_db("fresh")
    results, errors = _at_once(4, lambda i: init_database(url)[1])
    assert not errors, errors
    assert sorted(v for r in results for v in r) == list(range(1, SCHEMA_VERSION + 1))
    db = Database(url)
    assert applied_versions(db.engine) == list(range(1, SCHEMA_VERSION + 1))
    results, errors = _at_once(4, lambda i: ai_annotator(db, "reward:toy"))
    assert not errors and len(set(results)) == 1


def test_connections_opened_at_once_on_a_fresh_sqlite_file(tmp_path):
    """4 connections opening one fresh SQLite file at the same moment all get a WAL database: switching the
    journal mode answers "database is locked" to the losers without waiting (about 7 % of such rounds before
    the retry), so 60 rounds fail almost surely without it."""
    from mmalign.annotate.db import make_engine

    def connect(path):
        engine = make_engine(path)
        try:
            with engine.connect() as conn:
                return conn.exec_driver_sql("PRAGMA journal_mode").scalar()
        finally:
            engine.dispose()

    for round_ in range(60):
        path = tmp_path / f"{round_}.db"
        results, errors = _at_once(4, lambda i, path=path: connect(path))
        assert not errors, (round_, errors)
        assert results == ["wal"] * 4
