"""`mmalign bench` end to end on small files made here: a tiny PickScore-format reward, --scores files,
Pick-a-Pic parquet splits, leaderboards and generator rankings."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mmalign
from mmalign.bench import protocols as P
from mmalign.bench.runner import load_benchmark
from mmalign.cli import main
from tests import tiny

PROMPTS = ["a red cube", "two blue spheres", "a cat on a mat"]


@pytest.fixture(scope="module")
def hpd(tmp_path_factory):
    """HPDv2-style test.json (3 prompts x 3 images, one human tie) and ImageRewardDB JSON over the same images."""
    root = tmp_path_factory.mktemp("hpd")
    rows, ir_rows = [], []
    for p, prompt in enumerate(PROMPTS):
        names = []
        for i in range(3):
            name = f"{p}_{i}.png"
            tiny.random_image(10 * p + i, (64 + 16 * i, 64)).save(root / name)
            names.append(name)
        ranks = [1, 2, 2] if p == 0 else [3, 1, 2]
        rows.append({"prompt": prompt, "image_path": names, "rank": ranks})
        ir_rows.append({"id": str(p), "prompt": prompt, "generations": names, "ranking": ranks})
    (root / "test.json").write_text(json.dumps(rows))
    (root / "ir_test.json").write_text(json.dumps(ir_rows))
    return root


def run(argv, capsys=None) -> int:
    return main([str(a) for a in argv])


def test_bench_rewards_with_a_tiny_reward_equals_direct_protocol(hpd, clip_folder, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["bench", "rewards", "--protocol", "hpdv2", "--data", hpd / "test.json", "--reward", "pickscore"]
    argv += ["--weights", clip_folder, "--processor", clip_folder, "--batch-size", 4, "--bootstrap", 50]
    argv += ["--out", out, "--no-progress"]
    assert run(argv) == 0
    result = json.loads((out / "pickscore.hpdv2_test.json").read_text())
    reward = mmalign.load_reward("pickscore", weights=str(clip_folder), processor=str(clip_folder))
    rows = json.loads((hpd / "test.json").read_text())
    scores = [reward.score([str(hpd / n) for n in row["image_path"]], row["prompt"]).numpy() for row in rows]
    ranks = [row["rank"] for row in rows]
    accuracy = result["metrics"]["accuracy"]
    assert accuracy["value"] == pytest.approx(P.hpdv2_accuracy(scores, ranks))
    assert accuracy["low"] <= accuracy["value"] <= accuracy["high"]
    assert result["counts"] == {
        "groups": 3,
        "pairs": 9,
        "human_ties": 1,
        "images": 9,
        "validation_groups": 0,
        "skipped_rows": 0,
    }
    assert {"pairwise_accuracy", "ece", "spearman", "kendall"} <= set(result["metrics"])
    assert result["settings"]["logit_scale"] == 1.0 and result["settings"]["bootstrap"]["n_resamples"] == 50
    assert "| pickscore | hpdv2:test |" in (out / "results.md").read_text()
    assert "pickscore" in capsys.readouterr().out


def test_each_image_scored_once_and_prompt_cached(hpd, clip_folder):
    from mmalign.bench.runner import score_groups

    reward = mmalign.load_reward("pickscore", weights=str(clip_folder), processor=str(clip_folder))
    calls = {"images": 0, "texts": 0}
    encode_image, encode_text = reward._encode_image, reward._encode_text

    def counting_image(pixels):
        calls["images"] += pixels.shape[0]
        return encode_image(pixels)

    def counting_text(prompts):
        calls["texts"] += len(prompts)
        return encode_text(prompts)

    reward._encode_image, reward._encode_text = counting_image, counting_text
    bench = load_benchmark("imagereward", hpd / "ir_test.json")
    table = score_groups(reward, bench.test, batch_size=2)
    assert calls == {"images": 9, "texts": 3} and len(table) == 9


def write_scores(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bench_rewards_from_scores_file(hpd, tmp_path):
    # scores that order prompt 0 as 0 > 1 = 2 (human: 1 < 2 = 2), prompt 1 reversed, prompt 2 right but a tie
    values = {0: [3.0, 2.0, 1.0], 1: [3.0, 1.0, 2.0], 2: [1.0, 3.0, 1.0]}
    rows = []
    for p, prompt in enumerate(PROMPTS):
        for i in range(3):
            rows.append({"path": str(hpd / f"{p}_{i}.png"), "prompt": prompt, "reward": "fake", "score": values[p][i]})
    scores = write_scores(tmp_path / "scores.jsonl", rows)
    out = tmp_path / "ir"
    argv = ["bench", "rewards", "--protocol", "imagereward", "--data", hpd / "ir_test.json", "--scores", scores]
    assert run([*argv, "--out", out, "--bootstrap", 100, "--no-progress"]) == 0
    result = json.loads((out / "fake.imagereward_ir_test.json").read_text())
    ranks = [[1, 2, 2], [3, 1, 2], [3, 1, 2]]
    expected = P.imagereward_accuracy([values[p] for p in range(3)], ranks)
    assert result["metrics"]["accuracy"]["value"] == pytest.approx(expected)
    assert expected == pytest.approx(4 / 8)  # hand count: 2/2 (tie skipped) + 0/3 (reversed) + 2/3 (tie wrong)
    # the same scores under HPDv2's protocol: per prompt 1, 2/3 (one inversion), then index-broken tie
    out2 = tmp_path / "hpd"
    argv = ["bench", "rewards", "--protocol", "hpdv2", "--data", hpd / "test.json", "--scores", scores]
    assert run([*argv, "--out", out2, "--bootstrap", 0, "--no-progress"]) == 0
    result = json.loads((out2 / "fake.hpdv2_test.json").read_text())
    assert result["metrics"]["accuracy"]["value"] == pytest.approx(
        P.hpdv2_accuracy([values[p] for p in range(3)], ranks)
    )
    assert result["metrics"]["accuracy"]["low"] is None  # no bootstrap: no interval (strict JSON null)


def test_pairs_protocol_from_jsonl_and_missing_scores(hpd, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": PROMPTS[p], "chosen": str(hpd / f"{p}_0.png"), "rejected": str(hpd / f"{p}_1.png")})
            + "\n"
            for p in range(3)
        )
    )
    rows = [
        {"path": str(hpd / f"{p}_{i}.png"), "prompt": PROMPTS[p], "reward": "r", "score": s}
        for p, (a, b) in enumerate([(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)])
        for i, s in ((0, a), (1, b))
    ]
    scores = write_scores(tmp_path / "s.jsonl", rows)
    out = tmp_path / "pairs"
    assert (
        run(
            [
                "bench",
                "rewards",
                "--protocol",
                "pairs",
                "--data",
                pairs,
                "--scores",
                scores,
                "--out",
                out,
                "--bootstrap",
                20,
                "--no-progress",
            ]
        )
        == 0
    )
    result = json.loads(next(out.glob("r.*.json")).read_text())
    assert result["metrics"]["accuracy"]["value"] == pytest.approx(1.5 / 3)  # right, wrong, predicted tie 0.5
    assert "spearman" not in result["metrics"] and result["settings"]["bootstrap_unit"] == "pair"
    write_scores(scores, rows[:-1])
    assert run(["bench", "rewards", "--protocol", "pairs", "--data", pairs, "--scores", scores, "--no-progress"]) == 2
    assert "1 item(s) have no score" in capsys.readouterr().err


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    tiny.random_image(seed, (32, 32)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pickapic(path: Path, rows: list[tuple[str, str, str, float]]) -> None:
    """rows: (caption, uid_0, uid_1, label_0)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "caption": [r[0] for r in rows],
            "jpg_0": [png(i) for i in range(len(rows))],
            "jpg_1": [png(100 + i) for i in range(len(rows))],
            "label_0": [r[3] for r in rows],
            "label_1": [1.0 - r[3] for r in rows],
            "has_label": [True] * len(rows),
            "image_0_uid": [r[1] for r in rows],
            "image_1_uid": [r[2] for r in rows],
        }
    )
    pq.write_table(table, path)


