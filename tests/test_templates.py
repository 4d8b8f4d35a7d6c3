"""HTML reports from the jinja2 templates in mmalign/templates: package data, and every value escaped."""

from __future__ import annotations

import importlib.resources

from mmalign.bench.leaderboard import leaderboard_html
from mmalign.toyworld.report import ROWS, html_page

SCRIPT = "<script>alert('x')</script>"


def toyworld_report(trainer: str = "dpo") -> dict:
    scores = {name: 0.5 for name in ROWS}
    return {
        "before": scores,
        "after": {name: 0.75 for name in ROWS},
        "gain": {name: 0.25 for name in ROWS},
        "timing": {"sample_s": 1.0, "train_s": 2.0, "train_cpu_s": 3.0},
        "heldout": {"prompts": 4, "samples_per_prompt": 2, "seed": 0},
        "pairs": {
            "pairs": 8,
            "pairing": "extremes",
            "judge_of_chosen": 0.9,
            "judge_of_rejected": 0.1,
            "label_agreement_with_judge": 0.875,
            "pairs_the_judge_orders": 8,
        },
        "demo_config": {"samples_per_prompt": 4},
        "trainer_config": {"trainer": trainer, "lora_rank": 4, "batch_size": 2, "lr": 1e-4, "beta": 500},
        "training": {"steps": 10},
        "torch_threads": 1,
    }


def leaderboard_results(reward: str = "pickscore", dataset: str = "hpdv2") -> list[dict]:
    estimate = {"value": 0.7, "low": 0.6, "high": 0.8}
    return [
        {
            "reward": reward,
            "dataset": dataset,
            "protocol": "pairwise",
            "metrics": {"accuracy": estimate, "pairwise_accuracy": estimate},
            "settings": {"bootstrap": {"level": 0.95, "n_resamples": 100, "seed": 0}},
        }
    ]


def test_templates_are_package_data():
    root = importlib.resources.files("mmalign") / "templates"
    for name in ("toyworld_report.html.j2", "leaderboard.html.j2"):
        assert (root / name).is_file(), name


def test_toyworld_report_escapes_names():
    page = html_page(toyworld_report(trainer=SCRIPT))
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<td>overall</td><td>0.500</td><td>0.750</td>" in page and "+0.250" in page
    assert page.startswith("<!doctype html>") and page.endswith("</html>\n")


def test_leaderboard_escapes_reward_and_dataset_names():
    page = leaderboard_html(leaderboard_results(reward=SCRIPT, dataset="a&b"), title="board <1>")
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<th>a&amp;b</th>" in page and "<title>board &lt;1&gt;</title>" in page
    assert "<td>70.0 [60.0, 80.0]</td>" in page
