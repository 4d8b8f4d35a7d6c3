"""Benchmarks per modality: VideoGen-RewardBench (accuracy w/ and w/o ties), HPDv3 pairs and audio pairs, each
from tiny files in the released layout; the leaderboard's modality column."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import soundfile as sf

import mmalign
from mmalign.bench import protocols as P
from mmalign.bench.runner import load_benchmark
from mmalign.cli import main
from mmalign.errors import MMAlignError
from tests.modalities.tiny_media import make_clap_model, random_frames, sine, write_video


def run(argv) -> int:
    return main([str(a) for a in argv])


# ---------------------------------------------------------------- protocols, hand-computed


def test_videogen_without_ties_skips_human_ties_and_counts_exact_ties_wrong():
    # pairs: (1, .5) C; (-1, .2) D; (0, .1) human tie; (1, 0) D (an exact tie is wrong); (-1, -.3) C
    h, m = [1, -1, 0, 1, -1], [0.5, 0.2, 0.1, 0.0, -0.3]
    assert P.videogen_counts(h, m) == {"C": 2, "D": 2, "Th": 1, "Tm": 0, "Thm": 0}
    assert P.videogen_accuracy_without_ties(h, m) == pytest.approx(2 / 4)
    assert math.isnan(P.videogen_accuracy_without_ties([0, 0], [1.0, -1.0]))
    with pytest.raises(ValueError, match="human labels"):
        P.videogen_counts([2], [1.0])


def test_videogen_with_ties_is_the_best_prefix_of_the_gap_sorted_pairs():
    # sorted by |m|: (1, 0) (0, .1) (-1, .2) (-1, -.3) (1, .5); sign matches among them: the last two.
    # k = 1..5 predicted ties: (0 + 2)/5, (1 + 2)/5, (1 + 2)/5, (1 + 1)/5, (1 + 0)/5 -> 3/5 first at k = 2.
    h, m = [1, -1, 0, 1, -1], [0.5, 0.2, 0.1, 0.0, -0.3]
    assert P.videogen_tie_calibration(h, m) == pytest.approx((3 / 5, 0.1))
    assert P.videogen_counts(h, m, epsilon=0.1) == {"C": 2, "D": 1, "Th": 0, "Tm": 1, "Thm": 1}


def test_videogen_with_ties_reference_splits_equal_gaps_distinct_does_not():
    # equal |m|: the reference evaluates "first pair a tie, second not" (accuracy (1 + 1)/2), which no threshold
    # gives; "distinct" evaluates only |m| <= 0.2 (both ties: (1 + 0)/2).
    h, m = [0, 1], [0.2, 0.2]
    assert P.videogen_accuracy_with_ties(h, m) == pytest.approx(1.0)
    assert P.videogen_accuracy_with_ties(h, m, thresholds="distinct") == pytest.approx(0.5)


def test_hpdv3_pair_accuracy_counts_ties_wrong():
    assert P.hpdv3_outcomes([2.0, 1.0, 1.0], [1.0, 1.0, 3.0]).tolist() == [1.0, 0.0, 0.0]
    assert P.hpdv3_accuracy([2.0, 1.0, 1.0], [1.0, 1.0, 3.0]) == pytest.approx(1 / 3)


# ---------------------------------------------------------------- VideoGen-RewardBench layout

LABELS = [  # VQ, MQ, TA, Overall per pair
    ("A", "A", "B", "A"),
    ("B", "same", "B", "B"),
    ("same", "A", "A", "same"),
    ("A", "B", "A", "A"),
]


@pytest.fixture(scope="module")
def videogen(tmp_path_factory):
    """``videogen-rewardbench.csv`` beside ``videos/<model>/<model>_<n>.mkv`` (the released CSV's columns)."""
    root = tmp_path_factory.mktemp("videogen")
    rows = []
    for n, labels in enumerate(LABELS):
        paths = []
        for model in ("kling1.5", "minimax"):
            rel = f"videos/{model}/{model}_{n:05d}.mkv"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            write_video(root / rel, random_frames(4, 32, 32, seed=10 * n + len(paths)), fps=4)
            paths.append(rel)
        row = {"path_A": paths[0], "path_B": paths[1], "A_model": "kling1.5", "B_model": "minimax"}
        row.update(prompt=f"prompt {n % 2}", fps_A=4, num_frames_A=4, fps_B=4, num_frames_B=4)
        row.update(dict(zip(P.VIDEOGEN_DIMENSIONS, labels)))
        rows.append(row)
    with (root / "videogen-rewardbench.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_videogen_reader_keeps_every_dimension(videogen):
    bench = load_benchmark("videogen", videogen / "videogen-rewardbench.csv")
    assert bench.modality == "video" and len(bench.test) == 4 and not bench.skipped
    assert bench.test[1].meta["labels"] == {"VQ": -1, "MQ": 0, "TA": -1, "Overall": -1}
    assert bench.test[1].ranks == [2.0, 1.0] and bench.test[2].label == 0.5
    assert bench.test[0].images[0] == str(videogen / "videos/kling1.5/kling1.5_00000.mkv")


def test_videogen_scores_file_with_dimensions(videogen, tmp_path):
    """A VideoReward-style scores file (``dimensions`` per record): each dimension is judged by its own score."""
    bench = load_benchmark("videogen", videogen / "videogen-rewardbench.csv")
    rng = np.random.default_rng(0)
    records, dims = [], {}
    for group in bench.test:
        for path in group.images:
            d = {k: float(v) for k, v in zip(P.VIDEOGEN_DIMENSIONS, rng.normal(size=4))}
            d["MQ"] = 0.0  # every MQ difference is an exact tie
            dims[path] = d
            records.append({"path": path, "prompt": group.prompt, "reward": "videoreward", "score": d["Overall"]})
            records[-1]["dimensions"] = d
    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    argv = ["bench", "rewards", "--protocol", "videogen", "--data", videogen / "videogen-rewardbench.csv"]
    assert run([*argv, "--scores", scores, "--bootstrap", 20, "--out", out, "--no-progress"]) == 0
    result = json.loads(next(out.glob("videoreward.*.json")).read_text())
    assert result["modality"] == "video" and result["settings"]["dimension_scores"] == "per dimension"
    for dim in P.VIDEOGEN_DIMENSIONS:
        h = [g.meta["labels"][dim] for g in bench.test]
        m = [dims[g.images[0]][dim] - dims[g.images[1]][dim] for g in bench.test]
        prefix = "" if dim == "Overall" else f"{dim}_"
        metrics = result["metrics"]
        assert metrics[f"{prefix}accuracy"]["value"] == pytest.approx(P.videogen_accuracy_without_ties(h, m))
        assert metrics[f"{prefix}accuracy_with_ties"]["value"] == pytest.approx(P.videogen_accuracy_with_ties(h, m))
    assert result["metrics"]["MQ_accuracy"]["value"] == 0.0  # exact ties are wrong w/o ties


def test_videogen_with_an_image_reward_lifted_to_video(videogen, clip_folder, tmp_path):
    from mmalign.scoring import media_scorers

    out = tmp_path / "out"
    argv = ["bench", "rewards", "--protocol", "videogen", "--data", videogen / "videogen-rewardbench.csv"]
    argv += ["--reward", "pickscore", "--weights", clip_folder, "--processor", clip_folder]
    assert run([*argv, "--bootstrap", 0, "--out", out, "--no-progress"]) == 0
    result = json.loads((out / "pickscore.videogen-rewardbench.json").read_text())
    reward = mmalign.load_reward("pickscore", weights=str(clip_folder), processor=str(clip_folder))
    video = media_scorers(reward, ["video"])["video"]
    bench = load_benchmark("videogen", videogen / "videogen-rewardbench.csv")
    m = [float(np.subtract(*video.score(g.images, g.prompt).tolist())) for g in bench.test]
    h = [g.meta["labels"]["Overall"] for g in bench.test]
    assert result["metrics"]["accuracy"]["value"] == pytest.approx(P.videogen_accuracy_without_ties(h, m))
    assert result["settings"]["dimension_scores"].startswith("the reward's one score")


# ---------------------------------------------------------------- HPDv3 layout


def test_hpdv3_test_json_path1_is_preferred(tmp_path):
    rows, records = [], []
    scores = [(2.0, 1.0), (1.0, 1.0), (0.5, 3.0), (4.0, 0.0)]
    for n, (s1, s2) in enumerate(scores):
        row = {"prompt": f"p{n}", "path1": f"images/{n}_a.jpg", "path2": f"images/{n}_b.jpg", "confidence": 0.97}
        rows.append(row)
        records += [{"path": f"images/{n}_a.jpg", "prompt": f"p{n}", "reward": "hpsv3", "score": s1}]
        records += [{"path": f"images/{n}_b.jpg", "prompt": f"p{n}", "reward": "hpsv3", "score": s2}]
    (tmp_path / "test.json").write_text(json.dumps(rows))
    (tmp_path / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    argv = ["bench", "rewards", "--protocol", "hpdv3", "--data", tmp_path / "test.json"]
    assert run([*argv, "--scores", tmp_path / "scores.jsonl", "--bootstrap", 20, "--out", out, "--no-progress"]) == 0
    result = json.loads((out / "hpsv3.hpdv3_test.json").read_text())
    assert result["metrics"]["accuracy"]["value"] == pytest.approx(P.hpdv3_accuracy(*zip(*scores))) == 0.5
    assert result["metrics"]["pairwise_accuracy"]["value"] == pytest.approx(2.5 / 4)  # the tie is half there
    assert result["modality"] == "image" and result["counts"]["pairs"] == 4
    bench = load_benchmark("hpdv3", tmp_path / "test.json", check_files=False)
    assert bench.test[0].meta == {"confidence": 0.97}
    (tmp_path / "ranking.json").write_text(json.dumps([{"prompt": "p", "generations": ["a"], "ranking": [1]}]))
    with pytest.raises(MMAlignError, match="--protocol imagereward"):
        load_benchmark("hpdv3", tmp_path / "ranking.json")


# ---------------------------------------------------------------- audio pairs and the leaderboard


def test_audio_pairs_with_clap_and_the_modality_column(tmp_path, hpdv3_result):
    clap_dir = make_clap_model(tmp_path / "clap")
    lines = []
    for n, (good, bad) in enumerate([(440.0, 2000.0), (300.0, 5000.0), (880.0, 660.0)]):
        for name, freq in (("c", good), ("r", bad)):
            sf.write(tmp_path / f"{n}{name}.wav", sine(freq, 0.5, 48000)[0], 48000)
        lines.append({"prompt": f"a tone {n}", "chosen": f"{n}c.wav", "rejected": f"{n}r.wav"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "audio"
    argv = ["bench", "rewards", "--protocol", "pairs", "--data", tmp_path / "pairs.jsonl", "--reward", "clap"]
    assert run([*argv, "--weights", clap_dir, "--bootstrap", 0, "--out", out, "--no-progress"]) == 0
    result = json.loads((out / "clap.pairs.json").read_text())
    reward = mmalign.load_reward("clap", weights=str(clap_dir))
    chosen = [reward.score([str(tmp_path / x["chosen"])], x["prompt"]).item() for x in lines]
    rejected = [reward.score([str(tmp_path / x["rejected"])], x["prompt"]).item() for x in lines]
    assert result["modality"] == "audio"
    assert result["metrics"]["accuracy"]["value"] == pytest.approx(P.pairwise_accuracy(chosen, rejected))

    board = tmp_path / "board"
    assert run(["bench", "leaderboard", out, hpdv3_result, "--out", board]) == 0
    markdown = (board / "leaderboard.md").read_text()
    assert "| reward | pairs | hpdv3_test | modality |" in markdown
    assert "| clap | " in markdown and markdown.split("| clap | ")[1].split("\n")[0].endswith("| audio |")
    assert "| ECE (BT) | modality |" in markdown and "<th>modality</th>" in (board / "leaderboard.html").read_text()


@pytest.fixture
def hpdv3_result(tmp_path):
    """An older result file (no ``modality`` field): the leaderboard calls it image."""
    result = {
        "protocol": "hpdv3",
        "dataset": "hpdv3_test",
        "reward": "hpsv3",
        "metrics": {"accuracy": {"value": 0.7, "low": 0.6, "high": 0.8, "n": 10, "level": 0.95}},
        "counts": {"pairs": 10},
        "settings": {"bootstrap": {"n_resamples": 20, "seed": 0, "level": 0.95}},
    }
    path = tmp_path / "old" / "hpsv3.hpdv3_test.json"
    path.parent.mkdir()
    path.write_text(json.dumps(result))
    return path


def test_example_media_files_feed_the_readme_commands(tmp_path, monkeypatch, capsys):
    from mmalign.bench.examples import write_examples

    monkeypatch.chdir(tmp_path)
    paths = write_examples("examples", n_prompts=30)
    for protocol in ("videogen", "hpdv3"):
        argv = ["bench", "rewards", "--protocol", protocol, "--data", paths[protocol], "--scores"]
        assert run([*argv, paths["media_scores"], "--out", f"runs/{protocol}", "--bootstrap", 10, "--no-progress"]) == 0
    assert "| VQ w/o ties % | VQ w/ ties % |" in capsys.readouterr().out
    assert run(["bench", "leaderboard", "runs/videogen", "runs/hpdv3", "--out", "runs/board"]) == 0
    board = json.loads((tmp_path / "runs/board/leaderboard.json").read_text())
    expected = {("videogen-rewardbench", "video"), ("hpdv3_test", "image")}
    assert {(r["dataset"], r["modality"]) for r in board} == expected
    sharp = {r["dataset"]: r["metrics"]["accuracy"]["value"] for r in board if r["reward"] == "sharp"}
    randoms = {r["dataset"]: r["metrics"]["accuracy"]["value"] for r in board if r["reward"] == "random"}
    assert all(sharp[d] > randoms[d] for d in sharp)