def test_pickapic_threshold_on_validation_split(tmp_path):
    near, far = 2 * float(np.arctanh(0.45)), 2 * float(np.arctanh(0.85))  # score gaps giving |p1 - p0| = 0.45, 0.85
    folder = tmp_path / "pickapic"
    # validation: a tie seen at gap 0.45, two clear wins at gap 0.85 -> thresholds 0.5 ... 0.8 all perfect: 0.5
    write_pickapic(
        folder / "data" / "validation_unique-00000-of-00001.parquet",
        [("v1", "v1a", "v1b", 0.5), ("v2", "v2a", "v2b", 1.0), ("v3", "v3a", "v3b", 0.0)],
    )
    write_pickapic(
        folder / "data" / "test_unique-00000-of-00001.parquet",
        [("t1", "t1a", "t1b", 1.0), ("t2", "t2a", "t2b", 0.5), ("t3", "t3a", "t3b", 1.0)],
    )
    diffs = {"v1": near, "v2": far, "v3": -far, "t1": far, "t2": far, "t3": near}
    rows = []
    for caption, d in diffs.items():
        rows.append({"path": f"{caption}a", "prompt": caption, "reward": "pickscore", "score": 20.0 + d})
        rows.append({"path": f"{caption}b", "prompt": caption, "reward": "pickscore", "score": 20.0})
    scores = write_scores(tmp_path / "uid_scores.jsonl", rows)
    out = tmp_path / "out"
    assert (
        run(
            [
                "bench",
                "rewards",
                "--protocol",
                "pickapic",
                "--data",
                folder,
                "--scores",
                scores,
                "--out",
                out,
                "--bootstrap",
                50,
                "--no-progress",
            ]
        )
        == 0
    )
    result = json.loads(next(out.glob("pickscore.*.json")).read_text())
    assert result["settings"]["threshold"] == 0.5
    assert result["settings"]["validation"] == "split validation_unique"
    # test at t = 0.5: t1 right (1), t2 predicted win vs tie (0.5), t3 predicted tie vs win (0.5)
    assert result["metrics"]["accuracy"]["value"] == pytest.approx(2.0 / 3.0)
    assert "ece_fitted" in result["metrics"] and result["settings"]["fitted_logit_scale"] > 0
    # one parquet file, no splits: a seeded share of the prompts becomes the validation split
    single = load_benchmark("pickapic", folder / "data" / "test_unique-00000-of-00001.parquet", val_fraction=0.34)
    assert (len(single.validation), len(single.test)) == (1, 2) and "seed 0" in single.validation_source
    assert {g.prompt for g in single.validation}.isdisjoint(g.prompt for g in single.test)


