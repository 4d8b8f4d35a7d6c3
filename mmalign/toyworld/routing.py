"""Hybrid human/AI labelling measured on the toyworld, with the exact judge standing in for people.

Pairs: for random prompts, two renders of independently corrupted versions of the prompt (each attribute wrong
with probability ``rate``), kept when the judge's adherence differs (the truth is then known). Three ways to
label them, at the same number of human judgements ``budget``:

- all-human: people (the judge) label ``budget`` items, the rest stay unlabelled;
- all-AI: the learned ``toyworld`` reward labels every item;
- routed: :func:`mmalign.annotate.routing.route` gives the ``budget`` items the reward is least sure of to
  people and labels the rest with the reward.

Everything goes through the annotation database (tasks, hand-out, judgements, export), as in real use.
Reported: accuracy over all items (an unlabelled item counts as wrong), and over the labelled ones.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from PIL import Image

from ..annotate import assign
from ..annotate.db import init_database
from ..annotate.export import export_pairs
from ..annotate.people import add_user, authenticate
from ..annotate.routing import route
from ..annotate.tasks import add_task
from .judge import judge
from .render import render
from .world import corrupt, random_prompt


def make_pairs(folder: Path, n: int, rate: float = 0.4, seed: int = 0) -> list[dict]:
    """``n`` pairs written to ``folder`` with a manifest; each row keeps the judge's truth."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    while len(rows) < n:
        prompt = random_prompt(rng)
        names, scores = [], []
        for side in range(2):
            image = render(corrupt(prompt, rng, rate), rng.randrange(1 << 30))
            name = f"{len(rows):04d}_{side}.png"
            Image.fromarray(image).save(folder / name)
            names.append(name)
            scores.append(judge(image, prompt).overall)
        if scores[0] == scores[1]:
            continue
        rows.append({"prompt": prompt.text, "media": names, "truth": 0 if scores[0] > scores[1] else 1})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _judge_answer(folder: Path, item: dict[str, Any]) -> dict:
    """A person's answer, here the judge's: the option whose render adheres more."""
    with Image.open(folder / item["options"][0]) as a, Image.open(folder / item["options"][1]) as b:
        sa, sb = judge(a, item["prompt"]).overall, judge(b, item["prompt"]).overall
    return {"choice": "tie" if sa == sb else (0 if sa > sb else 1)}


def run(folder: str | Path, n: int = 200, budget: int = 50, rate: float = 0.4, seed: int = 0, scorer=None) -> dict:
    """The three labellings of the module docstring; ``scorer`` defaults to the shipped ``toyworld`` reward."""
    from ..annotate.routing import reward_scorer

    folder = Path(folder)
    rows = make_pairs(folder / "media", n, rate, seed)
    truth = {r["prompt"] + "|" + r["media"][0]: r["truth"] for r in rows}
    scorer = scorer or reward_scorer("toyworld")
    results = {}
    for mode in ("all-human", "all-ai", "routed"):
        db = init_database(folder / f"{mode}.db")[0]
        add_task(db, mode, "pairwise", folder / "media", judgements=1)
        if mode == "all-ai":
            route(db, mode, scorer, 0, "toyworld")
        elif mode == "routed":
            route(db, mode, scorer, budget, "toyworld")
        person = authenticate(db, add_user(db, "judge")).id
        for _ in range(budget if mode != "all-ai" else 0):
            current = assign.next_assignment(db, 1, person)
            if current is None:
                break
            with db.read() as s:
                from ..annotate.db import Item

                item = s.get(Item, s.get(assign.Assignment, current["assignment"]).item_id)
                shown = {"prompt": item.prompt, "options": [o["path"] for o in item.options]}
            assign.record(db, current["assignment"], person, _judge_answer(folder / "media", shown))
        out = folder / f"{mode}.jsonl"
        export_pairs(db, mode, out)
        correct = labelled = human = 0
        for line in out.read_text().splitlines():
            row = json.loads(line)
            if row["label"] != 1.0:
                continue  # a tie from the judge cannot happen here; a reward tie counts as unlabelled
            a, b = Path(row["chosen"]).name, Path(row["rejected"]).name
            first = a if a.endswith("_0.png") else b
            key = row["prompt"] + "|" + first
            labelled += 1
            human += row["source"] == "human"
            correct += (truth[key] == 0) == (a == first)
        results[mode] = {
            "human_judgements": human,
            "labelled": labelled,
            "accuracy_all_items": correct / n,
            "accuracy_labelled": correct / labelled if labelled else None,
        }
        db.dispose()
    return {"items": n, "budget": budget, "rate": rate, "seed": seed, "results": results}
