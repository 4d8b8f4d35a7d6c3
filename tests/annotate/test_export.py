"""Exports read back by the readers that consume them: load_preferences, read_human_scores, read_votes and
`mmalign bench generators`."""

from __future__ import annotations

import json

import pytest

from mmalign.annotate import assign
from mmalign.annotate.db import AnnotateError, init_database
from mmalign.annotate.export import export
from mmalign.annotate.people import add_user, ai_annotator, authenticate
from mmalign.annotate.tasks import add_task
from mmalign.bench.arena import read_votes
from mmalign.cli import main
from mmalign.data import load_preferences
from mmalign.data.feedback import read_human_scores, read_labelled_samples
from tests.annotate import media


@pytest.fixture
def db(new_db):
    return init_database(new_db("a"))[0]


def _answer_all(db, task_id, person, answer):
    n = 0
    while (a := assign.next_assignment(db, task_id, person)) is not None:
        assign.record(db, a["assignment"], person, answer(a) if callable(answer) else answer)
        n += 1
    return n


def test_pairs_for_train_with_sources(tmp_path, db):
    add_task(db, "t", "pairwise", media.manifest_folder(tmp_path / "m", items=3), judgements=2)
    alice, bob = (authenticate(db, add_user(db, n)).id for n in ("alice", "bob"))
    _answer_all(db, 1, alice, {"choice": 1})
    _answer_all(db, 1, bob, lambda a: {"choice": "tie"})
    robot = ai_annotator(db, "reward:toy")
    with db.session() as s:
        from mmalign.annotate.db import Item

        item_ids = [i.id for i in s.query(Item).order_by(Item.id)]
    assign.record_direct(db, item_ids[0], robot, {"choice": 0})
    n = export(db, "t", "pairs", tmp_path / "out" / "pairs.jsonl")
    assert n == 7
    pairs = load_preferences(tmp_path / "out" / "pairs.jsonl", tie_policy="keep")
    assert len(pairs) == 7 and not pairs.skipped
    human = [p for p in pairs if p.meta["source"] == "human" and p.label == 1.0]
    assert len(human) == 3 and all(p.chosen.endswith("sdxl/" + p.rejected.split("/")[-1]) for p in human)
    assert sum(p.is_tie for p in pairs) == 3
    ai = [p for p in pairs if p.meta["source"] == "ai"]
    assert len(ai) == 1 and ai[0].meta["annotator"] == "reward:toy" and ai[0].chosen.endswith("sd15/0.png")
    assert len(load_preferences(tmp_path / "out" / "pairs.jsonl")) == 4  # the trainer's default drops ties
    assert export(db, "t", "pairs", tmp_path / "h.jsonl", source="human") == 6


def test_rating_and_kwise_pairs(tmp_path, db):
    add_task(
        db, "r", "rating", media.manifest_folder(tmp_path / "m", items=2), judgements=1, dimensions=["look", "fit"]
    )
    alice = authenticate(db, add_user(db, "alice")).id
    _answer_all(db, 1, alice, {"scores": {"look": [2, 4], "fit": [5, 1]}})
    pairs = load_preferences(export(db, "r", "pairs", tmp_path / "r.jsonl") and tmp_path / "r.jsonl", tie_policy="keep")
    assert [p.label for p in pairs] == [1.0, 1.0] and all(p.chosen.split("/")[-2] == "sd15" for p in pairs)
    export(db, "r", "pairs", tmp_path / "look.jsonl", dimension="look")
    assert all(p.chosen.split("/")[-2] == "sdxl" for p in load_preferences(tmp_path / "look.jsonl"))


def test_d3po_scores_read_by_the_feedback_reader(tmp_path, db):
    label = media.label_folder(tmp_path / "label", prompts=3, k=3)
    add_task(db, "k", "kwise", label, judgements=2)
    alice, bob = (authenticate(db, add_user(db, n)).id for n in ("alice", "bob"))
    _answer_all(db, 1, alice, {"ranks": [1, 2, 3]})
    _answer_all(db, 1, bob, {"ranks": [1, 3, 2]})
    result = export(db, "k", "d3po", tmp_path / "d3po", source="human")
    assert result == {"scores_lines": 6, "annotator_files": {"alice": 3, "bob": 3}}
    groups = read_labelled_samples(label).groups
    from_jsonl = read_human_scores(tmp_path / "d3po" / "scores.jsonl", groups)
    from_folder = read_human_scores(tmp_path / "d3po" / "annotators", groups)
    assert from_jsonl == from_folder == [[2.0, 0.5, 0.5]] * 3
    lines = [json.loads(line) for line in (tmp_path / "d3po" / "scores.jsonl").read_text().splitlines()]
    assert {line["source"] for line in lines} == {"human"}


def test_d3po_from_pairwise_needs_every_pair(tmp_path, db):
    label = media.label_folder(tmp_path / "label", prompts=2, k=3)
    add_task(db, "p", "pairwise", label, judgements=1)
    alice = authenticate(db, add_user(db, "alice")).id
    _answer_all(db, 1, alice, {"choice": 0})  # the earlier image of every pair wins: scores 2, 1, 0
    groups = read_labelled_samples(label).groups
    export(db, "p", "d3po", tmp_path / "d")
    assert read_human_scores(tmp_path / "d" / "scores.jsonl", groups) == [[2.0, 1.0, 0.0]] * 2


def test_votes_for_bench_generators(tmp_path, db):
    add_task(db, "arena", "pairwise", media.manifest_folder(tmp_path / "m", items=4), judgements=1)
    add_task(db, "arena-k", "kwise", media.manifest_folder(tmp_path / "k", items=2, models=("a", "b", "c")))
    alice = authenticate(db, add_user(db, "alice")).id
    _answer_all(db, 1, alice, {"choice": 1})
    _answer_all(db, 2, alice, {"ranks": [3, 1, 2]})
    export(db, "arena", "votes", tmp_path / "votes.jsonl")
    export(db, "arena-k", "votes", tmp_path / "votes_k.jsonl")
    votes = read_votes(tmp_path / "votes.jsonl")
    assert len(votes) == 4 and all(v.models == ("sd15", "sdxl") and v.ranks == (1.0, 0.0) for v in votes)
    assert votes[0].judge == "human"
    kvotes = read_votes(tmp_path / "votes_k.jsonl")
    assert kvotes[0].models == ("a", "b", "c") and kvotes[0].ranks == (3.0, 1.0, 2.0)
    out = tmp_path / "bench"
    assert (
        main(["bench", "generators", "--votes", str(tmp_path / "votes.jsonl"), "--bootstrap", "0", "--out", str(out)])
        == 0
    )
    report = json.loads((out / "generators.json").read_text())
    assert json.dumps(report).index("sdxl") >= 0


def test_votes_need_generator_names(tmp_path, db):
    add_task(db, "k", "kwise", media.label_folder(tmp_path / "label"))
    alice = authenticate(db, add_user(db, "alice")).id
    _answer_all(db, 1, alice, {"ranks": [1, 2, 3]})
    with pytest.raises(AnnotateError, match="generators"):
        export(db, "k", "votes", tmp_path / "v.jsonl")
    with pytest.raises(AnnotateError, match="no task"):
        export(db, "nope", "pairs", tmp_path / "v.jsonl")