def test_leaderboard_and_generators(hpd, tmp_path, capsys):
    rows = [
        {"path": str(hpd / f"{p}_{i}.png"), "prompt": PROMPTS[p], "reward": name, "score": s}
        for name, sign in (("good", 1.0), ("bad", -1.0))
        for p in range(3)
        for i, s in enumerate(sign * np.array([3.0, 2.0, 1.0] if p == 0 else [1.0, 3.0, 2.0]))  # = human order
    ]
    scores = write_scores(tmp_path / "two.jsonl", rows)
    for protocol, data in (("hpdv2", "test.json"), ("imagereward", "ir_test.json")):
        assert (
            run(
                [
                    "bench",
                    "rewards",
                    "--protocol",
                    protocol,
                    "--data",
                    hpd / data,
                    "--scores",
                    scores,
                    "--out",
                    tmp_path / protocol,
                    "--bootstrap",
                    20,
                    "--no-progress",
                ]
            )
            == 0
        )
    board = tmp_path / "board"
    assert run(["bench", "leaderboard", tmp_path / "hpdv2", tmp_path / "imagereward", "--out", board]) == 0
    for name in ("leaderboard.md", "leaderboard.html", "leaderboard.png", "leaderboard.json"):
        assert (board / name).stat().st_size > 0
    markdown = (board / "leaderboard.md").read_text()
    assert markdown.index("| good |") < markdown.index("| bad |")  # best first
    assert "hpdv2:test" in markdown and "imagereward:ir_test" in markdown
    assert "<table>" in (board / "leaderboard.html").read_text()

    # generators: votes (K-wise and pairwise) + reward scores of outputs/<generator>/<image>
    votes = tmp_path / "votes.jsonl"
    votes.write_text(
        "".join(
            json.dumps(v) + "\n"
            for v in [
                {"models": ["sdxl", "sd15", "flux"], "ranks": [2, 3, 1], "judge": "human"},
                {"model_a": "flux", "model_b": "sd15", "winner": "model_a", "judge": "gpt-4o"},
                {"model_a": "sdxl", "model_b": "sd15", "winner": "model_a"},
            ]
        )
    )
    gen_rows = []
    for g, quality in (("flux", 3.0), ("sdxl", 2.0), ("sd15", 1.0)):
        for p, prompt in enumerate(PROMPTS):
            gen_rows.append(
                {"path": f"outputs/{g}/{p}.png", "prompt": prompt, "reward": "hps", "score": quality + 0.1 * p}
            )
    gen_scores = write_scores(tmp_path / "gen_scores.jsonl", gen_rows)
    out = tmp_path / "gen"
    assert (
        run(
            [
                "bench",
                "generators",
                "--votes",
                votes,
                "--scores",
                gen_scores,
                "--out",
                out,
                "--bootstrap",
                20,
                "--no-progress",
            ]
        )
        == 0
    )
    report = json.loads((out / "generators.json").read_text())
    assert report["rankings"]["bt"] == ["flux", "sdxl", "sd15"] == report["rankings"]["kwise"]
    assert report["n_votes"] == 6 and report["judges"] == {"human": 1, "gpt-4o": 1, "unnamed": 1, "hps": 3}
    assert report["mean_reward"]["hps"]["flux"]["value"] == pytest.approx(3.1)
    assert (out / "win_rates.png").stat().st_size > 0 and "| 1 | flux |" in (out / "generators.md").read_text()
    capsys.readouterr()


