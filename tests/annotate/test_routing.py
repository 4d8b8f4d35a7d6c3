"""Hybrid routing: the reward labels the items it is sure of, people get the rest within the budget."""

from __future__ import annotations

import json

import pytest

from mmalign.annotate import assign
from mmalign.annotate.db import init_database
from mmalign.annotate.people import add_user, authenticate
from mmalign.annotate.routing import route
from mmalign.annotate.stats import task_stats
from mmalign.annotate.tasks import add_task
from mmalign.data import load_preferences
from tests.annotate import media


def test_route_keeps_the_least_confident_for_people(tmp_path, new_db):
    db = init_database(new_db("a"))[0]
    add_task(db, "t", "pairwise", media.manifest_folder(tmp_path / "m", items=6), judgements=1)
    margins = {f"prompt <b>{i}</b>": 0.1 * (i + 1) for i in range(6)}  # items 0 and 1 are the least sure

    def scorer(paths, prompt):
        return [margins[prompt], 0.0]

    result = route(db, "t", scorer, budget=2, reward_name="fake")
    assert result["human"] == 2 and result["ai"] == 4 and result["margin_cut"] == pytest.approx(0.2)
    alice = authenticate(db, add_user(db, "alice")).id
    seen = []
    while (a := assign.next_assignment(db, 1, alice)) is not None:
        seen.append(a["prompt"])
        assign.record(db, a["assignment"], alice, {"choice": 1})
    assert sorted(seen) == ["prompt <b>0</b>", "prompt <b>1</b>"]
    stats = task_stats(db, 1)
    assert stats["ai_labelled_items"] == 4 and stats["complete_items"] == 2
    from mmalign.annotate.export import export_pairs

    export_pairs(db, "t", tmp_path / "p.jsonl")
    pairs = load_preferences(tmp_path / "p.jsonl")
    assert sorted(p.meta["source"] for p in pairs) == ["ai"] * 4 + ["human"] * 2
    assert {p.meta["annotator"] for p in pairs if p.meta["source"] == "ai"} == {"reward:fake"}


@pytest.mark.slow
def test_toyworld_routed_beats_all_ai_at_equal_budget(tmp_path):
    """The shipped toyworld reward against the exact judge standing in for people (40 pairs, budget 10)."""
    from mmalign.toyworld.routing import run

    report = run(tmp_path, n=40, budget=10)
    results = report["results"]
    print(json.dumps(results))
    assert results["all-human"]["human_judgements"] == 10 and results["all-human"]["accuracy_labelled"] == 1.0
    assert results["routed"]["human_judgements"] == 10 and results["routed"]["labelled"] == 40
    assert results["routed"]["accuracy_all_items"] >= results["all-ai"]["accuracy_all_items"]
    assert results["routed"]["accuracy_all_items"] > results["all-human"]["accuracy_all_items"]