def test_generators_scores_outputs_with_a_reward(tmp_path):
    from PIL import Image

    lines = []
    for g, noisy in (("noisy", True), ("flat", False)):
        for p in range(3):
            path = tmp_path / g / f"{p}.png"
            path.parent.mkdir(exist_ok=True)
            image = tiny.random_image(p, (64, 64)) if noisy else Image.new("RGB", (64, 64), (p, 0, 0))
            image.save(path)
            lines.append(json.dumps({"prompt": f"prompt {p}", "image": f"{g}/{p}.png"}))
    outputs = tmp_path / "outputs.jsonl"
    outputs.write_text("\n".join(lines) + "\n")
    out = tmp_path / "gen"
    assert (
        run(
            [
                "bench",
                "generators",
                "--outputs",
                outputs,
                "--reward",
                "jpeg-incompressibility",
                "--method",
                "bt",
                "--out",
                out,
                "--bootstrap",
                10,
                "--no-progress",
            ]
        )
        == 0
    )
    report = json.loads((out / "generators.json").read_text())
    assert report["rankings"] == {"bt": ["noisy", "flat"]}
    assert len((out / "scores.jsonl").read_text().splitlines()) == 6  # kept, so a rerun resumes


def test_cli_errors(tmp_path, capsys):
    assert run(["bench", "rewards", "--protocol", "pairs", "--data", tmp_path]) == 2
    assert "give --reward" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(["bench", "rewards", "--protocol", "pairs", "--data", tmp_path, "--weights", "w.pt"])
    assert "must follow the --reward" in capsys.readouterr().err


def test_example_files_feed_every_command(tmp_path, monkeypatch):
    from mmalign.bench.examples import write_examples

    monkeypatch.chdir(tmp_path)
    paths = write_examples("examples", n_prompts=30)
    for protocol in ("hpdv2", "imagereward", "pairs"):
        argv = ["bench", "rewards", "--protocol", protocol, "--data", paths[protocol]]
        argv += ["--scores", paths["reward_scores"], "--out", f"runs/{protocol}", "--bootstrap", 20, "--no-progress"]
        assert run(argv) == 0
    assert run(["bench", "leaderboard", "runs/hpdv2", "runs/imagereward", "runs/pairs", "--out", "runs/board"]) == 0
    board = json.loads(Path("runs/board/leaderboard.json").read_text())
    best = {
        r["dataset"]: max(board, key=lambda x: (x["dataset"] == r["dataset"], x["metrics"]["accuracy"]["value"]))
        for r in board
    }
    assert {r["reward"] for r in best.values()} == {"sharp"}
    argv = ["bench", "generators", "--votes", paths["votes"], "--scores", paths["generator_scores"]]
    assert run([*argv, "--out", "runs/gen", "--bootstrap", 10, "--no-progress"]) == 0
    report = json.loads(Path("runs/gen/generators.json").read_text())
    assert report["rankings"]["bt"][0] == "flux-dev" and report["rankings"]["bt"][-1] == "sd-1.5"


def test_generators_bt_prior_zero_is_the_mle(tmp_path):
    """A beats B 3 times out of 4: the MLE is p(A > B) = 3/4, so R_A - R_B = 400 log10(3); the default prior 0.1
    adds 0.05 wins to each side: 400 log10(3.05 / 1.05)."""
    votes = tmp_path / "votes.jsonl"
    battles = ["model_a"] * 3 + ["model_b"]
    votes.write_text("".join(json.dumps({"model_a": "A", "model_b": "B", "winner": w}) + "\n" for w in battles))
    gaps = {}
    for prior in ("0", None):
        out = tmp_path / f"prior_{prior}"
        argv = ["bench", "generators", "--votes", votes, "--method", "bt", "--bootstrap", 0, "--out", out]
        argv += ["--bt-prior", prior] if prior is not None else []
        assert run(argv + ["--no-progress"]) == 0
        report = json.loads((out / "generators.json").read_text())
        ratings = report["ratings"]["bt"]
        gaps[prior] = ratings["A"]["value"] - ratings["B"]["value"]
        assert report["settings"]["bt"]["prior"] == (0.0 if prior == "0" else 0.1)
    assert gaps["0"] == pytest.approx(400 * math.log10(3.0), abs=1e-6)
    assert gaps[None] == pytest.approx(400 * math.log10(3.05 / 1.05), abs=1e-6)
